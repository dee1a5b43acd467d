"""The cold-start split (paper Sec. 3 and 5.1): old users / D_old before T, new users after T."""

from __future__ import annotations

import json
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


def _require(folder: Path, name: str) -> Path:
    from mml.errors import DataError

    path = folder / name
    if not path.is_file():
        raise DataError(
            f"{folder} is not a prepared split: missing {name} (run `mml data prepare --out {folder}`)"
        )
    return path


def load_split(directory: str | Path) -> Split:
    """Read a folder written by `mml data prepare` (see docs/architecture.md section 2)."""
    import pandas as pd

    folder = Path(directory)
    stats = json.loads(_require(folder, "stats.json").read_text())
    old = pd.read_parquet(_require(folder, "old_interactions.parquet"))
    new = pd.read_parquet(_require(folder, "new_users.parquet"))

    # D_old is grouped by user, each user's rows in time order: cut it where the user changes.
    old_user = old["user_id"].to_numpy(dtype=str)
    starts = (
        np.flatnonzero(np.r_[True, old_user[1:] != old_user[:-1]]) if len(old_user) else np.array([], int)
    )
    old_items = old["item_idx"].to_numpy(dtype=np.int32)

    length = int(stats["support"]) + 2  # support + valid + query
    positions = new["pos"].to_numpy()
    if len(new) % length or not (positions == np.tile(np.arange(length), len(new) // length)).all():
        from mml.errors import DataError

        raise DataError(f"{folder / 'new_users.parquet'}: rows are not {length} positions per user in order")
    new_items = new["item_idx"].to_numpy(dtype=np.int32).reshape(-1, length)
    new_user = new["user_id"].to_numpy(dtype=str)[::length]
    return Split(
        n_items=int(stats["n_items"]),
        n_old_items=int(stats["n_old_items"]),
        old_users=old_user[starts],
        old_seqs=np.split(old_items, starts[1:]),
        new_users=new_user,
        new_support=new_items[:, : length - 2],
        new_valid=new_items[:, length - 2],
        new_query=new_items[:, length - 1],
        stats=stats,
    )


def load_items(directory: str | Path):
    """DIR/items.parquet as a pandas DataFrame, sorted by item_idx (row i = item_idx i + 1)."""
    import pandas as pd

    return pd.read_parquet(_require(Path(directory), "items.parquet")).sort_values(
        "item_idx", ignore_index=True
    )
