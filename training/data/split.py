"""The cold-start split (paper Sec. 3 and 5.1): old users / D_old before T, new users after T."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Split:
    """A prepared split in memory. Item indices: 1..n_items, 0 = pad; old items are 1..n_old_items."""

    n_items: int  # catalogue size N, pad excluded
    n_old_items: int
    old_users: np.ndarray  # (n_old_users,) str
    old_seqs: list[np.ndarray]  # per old user: int32 item_idx in time order (D_old only)
    new_users: np.ndarray  # (n_new_users,) str
    new_support: np.ndarray  # (n_new_users, 8) int32, time order
    new_valid: np.ndarray  # (n_new_users,) int32, the 9th interaction
    new_query: np.ndarray  # (n_new_users,) int32, the 10th interaction
    stats: dict = field(default_factory=dict)


def load_split(directory: str | Path) -> Split:
    """Read a folder written by `mml data prepare` (see docs/architecture.md section 2)."""
    raise NotImplementedError  # implemented by the data stage
