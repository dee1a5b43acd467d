"""Fault injection under load: one `mml serve` (real uvicorn process) with Redis behind a latency proxy,
steady POST /recall + POST /events traffic from client threads, and, one after the other:

    baseline        nothing broken
    redis_kill      redis-server SIGKILLed (state lost), restarted on the same port after `down_s`
    hot_reloads     `reloads` POST /admin/reload alternating bundles a and b
    corrupt_bundle  bundles with a flipped byte in a graph, a truncated manifest, a missing table,
                    and a path that is no bundle, offered for reload: each must be refused (409)
                    while the old one keeps serving
    slow_redis      the proxy adds SLOW_DELAY_S each way (round trips slower, under the timeout),
    redis_timeout   then TIMEOUT_DELAY_S each way (over MML_REDIS_TIMEOUT_S: the breaker opens),
                    then back to no delay

    python -m reliability.faults [--quick] [--rate 40] [--out docs/results/reliability.json]

For each phase: requests, failed (no answer, a 5xx, or any non-2xx but POST /events' documented
503 while the store is down), degraded answers, latency percentiles (client side), and for the
Redis faults the time from the fault to the first degraded answer and from the repair to the
first non-degraded one (recovery). Exit status 1 when a request failed, a reload did not answer as
expected, or the service did not recover.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from reliability.harness import (
    RESULTS,
    WORK,
    Load,
    ProxyProcess,
    RedisServer,
    Server,
    linked_copy,
    machine,
    model_version,
    replace_file,
    summarise,
    test_bundles,
    update_results,
)

SLOW_DELAY_S = 0.005  # each way: +10 ms per Redis round trip, under the 50 ms socket timeout
TIMEOUT_DELAY_S = 0.1  # each way: a round trip of 200 ms > MML_REDIS_TIMEOUT_S (0.05 s)
RECOVERY_CAP_S = 20.0  # the breaker's pause doubles up to MML_REDIS_BACKOFF_MAX_S (5 s): ample


@dataclass(frozen=True)
class Plan:
    rate: float  # requests/s, all client threads together
    baseline_s: float
    down_s: float  # how long Redis stays dead
    reloads: int
    slow_s: float  # each of slow_redis / redis_timeout


FULL = Plan(rate=40, baseline_s=10, down_s=5, reloads=10, slow_s=8)
QUICK = Plan(rate=30, baseline_s=2, down_s=2, reloads=3, slow_s=3)


def _window(load: Load, start: float, end: float) -> list:
    return [a for a in load.snapshot() if start <= a.t < end]


def _first(answers: list, after: float, degraded: bool) -> float | None:
    for a in answers:
        if a.t >= after and a.route != "events" and a.status == 200 and a.degraded == degraded:
            return round(a.t - after, 3)
    return None


def _wait_recovered(load: Load, after: float) -> float | None:
    """Seconds from `after` to the first non-degraded /recall answer sent after it (None: not
    within RECOVERY_CAP_S)."""
    deadline = time.monotonic() + RECOVERY_CAP_S
    while time.monotonic() < deadline:
        found = _first(load.snapshot(), after, degraded=False)
        if found is not None:
            time.sleep(0.5)  # a little traffic after recovery, counted in the phase
            return found
        time.sleep(0.05)
    return None


def _corrupt_bundles(source: Path, workdir: Path) -> dict[str, Path]:
    out = {}
    flipped = linked_copy(source, workdir / "flipped-byte")
    graph = flipped / "graphs" / "generator.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    replace_file(graph, bytes(data))
    out["flipped_byte_in_graph"] = flipped
    truncated = linked_copy(source, workdir / "truncated-manifest")
    manifest = (truncated / "manifest.json").read_bytes()
    replace_file(truncated / "manifest.json", manifest[: len(manifest) // 2])
    out["truncated_manifest"] = truncated
    missing = linked_copy(source, workdir / "missing-table")
    (missing / "tables" / "items.npz").unlink()
    out["missing_table"] = missing
    out["not_a_bundle"] = workdir / "no-such-bundle"
    return out


def run(plan: Plan, bundles: tuple[Path, Path] | None = None) -> dict:
    a, b = bundles or test_bundles()
    workdir = WORK / "faults"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    corrupt = _corrupt_bundles(b, workdir / "corrupt")
    token = secrets.token_urlsafe(24)
    auth = {"Authorization": f"Bearer {token}"}
    phases: dict[str, dict] = {}
    machine_before = machine()
    redis = RedisServer()
    redis.start()
    proxy = ProxyProcess(redis.port, workdir).start()
    server = Server(a, workdir / "server", token=token, redis_url=f"redis://127.0.0.1:{proxy.port}/0")
    try:
        server.start()
        admin = httpx.Client(base_url=server.url, headers=auth, timeout=120)
        with Load(server.url, plan.rate, duration_s=900, threads=4, seed=7) as load:
            # baseline
            t0 = load.elapsed()
            time.sleep(plan.baseline_s)
            phases["baseline"] = summarise(_window(load, t0, load.elapsed()))

            # redis killed, restarted
            t0 = load.elapsed()
            redis.kill()
            time.sleep(plan.down_s)
            t_restart = load.elapsed()
            redis.start()
            recovery = _wait_recovered(load, t_restart)
            answers = _window(load, t0, load.elapsed())
            phases["redis_kill"] = {
                **summarise(answers),
                "down_s": plan.down_s,
                "first_degraded_after_kill_s": _first(answers, t0, degraded=True),
                "recovered_after_restart_s": recovery,
            }

            # hot reloads
            t0 = load.elapsed()
            reloads = []
            for i in range(plan.reloads):
                target = b if i % 2 == 0 else a
                r = admin.post("/admin/reload", json={"path": str(target)})
                body = r.json()
                reloads.append(
                    {
                        "status": r.status_code,
                        "seconds": body.get("seconds"),
                        "served": body.get("reloaded", {}).get("mml"),
                        "expected": model_version(target),
                    }
                )
                time.sleep(0.3)
            answers = _window(load, t0, load.elapsed())
            phases["hot_reloads"] = {
                **summarise(answers),
                "reloads": len(reloads),
                "reloads_ok": sum(r["status"] == 200 and r["served"] == r["expected"] for r in reloads),
                "reload_seconds_max": max((r["seconds"] or 0) for r in reloads) if reloads else None,
                "versions_answered": sorted({x.model_version for x in answers if x.model_version}),
            }

            # corrupted bundles offered for reload
            t0 = load.elapsed()
            before = admin.get("/v1/models").json()["arms"][0]["model_version"]
            offers = {}
            for name, path in corrupt.items():
                r = admin.post("/admin/reload", json={"path": str(path)})
                offers[name] = {"status": r.status_code, "message": r.json().get("message", "")[:200]}
            after = admin.get("/v1/models").json()["arms"][0]["model_version"]
            time.sleep(0.5)
            answers = _window(load, t0, load.elapsed())
            phases["corrupt_bundle"] = {
                **summarise(answers),
                "offers": offers,
                "refused_409": sum(o["status"] == 409 for o in offers.values()),
                "served_before": before,
                "served_after": after,
                "versions_answered": sorted({x.model_version for x in answers if x.model_version}),
            }

            # slow Redis, then slower than the timeout, then repaired
            t0 = load.elapsed()
            proxy.set_delay(SLOW_DELAY_S)
            time.sleep(plan.slow_s)
            phases["slow_redis"] = {
                **summarise(_window(load, t0, load.elapsed())),
                "added_round_trip_ms": 2 * SLOW_DELAY_S * 1000,
            }
            t0 = load.elapsed()
            proxy.set_delay(TIMEOUT_DELAY_S)
            time.sleep(plan.slow_s)
            t_repair = load.elapsed()
            proxy.set_delay(0.0)
            recovery = _wait_recovered(load, t_repair)
            answers = _window(load, t0, load.elapsed())
            phases["redis_timeout"] = {
                **summarise(answers),
                "added_round_trip_ms": 2 * TIMEOUT_DELAY_S * 1000,
                "first_degraded_after_slowdown_s": _first(answers, t0, degraded=True),
                "recovered_after_repair_s": recovery,
            }
        admin.close()
        alive = server.process.poll() is None
    finally:
        server.stop()
        proxy.stop()
        redis.stop()
    log = server.stdout() + server.stderr()
    result = {
        "plan": plan.__dict__,
        "machine": {"before": machine_before, "after": machine()},
        "phases": phases,
        "requests": sum(p["requests"] for p in phases.values()),
        "failed": sum(p["failed"] for p in phases.values()),
        "degraded": sum(p["recall_degraded"] for p in phases.values()),
        "tracebacks_in_server_log": log.count("Traceback"),
        "token_in_server_log": token in log,
        "server_alive_after": alive,
    }
    reload_phase, corrupt_phase = phases["hot_reloads"], phases["corrupt_bundle"]
    result["ok"] = (
        result["failed"] == 0
        and reload_phase["reloads_ok"] == reload_phase["reloads"]
        and corrupt_phase["refused_409"] == len(corrupt)
        and corrupt_phase["served_before"] == corrupt_phase["served_after"]
        and phases["redis_kill"]["recovered_after_restart_s"] is not None
        and phases["redis_timeout"]["recovered_after_repair_s"] is not None
        and result["tracebacks_in_server_log"] == 0
        and not result["token_in_server_log"]
        and alive
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Fault injection under load (Redis, reloads, bundles).")
    parser.add_argument("--quick", action="store_true", help="short phases (the test suite's version)")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (default: the plan's)")
    parser.add_argument(
        "--bundles", type=Path, nargs=2, default=None, help="two bundle dirs (default: test bundles)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON (section 'faults')")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.rate:
        plan = Plan(**{**plan.__dict__, "rate": args.rate})
    result = run(plan, tuple(args.bundles) if args.bundles else None)
    update_results(args.out, "faults", result)
    for name, p in result["phases"].items():
        extra = {k: v for k, v in p.items() if k.endswith("_s") or k in ("reloads_ok", "refused_409")}
        print(
            f"{name:>15}: {p['requests']:>5} requests, {p['failed']} failed, {p['recall_degraded']} degraded, "
            f"p50 {p['recall_ms_p50']} ms, p99 {p['recall_ms_p99']} ms {json.dumps(extra)}"
        )
    print(f"ok: {result['ok']}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
