"""`make ab-replay`: an A/B experiment replayed against a running service, then read by `mml ab report`.

    python -m loadtest.ab_replay [--bundle artifacts/bundles/quick] [--data-dir artifacts/data/ml-1m]
                                 [--arms loadtest/arms.yaml] [--out docs/results/ab-replay.json]

1. a redis-server of its own on a free loopback port, `mml serve` with the bundle, the two arms of
   `loadtest/arms.yaml` (control: the bundle's popularity ranking; mml: the MML model) and Redis, so
   exposures go to the Redis stream (and a log file) and events to the stored histories, as deployed;
2. the load test's traffic generator (`loadtest/traffic.py`) in replay mode: the split's new users
   (first interaction after T, never seen in training), every user in step; for each of a user's
   interactions in time order, `POST /recall` without a history (the answer from the events stored
   so far) and then `POST /events` of that interaction, stamped with the next whole second so that
   it falls after the exposure; a user's next recall waits until that second has passed;
3. the server is stopped (its exposure writer flushes), and `mml ab report` reads the Redis stream and
   the stored histories (every exposure; the command's JSON is kept); `service.ab_report.build_report`
   reads the same records once more, to check the command, then over the last position only
   (history = support + validation item, target = query item: the offline protocol's query item,
   history excluded, i.e. the "masked" table of docs/results.md), and once per position (hit rate@10);
4. the offline evaluation of the same two methods (`docs/results/ml-1m.json`, masked, cold users) is
   put beside it, with whether the orderings agree; everything goes to `--out` (JSON) and a markdown
   rendering next to it (`.md`).
"""

from __future__ import annotations

import http.client
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import typer
from pydantic import BaseModel, Field

REPO = Path(__file__).resolve().parents[1]


class ReplayConfig(BaseModel):
    model_config = {"extra": "forbid"}

    bundle: Path = Path("artifacts/bundles/quick")  # `make export`
    data_dir: Path = Path("artifacts/data/ml-1m")  # the split whose new users are replayed
    arms: Path = REPO / "loadtest" / "arms.yaml"  # control (popularity) and mml, 50/50
    out: Path = Path("docs/results/ab-replay.json")  # and the same name with .md
    offline: Path = Path("docs/results/ml-1m.json")  # the offline evaluation (make results)
    tag: str = Field("abreplay", pattern=r"^[A-Za-z0-9_.-]{1,32}$")  # in user and request ids
    k: int = Field(100, ge=1, le=1000)  # answer size (the exposure logs up to k_logged of it)
    window_s: float = Field(1800.0, gt=0)  # the report's join window
    bootstrap: int = Field(1000, ge=50)  # coverage intervals
    seed: int = 0
    ready_timeout_s: float = Field(300.0, gt=0)


class _Client:
    """One keep-alive HTTP connection; every answer must be 2xx (a failed request stops the replay)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, body: dict) -> dict:
        self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer = self.conn.getresponse()
        data = answer.read()
        if not 200 <= answer.status < 300:
            raise RuntimeError(f"POST {path} {body}: HTTP {answer.status} {data[:300]!r}")
        return json.loads(data)


def _offline(path: Path) -> dict | None:
    """Pop and MML on the cold users, history excluded ("masked"), from the offline evaluation."""
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    masked = results.get("masked", {}).get("cold_users", {})
    if "pop" not in masked or "mml" not in masked:
        return None
    keep = ("recall@10", "recall@20", "mrr@10", "ndcg@10")
    return {
        "source": str(path),
        "command": results.get("meta", {}).get("command"),
        "setting": "cold users, history excluded (masked), query item; mean over seeds",
        "control": {m: masked["pop"][m]["mean"] for m in keep if m in masked["pop"]},
        "mml": {m: masked["mml"][m]["mean"] for m in keep if m in masked["mml"]},
        "n_seeds": masked["mml"].get("recall@10", {}).get("n_seeds"),
    }


def _agreement(query_report: dict, offline: dict | None) -> dict | None:
    """Does the replay order the two arms as the offline evaluation orders the two methods?"""
    if offline is None or query_report.get("refused"):
        return None
    pairs = {"hit_rate@10": "recall@10", "mrr": "mrr@10"}
    out = {}
    for online, off in pairs.items():
        c = query_report["comparisons"]["mml"][online]
        offline_diff = offline["mml"][off] - offline["control"][off]
        significant = c["ci_low"] > 0 or c["ci_high"] < 0
        out[online] = {
            "offline_metric": off,
            "offline_diff": offline_diff,
            "online_diff": c["diff"],
            "online_p": c["p_value"],
            "online_significant": significant,
            "same_sign": math.copysign(1, offline_diff) == math.copysign(1, c["diff"]),
        }
    return out


def _code_version() -> dict:
    """The commit the replay ran on and how many tracked files differed from it (a shared checkout)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or None, "tracked_files_changed": len(changed.splitlines())}


