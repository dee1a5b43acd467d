"""`mml train` (light module: torch and the training code are imported inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer


def train(
    data: Path = typer.Option(
        ..., "--data", help="a prepared split with its features (mml data prepare / features)"
    ),
    out: Path = typer.Option(..., "--out", help="run folder: config.json, stage1..3.pt, metrics.json"),
    profile: str = typer.Option(
        "quick", "--profile", help="quick (minutes on 2 CPU cores) or paper (full settings)"
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="seed of every random draw (default: the profile's, 2020)"
    ),
    loss: str | None = typer.Option(None, "--loss", help="stage-1 loss: bpr (paper) or ce (full softmax)"),
    settings: list[str] = typer.Option(
        [],
        "--set",
        help="override one setting of the profile, KEY=VALUE with a dotted key of TrainConfig "
        "(training/config.py) and a JSON value, e.g. --set stage1.epochs=10 --set tasks.query_share=0.5",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu (default), cuda or cuda:N"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Three-stage meta-training of MML: learners (MAML), generator, fusion. Resumes finished stages."""
    import json
    import os

    # Idle OpenMP threads sleep instead of spinning: on a small shared machine spinning threads made
    # every small op of the meta-learning loop up to 50x slower (measured). Must precede `import torch`.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from pydantic import ValidationError

    from mml.errors import MMLError
    from mml.progress import console
    from training.config import PROFILES
    from training.config import profile as make_profile
    from training.run import train_from_dir

    if profile not in PROFILES:
        raise MMLError(f"--profile must be one of {', '.join(sorted(PROFILES))}, got {profile!r}")
    if loss is not None and loss not in ("bpr", "ce"):
        raise MMLError(f"--loss must be bpr or ce, got {loss!r}")
    overrides: dict = parse_settings(settings)
    if seed is not None:
        overrides["seed"] = seed
    if loss is not None:
        overrides.setdefault("stage1", {})["loss"] = loss
    if device is not None:
        overrides["device"] = device
    try:
        cfg = make_profile(profile, **overrides)
    except ValidationError as exc:
        raise MMLError(f"invalid training settings: {exc}") from exc
    metrics = train_from_dir(data, out, cfg, show_progress=not quiet)
    summary = {key: value for key, value in metrics["validation"].items()}
    console.print(f"run written to {out}; validation (new users' 9th item): {json.dumps(summary)}")


def parse_settings(items: list[str]) -> dict:
    """["stage1.epochs=10", "tasks.window=recent"] -> {"stage1": {"epochs": 10}, "tasks": {...}}.
    A value is read as JSON (numbers, true/false, null, lists), else kept as a string; pydantic
    validates the result (an unknown key or a bad value is an error naming it)."""
    import json

    from mml.errors import MMLError

    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise MMLError(f"--set takes KEY=VALUE with a dotted key, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MMLError(f"--set {key}: '{part}' was set to a value earlier")
        node[parts[-1]] = value
    return out


def register(groups: dict[str, typer.Typer]) -> None:
    groups["root"].command("train")(train)
