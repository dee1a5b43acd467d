"""`mml evaluate`: the cold-start evaluation grid and its report (heavy imports inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer

DEFAULT_SETTINGS = "cold_users,cold_users_items"


def _names(value: str, allowed: tuple[str, ...], field: str) -> list[str]:
    from mml.errors import MMLError

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise MMLError(
            f"{field}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}"
        )
    return names


def evaluate(
    data: Path = typer.Option(..., "--data", help="prepared split with features (the cold-users setting)"),
    out: Path = typer.Option(Path("docs/results"), "--out", help="folder for <dataset>.json and the plots"),
    report: Path = typer.Option(Path("docs/results.md"), "--report", help="the generated markdown report"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="seeds per method (0..n-1)"),
    settings: str = typer.Option(DEFAULT_SETTINGS, "--settings", help="comma-separated settings"),
    methods: str = typer.Option("", "--methods", help="comma-separated methods [default: all]"),
    profile: str = typer.Option("quick", "--profile", help="quick | full (the report's budget)"),
    data_cold_items: Path | None = typer.Option(
        None,
        "--data-cold-items",
        help="split of the cold-items setting [default: <data>-cold-items, prepared if absent]",
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="per-run cache [default: artifacts/eval/<dataset>/<profile>]"
    ),
    cached_only: bool = typer.Option(
        False,
        "--cached-only",
        help="report only the runs the cache holds (train nothing); the report lists the gaps",
    ),
    rq4: bool = typer.Option(
        True, "--rq4/--no-rq4", help="also run RQ4 (MML vs PT-FT on 20..100% of old users)"
    ),
    rq4_seeds: int | None = typer.Option(
        None, "--rq4-seeds", min=1, help="seeds of the RQ4 points [default: --seeds]"
    ),
    set_: list[str] = typer.Option(
        None,
        "--set",
        help="KEY=VALUE training setting for MML, its ablations and PT-FT, as `mml train --set` "
        "(experiments: the cache goes to <profile>+set-<hash> unless --cache is given)",
    ),
) -> None:
    """Evaluate every method on the cold-start protocol and write the JSON results and the report."""
    import json
    import os
    import platform
    import time

    from mml.errors import DataError
    from training.evaluation import report as rep
    from training.evaluation import runner

    start = time.perf_counter()
    eval_profile = runner.get_profile(profile)
    if set_:
        import hashlib

        from training.cli import parse_settings

        overrides = parse_settings(set_)
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
        eval_profile = eval_profile.model_copy(
            update={"train_overrides": overrides, "name": f"{eval_profile.name}+set-{digest}"}
        )
    chosen_settings = _names(settings, runner.SETTINGS, "--settings")
    chosen_methods = _names(methods, runner.ALL_METHODS, "--methods") if methods else list(runner.METHODS)
    stats_path = data / "stats.json"
    if not stats_path.is_file():
        raise DataError(f"--data {data}: not a prepared split (run `mml data prepare --out {data}`)")
    dataset = json.loads(stats_path.read_text()).get("dataset", data.name)
    folders: dict[str, Path] = {}
    if "cold_users" in chosen_settings:
        folders["cold_users"] = data
    if "cold_users_items" in chosen_settings:
        folders["cold_users_items"] = runner.ensure_cold_items_split(
            data, data_cold_items or runner.cold_items_dir(data)
        )
    cache_dir = cache or Path("artifacts") / "eval" / dataset / eval_profile.name
    seed_list = list(range(seeds))
    rq4_seed_list = list(range(rq4_seeds or seeds))
    grid = runner.Grid(folders, chosen_methods, seed_list, eval_profile, cache_dir, cached_only)
    results = runner.run_grid(grid, log=lambda line: typer.echo(line, err=True))

    figures: dict[str, str] = {}
    rq4_doc = None
    if rq4 and {"mml", "pt_ft"} <= set(chosen_methods) and "cold_users" in folders:
        from training.data import load_split
        from training.evaluation.rq4 import run_rq4, summarise_rq4
        from training.features import load_features

        rq4_runs = run_rq4(
            load_split(data),
            load_features(data),
            data,
            eval_profile,
            rq4_seed_list,
            cache_dir,
            log=lambda line: typer.echo(line, err=True),
        )
        rq4_doc = summarise_rq4(rq4_runs, "cold_users", rq4_seed_list)
        figure = out / f"{dataset}-rq4.png"
        rep.plot_rq4(rq4_doc, figure)
        figures["rq4"] = os.path.relpath(figure, report.parent)

    run_seconds = sum(r.seconds for methods_ in results.values() for runs in methods_.values() for r in runs)
    rq4_seconds = 0.0
    if rq4_doc is not None:
        rq4_seconds = sum(
            r.seconds for series in rq4_runs.values() for f, runs in series.items() if f != 1.0 for r in runs
        )
    meta = {
        "dataset": dataset,
        "profile": eval_profile.name,
        "profile_config": json.loads(eval_profile.model_dump_json()),
        "seeds": seed_list,
        "command": " ".join(
            ["mml evaluate", f"--data {data}", f"--out {out}", f"--seeds {seeds}", f"--settings {settings}"]
            + ([f"--methods {methods}"] if methods else [])
            + [f"--profile {profile}"]
            + ([] if rq4 else ["--no-rq4"])
            + (["--cached-only"] if cached_only else [])
            + ([f"--rq4-seeds {rq4_seeds}"] if rq4 and rq4_seeds else [])
            + [f"--set {item}" for item in set_ or []]
        ),
        "seconds": run_seconds + rq4_seconds,
        "seconds_rq4": rq4_seconds,
        "wall_seconds_this_invocation": time.perf_counter() - start,
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, no GPU",
        "data": {setting: str(folder) for setting, folder in folders.items()},
        "missing": [f"{s} / {m}" for s in folders for m in chosen_methods if m not in results.get(s, {})],
    }
    doc = rep.aggregate(results, meta)
    if rq4_doc is not None:
        doc["rq4"] = rq4_doc
    json_path = out / f"{dataset}.json"
    rep.write_json(doc, json_path)
    discussion_path = out / "discussion.md"
    discussion = discussion_path.read_text() if discussion_path.is_file() else None
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(rep.render_markdown(doc, discussion, figures))
    typer.echo(f"wrote {json_path} and {report}", err=True)


def register(groups: dict[str, typer.Typer]) -> None:
    groups["root"].command("evaluate")(evaluate)
