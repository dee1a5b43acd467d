"""The generic input format (docs/architecture.md section 1): read and validate a source folder.

A source folder holds `interactions.csv|parquet` (user_id, item_id, timestamp) and
`items.csv|parquet` (item_id, title, optional year, genres, description, image). Every loader
(this one, the MovieLens converter) returns the same in-memory `SourceTables`, so the cold-start
split never depends on where the data came from.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mml.errors import DataError

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_REQUIRED = ("item_id", "title")
ITEM_OPTIONAL = ("year", "genres", "description", "image")
TABLE_SUFFIXES = (".csv", ".parquet")
URL_PREFIXES = ("http://", "https://")


class DataWarning(UserWarning):
    """Input that is usable but suspicious (dropped users, a non-official dataset, a missing image)."""


@dataclass
class SourceTables:
    """A dataset in the generic format, in memory.

    interactions: user_id, item_id (strings; a pandas categorical of strings is fine and faster),
    timestamp int64, in file order (the order breaks ties).
    items: item_id str (unique), title str, year Int32 (nullable), genres str ("" = none),
    description str ("" = none), image str or None (absolute local path, or an http(s) URL still
    to be fetched).
    """

    interactions: pd.DataFrame
    items: pd.DataFrame


def find_table(folder: Path, stem: str) -> Path | None:
    """`folder/stem.csv` or `folder/stem.parquet`; None when neither exists; DataError when both do."""
    found = [
        folder / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES if (folder / f"{stem}{suffix}").is_file()
    ]
    if len(found) > 1:
        raise DataError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0] if found else None


def is_generic_folder(folder: Path) -> bool:
    return find_table(folder, "interactions") is not None and find_table(folder, "items") is not None


def _row_name(path: Path) -> Callable[[int], str]:
    """How to name row i of a table in an error message: the file line for CSV (header = line 1)."""
    if path.suffix == ".csv":
        return lambda i: f"{path.name} line {i + 2}"
    return lambda i: f"{path.name} row {i}"


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        if path.suffix == ".csv":
            # Everything as text: ids stay strings ("007" != "7"), and "NA" is a title, not a null.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read the table: {first_line}") from exc
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (required: {', '.join(required)})")
    return frame.reset_index(drop=True)


def _blank(values: pd.Series) -> np.ndarray:
    """True where a cell is missing or an empty/whitespace string."""
    return (values.isna() | values.astype("string").str.strip().eq("")).to_numpy(dtype=bool)


def _ids(frame: pd.DataFrame, column: str, row_name: Callable[[int], str]) -> pd.Series:
    """An id column as stripped strings; a missing id is an error naming its row."""
    values = frame[column]
    if pd.api.types.is_float_dtype(values):  # Parquet floats: 7.0 -> "7" (a non-integral id is an error)
        numbers = values.to_numpy(dtype=float)
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{row_name(i)}: {column} {values.iloc[i]!r} is not an id")
        values = pd.Series(numbers.astype(np.int64))
    blank = _blank(values)
    if blank.any():
        raise DataError(f"{row_name(int(np.flatnonzero(blank)[0]))}: {column} is missing")
    return values.astype(str).str.strip()


def parse_integers(values: pd.Series, what: str, row_name: Callable[[int], str], allow_missing: bool = False):
    """Integer column -> int64 array (or nullable Int64 with allow_missing); names the first bad row."""
    if pd.api.types.is_integer_dtype(values) and not allow_missing:
        return values.to_numpy(dtype=np.int64)
    missing = _blank(values)
    text = values.astype("string").str.strip()
    numbers = pd.to_numeric(text.where(~missing, None), errors="coerce").to_numpy(
        dtype=float, na_value=np.nan
    )
    bad = (~missing & (~np.isfinite(numbers) | (numbers != np.round(numbers)))) | (
        missing & (not allow_missing)
    )
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        shown = "missing" if missing[i] else f"{values.iloc[i]!r} is not an integer"
        raise DataError(f"{row_name(i)}: {what} {shown}")
    if allow_missing:
        result = pd.Series(np.where(missing, 0, numbers).astype(np.int64), dtype="Int64")
        result[missing] = pd.NA
        return result
    return numbers.astype(np.int64)


def check_known_items(
    interactions: pd.DataFrame, items: pd.DataFrame, row_name: Callable[[int], str]
) -> None:
    """Every interaction's item must be in the items table (names the first offending row)."""
    known = interactions["item_id"].isin(items["item_id"]).to_numpy(dtype=bool)
    if not known.all():
        i = int(np.flatnonzero(~known)[0])
        n_bad = int((~known).sum())
        raise DataError(
            f"{row_name(i)}: unknown item {interactions['item_id'].iloc[i]!r} "
            f"(not in the items table; {n_bad} interaction(s) affected)"
        )


