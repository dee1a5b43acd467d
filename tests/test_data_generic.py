"""The generic input format (CSV and Parquet) through `prepare_dataset`, and its error messages."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from test_data_movielens import T, ratings_for, write_ml1m

from mml.errors import DataError
from training.data import load_items
from training.data.generic import DataWarning, read_generic, write_generic
from training.data.movielens import read_ml1m
from training.data.prepare import prepare_dataset

SPLIT_TABLES = ("items.parquet", "old_interactions.parquet", "new_users.parquet")


def write_tables(folder: Path, interactions: pd.DataFrame, items: pd.DataFrame, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in (("interactions", interactions), ("items", items)):
        if fmt == "csv":
            frame.to_csv(folder / f"{name}.csv", index=False)
        else:
            frame.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


def small_tables(image: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ids that look numeric but are strings ('007'), a description, an unrated item, one image."""
    rows = [("u1", "007", T - 10), ("u1", "b", T - 5), ("u2", "b", T - 1)]
    rows += [("u3", ["007", "b", "c"][k % 3], T + 100 + k // 2) for k in range(11)]
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame(
        {
            "item_id": ["007", "b", "c", "unrated"],
            "title": ["Bond", "Bee", "NA", "Nobody"],
            "year": pd.array([1962, None, 2001, None], dtype="Int64"),
            "genres": ["Action|Spy", "", "Drama", ""],
            "description": ["", "A bee.", "", ""],
            "image": [image, "", "", ""],
        }
    )
    return interactions, items


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_source(tmp_path: Path, fmt: str) -> None:
    folder = write_tables(tmp_path / "src", *small_tables(image="img/007.jpg"), fmt)
    (folder / "img").mkdir()
    (folder / "img" / "007.jpg").write_bytes(b"jpg")
    stats = prepare_dataset(tmp_path / "out", source=folder, T=T, verbose=False)
    assert (stats["n_old_users"], stats["n_new_users"], stats["n_old_items"], stats["n_items"]) == (
        2,
        1,
        2,
        4,
    )
    items = load_items(tmp_path / "out").set_index("item_id")
    assert items.index.tolist() == ["007", "b", "c", "unrated"]  # old first; ids not all numeric: as text
    assert items.loc["007", "image_path"] == str((folder / "img" / "007.jpg").resolve())
    assert pd.isna(items.loc["b", "image_path"])
    assert items.loc["c", "title"] == "NA"  # not read as a missing value
    assert items.loc["007", "text"] == "Bond (1962) | Action, Spy"
    assert items.loc["b", "text"] == "Bee | A bee."
    assert pd.isna(items.loc["b", "year"])


def test_csv_and_parquet_give_the_same_split(tmp_path: Path) -> None:
    for fmt in ("csv", "parquet"):
        prepare_dataset(
            tmp_path / fmt, source=write_tables(tmp_path / f"src-{fmt}", *small_tables(), fmt), T=T
        )
    for name in SPLIT_TABLES:
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "csv" / name), pd.read_parquet(tmp_path / "parquet" / name)
        )


def test_movielens_converted_to_generic_gives_the_same_split(tmp_path: Path) -> None:
    ml1m = write_ml1m(tmp_path / "ml", ratings_for())
    write_generic(read_ml1m(ml1m), tmp_path / "generic")
    with pytest.warns(DataWarning):
        prepare_dataset(tmp_path / "from-ml1m", source=ml1m, T=T, verbose=False)
    prepare_dataset(tmp_path / "from-generic", source=tmp_path / "generic", T=T, verbose=False)
    for name in SPLIT_TABLES:
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "from-ml1m" / name), pd.read_parquet(tmp_path / "from-generic" / name)
        )


def _break(interactions: pd.DataFrame, items: pd.DataFrame, case: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    interactions, items = interactions.astype({"timestamp": object}), items.copy()
    if case == "missing column":
        interactions = interactions.drop(columns="timestamp")
    elif case == "unknown item":
        interactions.loc[2, "item_id"] = "ghost"
    elif case == "bad timestamp":
        interactions.loc[3, "timestamp"] = "12:30"
    elif case == "duplicate item":
        items.loc[2, "item_id"] = "b"
    elif case == "missing title":
        items.loc[1, "title"] = ""
    elif case == "bad year":
        items = items.astype({"year": object})
        items.loc[0, "year"] = "sixties"
    return interactions, items


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing column", r"interactions.csv: missing column 'timestamp'"),
        ("unknown item", r"interactions.csv line 4: unknown item 'ghost'"),
        ("bad timestamp", r"interactions.csv line 5: timestamp '12:30' is not an integer"),
        ("duplicate item", r"items.csv line 4: duplicate item_id 'b'"),
        ("missing title", r"items.csv line 3: title is missing"),
        ("bad year", r"items.csv line 2: year 'sixties' is not an integer"),
    ],
)
def test_generic_errors_name_the_row(tmp_path: Path, case: str, message: str) -> None:
    folder = write_tables(tmp_path, *_break(*small_tables(), case), "csv")
    with pytest.raises(DataError, match=message):
        read_generic(folder)


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    folder = write_tables(tmp_path, *_break(*small_tables(), "unknown item"), "parquet")
    with pytest.raises(DataError, match=r"interactions.parquet row 2: unknown item 'ghost'"):
        read_generic(folder)


def test_missing_image_file_warns(tmp_path: Path) -> None:
    folder = write_tables(tmp_path, *small_tables(image="img/007.jpg"), "csv")  # not there
    with pytest.warns(DataWarning, match="1 image file"):
        tables = read_generic(folder)
    assert tables.items["image"].isna().all()


def test_source_folder_detection(tmp_path: Path) -> None:
    folder = write_tables(tmp_path / "both", *small_tables(), "csv")
    small_tables()[1].to_parquet(folder / "items.parquet")
    with pytest.raises(DataError, match="both items.csv and items.parquet"):
        prepare_dataset(tmp_path / "out", source=folder, T=T)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither the ML-1M layout .* nor the generic format"):
        prepare_dataset(tmp_path / "out", source=tmp_path / "empty", T=T)
    with pytest.raises(DataError, match="T is required"):
        prepare_dataset(tmp_path / "out", source=write_tables(tmp_path / "ok", *small_tables(), "csv"))
