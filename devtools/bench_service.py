"""`mml bench` figures of the recall service: POST /recall latency and throughput over loopback.

Setup: `mml serve` over an ML-1M bundle (in-process store; min(2, CPUs) uvicorn workers, each
request on one core); the load generator (devtools/load.py) in its own process sends open-loop
traffic (request i is due at t0 + i / rate, so a slow server cannot slow the load down). Each
request asks k=100. Workload: the product's traffic, the cold-start split's new users (their
support and validation items, 9 items, oldest first, from the data folder named in the bundle's
manifest); without that folder, histories of 1..max_len catalogue items drawn by popularity.

Side by side: with `MML_BENCH_BASELINE=<git ref>` (or context["baseline"]) every HTTP figure is also
measured on a worktree of that ref, in the same run, written with a `baseline_` prefix.

Figures (per version of the code):
  recall_p50_ms, recall_p99_ms   server-side time (the `app` entry of Server-Timing) at 200 req/s, 15 s
  recall_p50_ms_k_logged_0       the same with MML_EXPOSURE_K_LOGGED=0 (exposures without item ids):
                                 the cost of logging them is recall_p50_ms minus this
  recall_long_p50_ms, recall_long_p99_ms  200 req/s with 1..max_len-item histories
  recall_client_p99_ms           the steady run seen by the client (due time -> full response)
  recall_server_cpu_ms_per_request  server CPU (all workers, /proc) per answered request
  recall_max_rps_p99_20ms        the highest rate of a ramp (5 s a step) with client p99 <= 20 ms,
                                 zero errors and the rate delivered
  recall_rps_one_worker_p99_10ms the same for one worker, 4 connections, 1..10-item histories,
                                 client p99 <= 10 ms
  recall_max_ms_during_burst, recall_p99_ms_during_burst  server-side /recall time while one
                                 worker of two (over one Redis) takes 100 PUT /items in a burst
  recall_exposure_items_us       in process: the request-path cost of the exposure's item ids
                                 (runner k_logged 100 minus 0, interleaved, median); *_writer_us the
                                 writer thread's extra JSON encoding per record
  recall_adapt{N}_p50_ms         the mml chain's stages alone (no HTTP), N = 0 (ONNX Runtime) and
                                 N = 1, 2, 5 meta-test warm-up steps (torch; skipped without it)
Targets (mml/bench.py): p50 <= 1.5 ms, p99 <= 5 ms, >= 500 req/s, >= 1000 req/s on one worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from devtools.harness import Server, cpu_seconds
from devtools.load import CONNECTIONS, run_client

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
ONE_WORKER_RATES = (400.0, 600.0, 800.0, 1000.0, 1200.0, 1400.0, 1600.0)
ONE_WORKER_P99_MS = 10.0
ONE_WORKER_CONNECTIONS = 4  # the setting: one worker, 4 connections, 1..10-item histories


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


ADAPT_STEPS = (1, 2, 5)
ADAPT_REQUESTS = 20


def _adapt_latency(bundle: Path, bodies: list[str]) -> dict:
    """Median time of the mml chain's stages (no HTTP, no runner) per adapt_steps value; torch only
    for N > 0."""
    from threadpoolctl import threadpool_limits

    from service.items import ItemRegistry
    from service.recall import mml_chain, run_chain
    from service.runtime import Runtime
    from service.schemas import RecallRequest
    from service.snapshot import BundleState
    from service.store import MemoryStore
    from service.topk import TopKConfig

    threadpool_limits(limits=1)
    store = MemoryStore()
    runtime = Runtime.load(bundle)
    snapshot = BundleState(runtime, ItemRegistry(store, 0), TopKConfig()).next_snapshot(None)
    requests = [
        RecallRequest(user_id="bench", history=json.loads(b)["history"]) for b in bodies[:ADAPT_REQUESTS]
    ]
    chains = {0: mml_chain(store)}
    try:
        from service.adapt import AdaptingModel

        chains.update({n: mml_chain(store, AdaptingModel(runtime, n)) for n in ADAPT_STEPS})
    except ModuleNotFoundError:
        print("service bench: no torch: adapt_steps > 0 not measured", file=sys.stderr)

    out = {}
    for steps, chain in chains.items():
        run_chain(chain, snapshot, requests[0])  # first call: allocations, lazy init
        times = []
        for request in requests:
            start = time.perf_counter()
            run_chain(chain, snapshot, request)
            times.append(time.perf_counter() - start)
        out[f"recall_adapt{steps}_p50_ms"] = round(float(np.median(times)) * 1000, 3)
    return out


EXPOSURE_ROUNDS = 3000


def _exposure_cost(bundle: Path, bodies: list[str]) -> dict:
    """What carrying the answer's item ids in the exposure record costs, in process (no HTTP, no
    load generator: on a shared machine the HTTP figures cannot resolve 0.1 ms). The same requests
    through two runners over one deployment, k_logged 100 and 0, interleaved; the median difference
    per request on the request path, and per record in the writer thread (JSON encoding)."""
    from threadpoolctl import threadpool_limits

    from service.ab import exposure_record
    from service.config import load_settings
    from service.handlers import RecallService
    from service.recall import RecallRunner
    from service.schemas import RecallRequest

    threadpool_limits(limits=1)
    with tempfile.TemporaryDirectory(prefix="mml-exposure-") as tmp:
        settings = load_settings(bundle=bundle, exposure_log=Path(tmp) / "exposures.jsonl")
        service = RecallService(settings)
        service.lifecycle.load()
        try:
            runners = {
                k: RecallRunner(settings.model_copy(update={"exposure_k_logged": k}), service.exposures)
                for k in (0, 100)
            }
            requests = [RecallRequest.model_validate_json(b) for b in bodies[:200]]
            times: dict[int, list[float]] = {0: [], 100: []}
            deployment = service.deployment
            for n in range(EXPOSURE_ROUNDS):
                request = requests[n % len(requests)]
                for k in (0, 100) if n % 2 else (100, 0):
                    start = time.perf_counter()
                    runners[k].run(deployment, request, None, None)
                    times[k].append(time.perf_counter() - start)
        finally:
            service.close()
    ids = [str(i) for i in range(1000, 1100)]
    records = {k: exposure_record("r" * 32, "user-1", "mml", "v", False, ids[:k]) for k in (0, 100)}
    writer = {}
    for k, record in records.items():
        start = time.perf_counter()
        for _ in range(2000):
            json.dumps(record, separators=(",", ":"))
        writer[k] = (time.perf_counter() - start) / 2000
    return {
        "recall_runner_p50_us_k_logged_100": round(float(np.median(times[100])) * 1e6, 1),
        "recall_runner_p50_us_k_logged_0": round(float(np.median(times[0])) * 1e6, 1),
        "recall_exposure_items_us": round(float(np.median(times[100]) - np.median(times[0])) * 1e6, 1),
        "recall_exposure_items_writer_us": round((writer[100] - writer[0]) * 1e6, 1),
        "recall_exposure_record_bytes": float(len(json.dumps(records[100], separators=(",", ":"))) + 1),
    }


def _short_bodies(bundle: Path, count: int, seed: int = 1) -> list[str]:
    """1..10-item histories drawn by popularity (the one-worker throughput workload)."""
    bodies = []
    for body in _bodies(bundle, count * 3, seed):
        parsed = json.loads(body)
        if len(parsed["history"]) <= 10:
            bodies.append(body)
    rng = np.random.default_rng(seed)
    return [
        json.dumps({**json.loads(b), "history": json.loads(b)["history"][: int(rng.integers(1, 11))]})
        for b in (bodies or _bodies(bundle, count, seed))[:count]
    ]


def _ramp(port: int, bodies: list[str], rates, limit_ms: float, connections: int) -> tuple[float, dict]:
    """The highest rate whose client p99 (from each request's due time) is <= limit_ms with zero
    errors and >= 95 % of the rate delivered; stops at the first step that misses."""
    best, steps = 0.0, {}
    for rate in rates:
        r = run_client(port, bodies, rate, RAMP_SECONDS, connections)
        p99 = float(np.percentile(r["client_ms"], 99)) if r["client_ms"] else float("inf")
        delivered = r["answered"] / r["seconds"]
        steps[rate] = (p99, r["errors"], delivered)
        if p99 > limit_ms or r["errors"] or delivered < 0.95 * rate:
            break
        best = rate
    return best, steps


BURST_ITEMS = 100  # registrations in one burst (the stall measurement)
TOKEN = "bench-token"


def _register_burst(url: str, count: int) -> float:
    """PUT /items `count` text-only new items as fast as one client can; seconds it took."""
    import httpx

    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        for n in range(count):
            r = client.put(f"/items/bench-new-{n}", json={"title": f"Bench item {n}", "genres": ["Drama"]})
            r.raise_for_status()
    return time.perf_counter() - start


def _stall(bundle: Path, code: Path, bodies: list[str], workers: int, tmp: Path) -> dict:
    """The longest server-side /recall time while one worker registers BURST_ITEMS new items:
    `workers` workers over one redis-server of their own, steady traffic at STEADY_RATE, the burst
    sent through its own connection (whichever worker takes it) a second into the run."""
    import threading

    from devtools.harness import RedisServer

    env = {"PYTHONPATH": str(code)}
    with RedisServer() as redis, Server(bundle, tmp / "stall", workers=workers, env=env, cwd=code,
                                        token=TOKEN, redis_url=redis.url) as server:  # fmt: skip
        run_client(server.port, bodies[:200], 100.0, 2.0)
        took: list[float] = []

        def burst() -> None:
            time.sleep(1.0)
            took.append(_register_burst(server.url, BURST_ITEMS))

        thread = threading.Thread(target=burst)
        thread.start()
        during = run_client(server.port, bodies, STEADY_RATE, STEADY_SECONDS)
        thread.join()
    server_ms = np.asarray(during["server_ms"])
    return {
        "recall_max_ms_during_burst": round(float(server_ms.max()), 3),
        "recall_p99_ms_during_burst": round(float(np.percentile(server_ms, 99)), 3),
        "recall_burst_seconds": round(took[0], 2) if took else float("nan"),
        "recall_burst_errors": float(during["errors"]),
    }


def _measure(
    bundle: Path, code: Path, bodies: list[str], long_bodies: list[str], short: list[str], workers: int
) -> dict:
    """Every HTTP figure of one version of the code (`code`: a checkout of the repository)."""
    env = {"PYTHONPATH": str(code)}  # this checkout's packages before the installed ones
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="mml-bench-") as tmp:
        # exposures without item ids (the records of the code before they carried them): the cost
        # of logging them is the difference with recall_p50_ms, measured in the same run
        with Server(bundle, Path(tmp) / "bare", workers=workers, env={**env, "MML_EXPOSURE_K_LOGGED": "0"},
                    cwd=code) as server:  # fmt: skip
            run_client(server.port, bodies[:200], 100.0, 2.0)
            bare = run_client(server.port, bodies, STEADY_RATE, STEADY_SECONDS)
        figures["recall_p50_ms_k_logged_0"] = round(float(np.percentile(bare["server_ms"], 50)), 3)
        figures.update(_stall(bundle, code, bodies, workers, Path(tmp)))
        with Server(bundle, Path(tmp) / "multi", workers=workers, env=env, cwd=code) as server:
            run_client(server.port, bodies[:200], 100.0, 2.0)  # warm connections and caches
            cpu_before = cpu_seconds(server.process.pid)
            steady = run_client(server.port, bodies, STEADY_RATE, STEADY_SECONDS)
            cpu_ms = (cpu_seconds(server.process.pid) - cpu_before) * 1000 / max(steady["answered"], 1)
            long = run_client(server.port, long_bodies, STEADY_RATE, STEADY_SECONDS)
            best, ramp = _ramp(server.port, bodies, RAMP_RATES, P99_LIMIT_MS, CONNECTIONS)
        with Server(bundle, Path(tmp) / "one", workers=1, env=env, cwd=code) as server:
            run_client(server.port, short[:200], 100.0, 2.0, ONE_WORKER_CONNECTIONS)
            one, one_ramp = _ramp(
                server.port, short, ONE_WORKER_RATES, ONE_WORKER_P99_MS, ONE_WORKER_CONNECTIONS
            )
    for name, steps in (("ramp", ramp), ("one worker", one_ramp)):
        for rate, (p99, errors, delivered) in steps.items():
            print(f"  {code.name} {name} {rate:6.0f} req/s: client p99 {p99:7.2f} ms, errors {errors}, "
                  f"delivered {delivered:.0f}/s", file=sys.stderr)  # fmt: skip
    server_ms, long_ms = np.asarray(steady["server_ms"]), np.asarray(long["server_ms"])
    figures.update(
        {
            "recall_p50_ms": round(float(np.percentile(server_ms, 50)), 3),
            "recall_p99_ms": round(float(np.percentile(server_ms, 99)), 3),
            "recall_max_ms": round(float(server_ms.max()), 3),  # compare recall_max_ms_during_burst
            "recall_long_p50_ms": round(float(np.percentile(long_ms, 50)), 3),
            "recall_long_p99_ms": round(float(np.percentile(long_ms, 99)), 3),
            "recall_client_p99_ms": round(float(np.percentile(steady["client_ms"], 99)), 3),
            "recall_steady_errors": float(steady["errors"]),
            "recall_max_rps_p99_20ms": best,
            "recall_rps_one_worker_p99_10ms": one,
            "recall_server_cpu_ms_per_request": round(cpu_ms, 3),
        }
    )
    return figures


def _checkout(ref: str, into: Path) -> Path:
    """A detached worktree of `ref` (the baseline of a side-by-side run)."""
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(into), ref], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    return into


def run(context: dict | None = None) -> dict:
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
    short = _short_bodies(bundle, 2000)
    workload = "new users (support + validation items)" if bodies is not long_bodies else "popularity mix"
    load_average = os.getloadavg()[0]  # other work on the machine: latency figures depend on it
    workers = int(context.get("service_workers") or min(2, os.cpu_count() or 1))
    baseline = context.get("baseline") or os.environ.get("MML_BENCH_BASELINE")
    out = {}
    if baseline:  # the same measurements on another version of the code, in the same run
        with tempfile.TemporaryDirectory(prefix="mml-baseline-") as tmp:
            code = _checkout(baseline, Path(tmp) / "baseline")
            try:
                before = _measure(bundle, code, bodies, long_bodies, short, workers)
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(code)], cwd=REPO, check=False)
        rev = subprocess.run(
            ["git", "rev-parse", "--short", baseline], cwd=REPO, capture_output=True, text=True
        )
        out["recall_baseline_ref"] = f"{baseline} ({rev.stdout.strip()})"
        out.update({f"baseline_{k}": v for k, v in before.items()})
    out.update(_measure(bundle, REPO, bodies, long_bodies, short, workers))
    if baseline:
        out["recall_p50_ms_minus_baseline"] = round(out["recall_p50_ms"] - out["baseline_recall_p50_ms"], 3)
    return {
        **out,
        "recall_workload": workload,
        "recall_bench_workers": float(workers),
        "recall_bench_load_average": round(load_average, 2),
        **_adapt_latency(bundle, long_bodies),
        **_exposure_cost(bundle, bodies),
    }


if __name__ == "__main__":
    print(json.dumps(run({"bundle": sys.argv[1]} if len(sys.argv) > 1 else {}), indent=2))
