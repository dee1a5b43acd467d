"""`mml bench` figures of the recall service: POST /recall latency and throughput over loopback.

Setup: `mml serve` over an ML-1M bundle (in-process store; min(2, CPUs) uvicorn workers, each
request on one core); one load-generator process (asyncio, raw HTTP/1.1 keep-alive connections) sending
open-loop traffic: request i is due at t0 + i / rate whatever the earlier answers did, so a slow
server cannot slow the load down (no coordinated omission). Each request asks k=100. Workload: the
product's traffic, the cold-start split's new users (their support and validation items, 9 items,
oldest first, from the data folder named in the bundle's manifest); without that folder, histories
of 1..max_len catalogue items drawn by popularity. A second steady run with the 1..max_len
popularity mix measures long histories (the model's cost grows with the history's length).

Figures:
  recall_p50_ms, recall_p99_ms   server-side time (the `app` entry of the Server-Timing header: request
                                 reaching the app -> response start) at 200 requests/s for 15 s;
  recall_workload                which histories the headline figures used (new users / popularity mix);
  recall_long_p50_ms, recall_long_p99_ms  the same at 200 requests/s with 1..max_len-item histories;
  recall_client_p99_ms           the same run seen by the client (due time -> full response);
  recall_server_cpu_ms_per_request  server CPU time (all workers, /proc) per answered request in
                                 that run: the capacity per core is 1000 / this, whatever else runs
                                 on the machine (latency figures are not: read them with the load);
  recall_max_rps_p99_20ms        the highest rate of a ramp (5 s per step) whose client-side p99,
                                 counted from each request's due time, is <= 20 ms with zero
                                 errors and the rate actually delivered.
  recall_adapt{N}_p50_ms          the pipeline alone (no HTTP), k=100, with N = 0 (ONNX Runtime) and
                                 N = 1, 2, 5 meta-test warm-up steps per request (torch; skipped
                                 without it): the adapt_steps latency trade-off (docs/service.md).
Targets (mml/bench.py): p50 <= 3 ms, p99 <= 10 ms, >= 500 requests/s.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE_CANDIDATES = (  # `make export`'s bundle, then the service tests' export of the quick-trained run
    REPO / "artifacts" / "bundles" / "quick",
    REPO / ".cache" / "test-artifacts" / "service-bundles" / "trained",
)
STEADY_RATE = 200.0
STEADY_SECONDS = 15.0
RAMP_RATES = (300.0, 500.0, 700.0, 900.0, 1200.0, 1500.0, 2000.0)
RAMP_SECONDS = 5.0
P99_LIMIT_MS = 20.0
CONNECTIONS = 64  # the client's keep-alive connections (in flight at most)


# --- the load generator (runs in its own process) -------------------------------------------------


async def _load(port: int, bodies: list[bytes], rate: float, seconds: float) -> dict:
    n = int(rate * seconds)
    client_ms = np.full(n, np.nan)
    server_ms = np.full(n, np.nan)
    statuses = np.zeros(n, np.int32)
    counter = iter(range(n))
    t0 = time.perf_counter() + 0.05

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                due = t0 + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = bodies[i % len(bodies)]
                writer.write(
                    b"POST /recall HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                statuses[i] = int(lines[0].split()[1])
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "server-timing":
                        for entry in value.split(","):
                            key, _, dur = entry.strip().partition(";dur=")
                            if key == "app":
                                server_ms[i] = float(dur)
                await reader.readexactly(length)
                client_ms[i] = (time.perf_counter() - due) * 1000
        finally:
            writer.close()

    start = time.perf_counter()
    results = await asyncio.gather(*(connection() for _ in range(CONNECTIONS)), return_exceptions=True)
    elapsed = time.perf_counter() - start
    failures = [r for r in results if isinstance(r, BaseException)]
    done = ~np.isnan(client_ms)
    return {
        "sent": n,
        "answered": int(done.sum()),
        "errors": int((statuses[done] != 200).sum()) + (n - int(done.sum())),
        "connection_failures": len(failures),
        "seconds": elapsed,
        "client_ms": client_ms[done].tolist(),
        "server_ms": server_ms[done & ~np.isnan(server_ms)].tolist(),
    }


def _client_main() -> None:
    """Entry of the load-generator process: JSON job on stdin, JSON results on stdout."""
    job = json.loads(sys.stdin.read())
    bodies = [b.encode() for b in job["bodies"]]
    out = asyncio.run(_load(job["port"], bodies, job["rate"], job["seconds"]))
    sys.stdout.write(json.dumps(out))


def _run_client(port: int, bodies: list[str], rate: float, seconds: float) -> dict:
    job = json.dumps({"port": port, "bodies": bodies, "rate": rate, "seconds": seconds})
    proc = subprocess.run(
        [sys.executable, "-c", "from service.bench import _client_main; _client_main()"],
        input=job,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


# --- the benchmark --------------------------------------------------------------------------------


def _bodies(bundle: Path, count: int, seed: int = 0) -> list[str]:
    from mml.bundle import read_manifest

    manifest = read_manifest(bundle)
    with np.load(bundle / "tables" / "items.npz", allow_pickle=False) as npz:
        item_ids = npz["item_id"].astype(str)
        popularity = npz["popularity"].astype(np.float64)
    rng = np.random.default_rng(seed)
    p = popularity[1:] + 1.0
    p /= p.sum()
    bodies = []
    for i in range(count):
        length = int(rng.integers(1, manifest.dims.max_len + 1))
        rows = rng.choice(len(p), size=length, replace=False, p=p) + 1
        body = {"user_id": f"bench-{i}", "history": item_ids[rows].tolist(), "k": 100}
        bodies.append(json.dumps(body))
    return bodies


def _new_user_bodies(bundle: Path) -> list[str] | None:
    """The split's new users as /recall bodies (support + validation items, oldest first), or None
    when the bundle's data folder is not on this machine."""
    import pandas as pd

    from mml.bundle import read_manifest

    data_dir = Path(read_manifest(bundle).dataset.get("data_dir") or "")
    users_file, items_file = data_dir / "new_users.parquet", data_dir / "items.parquet"
    if not (users_file.is_file() and items_file.is_file()):
        return None
    items = pd.read_parquet(items_file, columns=["item_idx", "item_id"])
    id_of = dict(zip(items["item_idx"].tolist(), items["item_id"].astype(str).tolist(), strict=True))
    users = pd.read_parquet(users_file, columns=["user_id", "pos", "item_idx", "role"])
    users = users[users["role"].isin(["support", "valid"])].sort_values(["user_id", "pos"])
    return [
        json.dumps({"user_id": f"bench-{user}", "history": [id_of[i] for i in group["item_idx"]], "k": 100})
        for user, group in users.groupby("user_id", sort=True)
    ]


