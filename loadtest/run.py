"""`make loadtest`: the service and a locust run against it, on loopback, then the report.

    python -m loadtest.run [--bundle artifacts/bundles/quick] [--data-dir artifacts/data/ml-1m]
                           [--users 20] [--user-rate 5] [--run-time 60] [--p99-ms 50] ...
    make loadtest [BUNDLE=DIR] [LOADTEST_ARGS="--users 40 --run-time 120"]

1. redis-server of its own on a free loopback port when one is installed (the deployed state path:
   events, registered items and exposures in Redis), else the in-process store with one worker;
2. `mml serve` on 127.0.0.1 with the bundle and the two arms of `loadtest/arms.yaml`, a random admin
   token (environment only) and the exposure log in a temporary folder; waits for /readyz;
3. locust headless (`loadtest/locustfile.py`), bounded users, pace and run time, CSV output to
   `<out>/loadtest/locust_*.csv`; its exit code carries the thresholds' verdict;
4. the server's CPU time and resident memory, its /metrics counters, the SRM check of the exposures;
5. stops every process it started (also on failure or Ctrl-C) and writes `<out>/loadtest.md`.

Exit status: 0 when every threshold held and the exposures show no sample ratio mismatch, else 1.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import typer
from pydantic import BaseModel, Field

from loadtest.thresholds import Thresholds

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
CSV_PREFIX = "locust"  # locust writes <prefix>_stats.csv, _stats_history.csv, _failures.csv, _exceptions.csv


class LoadTestConfig(BaseModel):
    bundle: Path = Path("artifacts/bundles/quick")  # `make export`
    data_dir: Path = Path("artifacts/data/ml-1m")  # the split whose new users are replayed
    arms: Path = REPO / "loadtest" / "arms.yaml"  # two arms: control (popularity) and mml, 50/50
    out: Path = Path("docs/results")  # loadtest.md and loadtest/*.csv
    users: int = Field(20, ge=1, le=1000)  # concurrent simulated users
    spawn_rate: float = Field(5.0, gt=0)  # users started per second
    user_rate: float = Field(5.0, gt=0)  # task runs per second per user: users * user_rate offered
    run_time_s: int = Field(60, ge=5, le=3600)  # bounded: the whole run is this + start-up + report
    workers: int = Field(1, ge=1, le=16)  # uvicorn workers (one core each); >1 needs Redis
    redis: Literal["auto", "on", "off"] = "auto"  # auto: when redis-server is installed
    ready_timeout_s: float = Field(300.0, gt=0)  # bundle verification + warm-up on a busy machine
    thresholds: Thresholds = Thresholds()


# --- processes --------------------------------------------------------------------------------------


def _metrics(url: str) -> dict[str, float]:
    """Counters of the service's /metrics worth a line in the report, summed over labels."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "mml_redis_errors": "redis errors",
        "mml_recall_fallbacks": "popularity fallbacks",
        "mml_recall_degraded": "degraded answers",
        "mml_warmups": "new-item ID embeddings generated",
    }
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            out[wanted[family.name]] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return out


# --- the run ----------------------------------------------------------------------------------------


