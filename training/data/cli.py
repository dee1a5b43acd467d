"""`mml data prepare` (light module: pandas and the data code are imported inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer


def prepare(
    out: Path = typer.Option(..., "--out", help="output folder of the prepared split"),
    source: Path | None = typer.Option(
        None, "--source", help="a folder in the ML-1M layout (ml-1m/ + ml-1m-posters/) or the generic format"
    ),
    mirror: Path | None = typer.Option(
        None,
        "--mirror",
        help="local copy of the official data (ml-1m/ + ml-1m-posters/); env MML_DATA_MIRROR",
    ),
    T: str | None = typer.Option(
        None,
        "--T",
        help="reference time, unix seconds or ISO-8601 (MovieLens-1M default: 2000-12-01T00:00:00Z)",
    ),
    cold_items: float = typer.Option(0.0, "--cold-items", help="fraction of old items treated as new"),
    seed: int = typer.Option(2020, "--seed", help="seed of the --cold-items draw"),
    support: int = typer.Option(8, "--support", help="support items per new user (+1 valid, +1 query)"),
    downloads: Path = typer.Option(
        Path("artifacts/downloads"), "--downloads", help="where official downloads go"
    ),
) -> None:
    """Build the cold-start split: old users / D_old at or before T, new users after T."""
    import warnings

    from mml.progress import console
    from training.data.prepare import prepare_dataset

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

    with warnings.catch_warnings():  # restores the default display afterwards
        warnings.showwarning = show
        prepare_dataset(
            out=out,
            source=source,
            mirror=mirror,
            T=T,
            cold_items=cold_items,
            seed=seed,
            support=support,
            downloads=downloads,
        )


def register(groups: dict[str, typer.Typer]) -> None:
    groups["data"].command("prepare")(prepare)