def check_unique_items(items: pd.DataFrame, row_name: Callable[[int], str]) -> None:
    duplicated = items["item_id"].duplicated().to_numpy(dtype=bool)
    if duplicated.any():
        i = int(np.flatnonzero(duplicated)[0])
        raise DataError(f"{row_name(i)}: duplicate item_id {items['item_id'].iloc[i]!r}")


def read_interactions(path: Path) -> pd.DataFrame:
    row_name = _row_name(path)
    frame = _read_table(path, INTERACTION_COLUMNS)
    return pd.DataFrame(
        {
            "user_id": _ids(frame, "user_id", row_name).astype("category"),
            "item_id": _ids(frame, "item_id", row_name).astype("category"),
            "timestamp": parse_integers(frame["timestamp"], "timestamp", row_name),
        }
    )


def _optional_text(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series([""] * len(frame), dtype=str)
    return frame[column].astype("string").fillna("").str.strip().astype(str)


def _resolve_image(value: str, base: Path) -> str | None:
    if not value:
        return None
    if value.startswith(URL_PREFIXES):
        return value
    return str((base / value).resolve())


def read_items(path: Path) -> pd.DataFrame:
    row_name = _row_name(path)
    frame = _read_table(path, ITEM_REQUIRED)
    items = pd.DataFrame({"item_id": _ids(frame, "item_id", row_name)})
    title = _optional_text(frame, "title")
    empty = (title == "").to_numpy(dtype=bool)
    if empty.any():
        raise DataError(f"{row_name(int(np.flatnonzero(empty)[0]))}: title is missing")
    items["title"] = title
    if "year" in frame.columns:
        items["year"] = parse_integers(frame["year"], "year", row_name, allow_missing=True).astype("Int32")
    else:
        items["year"] = pd.array([pd.NA] * len(frame), dtype="Int32")
    items["genres"] = _optional_text(frame, "genres")
    items["description"] = _optional_text(frame, "description")
    images = [_resolve_image(value, path.parent.resolve()) for value in _optional_text(frame, "image")]
    missing = [
        image
        for image in images
        if image and not image.startswith(URL_PREFIXES) and not Path(image).is_file()
    ]
    if missing:
        warnings.warn(
            f"{path.name}: {len(missing)} image file(s) do not exist (first: {missing[0]}); "
            "those items have no image",
            DataWarning,
            stacklevel=2,
        )
        missing_set = set(missing)
        images = [None if image in missing_set else image for image in images]
    items["image"] = pd.Series(images, dtype=object)
    check_unique_items(items, row_name)
    return items


def read_generic(folder: Path) -> SourceTables:
    """Read and validate a source folder in the generic format."""
    interactions_path = find_table(folder, "interactions")
    items_path = find_table(folder, "items")
    if interactions_path is None or items_path is None:
        raise DataError(f"{folder}: expected interactions.csv|parquet and items.csv|parquet")
    items = read_items(items_path)
    interactions = read_interactions(interactions_path)
    check_known_items(interactions, items, _row_name(interactions_path))
    return SourceTables(interactions=interactions, items=items)


def write_generic(tables: SourceTables, folder: Path, fmt: str = "parquet") -> None:
    """Write tables in the generic format (e.g. a converted MovieLens as a template for own data)."""
    if fmt not in ("csv", "parquet"):
        raise DataError(f"format must be 'csv' or 'parquet', not {fmt!r}")
    folder.mkdir(parents=True, exist_ok=True)
    interactions = tables.interactions.astype({"user_id": str, "item_id": str})
    for name, frame in (("interactions", interactions), ("items", tables.items)):
        target = folder / f"{name}.{fmt}"
        if fmt == "csv":
            frame.to_csv(target, index=False)
        else:
            frame.to_parquet(target, index=False)