def run_loadtest(config: LoadTestConfig) -> int:
    from devtools.harness import (
        RedisServer,
        cpu_seconds,
        free_port,
        rss_bytes,
        serve_process,
        stop_process,
        wait_ready,
    )
    from mml.bundle import read_manifest
    from mml.errors import MMLError
    from service.ab import count_users, load_arms, read_exposures, srm_check

    if not (config.bundle / "manifest.json").is_file():
        raise MMLError(f"--bundle {config.bundle}: no bundle there (build one with `make export`)")
    manifest = read_manifest(config.bundle)
    arms = load_arms(config.arms)
    use_redis = config.redis == "on" or (config.redis == "auto" and shutil.which("redis-server") is not None)
    if config.workers > 1 and not use_redis:
        raise MMLError("--workers > 1 needs Redis (each worker would keep its own events and items)")
    csv_dir = config.out / "loadtest"
    csv_dir.mkdir(parents=True, exist_ok=True)
    for stale in csv_dir.glob(f"{CSV_PREFIX}_*.csv"):
        stale.unlink()

    tmp = Path(tempfile.mkdtemp(prefix="mml-loadtest-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = secrets.token_hex(32)
    redis = RedisServer(tmp) if use_redis else None
    server = locust = None
    facts: dict = {
        "model_version": manifest.model_version,
        "n_items": manifest.dims.n_items,
        "store": "redis" if use_redis else "memory",
        "load_average_before": os.getloadavg()[0],
    }
    try:
        if redis is not None:
            redis.start()
        env = {"MML_ADMIN_TOKEN": token, "MML_EXPOSURE_LOG": str(tmp / "exposures.jsonl")}
        if redis is not None:
            env["REDIS_URL"] = redis.url
        args = ["--arms", str(config.arms), "--host", "127.0.0.1", "--workers", str(config.workers),
                "--log-level", "warning"]  # fmt: skip
        print(f"loadtest: starting the service on {url} ({facts['store']} store)", file=sys.stderr)
        with open(tmp / "server.log", "w") as server_log:
            server = serve_process(
                config.bundle, port, *args, env=env, cwd=REPO, stdout=server_log, stderr=subprocess.STDOUT
            )
        facts["ready_seconds"] = wait_ready(url, server, config.ready_timeout_s)
        facts["rss_ready_bytes"] = rss_bytes(server.pid)
        print(
            f"loadtest: ready after {facts['ready_seconds']:.1f} s; locust for {config.run_time_s} s",
            file=sys.stderr,
        )

        t = config.thresholds
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
            "--users", str(config.users), "--spawn-rate", str(config.spawn_rate),
            "--run-time", f"{config.run_time_s}s", "--stop-timeout", "10", "--only-summary",
            "--csv", str(csv_dir / CSV_PREFIX), "--exit-code-on-error", "1",
            "--data-dir", str(config.data_dir), "--user-rate", str(config.user_rate),
            "--p99-ms", str(t.recall_p99_ms), "--max-failure-ratio", str(t.max_failure_ratio),
            "--min-requests", str(t.min_requests), "--summary-json", str(tmp / "summary.json"),
        ]  # fmt: skip
        cpu_before = cpu_seconds(server.pid)
        locust = subprocess.Popen(command, env={**env, "MML_ADMIN_TOKEN": token}, cwd=REPO)
        try:
            locust_rc = locust.wait(timeout=config.run_time_s + 180)
        except subprocess.TimeoutExpired:
            stop_process(locust, grace=10)
            raise RuntimeError("locust did not finish in time") from None
        facts["server_cpu_seconds"] = cpu_seconds(server.pid) - cpu_before
        facts["rss_after_bytes"] = rss_bytes(server.pid)
        facts["metrics"] = _metrics(url)
    except BaseException:
        if server is not None and (tmp / "server.log").is_file():
            print((tmp / "server.log").read_text()[-3000:], file=sys.stderr)
        print(f"loadtest: server log and exposures kept in {tmp}", file=sys.stderr)
        raise
    finally:
        stop_process(locust, grace=10)
        stop_process(server, grace=40)
        if redis is not None:
            redis.stop()

    summary_file = tmp / "summary.json"
    if not summary_file.is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise MMLError(f"locust exited with status {locust_rc} without a summary (see its output above)")
    summary = json.loads(summary_file.read_text())
    srm = srm_check(
        count_users(read_exposures(str(tmp / "exposures.jsonl"), "mml:")),
        {a.name: a.weight for a in arms.arms},
    )
    facts["srm"] = {
        "users": srm.observed,
        "chi2": srm.chi2,
        "p_value": srm.p_value,
        "mismatch": srm.mismatch,
    }
    shutil.rmtree(tmp, ignore_errors=True)
    breaches = list(summary["breaches"])
    if srm.mismatch:
        breaches.append(f"sample ratio mismatch in the exposures (p = {srm.p_value:.3g} < 0.001)")
    if locust_rc not in (0, 1) and not breaches:
        breaches.append(f"locust exited with status {locust_rc}")
    (csv_dir / "summary.json").write_text(json.dumps({**summary, "facts": facts}, indent=2) + "\n")
    report = render_report(config, summary, facts, breaches)
    (config.out / "loadtest.md").write_text(report)
    print(
        f"loadtest: report {config.out / 'loadtest.md'}: {'FAILED' if breaches else 'passed'}",
        file=sys.stderr,
    )
    for line in breaches:
        print(f"  breach: {line}", file=sys.stderr)
    return 1 if breaches else 0


# --- the report -------------------------------------------------------------------------------------


def render_report(config: LoadTestConfig, summary: dict, facts: dict, breaches: list[str]) -> str:
    """The markdown report from the measured figures (nothing typed in)."""
    t = config.thresholds
    mib = 1024 * 1024
    weights = summary["arm_weights"]
    arm_list = ", ".join(
        f"{arm} ({kind}, weight {weights.get(arm)})" for arm, kind in summary["arms"].items()
    )
    lines = [
        "# Load test",
        "",
        f"Generated by `make loadtest` (`loadtest/run.py`) on {datetime.now(UTC).isoformat(timespec='seconds')}; "
        "do not edit by hand. CSVs: [loadtest/](loadtest/).",
        "",
        f"**Verdict: {'FAILED' if breaches else 'passed'}.**",
        *([""] + [f"- breach: {b}" for b in breaches] if breaches else []),
        "",
        "## Setup",
        "",
        "| | |",
        "|---|---|",
        f"| bundle | `{config.bundle}`, model version `{facts['model_version']}`, {facts['n_items']} items |",
        f"| service | `mml serve` on 127.0.0.1, {config.workers} worker(s), {facts['store']} store, "
        f"arms `{config.arms.relative_to(REPO) if config.arms.is_relative_to(REPO) else config.arms}` |",
        f"| arms | {arm_list} |",
        f"| load | locust, {config.users} users spawned at {config.spawn_rate}/s, {config.user_rate} task runs/s "
        f"each (<= {config.users * config.user_rate:.0f} requests/s offered, closed loop), {config.run_time_s} s |",
        f"| traffic | the split's new users (`{config.data_dir}`): /recall with the support items as history "
        "(some ending with a registered new item) : POST /events : /recall on the stored history = 6 : 3 : 1 |",
        f"| new items | {len(summary['registered_items'])} registered with PUT /items and real posters before the load: "
        f"{', '.join(summary['registered_items'])} |",
        f"| machine | {os.cpu_count()} CPUs, {platform.platform()}; load average {facts['load_average_before']:.1f} "
        "before the run (the service, locust and other work share the CPUs) |",
        "",
        "## Client side (locust)",
        "",
        "| method | name | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in [*summary["endpoints"], summary["total"]]:
        lines.append(
            f"| {e['method']} | {e['name']} | {e['requests']} | {e['failures']} | {e['rps']:.1f} | "
            f"{e['p50_ms']:.0f} | {e['p95_ms']:.0f} | {e['p99_ms']:.0f} | {e['max_ms']:.0f} |"
        )
    lines += [
        "",
        "Request sent -> full answer read, as locust measures it (percentiles rounded to whole ms, to 10 ms "
        "above 100 ms). Over time: `loadtest/locust_stats_history.csv`.",
        "",
        "## Server side (`Server-Timing: app`, request reaching the app -> response start)",
        "",
        "| name | answers | p50 ms | p95 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in summary["server_timing"].items():
        lines.append(
            f"| {name} | {s['requests']} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | {s['p99_ms']:.2f} |"
        )
    requests = summary["total"]["requests"]
    cpu_ms = facts["server_cpu_seconds"] * 1000 / max(requests, 1)
    srm = facts["srm"]
    metrics = facts["metrics"]
    lines += [
        "",
        "## Service",
        "",
        "| | |",
        "|---|---|",
        f"| start-up to ready | {facts['ready_seconds']:.1f} s (bundle verification, loading, warm-up) |",
        f"| resident memory | {facts['rss_ready_bytes'] / mib:.0f} MiB when ready, {facts['rss_after_bytes'] / mib:.0f} MiB after the load |",
        f"| CPU | {facts['server_cpu_seconds']:.1f} s over the run: {cpu_ms:.2f} ms per request (all "
        f"endpoints, {requests} requests; capacity about {1000 / max(cpu_ms, 1e-9):.0f} requests/s per core) |",
        *[f"| {name} | {value:.0f} |" for name, value in metrics.items()],
        "",
        "## A/B arms",
        "",
        "| arm | /recall answers | users in exposures |",
        "|---|---:|---:|",
        *[
            f"| {arm} | {summary['arm_counts'].get(arm, 0)} | {srm['users'].get(arm, 0)} |"
            for arm in summary["arms"]
        ],
        "",
        f"SRM check of the exposure log (`mml ab srm`): chi2 = {srm['chi2']:.3f}, p = {srm['p_value']:.3g} "
        f"({'mismatch' if srm['mismatch'] else 'no mismatch'} at p < 0.001).",
        "",
        "## Thresholds",
        "",
        "| rule | limit |",
        "|---|---|",
        f"| p99 of each /recall endpoint, client side | <= {t.recall_p99_ms} ms |",
        f"| failed / all requests | <= {t.max_failure_ratio} |",
        f"| requests made | >= {t.min_requests} |",
        "| new items registered | all |",
        "| arms with a weight that answered | all |",
        "| sample ratio mismatch | none (p >= 0.001) |",
        "",
    ]
    return "\n".join(lines)


def main(
    bundle: Path = typer.Option(LoadTestConfig().bundle, help="bundle directory (make export)"),
    data_dir: Path = typer.Option(LoadTestConfig().data_dir, help="prepared split to replay"),
    arms: Path = typer.Option(LoadTestConfig().arms, help="A/B arms config of the service"),
    out: Path = typer.Option(LoadTestConfig().out, help="folder of loadtest.md and loadtest/*.csv"),
    users: int = typer.Option(LoadTestConfig().users),
    spawn_rate: float = typer.Option(LoadTestConfig().spawn_rate),
    user_rate: float = typer.Option(LoadTestConfig().user_rate, help="task runs per second per user"),
    run_time: int = typer.Option(LoadTestConfig().run_time_s, help="seconds of load"),
    workers: int = typer.Option(LoadTestConfig().workers),
    redis: str = typer.Option(LoadTestConfig().redis, help="auto | on | off"),
    p99_ms: float = typer.Option(Thresholds().recall_p99_ms, help="client-side p99 limit of /recall"),
    max_failure_ratio: float = typer.Option(Thresholds().max_failure_ratio),
    min_requests: int = typer.Option(Thresholds().min_requests),
) -> None:
    from mml.errors import MMLError

    config = LoadTestConfig(
        bundle=bundle,
        data_dir=data_dir,
        arms=arms,
        out=out,
        users=users,
        spawn_rate=spawn_rate,
        user_rate=user_rate,
        run_time_s=run_time,
        workers=workers,
        redis=redis,
        thresholds=Thresholds(
            recall_p99_ms=p99_ms, max_failure_ratio=max_failure_ratio, min_requests=min_requests
        ),
    )
    try:
        code = run_loadtest(config)
    except MMLError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise SystemExit(2) from None
    raise SystemExit(code)


if __name__ == "__main__":
    typer.run(main)
