"""item_text: the one place that builds the text encoder's input (data stage, features, service)."""

from __future__ import annotations

import math

import pytest

from mml.encoders import item_text


def test_title_year_genres():
    text = item_text("Toy Story", 1995, "Animation|Children's|Comedy")
    assert text == "Toy Story (1995) | Animation, Children's, Comedy"


def test_genres_as_list_and_description_appended():
    text = item_text("Heat", 1995, ["Action", "Crime"], description="  A cop and a thief.\n")
    assert text == "Heat (1995) | Action, Crime | A cop and a thief."


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_missing_year_is_left_out(missing):
    assert item_text("Heat", missing, "Action") == "Heat | Action"


def test_pandas_na_year_and_numpy_year():
    pd = pytest.importorskip("pandas")
    np = pytest.importorskip("numpy")
    assert item_text("Heat", pd.NA, "Action") == "Heat | Action"
    assert item_text("Heat", np.int32(1995), "Action") == "Heat (1995) | Action"
    assert item_text("Heat", 1995.0, "Action") == "Heat (1995) | Action"


@pytest.mark.parametrize("genres", [None, "", "|", [], math.nan])
def test_missing_genres_are_left_out(genres):
    assert item_text("Heat", 1995, genres) == "Heat (1995)"


def test_whitespace_is_collapsed_and_empty_genres_dropped():
    assert item_text("  The   Matrix ", 1999, "Action||Sci-Fi ") == "The Matrix (1999) | Action, Sci-Fi"


@pytest.mark.parametrize(
    ("title", "year", "message"),
    [
        ("", 1995, "title"),
        ("   ", 1995, "title"),
        (None, 1995, "title"),
        ("Heat", 1995.5, "year"),
        ("Heat", "soon", "year"),
    ],
)
def test_bad_fields_are_named(title, year, message):
    with pytest.raises(ValueError, match=message):
        item_text(title, year, "Action")
