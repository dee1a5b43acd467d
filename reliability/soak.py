"""Soak: `mml serve --workers 2` with Redis, a steady request rate for minutes, and every worker's
resident memory (RSS) and open file descriptors sampled from /proc over time.

    python -m reliability.soak [--seconds 600] [--rate 50] [--workers 2] [--out docs/results/reliability.json]

Traffic: the harness mix (POST /recall with a history, /recall from the stored history, POST
/events for a bounded pool of users), plus every ITEM_EVERY_S an admin PUT /items that re-registers
one of ITEM_IDS with a title cycling through ITEM_TITLES (new revisions: embeddings regenerated,
old ones dropped), so the new-item path runs all along with a bounded set of items.

Warm-up: WARMUP_REGISTRATIONS registrations before the load (each worker loads the encoders on its
first one), then the first WARMUP_SHARE of the run (at least WARMUP_MIN_S). Bounds (checked; exit
status 1 when one is broken), from the end of the warm-up to the end:

* RSS growth of each worker <= RSS_GROWTH_MAX_MIB;
* open fds of each worker <= their count after warm-up + FD_GROWTH_MAX (and never more);
* no failed request (a 503 of POST /events or PUT /items while Redis is unreachable is the
  documented answer, counted apart), no worker restarted (pids unchanged), no traceback in the
  server log, the admin token nowhere in it.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx

from reliability.harness import (
    RESULTS,
    WORK,
    Load,
    RedisServer,
    Server,
    machine,
    proc_sample,
    summarise,
    test_bundles,
    update_results,
)

RSS_GROWTH_MAX_MIB = 64.0  # per worker, end of warm-up -> end (a 10-minute run)
FD_GROWTH_MAX = 8  # per worker: sockets to Redis and clients come and go; a leak keeps climbing
WARMUP_SHARE = 0.1
WARMUP_MIN_S = 5.0
ITEM_EVERY_S = 5.0
# A worker loads the bundle's encoders (ONNX, ~130 MiB) on its first PUT /items: a one-time step,
# not growth. Before the load, this many registrations go out over fresh connections, so that every
# worker gets one (each connection lands on a random worker: all of 2 are missed with p = 2**-15).
WARMUP_REGISTRATIONS = 16
ITEM_IDS = tuple(f"soak-new-{i}" for i in range(5))
ITEM_TITLES = ("Soak Test One", "Soak Test Two", "Soak Test Three")
MIB = 1024 * 1024


def _slope_mib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    cov = sum((t - mt) * (r - mr) for t, r in points)
    return round(cov / var / MIB * 60, 3) if var else 0.0


def run(seconds: float, rate: float, workers: int, sample_every: float, bundle: Path | None = None) -> dict:
    bundle = bundle or test_bundles()[0]
    workdir = WORK / "soak"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    token = secrets.token_urlsafe(24)
    warmup = max(WARMUP_MIN_S, WARMUP_SHARE * seconds)
    samples, registrations = [], []
    machine_before = machine()
    with RedisServer() as redis:
        server = Server(bundle, workdir / "server", token=token, redis_url=redis.url, workers=workers)
        with server:
            pids = server.worker_pids()
            if len(pids) != workers:
                raise RuntimeError(f"expected {workers} worker processes, found {pids}")
            stop = threading.Event()

            def register_items() -> None:
                with httpx.Client(base_url=server.url, timeout=60) as admin:
                    n = 0
                    while not stop.wait(ITEM_EVERY_S):
                        item = ITEM_IDS[n % len(ITEM_IDS)]
                        title = ITEM_TITLES[(n // len(ITEM_IDS)) % len(ITEM_TITLES)]
                        r = admin.put(
                            f"/items/{item}",
                            json={"title": title, "year": 2024, "genres": ["Drama"]},
                            headers={"Authorization": f"Bearer {token}"},
                        )
                        registrations.append(r.status_code)
                        n += 1

            for n in range(WARMUP_REGISTRATIONS):  # httpx.put: a new connection each time
                r = httpx.put(
                    f"{server.url}/items/{ITEM_IDS[n % len(ITEM_IDS)]}",
                    json={"title": ITEM_TITLES[0], "year": 2024, "genres": ["Drama"]},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=60,
                )
                registrations.append(r.status_code)
            registrar = threading.Thread(target=register_items, daemon=True)
            with Load(server.url, rate, duration_s=seconds, threads=4, seed=11) as load:
                registrar.start()
                next_sample = 0.0
                while (t := load.elapsed()) < seconds:
                    if t >= next_sample:
                        for pid in pids:
                            samples.append(proc_sample(pid, round(t, 1)))
                        next_sample += sample_every
                    time.sleep(min(0.2, max(0.0, next_sample - load.elapsed())))
                for pid in pids:
                    samples.append(proc_sample(pid, round(load.elapsed(), 1)))
                answers = load.join()
            stop.set()
            registrar.join(timeout=60)
            pids_after = server.worker_pids()
    log = server.stdout() + server.stderr()

    per_worker = {}
    ok = True
    for pid in pids:
        mine = [s for s in samples if s.pid == pid]
        after_warmup = [s for s in mine if s.t >= warmup] or mine[-1:]
        base, last = after_warmup[0], mine[-1]
        growth = (last.rss_bytes - base.rss_bytes) / MIB
        fd_peak = max(s.open_fds for s in after_warmup)
        per_worker[str(pid)] = {
            "rss_mib_start": round(mine[0].rss_bytes / MIB, 1),
            "rss_mib_after_warmup": round(base.rss_bytes / MIB, 1),
            "rss_mib_end": round(last.rss_bytes / MIB, 1),
            "rss_mib_max": round(max(s.rss_bytes for s in mine) / MIB, 1),
            "rss_growth_mib": round(growth, 1),
            "rss_slope_mib_per_min": _slope_mib_per_min([(s.t, s.rss_bytes) for s in after_warmup]),
            "fds_after_warmup": base.open_fds,
            "fds_end": last.open_fds,
            "fds_max": fd_peak,
            "series": [(s.t, round(s.rss_bytes / MIB, 1), s.open_fds) for s in mine],
        }
        ok &= growth <= RSS_GROWTH_MAX_MIB and fd_peak <= base.open_fds + FD_GROWTH_MAX
    summary = summarise(answers)
    result = {
        "seconds": seconds,
        "rate": rate,
        "workers": workers,
        "warmup_s": warmup,
        "sample_every_s": sample_every,
        "bounds": {"rss_growth_max_mib": RSS_GROWTH_MAX_MIB, "fd_growth_max": FD_GROWTH_MAX},
        "machine": {"before": machine_before, "after": machine()},
        **{k: v for k, v in summary.items() if k != "failure_examples"},
        "achieved_rate": round(summary["requests"] / seconds, 1),
        "failure_examples": summary["failure_examples"],
        "item_registrations": len(registrations),
        # 503: the store was unreachable (a Redis timeout): the documented answer, as for /events
        "item_registrations_failed": sum(s not in (200, 201, 503) for s in registrations),
        "item_registration_statuses": {str(s): registrations.count(s) for s in sorted(set(registrations))},
        "workers_restarted": sorted(pids) != sorted(pids_after),
        "tracebacks_in_server_log": log.count("Traceback"),
        "token_in_server_log": token in log,
        "per_worker": per_worker,
    }
    result["ok"] = bool(
        ok
        and summary["failed"] == 0
        and result["item_registrations_failed"] == 0
        and not result["workers_restarted"]
        and result["tracebacks_in_server_log"] == 0
        and not result["token_in_server_log"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Soak: steady load, RSS and fds per worker over time.")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the load runs")
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s, all client threads together")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument(
        "--sample-every", type=float, default=None, help="seconds (default: seconds/60, >= 1)"
    )
    parser.add_argument(
        "--bundle", type=Path, default=None, help="default: the test bundle (built if absent)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON (section 'soak')")
    args = parser.parse_args()
    sample_every = args.sample_every or max(1.0, args.seconds / 60)
    result = run(args.seconds, args.rate, args.workers, sample_every, args.bundle)
    update_results(args.out, "soak", result)
    print(
        f"{result['requests']} requests ({result['achieved_rate']}/s), {result['failed']} failed, "
        f"p50 {result['recall_ms_p50']} ms, p99 {result['recall_ms_p99']} ms"
    )
    for pid, w in result["per_worker"].items():
        print(
            f"worker {pid}: RSS {w['rss_mib_after_warmup']} -> {w['rss_mib_end']} MiB "
            f"(+{w['rss_growth_mib']}, {w['rss_slope_mib_per_min']} MiB/min), "
            f"fds {w['fds_after_warmup']} -> {w['fds_end']} (max {w['fds_max']})"
        )
    print(f"ok: {result['ok']}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