def run_replay(config: ReplayConfig) -> dict:
    from devtools.harness import RedisServer, Server
    from loadtest.traffic import TrafficConfig, load_traffic
    from mml.bundle import read_manifest
    from service.ab import load_arms, read_exposures
    from service.ab_report import (
        ReportConfig,
        build_report,
        exposures_from_records,
        load_catalogue,
        load_events,
    )

    manifest = read_manifest(config.bundle)
    traffic = load_traffic(TrafficConfig(data_dir=config.data_dir, new_items=0, k=config.k))
    rounds = traffic.replay_rounds(config.tag)
    arms = load_arms(config.arms)
    started = datetime.now(UTC).isoformat(timespec="seconds")

    with tempfile.TemporaryDirectory(prefix="mml-ab-replay-") as tmp, RedisServer() as redis:
        server = Server(
            config.bundle,
            Path(tmp),
            redis_url=redis.url,
            args=("--arms", str(config.arms.absolute())),  # the server runs in `tmp`
        )
        with server.start(config.ready_timeout_s):
            client = _Client(server.port)
            answers: dict[str, int] = {}
            fallbacks: dict[str, int] = {}
            t0 = time.monotonic()
            last_ts = 0
            for position, steps in enumerate(rounds):
                while time.time() <= last_ts:  # a user's next recall comes after its last event's second
                    time.sleep(0.01)
                for user, item in steps:
                    body = traffic.recall_stored(user) | {"request_id": f"{config.tag}-p{position}-{user}"}
                    answer = client.post("/recall", body)
                    answers[answer["arm"]] = answers.get(answer["arm"], 0) + 1
                    fallbacks[answer["arm"]] = fallbacks.get(answer["arm"], 0) + int(answer["fallback"])
                    last_ts = int(time.time()) + 1  # the next whole second: after the exposure
                    client.post("/events", traffic.event(user, item, last_ts))
            seconds = time.monotonic() - t0
        # the server has stopped gracefully (SIGTERM): its exposure writer flushed what was queued
        records = list(read_exposures(redis.url))
        file_records = sum(1 for _ in read_exposures(str(Path(tmp) / "exposures.jsonl")))
        events = load_events(redis.url)
        # the command itself on the service's sinks (exit 1 = SRM refusal, still a JSON report)
        command = [sys.executable, "-m", "mml.cli", "ab", "report", "--exposures", redis.url]
        command += ["--events", redis.url, "--arms", str(config.arms), "--bundle", str(config.bundle)]
        command += ["--window", str(config.window_s), "--bootstrap", str(config.bootstrap)]
        command += ["--seed", str(config.seed), "--json"]
        cli = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if cli.returncode not in (0, 1):
            raise RuntimeError(f"mml ab report failed ({cli.returncode}): {cli.stderr[-2000:]}")
        cli_report = json.loads(cli.stdout)

    catalogue = load_catalogue(config.bundle)
    report_config = ReportConfig(window_s=config.window_s, bootstrap=config.bootstrap, seed=config.seed)

    def report(selected: list[dict]) -> dict:
        built = build_report(
            exposures_from_records(selected, "replay"), events, arms, report_config, catalogue
        )
        return built.model_dump(mode="json")

    last = len(rounds) - 1
    by_position = {
        p: [r for r in records if r["request_id"].startswith(f"{config.tag}-p{p}-")] for p in range(last + 1)
    }
    per_position = {}
    for p, selected in by_position.items():
        one = report(selected)
        if one["refused"]:
            per_position[p] = {"refused": one["refused"]}
            continue
        c = one["comparisons"]["mml"]["hit_rate@10"]
        per_position[p] = {
            "control": c["control"],
            "mml": c["value"],
            "diff": c["diff"],
            "p_value": c["p_value"],
        }
    query = report(by_position[last])
    in_process = report(records)
    offline = _offline(config.offline)
    return {
        "command": "make ab-replay  (python -m loadtest.ab_replay "
        f"--bundle {config.bundle} --data-dir {config.data_dir} --arms {config.arms})",
        "started": started,
        "code": _code_version(),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "bundle": {
            "path": str(config.bundle),
            "model_version": manifest.model_version,
            "profile": manifest.training.get("profile"),
            "validation": manifest.training.get("metrics", {}).get("validation"),
            "config": manifest.training.get("config"),  # the recipe the bundle was trained with
        },
        "arms": arms.model_dump(mode="json"),
        "replay": {
            "users": len(traffic.sequences),
            "positions": len(rounds),
            "recall_requests": sum(answers.values()),
            "event_requests": sum(len(r) for r in rounds),
            "answers_per_arm": answers,
            "fallback_answers_per_arm": fallbacks,
            "seconds": round(seconds, 1),
            "exposures_in_stream": len(records),
            "exposures_in_log_file": file_records,
            "events_read": len(events.user),
        },
        "report_command": "mml ab report --exposures REDIS --events REDIS --arms ARMS --bundle BUNDLE --json",
        "report_all_positions": cli_report,  # the command's own output
        "command_equals_in_process_report": cli_report == in_process,
        "report_query_position": query,
        "hit_rate@10_per_position": per_position,
        "offline": offline,
        "agreement_query_position": _agreement(query, offline),
    }


