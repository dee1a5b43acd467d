"""MovieLens-1M parsing and checksums, on small folders in the ML-1M layout built per test."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mml.errors import DataError
from training.data.generic import DataWarning
from training.data.movielens import parse_movies, parse_ratings, read_ml1m, split_title
from training.data.prepare import prepare_dataset

T = 1_000_000  # reference time of the small fixtures
MOVIES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi",
    "3::2001: A Space Odyssey (1968)::Drama|Mystery|Sci-Fi",
    "4::Untitled Without Year::Drama",
    "5::Never Rated (2000)::Comedy",
]


def write_ml1m(
    root: Path,
    ratings: list[str],
    movies: list[str] = MOVIES,
    posters: tuple[str, ...] = ("1", "2", "3"),
    movies_encoding: str = "latin-1",
) -> Path:
    """A folder in the ML-1M layout: ml-1m/{ratings,movies,users}.dat + ml-1m-posters/<id>.jpg."""
    data = root / "ml-1m"
    data.mkdir(parents=True)
    (data / "ratings.dat").write_text("".join(f"{line}\n" for line in ratings), encoding="ascii")
    (data / "movies.dat").write_bytes("".join(f"{line}\n" for line in movies).encode(movies_encoding))
    (data / "users.dat").write_text("1::F::1::10::48067\n", encoding="ascii")
    (root / "ml-1m-posters").mkdir()
    for movie_id in posters:
        (root / "ml-1m-posters" / f"{movie_id}.jpg").write_bytes(b"\xff\xd8 not decoded by the data stage")
    return root


def ratings_for(old_users: int = 3, new_users: int = 2) -> list[str]:
    """Old users rate before T (and once after: that rating must not enter D_old); new users rate
    12 times after T, with tied timestamps."""
    lines = []
    for user in range(1, old_users + 1):
        lines += [f"{user}::1::5::{T - 100 + user}", f"{user}::2::4::{T - 50}", f"{user}::3::3::{T + 10}"]
    for user in range(100, 100 + new_users):
        lines += [f"{user}::{1 + k % 4}::3::{T + 1000 + 10 * (k // 2)}" for k in range(12)]
    return lines


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Toy Story (1995)", ("Toy Story", 1995)),
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            ("City of Lost Children, The (Cité des enfants perdus, La)", 1995),
        ),
        ("2001: A Space Odyssey (1968)", ("2001: A Space Odyssey", 1968)),
        ("Seven (Se7en) (1995) ", ("Seven (Se7en)", 1995)),
        ("Untitled Without Year", ("Untitled Without Year", None)),
        ("(1995)", ("(1995)", None)),  # a bare year is the title, not a year
    ],
)
def test_split_title(raw: str, expected: tuple[str, int | None]) -> None:
    assert split_title(raw) == expected


def test_movies_latin1_and_utf8(tmp_path: Path) -> None:
    for encoding in ("latin-1", "utf-8"):
        root = write_ml1m(tmp_path / encoding, ratings_for(), movies_encoding=encoding)
        items = parse_movies(root / "ml-1m" / "movies.dat")
        assert items.loc[1, "title"] == "City of Lost Children, The (Cité des enfants perdus, La)"
        assert items.loc[1, "year"] == 1995
        assert pd.isna(items.loc[3, "year"])
        assert list(items["item_id"]) == ["1", "2", "3", "4", "5"]


def test_read_ml1m_posters_and_file_order(tmp_path: Path) -> None:
    root = write_ml1m(tmp_path, ratings_for())
    tables = read_ml1m(root)
    images = dict(zip(tables.items["item_id"], tables.items["image"], strict=True))
    assert images["1"] == str((root / "ml-1m-posters" / "1.jpg").resolve())
    assert images["4"] is None and images["5"] is None
    assert tables.interactions["user_id"].tolist()[:3] == ["1", "1", "1"]  # file order kept
    assert tables.interactions["timestamp"].dtype == "int64"


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("1::1::5::100::7", "ratings.dat line 3"),  # too many fields
        ("1::1::5", "ratings.dat line 3"),  # too few
        ("1::1::5::soon", "ratings.dat line 3: Timestamp 'soon' is not an integer"),  # bad timestamp
        ("1::x::5::100", "ratings.dat line 3: MovieID 'x' is not an integer"),
        ("1::1::5:100", "ratings.dat line 3: expected UserID::MovieID::Rating::Timestamp"),  # one ':'
        ("1::1::5::1.5", "ratings.dat line 3: Timestamp '1.5' is not an integer"),
    ],
)
def test_malformed_ratings_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "ratings.dat"
    path.write_text(f"1::1::5::100\n\n{bad_line}\n2::2::4::200\n")  # line 2 is blank (allowed)
    with pytest.raises(DataError, match=message):
        parse_ratings(path)


def test_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "ratings.dat"
    path.write_text("1::1::5::100\n\n\n2::2::4::200\n")
    ratings = parse_ratings(path)
    assert ratings["user_id"].tolist() == ["1", "2"]
    assert ratings.index.tolist() == [0, 3]  # index = line - 1


@pytest.mark.parametrize(
    ("movies", "message"),
    [
        (["1::Toy Story (1995)::Animation", "2::No genres field"], "movies.dat line 2: expected"),
        (["x::Toy Story (1995)::Animation"], "movies.dat line 1: MovieID 'x'"),
        (["1::A (1995)::Drama", "1::B (1996)::Drama"], "duplicate item_id '1'"),
        (["1::::Drama"], "movies.dat line 1: empty title"),
    ],
)
def test_malformed_movies(tmp_path: Path, movies: list[str], message: str) -> None:
    path = tmp_path / "movies.dat"
    path.write_text("\n".join(movies) + "\n", encoding="latin-1")
    with pytest.raises(DataError, match=message):
        parse_movies(path)


def test_unknown_item_names_the_line(tmp_path: Path) -> None:
    root = write_ml1m(tmp_path, ["1::1::5::100", "1::2::5::101", "1::99::5::102"])
    with pytest.raises(DataError, match="ratings.dat line 3: unknown item '99'"):
        read_ml1m(root)


def test_missing_file(tmp_path: Path) -> None:
    root = write_ml1m(tmp_path, ratings_for())
    (root / "ml-1m" / "movies.dat").unlink()
    with pytest.raises(DataError, match="missing file .*movies.dat"):
        prepare_dataset(tmp_path / "out", source=root, T=T, verbose=False)


def test_non_official_source_warns_but_a_mirror_must_be_official(tmp_path: Path) -> None:
    root = write_ml1m(tmp_path / "data", ratings_for())
    with pytest.warns(DataWarning, match="not the official MovieLens-1M"):
        stats = prepare_dataset(tmp_path / "out", source=root, T=T, verbose=False)
    assert stats["n_old_users"] == 3 and stats["n_new_users"] == 2
    assert stats["dataset"] == "data"
    with pytest.raises(DataError, match="ratings.dat: sha256 .* does not match the official"):
        prepare_dataset(tmp_path / "out2", mirror=root, verbose=False)
    assert not (tmp_path / "out2").exists()


def test_a_mirror_without_posters_or_users_is_refused(tmp_path: Path) -> None:
    root = write_ml1m(tmp_path, ratings_for())
    (root / "ml-1m" / "users.dat").unlink()
    with pytest.raises(DataError, match="missing file .*users.dat"):
        prepare_dataset(tmp_path / "out", mirror=root, verbose=False)
    for poster in (root / "ml-1m-posters").iterdir():
        poster.unlink()
    (root / "ml-1m-posters").rmdir()
    with pytest.raises(DataError, match="missing folder ml-1m-posters"):
        prepare_dataset(tmp_path / "out", mirror=root, verbose=False)


def test_mirror_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_ml1m(tmp_path / "mirror", ratings_for())
    monkeypatch.setenv("MML_DATA_MIRROR", str(root))
    with pytest.raises(DataError, match="sha256"):  # the env mirror is checked like --mirror
        prepare_dataset(tmp_path / "out", verbose=False)


def test_non_official_source_needs_T(tmp_path: Path) -> None:
    root = write_ml1m(tmp_path, ratings_for())
    with pytest.warns(DataWarning), pytest.raises(DataError, match="T is required"):
        prepare_dataset(tmp_path / "out", source=root, verbose=False)
