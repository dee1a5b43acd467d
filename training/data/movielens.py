"""MovieLens-1M -> the generic format (docs/architecture.md section 1, docs/data.md).

A folder in the ML-1M layout holds the files of the official `ml-1m.zip` and the posters:

    ml-1m/ratings.dat        UserID::MovieID::Rating::Timestamp   (every rating is one interaction)
    ml-1m/movies.dat         MovieID::Title (Year)::Genre|Genre   (latin-1 in the official release)
    ml-1m/users.dat          UserID::Gender::Age::Occupation::Zip (only checksummed, not used)
    ml-1m-posters/<MovieID>.jpg                                   (optional per movie)

Ids become strings, "Name (1995)" becomes title "Name" + year 1995, and a movie's image is the
absolute path of its poster (None when the movie has no poster file).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from mml.errors import DataError
from training.data.generic import DataWarning, SourceTables, check_known_items, check_unique_items

DATA_DIR = "ml-1m"
POSTER_DIR = "ml-1m-posters"
RATINGS = "ratings.dat"
MOVIES = "movies.dat"
USERS = "users.dat"
FIELD_SEPARATOR = "::"
RATING_FIELDS = ("UserID", "MovieID", "Rating", "Timestamp")

# sha256 of the files of the official release (https://files.grouplens.org/datasets/movielens/ml-1m.zip).
OFFICIAL_SHA256 = {
    RATINGS: "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f",
    MOVIES: "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
    USERS: "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
}

# "Name (1995)": the year is the last parenthesised 4-digit group; earlier parentheses stay in the name.
TITLE_YEAR = re.compile(r"^(?P<name>.*?)\s*\((?P<year>\d{4})\)\s*$")


def is_ml1m_folder(root: Path) -> bool:
    return (root / DATA_DIR / RATINGS).is_file() or (root / DATA_DIR / MOVIES).is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(root: Path, official_required: bool) -> tuple[dict[str, str], bool]:
    """sha256 of the ML-1M files in `root/ml-1m`; returns (hashes, is_official).

    official_required (a mirror or a download, which claim to be the official release): a missing
    file or a checksum mismatch is a DataError. Otherwise (--source, any dataset in this layout):
    ratings.dat and movies.dat must exist, and a mismatch only warns that this is another dataset.
    """
    data = root / DATA_DIR
    needed = list(OFFICIAL_SHA256) if official_required else [RATINGS, MOVIES]
    for name in needed:
        if not (data / name).is_file():
            raise DataError(f"missing file {data / name}")
    hashes = {name: file_sha256(data / name) for name in OFFICIAL_SHA256 if (data / name).is_file()}
    mismatched = [name for name in OFFICIAL_SHA256 if hashes.get(name) != OFFICIAL_SHA256[name]]
    if mismatched and official_required:
        name = mismatched[0]
        raise DataError(
            f"{data / name}: sha256 {hashes[name][:12]}... does not match the official MovieLens-1M "
            f"file ({OFFICIAL_SHA256[name][:12]}...): the copy is corrupt or modified"
        )
    if mismatched:
        warnings.warn(
            f"{data}: not the official MovieLens-1M ({', '.join(mismatched)} differ by sha256): "
            "preparing it as another dataset in the ML-1M layout",
            DataWarning,
            stacklevel=2,
        )
    return hashes, not mismatched


def split_title(raw: str) -> tuple[str, int | None]:
    """'City of Lost Children, The (Cité des enfants perdus, La) (1995)' -> (name with its
    parenthesised alternative title, 1995); a title without a trailing year keeps year None."""
    match = TITLE_YEAR.match(raw)
    if match is None or not match.group("name").strip():
        return raw.strip(), None
    return match.group("name").strip(), int(match.group("year"))


def decode_text(raw: bytes) -> str:
    """UTF-8 when the bytes are valid UTF-8, else latin-1 (the official movies.dat is latin-1 and
    is not valid UTF-8; pure ASCII decodes identically either way)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_movies(path: Path) -> pd.DataFrame:
    """movies.dat -> item_id, title, year (Int32), genres; malformed lines name their line number."""
    rows = []
    for number, line in enumerate(decode_text(path.read_bytes()).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(FIELD_SEPARATOR)
        if len(fields) != 3:
            raise DataError(
                f"{path.name} line {number}: expected MovieID::Title::Genres (3 fields), got {len(fields)}"
            )
        movie_id, raw_title, genres = (field.strip() for field in fields)
        if not movie_id.isdigit():
            raise DataError(f"{path.name} line {number}: MovieID {movie_id!r} is not an integer")
        title, year = split_title(raw_title)
        if not title:
            raise DataError(f"{path.name} line {number}: empty title")
        rows.append((str(int(movie_id)), title, year, genres))
    if not rows:
        raise DataError(f"{path}: no movies")
    items = pd.DataFrame(rows, columns=["item_id", "title", "year", "genres"])
    items["year"] = items["year"].astype("Int32")
    check_unique_items(items, lambda i: f"{path.name} movie #{i + 1}")
    return items


def string_ids(numbers: np.ndarray) -> pd.Categorical:
    """Integer ids -> string ids, converting each distinct id once (a categorical of strings)."""
    codes, uniques = pd.factorize(numbers)
    return pd.Categorical.from_codes(codes, categories=pd.Index(uniques.astype(str), dtype=object))


def parse_ratings(path: Path) -> pd.DataFrame:
    """ratings.dat -> user_id, item_id, timestamp (int64) in file order; pandas' C parser splits on
    ':' (so '::' yields empty odd columns), which keeps the full file at well under a second."""
    n_columns = 2 * len(RATING_FIELDS) - 1
    try:
        raw = pd.read_csv(
            path,
            sep=":",
            header=None,
            names=range(n_columns),
            skip_blank_lines=False,  # keeps row i = line i + 1, so errors name the right line
            quoting=csv.QUOTE_NONE,
            encoding="latin-1",  # never fails to decode; garbage then fails the integer check below
            low_memory=False,
        )
    except pd.errors.ParserError as exc:
        line = re.search(r"line (\d+)", str(exc))
        where = f" line {line.group(1)}" if line else ""
        raise DataError(f"{path.name}{where}: expected {FIELD_SEPARATOR.join(RATING_FIELDS)}") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: no ratings") from exc
    blank_line = raw.isna().all(axis=1).to_numpy()
    raw = raw[~blank_line]
    if raw.empty:
        raise DataError(f"{path}: no ratings")
    fields = raw[list(range(0, n_columns, 2))].notna().all(axis=1)
    separators = raw[list(range(1, n_columns, 2))].isna().all(axis=1)
    malformed = ~(fields & separators).to_numpy()
    if malformed.any():
        line = int(raw.index[int(np.flatnonzero(malformed)[0])]) + 1
        raise DataError(f"{path.name} line {line}: expected {FIELD_SEPARATOR.join(RATING_FIELDS)}")
    values = {}
    for position, name in enumerate(RATING_FIELDS):
        column = raw[2 * position]
        if pd.api.types.is_integer_dtype(column):
            values[name] = column.to_numpy(dtype=np.int64)
            continue
        numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            line = int(raw.index[i]) + 1
            raise DataError(f"{path.name} line {line}: {name} {str(column.iloc[i])!r} is not an integer")
        values[name] = numbers.astype(np.int64)
    return pd.DataFrame(
        {
            "user_id": string_ids(values["UserID"]),
            "item_id": string_ids(values["MovieID"]),
            "timestamp": values["Timestamp"],
        },
        index=raw.index,  # file line - 1, for error messages; reset by the caller
    )


def poster_paths(items: pd.DataFrame, posters: Path | None) -> pd.Series:
    """Absolute poster path per movie, None where `posters/<MovieID>.jpg` does not exist."""
    available = set(os.listdir(posters)) if posters is not None and posters.is_dir() else set()
    base = posters.resolve() if posters is not None else None
    return pd.Series(
        [
            str(base / f"{item_id}.jpg") if f"{item_id}.jpg" in available else None
            for item_id in items["item_id"]
        ],
        dtype=object,
    )


def read_ml1m(root: Path) -> SourceTables:
    """Parse a folder in the ML-1M layout into the generic tables (checksums are checked elsewhere)."""
    data = root / DATA_DIR
    items = parse_movies(data / MOVIES)
    ratings = parse_ratings(data / RATINGS)
    line_of = ratings.index.to_numpy()
    ratings = ratings.reset_index(drop=True)
    check_known_items(ratings, items, lambda i: f"{RATINGS} line {int(line_of[i]) + 1}")
    items["description"] = ""
    items["image"] = poster_paths(items, root / POSTER_DIR)
    return SourceTables(interactions=ratings, items=items)
