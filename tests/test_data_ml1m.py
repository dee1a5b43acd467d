"""Integration: the cold-start split of the full MovieLens-1M mirror (needs MML_DATA_MIRROR)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mml.errors import DataError
from training.data import load_items, load_split
from training.data.coldstart import ML1M_T
from training.data.generic import DataWarning
from training.data.prepare import prepare_dataset

pytestmark = pytest.mark.slow


def grouped_in_time_order(frame: pd.DataFrame) -> bool:
    """Each user's rows are contiguous and in time order."""
    users, times = frame["user_id"].to_numpy(), frame["timestamp"].to_numpy()
    same_user = users[1:] == users[:-1]
    contiguous = int((~same_user).sum()) + 1 == frame["user_id"].nunique()
    return contiguous and bool((np.diff(times)[same_user] >= 0).all())


def test_default_split_counts(ml1m_dir: Path) -> None:
    """Counted independently of this code: 5,365 old users, 791,270 old interactions, 3,662 old
    items, 675 new users (T = 2000-12-01T00:00:00Z)."""
    stats = json.loads((ml1m_dir / "stats.json").read_text())
    assert stats["T"] == ML1M_T
    assert stats["n_old_users"] == 5365
    assert stats["n_old_interactions"] == 791_270
    assert stats["n_old_items"] == 3662
    assert stats["n_new_users"] == 675
    assert stats["n_items"] == 3883 and stats["n_new_items"] == 3883 - 3662
    assert stats["n_items_with_image"] == 3872  # 11 movies have no poster
    assert stats["n_new_users_dropped"] == 0


def test_default_split_invariants(ml1m_dir: Path) -> None:
    old = pd.read_parquet(ml1m_dir / "old_interactions.parquet")
    new = pd.read_parquet(ml1m_dir / "new_users.parquet")
    assert old["timestamp"].max() <= ML1M_T < new["timestamp"].min()
    assert not old["user_id"].isin(new["user_id"].unique()).any()
    assert grouped_in_time_order(old) and grouped_in_time_order(new)

    split = load_split(ml1m_dir)
    assert len(split.old_seqs) == 5365 and sum(len(s) for s in split.old_seqs) == 791_270
    assert np.unique(np.concatenate(split.old_seqs)).tolist() == list(range(1, 3663))
    assert split.new_support.shape == (675, 8) and split.new_valid.shape == split.new_query.shape == (675,)

    items = load_items(ml1m_dir)
    assert items["is_old"].sum() == 3662 and items["is_old"].iloc[:3662].all()
    toy = items.set_index("item_id").loc["1"]
    assert (toy["title"], toy["year"], toy["genres"]) == ("Toy Story", 1995, "Animation|Children's|Comedy")
    assert Path(toy["image_path"]).is_absolute() and Path(toy["image_path"]).is_file()
    assert any("é" in title for title in items["title"])  # latin-1 decoded


def test_cold_items_on_ml1m(ml1m_dir: Path, mirror: Path, tmp_path: Path) -> None:
    stats = prepare_dataset(tmp_path / "cold", mirror=mirror, cold_items=0.1, verbose=False)
    assert stats["n_cold_items"] == round(0.1 * 3662) == 366
    assert stats["n_old_items"] == 3662 - 366
    assert stats["n_new_users"] == 675 and stats["n_old_users"] <= 5365
    assert stats["n_old_interactions"] < 791_270
    cold = load_split(tmp_path / "cold")
    assert np.concatenate(cold.old_seqs).max() == 3296
    default_items = load_items(ml1m_dir).set_index("item_id")
    cold_items = load_items(tmp_path / "cold").set_index("item_id")
    made_new = default_items.index[default_items["is_old"] & ~cold_items.loc[default_items.index, "is_old"]]
    assert len(made_new) == 366
    new_default = pd.read_parquet(ml1m_dir / "new_users.parquet")
    new_cold = pd.read_parquet(tmp_path / "cold" / "new_users.parquet")
    ids_default = default_items.reset_index().set_index("item_idx")["item_id"]
    ids_cold = cold_items.reset_index().set_index("item_idx")["item_id"]
    assert (
        ids_default.loc[new_default["item_idx"]].to_numpy() == ids_cold.loc[new_cold["item_idx"]].to_numpy()
    ).all()


def test_official_copy_checked_by_sha256(mirror: Path, tmp_path: Path) -> None:
    """One changed byte in a mirror copy is an error; the same folder as --source only warns."""
    copy = tmp_path / "copy"
    (copy / "ml-1m").mkdir(parents=True)
    (copy / "ml-1m-posters").mkdir()  # no posters in this copy
    for name in ("movies.dat", "users.dat", "ratings.dat"):
        shutil.copy(mirror / "ml-1m" / name, copy / "ml-1m" / name)
    ratings = copy / "ml-1m" / "ratings.dat"
    data = bytearray(ratings.read_bytes())
    data[-2:-1] = b"1" if data[-2:-1] != b"1" else b"2"  # the last timestamp's last digit
    ratings.write_bytes(bytes(data))
    with pytest.raises(DataError, match="ratings.dat: sha256 .* corrupt or modified"):
        prepare_dataset(tmp_path / "out", mirror=copy, verbose=False)
    with pytest.warns(DataWarning, match="not the official MovieLens-1M"):
        stats = prepare_dataset(tmp_path / "out", source=copy, T=ML1M_T, verbose=False)
    assert stats["n_old_users"] == 5365 and stats["n_items_with_image"] == 0