def to_markdown(result: dict) -> str:
    from service.ab_report import Report
    from service.ab_report import to_markdown as table

    replay = result["replay"]
    lines = [
        f"Bundle `{result['bundle']['model_version']}` ({result['bundle']['profile']} profile); "
        f"{replay['users']} new users x {replay['positions']} interactions: {replay['recall_requests']} "
        f"/recall + {replay['event_requests']} /events in {replay['seconds']} s; "
        f"exposures: {replay['exposures_in_stream']} in the Redis stream, {replay['exposures_in_log_file']} "
        "in the log file.",
        "",
        "**Every position** (a recall before each of a user's 10 interactions; position 0 has no history: "
        "both arms answer with the popularity fallback):",
        "",
    ]
    everything = Report.model_validate(result["report_all_positions"])
    from service.ab_report import srm_line

    lines += [srm_line(everything), "", table(everything)]
    query = Report.model_validate(result["report_query_position"])
    lines += [
        "**Last position only** (history = 8 support items + the validation item, next event = the query "
        "item: the offline protocol's query item, history excluded):",
        "",
        srm_line(query),
        "",
        table(query),
    ]
    lines += [
        "**Hit rate@10 per position**",
        "",
        "| position | control | mml | diff | p |",
        "|---|---|---|---|---|",
    ]
    for p, row in result["hit_rate@10_per_position"].items():
        if "refused" in row:
            lines.append(f"| {p} | refused | | | |")
        else:
            lines.append(
                f"| {p} | {row['control']:.4f} | {row['mml']:.4f} | {row['diff']:+.4f} | {row['p_value']:.2g} |"
            )
    offline = result.get("offline")
    if offline:
        lines += [
            "",
            f"**Offline** ({offline['setting']}, {offline['n_seeds']} seeds, `{offline['source']}`):",
            "",
            "| metric | Pop | MML | MML - Pop |",
            "|---|---|---|---|",
        ]
        for metric, value in offline["control"].items():
            mml = offline["mml"][metric]
            lines.append(f"| {metric} | {value:.4f} | {mml:.4f} | {mml - value:+.4f} |")
    agreement = result.get("agreement_query_position")
    if agreement:
        lines += ["", "| online (last position) | offline | online diff (p) | offline diff | same sign |"]
        lines += ["|---|---|---|---|---|"]
        for metric, a in agreement.items():
            lines.append(
                f"| {metric} | {a['offline_metric']} | {a['online_diff']:+.4f} ({a['online_p']:.2g}) | "
                f"{a['offline_diff']:+.4f} | {'yes' if a['same_sign'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main(
    bundle: Path = typer.Option(ReplayConfig().bundle, help="bundle directory (make export)"),
    data_dir: Path = typer.Option(
        ReplayConfig().data_dir, help="prepared split whose new users are replayed"
    ),
    arms: Path = typer.Option(ReplayConfig().arms, help="A/B arms config of the service"),
    out: Path = typer.Option(ReplayConfig().out, help="result JSON (and the same name with .md)"),
    offline: Path = typer.Option(ReplayConfig().offline, help="offline evaluation JSON (make results)"),
    window: float = typer.Option(ReplayConfig().window_s, help="join window of the report, seconds"),
    bootstrap: int = typer.Option(ReplayConfig().bootstrap, help="bootstrap replicates (coverage)"),
) -> None:
    from pydantic import ValidationError

    from mml.errors import MMLError

    try:
        config = ReplayConfig(
            bundle=bundle,
            data_dir=data_dir,
            arms=arms,
            out=out,
            offline=offline,
            window_s=window,
            bootstrap=bootstrap,
        )
        result = run_replay(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        typer.secho(f"error: --{'-'.join(str(p) for p in first['loc'])}: {first['msg']}", fg="red", err=True)
        raise SystemExit(2) from None
    except (MMLError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise SystemExit(2) from None
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(result)
    config.out.with_suffix(".md").write_text(markdown)
    typer.echo(markdown)


if __name__ == "__main__":
    typer.run(main)
