"""Eq. 14 neighbour search (mml/neighbours.py, torch-free)."""

from __future__ import annotations

import numpy as np
import pytest

from mml.neighbours import NeighbourIndex, catalogue_neighbours


def _features(n: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n + 1, 7)).astype(np.float32)
    image = rng.normal(size=(n + 1, 5)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    mask = np.ones(n + 1, dtype=bool)
    mask[[0, 4, 25]] = False
    image[~mask] = 0.0
    text[0] = 0.0
    return text, image, mask


def _eq14(text, image, mask, z, o):
    """Brute force q_{z,o}: mean over the modalities z has; an old item without a poster -> image cos 0."""
    cos_text = float(text[z] @ text[o])
    if not mask[z]:
        return cos_text
    return (cos_text + (float(image[z] @ image[o]) if mask[o] else 0.0)) / 2


def test_search_matches_brute_force_eq14_and_excludes_self():
    text, image, mask = _features()
    old = np.arange(1, 21)
    index = NeighbourIndex(old, text[old], image[old], mask[old])
    queries = np.arange(1, 31)
    exclude = np.where(queries <= 20, queries, -1)
    ids, scores = index.search(text[queries], image[queries], mask[queries], k=4, exclude=exclude)
    for row, z in enumerate(queries):
        candidates = [o for o in old if o != z]
        expected = sorted(candidates, key=lambda o: -_eq14(text, image, mask, z, o))[:4]
        assert ids[row].tolist() == expected, z
        assert np.allclose(scores[row], [_eq14(text, image, mask, z, o) for o in expected], atol=1e-5)
        assert z not in ids[row]


def test_catalogue_table_old_items_exclude_themselves_new_items_search_old():
    text, image, mask = _features()
    table = catalogue_neighbours(text, image, mask, n_old_items=20, k=3)
    assert table.shape == (31, 3)
    assert (table[1:] >= 1).all() and (table[1:] <= 20).all()
    for item in range(1, 21):
        assert item not in table[item]
    assert (table[0] == 0).all()


def test_errors_name_the_problem():
    text, image, mask = _features()
    index = NeighbourIndex(np.arange(1, 4), text[1:4], image[1:4], mask[1:4])
    with pytest.raises(ValueError, match="k=5"):
        index.search(text[:2], image[:2], mask[:2], k=5)
    with pytest.raises(ValueError, match="n_old_items"):
        catalogue_neighbours(text, image, mask, n_old_items=0, k=2)
