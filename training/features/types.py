"""Item features as arrays (docs/architecture.md section 3). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mml.errors import DataError

FEATURES_NPZ = "features.npz"
FEATURES_JSON = "features.json"
FEATURES_FORMAT_VERSION = 1
_ARRAYS = ("text", "image", "image_mask", "item_id")


@dataclass
class ItemFeatures:
    """Row = item_idx (0 = pad). Text/image rows are L2-normalised; image rows without a poster are
    zeros and have image_mask False: always use the mask, never the zeros."""

    text: np.ndarray  # (N+1, 384) float32
    image: np.ndarray  # (N+1, 1280) float32
    image_mask: np.ndarray  # (N+1,) bool
    item_id: np.ndarray  # (N+1,) str, "" at row 0


def load_features(directory: str | Path) -> ItemFeatures:
    """Read DIR/features.npz written by `mml data features`, checking shapes and dtypes."""
    path = Path(directory) / FEATURES_NPZ
    if not path.is_file():
        raise DataError(f"{path} not found: run `mml data features --data {directory}`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in _ARRAYS if name not in npz.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}")
            arrays = {name: npz[name] for name in _ARRAYS}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable features file: {exc}") from exc
    features = ItemFeatures(**arrays)
    rows = features.text.shape[0]
    checks = {
        "text": features.text.ndim == 2 and features.text.dtype == np.float32,
        "image": features.image.ndim == 2
        and features.image.dtype == np.float32
        and features.image.shape[0] == rows,
        "image_mask": features.image_mask.shape == (rows,) and features.image_mask.dtype == np.bool_,
        "item_id": features.item_id.shape == (rows,) and features.item_id.dtype.kind == "U",
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise DataError(f"{path}: array(s) {', '.join(bad)} have the wrong shape or dtype")
    if rows < 1 or features.image_mask[0] or features.item_id[0] != "":
        raise DataError(f"{path}: row 0 must be the padding row (item_id '', image_mask False)")
    return features
