"""The co-occurrence learner: its table, its scores (dense == sparse), its place in the fusion and the
exactness of the served union of dense and co-occurrence candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mml.cooc import build_table, dense_scores, fused_cooc, merge_topk, moments, sparse_scores
from model.config import ModelConfig
from model.fusion import Fusion

SEQS = [np.array([1, 2, 3, 4]), np.array([2, 3, 5]), np.array([1, 2])]


def test_table_counts_within_the_window_normalised_by_occurrences():
    table = build_table(SEQS, n_items=6, window=1, m=3)
    # item 2 follows or precedes 1 twice, 3 twice; occurrences n_1 = 2, n_2 = 3, n_3 = 2
    row2 = dict(zip(table.items[2].tolist(), table.weights[2].tolist(), strict=True))
    assert row2[1] == pytest.approx(2 / np.sqrt(2 * 3))
    assert row2[3] == pytest.approx(2 / np.sqrt(3 * 2))
    assert 4 not in row2 and 5 not in row2  # two positions away: outside window 1
    assert (table.items[6] == 0).all() and (table.weights[6] == 0).all()  # never seen
    assert (table.items[0] == 0).all()
    wider = build_table(SEQS, n_items=6, window=2, m=5)
    assert 4 in wider.items[2].tolist()
    assert np.all(np.diff(wider.weights, axis=1) <= 0)  # best first


def test_top_m_keeps_the_strongest_neighbours_only():
    table = build_table(SEQS, n_items=6, window=3, m=1)
    assert table.items.shape == (7, 1)
    full = build_table(SEQS, n_items=6, window=3, m=6)
    assert table.weights[2, 0] == full.weights[2].max()


def test_dense_and_sparse_scores_agree_and_ignore_unknown_items():
    table = build_table(SEQS, n_items=6, window=2, m=4)
    history = np.array([[1, 9, 3, 0], [2, 0, 0, 0]])  # 9 = a registered new item beyond the table
    dense = dense_scores(table, history)
    for row in range(2):
        items, scores = sparse_scores(table, history[row])
        expected = np.zeros(7, np.float32)
        expected[items] = scores
        np.testing.assert_allclose(dense[row], expected, rtol=1e-6)
    # recency: the new item still counts as a position (weights 1/3, 2/3, 3/3)
    items, scores = sparse_scores(table, np.array([1, 9, 3]))
    only_3 = sparse_scores(table, np.array([3]))
    assert dict(zip(items, scores, strict=True))[only_3[0][0]] > 0


def test_torch_cooc_scores_match_numpy():
    from training.synthetic import synthetic

    split, features = synthetic()
    cfg = ModelConfig(d=16, d_ffn=32, max_len=12, n_neighbours=4, cooc_neighbours=5)
    from model.mml import MML

    model = MML(cfg, split.n_old_items, features.text, features.image, features.image_mask)
    table = build_table(split.old_seqs, split.n_items, window=2, m=5)
    model.set_cooc(table.items, table.weights)
    seq = np.array([[3, 7, 1, 0, 0], [5, 0, 0, 0, 0]])
    np.testing.assert_allclose(
        model.cooc_scores(torch.as_tensor(seq)).numpy(), dense_scores(table, seq), rtol=1e-5, atol=1e-7
    )


def test_sparse_moments_equal_dense_moments():
    rng = np.random.default_rng(0)
    dense = np.zeros(50)
    dense[rng.choice(50, 7, replace=False)] = rng.random(7)
    mean, var = moments(dense[dense > 0], 50)
    assert mean == pytest.approx(dense.mean()) and var == pytest.approx(dense.var())


@torch.no_grad()
def test_served_union_is_exactly_the_fusions_top_k():
    """The fusion's fused scores (torch, dense) vs the service's recipe: dense top-k plus the
    co-occurrence candidates, re-scored, merged (numpy, sparse)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    n, k = 400, 20
    cfg = ModelConfig(d=8, d_ffn=16, max_len=4, fusion_hidden=8, cooc_neighbours=3)
    fusion = Fusion(cfg, cooc=True)
    with torch.no_grad():
        fusion.cooc_scale.fill_(0.7)
    for trial in range(20):
        learners = [torch.randn(1, n + 1) for _ in range(3)]
        cooc = np.zeros(n + 1, np.float32)
        hit = rng.choice(np.arange(1, n + 1), size=int(rng.integers(0, 30)), replace=False)
        cooc[hit] = rng.random(len(hit)).astype(np.float32) * 3
        weights = torch.softmax(torch.randn(1, 4), dim=-1)
        fused = fusion([*learners, torch.as_tensor(cooc)[None]], weights)[0, 1:].numpy()
        # the dense part alone: the same fusion with the co-occurrence weight set to 0
        dense = fusion([*learners, torch.zeros(1, n + 1)], weights * torch.tensor([1.0, 1, 1, 0]))[0, 1:]
        dense = dense.numpy()
        top = np.argsort(-dense, kind="stable")[:k] + 1
        bonus, shift = fused_cooc(cooc[hit], float(weights[0, 3] * fusion.cooc_gamma()), n)
        items, scores = merge_topk(top, dense[top - 1], hit, bonus, dense[hit - 1], k)
        expected = np.argsort(-fused, kind="stable")[:k] + 1
        assert set(items.tolist()) == set(expected.tolist()), trial
        np.testing.assert_allclose(scores + shift, fused[items - 1], rtol=1e-4, atol=1e-4)
