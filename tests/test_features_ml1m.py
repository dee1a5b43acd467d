"""Integration: the features of the full ML-1M catalogue (3,883 films, 3,872 posters), built once
per machine by the `ml1m_features_dir` fixture (tests/conftest.py), cached by input hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mml.encoders import item_text, load_spec
from training.features import load_features

pytestmark = pytest.mark.slow


def test_every_item_has_a_unit_text_row(ml1m_features_dir: Path):
    items = pd.read_parquet(ml1m_features_dir / "items.parquet")
    features = load_features(ml1m_features_dir)
    n = len(items)
    assert n == 3883
    assert features.text.shape == (n + 1, 384) and features.image.shape == (n + 1, 1280)
    assert list(features.item_id[1:]) == list(items["item_id"])
    np.testing.assert_allclose(np.linalg.norm(features.text[1:], axis=1), 1.0, atol=1e-5)
    assert not features.text[0].any() and not features.image_mask[0]


def test_mask_is_false_exactly_for_items_without_a_poster_file(ml1m_features_dir: Path, mirror: Path):
    features = load_features(ml1m_features_dir)
    has_file = np.array(
        [(mirror / "ml-1m-posters" / f"{item_id}.jpg").is_file() for item_id in features.item_id[1:]]
    )
    np.testing.assert_array_equal(features.image_mask[1:], has_file)
    assert int(features.image_mask.sum()) == 3872
    np.testing.assert_allclose(np.linalg.norm(features.image[features.image_mask], axis=1), 1.0, atol=1e-5)
    assert not features.image[~features.image_mask].any()
    meta = json.loads((ml1m_features_dir / "features.json").read_text())
    assert meta["n_images"] == 3872 and len(meta["items_without_image"]) == 11


def test_data_stage_text_is_item_text(ml1m_features_dir: Path):
    """The service builds a new item's text with mml.encoders.item_text: it must match training's."""
    items = pd.read_parquet(ml1m_features_dir / "items.parquet")
    rebuilt = [item_text(r.title, r.year, r.genres) for r in items.itertuples()]
    assert rebuilt == list(items["text"])


def test_no_two_posters_or_titles_collapse(ml1m_features_dir: Path):
    """Distinct films get distinct vectors (a broken encoder tends to map everything to one point)."""
    features = load_features(ml1m_features_dir)
    image = features.image[features.image_mask]
    rng = np.random.default_rng(0)
    sample = rng.choice(len(image), size=500, replace=False)
    similarity = image[sample] @ image[sample].T
    off_diagonal = similarity[~np.eye(len(sample), dtype=bool)]
    assert off_diagonal.mean() < 0.7 and off_diagonal.max() < 0.9999
    text = features.text[1:]
    text_similarity = text[sample] @ text[sample].T
    assert text_similarity[~np.eye(len(sample), dtype=bool)].mean() < 0.6
    assert load_spec(ml1m_features_dir / "encoders").image_dim == image.shape[1]
