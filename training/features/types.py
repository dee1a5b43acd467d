"""Item features as arrays (docs/architecture.md section 3). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ItemFeatures:
    """Row = item_idx (0 = pad). Text/image rows are L2-normalised; image rows without a poster are
    zeros and have image_mask False: always use the mask, never the zeros."""

    text: np.ndarray  # (N+1, 384) float32
    image: np.ndarray  # (N+1, 1280) float32
    image_mask: np.ndarray  # (N+1,) bool
    item_id: np.ndarray  # (N+1,) str, "" at row 0


def load_features(directory: str | Path) -> ItemFeatures:
    """Read DIR/features.npz written by `mml data features`."""
    raise NotImplementedError  # implemented by the features stage
