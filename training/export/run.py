"""`export_bundle`: a trained run folder + its prepared split -> a serving bundle (`mml export`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mml.bundle import Manifest
from mml.errors import DataError, MMLError

METRICS_JSON = "metrics.json"
ENCODERS = "encoders"
MAX_INLINE_METRICS = 64 * 1024  # bytes of RUN/metrics.json copied whole; above that, scalars only


def _scalars(value: Any) -> Any:
    """The scalar leaves of a nested JSON value (lists of numbers dropped): a summary for the manifest."""
    if isinstance(value, dict):
        out = {k: _scalars(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {})}
    if isinstance(value, bool | int | float | str):
        return value
    return None


def metrics_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / METRICS_JSON
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable training metrics ({exc})") from exc
    return raw if len(path.read_bytes()) <= MAX_INLINE_METRICS else _scalars(raw)


def _data_dir(run_dir: Path, data_dir: Path | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    from training.checkpoint import run_data_dir

    found = run_data_dir(run_dir)
    if found is None:
        raise MMLError(f"{run_dir} does not record its data folder: pass --data DIR")
    return Path(found)


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    model_version: str | None = None,
    overwrite: bool = False,
    threads: int = 1,
    check: bool = True,
) -> Manifest:
    """Export the trained run at `run_dir` (training.checkpoint) with the split and features of
    `data_dir` (default: the folder the run was trained on) to a bundle at `out_dir`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MMLError(f"{run_dir}: no such training run folder")
    if Path(out_dir).exists() and not overwrite:
        raise MMLError(f"{out_dir} exists: bundles are immutable; pass another --out or --force")

    import pandas as pd
    import torch

    from training.checkpoint import load_model
    from training.export.build import export_model
    from training.export.tables import popularity_counts
    from training.features import load_features

    data = _data_dir(run_dir, data_dir)
    stats_path = data / "stats.json"
    if not stats_path.is_file():
        raise DataError(f"{data} is not a prepared split: missing stats.json (run `mml data prepare`)")
    stats = json.loads(stats_path.read_text())
    features = load_features(data)
    torch.set_num_threads(threads)

    model, config = load_model(run_dir)
    rows = model.n_items + 1
    if features.text.shape[0] != rows or int(stats["n_old_items"]) != model.n_old_items:
        raise DataError(
            f"{data} has {features.text.shape[0] - 1} items ({stats['n_old_items']} old), the run in {run_dir} "
            f"was trained on {model.n_items} ({model.n_old_items} old): wrong --data?"
        )
    same = (
        np.array_equal(features.text, model.text.numpy())
        and np.array_equal(features.image, model.image.numpy())
        and np.array_equal(features.image_mask, model.image_mask.numpy())
    )
    if not same:
        raise DataError(f"the item features in {data} are not the ones the run in {run_dir} was trained on")

    old_items = pd.read_parquet(data / "old_interactions.parquet", columns=["item_idx"])[
        "item_idx"
    ].to_numpy()
    popularity = popularity_counts([old_items], model.n_items)
    features_json = data / "features.json"
    dataset = {
        "name": stats.get("dataset", data.name),
        "source": stats.get("source"),
        "data_dir": str(data.resolve()),
        "split": stats,
        "features": json.loads(features_json.read_text()) if features_json.is_file() else {},
    }
    training = {
        "run_dir": str(run_dir.resolve()),
        "profile": config.profile,
        "seed": config.seed,
        "config": config.model_dump(mode="json"),
        "metrics": metrics_summary(run_dir),
    }
    return export_model(
        model,
        out_dir,
        item_ids=features.item_id,
        popularity=popularity,
        encoders_dir=data / ENCODERS,
        dataset=dataset,
        training=training,
        warmup=config.warmup.model_dump(mode="json"),
        model_version=model_version,
        overwrite=overwrite,
        check=check,
        cooc_window=_cooc_window(run_dir),
    )


def _cooc_window(run_dir: Path) -> int | None:
    """The co-occurrence window the run chose (stage 3's record in metrics.json)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("stage3", {}).get("cooc_window")
