"""`mml data features`: registered into the CLI's "data" group. Heavy imports stay inside the command."""

from __future__ import annotations

from pathlib import Path

import typer


def register(groups: dict[str, typer.Typer]) -> None:
    groups["data"].command("features")(features)


def features(
    data: Path = typer.Option(..., "--data", help="A prepared split folder (holds items.parquet)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Items per encoder call."),
    threads: int = typer.Option(2, "--threads", min=1, help="torch / onnxruntime threads."),
    force: bool = typer.Option(False, "--force", help="Recompute even when the inputs are unchanged."),
) -> None:
    """Encode item text and posters with the pretrained encoders; export the encoders to ONNX."""
    from training.features.config import FeaturesConfig
    from training.features.encode import run_features

    run = run_features(data, FeaturesConfig(batch_size=batch_size, threads=threads), force=force)
    state = "unchanged inputs, cache hit" if run.cache_hit else f"computed in {run.seconds:.1f}s"
    typer.echo(f"features: {run.path} ({run.n_items} items, {run.n_images} with an image; {state})")
