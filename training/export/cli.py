"""`mml export`: a trained run -> a serving bundle. Light module: torch is imported inside the command."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    run: Path = typer.Option(..., "--run", help="a training run folder written by `mml train --out RUN`"),
    out: Path = typer.Option(
        ..., "--out", help="the bundle folder to create (e.g. artifacts/bundles/<version>)"
    ),
    data: Path | None = typer.Option(
        None, "--data", help="the prepared split + features the run was trained on (default: the run's own)"
    ),
    model_version: str | None = typer.Option(
        None,
        "--model-version",
        help="version string of the bundle (default: UTC date + short hash of the weights)",
    ),
    force: bool = typer.Option(False, "--force", help="replace an existing bundle at --out"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads while exporting"),
) -> None:
    """Export the trained stages to ONNX and write the versioned serving bundle."""
    import time

    from training.export.run import export_bundle

    start = time.perf_counter()
    manifest = export_bundle(
        run, out, data_dir=data, model_version=model_version, overwrite=force, threads=threads
    )
    size = sum(f.bytes for f in manifest.files) / 2**20
    typer.echo(
        f"bundle: {out} (model version {manifest.model_version}, {len(manifest.files)} files, "
        f"{size:.0f} MiB, {time.perf_counter() - start:.1f}s)"
    )


def register(groups: dict[str, typer.Typer]) -> None:
    groups["root"].command("export")(export)
