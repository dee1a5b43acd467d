"""The cold-start split on synthetic data, checked against a plain-Python reading of the protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mml.errors import DataError
from training.data import load_items, load_split
from training.data.coldstart import ML1M_T, SplitOptions, id_order, make_split, parse_time
from training.data.generic import DataWarning, SourceTables
from training.data.prepare import write_split

T = 1_000_000
LENGTH = 10  # support 8 + valid + query


def synthetic(seed: int = 0, n_users: int = 80, n_items: int = 50, n_unrated: int = 5) -> SourceTables:
    """Users starting around T, coarse timestamps (many ties), rows shuffled (file order matters)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(n_users):
        start = T + int(rng.integers(-40_000, 40_000))
        n = int(rng.integers(4, 30))
        times = start + np.sort(rng.integers(0, 60_000, n)) // 5_000 * 5_000
        rows += [(str(user), str(int(rng.integers(1, n_items + 1))), int(t)) for t in times]
    order = rng.permutation(len(rows))
    frame = pd.DataFrame([rows[i] for i in order], columns=["user_id", "item_id", "timestamp"])
    frame["timestamp"] = frame["timestamp"].astype(np.int64)
    ids = [str(i) for i in range(1, n_items + n_unrated + 1)]
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"Item {i}" for i in ids],
            "year": pd.array([2000] * len(ids), dtype="Int32"),
            "genres": ["Drama|Comedy"] * len(ids),
            "description": [""] * len(ids),
            "image": [None] * len(ids),
        }
    )
    return SourceTables(interactions=frame, items=items)


def reference_sequences(tables: SourceTables) -> dict[str, list[tuple[str, int]]]:
    """Per user: (item_id, timestamp) sorted by time, ties in file order (Python's sort is stable)."""
    sequences: dict[str, list[tuple[str, int]]] = {}
    for user, item, time in tables.interactions.itertuples(index=False):
        sequences.setdefault(user, []).append((item, int(time)))
    return {user: sorted(seq, key=lambda pair: pair[1]) for user, seq in sequences.items()}


def split(tables: SourceTables, **options) -> object:
    with pytest.warns(DataWarning, match="new user"):  # the synthetic data always has short new users
        return make_split(tables, SplitOptions(T=T, **options))


def test_split_matches_the_protocol() -> None:
    tables = synthetic()
    result = split(tables)
    reference = reference_sequences(tables)
    idx_to_id = dict(zip(result.items["item_idx"], result.items["item_id"], strict=True))

    old = result.old_interactions
    assert (old["timestamp"] <= T).all()
    expected_old = {u: [p for p in seq if p[1] <= T] for u, seq in reference.items() if seq[0][1] <= T}
    got_old = {
        user: [(idx_to_id[i], t) for i, t in zip(group["item_idx"], group["timestamp"], strict=True)]
        for user, group in old.groupby("user_id", sort=False)
    }
    assert got_old == expected_old  # same users, same items, same (stable) order

    new = result.new_users
    expected_new = {u: seq[:LENGTH] for u, seq in reference.items() if seq[0][1] > T and len(seq) >= LENGTH}
    got_new = {
        user: [(idx_to_id[i], t) for i, t in zip(group["item_idx"], group["timestamp"], strict=True)]
        for user, group in new.groupby("user_id", sort=False)
    }
    assert got_new == expected_new
    assert not set(got_new) & set(got_old)
    assert new["pos"].tolist() == list(range(LENGTH)) * len(got_new)
    assert new["role"].tolist() == (["support"] * 8 + ["valid", "query"]) * len(got_new)
    for _, group in new.groupby("user_id"):
        assert group["timestamp"].is_monotonic_increasing

    stats = result.stats
    dropped = sum(1 for seq in reference.values() if seq[0][1] > T and len(seq) < LENGTH)
    assert stats["n_new_users_dropped"] == dropped > 0
    assert stats["n_old_users"] == len(got_old) and stats["n_new_users"] == len(got_new)
    assert stats["n_old_interactions"] == len(old) and stats["n_new_interactions"] == LENGTH * len(got_new)