def _find_bundle(context: dict) -> Path | None:
    given = context.get("bundle") or os.environ.get("MML_BENCH_BUNDLE")
    if given:
        return Path(given)
    return next((p for p in BUNDLE_CANDIDATES if (p / "manifest.json").is_file()), None)


def _start_server(bundle: Path, port: int, log_dir: Path, workers: int) -> subprocess.Popen:
    from service.testing import serve_process

    return serve_process(
        bundle,
        port,
        *("--host", "127.0.0.1", "--workers", str(workers), "--log-level", "warning"),
        env={"MML_EXPOSURE_LOG": str(log_dir / "exposures.jsonl")},
        cwd=REPO,
        stderr=open(log_dir / "server.log", "w"),  # noqa: SIM115 (closed with the process)
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (the uvicorn workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


ADAPT_STEPS = (1, 2, 5)
ADAPT_REQUESTS = 20


def _adapt_latency(bundle: Path, bodies: list[str]) -> dict:
    """Median pipeline time (no HTTP) per adapt_steps value; torch only for N > 0."""
    from threadpoolctl import threadpool_limits

    from service.items import ItemRegistry, NewItemTable
    from service.pipeline import RecallPipeline
    from service.runtime import Runtime
    from service.store import MemoryStore

    threadpool_limits(limits=1)
    runtime = Runtime.load(bundle)
    table = NewItemTable(runtime, ItemRegistry(MemoryStore(), 0))
    histories = [json.loads(b)["history"] for b in bodies[:ADAPT_REQUESTS]]
    pipelines = {0: RecallPipeline(runtime, table)}
    try:
        from service.adapt import AdaptingPipeline

        pipelines.update({n: AdaptingPipeline(runtime, table, n) for n in ADAPT_STEPS})
    except ModuleNotFoundError:
        print("service bench: no torch: adapt_steps > 0 not measured", file=sys.stderr)
    out = {}
    for steps, pipeline in pipelines.items():
        pipeline(histories[0], 100)  # first call: allocations, lazy init
        times = []
        for history in histories:
            start = time.perf_counter()
            pipeline(history, 100)
            times.append(time.perf_counter() - start)
        out[f"recall_adapt{steps}_p50_ms"] = round(float(np.median(times)) * 1000, 3)
    return out


def run(context: dict | None = None) -> dict:
    from service.testing import free_port, wait_ready

    context = context or {}
    bundle = _find_bundle(context)
    if bundle is None:
        print(
            "service bench: no ML-1M bundle (give context['bundle'] or MML_BENCH_BUNDLE, or build "
            f"one of {[str(p) for p in BUNDLE_CANDIDATES]}): skipped",
            file=sys.stderr,
        )
        return {}
    long_bodies = _bodies(bundle, 2000)
    bodies = _new_user_bodies(bundle) or long_bodies
    workload = "new users (support + validation items)" if bodies is not long_bodies else "popularity mix"
    load_average = os.getloadavg()[0]  # other work on the machine: latency figures depend on it
    port = free_port()
    workers = int(context.get("service_workers") or min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="mml-bench-") as tmp:
        server = _start_server(bundle, port, Path(tmp), workers)
        try:
            wait_ready(f"http://127.0.0.1:{port}", server)
            _run_client(port, bodies[:200], 100.0, 2.0)  # warm connections and caches
            cpu_before = _cpu_seconds(server.pid)
            steady = _run_client(port, bodies, STEADY_RATE, STEADY_SECONDS)
            cpu_ms = (_cpu_seconds(server.pid) - cpu_before) * 1000 / max(steady["answered"], 1)
            long = _run_client(port, long_bodies, STEADY_RATE, STEADY_SECONDS)
            best = 0.0
            ramp = {}
            for rate in RAMP_RATES:
                r = _run_client(port, bodies, rate, RAMP_SECONDS)
                p99 = float(np.percentile(r["client_ms"], 99)) if r["client_ms"] else float("inf")
                delivered = r["answered"] / r["seconds"]
                ramp[rate] = (p99, r["errors"], delivered)
                if p99 > P99_LIMIT_MS or r["errors"] or delivered < 0.95 * rate:
                    break
                best = rate
        finally:
            server.terminate()
            server.wait(timeout=30)
    adapt = _adapt_latency(bundle, long_bodies)
    server_ms = np.asarray(steady["server_ms"])
    long_ms = np.asarray(long["server_ms"])
    for rate, (p99, errors, delivered) in ramp.items():
        print(
            f"  {rate:6.0f} req/s: client p99 {p99:7.2f} ms, errors {errors}, delivered {delivered:.0f}/s",
            file=sys.stderr,
        )
    return {
        "recall_p50_ms": round(float(np.percentile(server_ms, 50)), 3),
        "recall_p99_ms": round(float(np.percentile(server_ms, 99)), 3),
        "recall_workload": workload,
        "recall_long_p50_ms": round(float(np.percentile(long_ms, 50)), 3),
        "recall_long_p99_ms": round(float(np.percentile(long_ms, 99)), 3),
        "recall_client_p99_ms": round(float(np.percentile(steady["client_ms"], 99)), 3),
        "recall_steady_errors": float(steady["errors"]),
        "recall_max_rps_p99_20ms": best,
        "recall_bench_workers": float(workers),
        "recall_bench_load_average": round(load_average, 2),
        "recall_server_cpu_ms_per_request": round(cpu_ms, 3),
        **adapt,
    }


if __name__ == "__main__":
    print(json.dumps(run({"bundle": sys.argv[1]} if len(sys.argv) > 1 else {}), indent=2))