def test_item_index_old_items_first() -> None:
    result = split(synthetic())
    items, stats = result.items, result.stats
    n_old = stats["n_old_items"]
    assert items["item_idx"].tolist() == list(range(1, stats["n_items"] + 1))
    assert stats["n_items"] == n_old + stats["n_new_items"] == 55
    assert set(result.old_interactions["item_idx"]) == set(range(1, n_old + 1))
    assert items["is_old"].tolist() == [True] * n_old + [False] * stats["n_new_items"]
    # never-rated items 51..55 are new; within each group ids are in numeric order
    new_ids = items.loc[~items["is_old"], "item_id"].astype(int).tolist()
    assert {51, 52, 53, 54, 55} <= set(new_ids) and new_ids == sorted(new_ids)
    old_ids = items.loc[items["is_old"], "item_id"].astype(int).tolist()
    assert old_ids == sorted(old_ids)
    assert items["text"].iloc[0] == f"{items['title'].iloc[0]} (2000) | Drama, Comedy"


def test_cold_items() -> None:
    tables = synthetic()
    plain = split(tables)
    cold = split(tables, cold_items=0.2, seed=7)
    n_candidates = plain.stats["n_old_items"]
    n_cold = round(0.2 * n_candidates)
    assert cold.stats["n_cold_items"] == n_cold
    assert cold.stats["n_old_items"] == n_candidates - n_cold

    cold_ids = set(plain.items.loc[plain.items["is_old"], "item_id"]) - set(
        cold.items.loc[cold.items["is_old"], "item_id"]
    )
    assert len(cold_ids) == n_cold
    old_ids_in_d_old = set(cold.items.set_index("item_idx").loc[cold.old_interactions["item_idx"], "item_id"])
    assert not old_ids_in_d_old & cold_ids  # removed from D_old entirely
    assert set(cold.old_interactions["item_idx"]) == set(range(1, cold.stats["n_old_items"] + 1))

    # D_old without the cold items' rows, users left empty dropped; new users unchanged (by item id).
    plain_ids = plain.items.set_index("item_idx")["item_id"]
    expected = plain.old_interactions.assign(
        item_id=plain_ids.loc[plain.old_interactions["item_idx"]].to_numpy()
    )
    expected = expected[~expected["item_id"].isin(cold_ids)]
    cold_ids_by_idx = cold.items.set_index("item_idx")["item_id"]
    got = cold.old_interactions.assign(
        item_id=cold_ids_by_idx.loc[cold.old_interactions["item_idx"]].to_numpy()
    )
    pd.testing.assert_frame_equal(
        got[["user_id", "item_id", "timestamp"]].reset_index(drop=True),
        expected[["user_id", "item_id", "timestamp"]].reset_index(drop=True),
    )
    new_plain = plain.new_users.assign(item_id=plain_ids.loc[plain.new_users["item_idx"]].to_numpy())
    new_cold = cold.new_users.assign(item_id=cold_ids_by_idx.loc[cold.new_users["item_idx"]].to_numpy())
    assert new_plain[["user_id", "item_id", "timestamp"]].equals(
        new_cold[["user_id", "item_id", "timestamp"]]
    )


def test_cold_items_drop_emptied_old_users() -> None:
    items = pd.DataFrame(
        {"item_id": ["1", "2"], "title": ["A", "B"], "year": pd.array([None, None], dtype="Int32")}
    )
    items["genres"], items["description"], items["image"] = "", "", None
    rows = [("a", "1", T - 5), ("b", "2", T - 5)] + [("n", "1", T + k) for k in range(1, 11)]
    tables = SourceTables(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), items)
    result = make_split(tables, SplitOptions(T=T, cold_items=0.5, seed=0))
    assert result.stats["n_old_users"] == 1 and result.stats["n_old_users_emptied_by_cold_items"] == 1
    assert result.stats["n_old_items"] == 1 and len(result.old_interactions) == 1


def test_deterministic_under_a_seed() -> None:
    tables = synthetic(seed=3)
    first = split(tables, cold_items=0.3, seed=11)
    again = split(synthetic(seed=3), cold_items=0.3, seed=11)
    other = split(tables, cold_items=0.3, seed=12)
    for name in ("items", "old_interactions", "new_users"):
        pd.testing.assert_frame_equal(getattr(first, name), getattr(again, name))
    assert set(first.items.loc[first.items["is_old"], "item_id"]) != set(
        other.items.loc[other.items["is_old"], "item_id"]
    )


def test_ties_keep_file_order() -> None:
    items = pd.DataFrame(
        {"item_id": [str(i) for i in range(1, 13)], "title": "x", "genres": "", "description": ""}
    )
    items["year"], items["image"] = pd.array([pd.NA] * 12, dtype="Int32"), None
    # the new user's 12 rows: all at one time, in file order 12, 11, ..., 1; the old user ties too
    rows = [("old", "3", T), ("old", "1", T), ("old", "2", T)]
    rows += [("new", str(12 - k), T + 50) for k in range(12)]
    tables = SourceTables(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), items)
    result = make_split(tables, SplitOptions(T=T))
    ids = result.items.set_index("item_idx")["item_id"]
    assert ids.loc[result.old_interactions["item_idx"]].tolist() == ["3", "1", "2"]
    assert ids.loc[result.new_users["item_idx"]].tolist() == [str(12 - k) for k in range(10)]


def test_id_order_numeric_or_text() -> None:
    assert id_order(np.array(["10", "9", "100"])).tolist() == [1, 0, 2]
    assert id_order(np.array(["10", "9", "a"])).tolist() == [0, 1, 2]  # not all numeric: as text


def test_no_old_or_no_new_users_is_an_error() -> None:
    tables = synthetic()
    with pytest.raises(DataError, match="no interaction at or before T"):
        make_split(tables, SplitOptions(T=0))
    with pytest.raises(DataError, match="no new user"), pytest.warns(DataWarning):
        make_split(tables, SplitOptions(T=T, support=40))


def test_parse_time() -> None:
    assert parse_time("2000-12-01T00:00:00Z") == ML1M_T
    assert parse_time("2000-12-01") == ML1M_T
    assert parse_time("2000-12-01T01:00:00+01:00") == ML1M_T
    assert parse_time(str(ML1M_T)) == ML1M_T == parse_time(ML1M_T)
    with pytest.raises(DataError, match="T: 'yesterday'"):
        parse_time("yesterday")


def test_load_split_round_trip(tmp_path: Path) -> None:
    result = split(synthetic(), support=5)
    write_split(tmp_path, result)
    loaded = load_split(tmp_path)
    old, new = result.old_interactions, result.new_users
    assert loaded.n_items == 55 and loaded.n_old_items == result.stats["n_old_items"]
    assert loaded.old_users.tolist() == list(dict.fromkeys(old["user_id"]))
    assert [seq.tolist() for seq in loaded.old_seqs] == [
        group["item_idx"].tolist() for _, group in old.groupby("user_id", sort=False)
    ]
    assert all(seq.dtype == np.int32 for seq in loaded.old_seqs)
    assert loaded.new_support.shape == (result.stats["n_new_users"], 5)
    assert (
        loaded.new_support.tolist()
        == new[new["role"] == "support"]["item_idx"].to_numpy().reshape(-1, 5).tolist()
    )
    assert loaded.new_valid.tolist() == new[new["role"] == "valid"]["item_idx"].tolist()
    assert loaded.new_query.tolist() == new[new["role"] == "query"]["item_idx"].tolist()
    assert loaded.new_users.tolist() == list(dict.fromkeys(new["user_id"]))
    items = load_items(tmp_path)
    assert items["item_idx"].tolist() == list(range(1, 56))
    assert str(items["year"].dtype) == "Int32" and items["is_old"].dtype == bool


def test_load_split_of_a_folder_that_is_not_a_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a prepared split: missing stats.json"):
        load_split(tmp_path)
