"""Catalogue-scale benchmark building blocks (loadtest/scale.py): recall@k on hand-made examples, the
exact ground truth, the MIPS -> L2 reduction, the synthetic items' per-block norms, and a tiny end-to-end
run (figures present, exact recall 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # loadtest/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from loadtest.scale import (  # noqa: E402
    ScaleConfig,
    fit_items,
    gaussian_items,
    ground_truth,
    mips_items,
    mips_queries,
    recall_at_k,
    run_scale,
)


def test_recall_at_k_by_hand():
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(truth, truth) == 1.0
    assert recall_at_k(np.array([[3, 2, 1], [6, 4, 5]]), truth) == 1.0  # order does not matter
    # query 0: 2 of 3 found; query 1: none -> (2/3 + 0) / 2
    assert recall_at_k(np.array([[1, 2, 9], [7, 8, 9]]), truth) == pytest.approx(1 / 3)
    # Faiss pads missing results with -1: never a hit, even if the truth held -1
    assert recall_at_k(np.array([[1, -1, -1], [4, 5, 6]]), truth) == pytest.approx((1 / 3 + 1) / 2)
    # a duplicate id counts once
    assert recall_at_k(np.array([[1, 1, 1], [4, 5, 6]]), truth) == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="same Q"):
        recall_at_k(np.array([[1, 2, 3]]), truth)


def test_ground_truth_is_the_inner_product_top_k_best_first():
    items = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], np.float32)
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]], np.float32)
    # scores q0: 1,0,2,1,-1 -> 2, then {0,3} (tied); q1: 0,1,0,1,0 -> {1,3}; q2: 1,2,2,3,-1 -> 3, then {1,2}
    got = ground_truth(items, queries, k=3, batch=2)
    assert got[0, 0] == 2 and set(got[0, 1:].tolist()) == {0, 3}
    assert set(got[1, :2].tolist()) == {1, 3}
    assert got[2, 0] == 3 and set(got[2, 1:].tolist()) == {1, 2}


def test_mips_reduction_keeps_the_inner_product_order():
    rng = np.random.default_rng(0)
    items = (rng.standard_normal((500, 6)) * rng.uniform(0.1, 3.0, (500, 1))).astype(np.float32)
    queries = rng.standard_normal((20, 6)).astype(np.float32)
    aug_items, aug_queries = mips_items(items), mips_queries(queries)
    assert aug_items.shape == (500, 7) and aug_queries.shape == (20, 7)
    norms = np.linalg.norm(aug_items, axis=1)
    np.testing.assert_allclose(norms, norms.max(), rtol=1e-5)  # every item on one sphere
    l2 = ((aug_queries[:, None, :] - aug_items[None, :, :]) ** 2).sum(-1)
    by_l2 = np.argsort(l2, axis=1, kind="stable")[:, :10]
    assert recall_at_k(by_l2, ground_truth(items, queries, 10)) == 1.0


def test_synthetic_items_take_the_real_block_norms():
    rng = np.random.default_rng(1)
    real = np.zeros((201, 12), np.float32)  # row 0 = pad, left out of the fit
    real[1:] = rng.standard_normal((200, 12)) * np.repeat([0.2, 0.5, 0.7], 4)
    distribution = fit_items(real, "bundle:test")
    drawn = distribution.sample(1000, rng, chunk=300)
    assert drawn.shape == (1000, 12) and drawn.dtype == np.float32
    real_norms = [np.linalg.norm(real[1:, 4 * b : 4 * b + 4], axis=1) for b in range(3)]
    for b in range(3):
        drawn_norms = np.linalg.norm(drawn[:, 4 * b : 4 * b + 4], axis=1)
        # each drawn block norm is one of the real ones (rescaled exactly)
        nearest = np.abs(drawn_norms[:, None] - real_norms[b][None, :]).min(1)
        assert nearest.max() < 1e-4
    np.testing.assert_allclose(drawn.mean(0), real[1:].mean(0), atol=0.15)
    assert gaussian_items(block=4).sample(10, rng, 10).shape == (10, 12)


def test_a_tiny_run_reports_every_figure():
    config = ScaleConfig(
        sizes=(1500,),
        k=10,
        tune_queries=20,
        test_queries=20,
        exact_timed_queries=10,
        hnsw_sizes=(1500,),
        ivf_points_per_list=100,
        hnsw_ef_grid=(16, 32, 64, 128),
        build_threads=1,
    )
    figures = run_scale(config, bundle_path=None)
    assert figures["scale_data"] == "gaussian"
    assert figures["scale_1500_exact_recall_at_10"] == 1.0
    for method in ("exact", "ivf", "ivf_fp16", "ivf_flat", "hnsw"):
        for figure in ("p50_ms", "p99_ms", "cpu_p99_ms", "recall_at_10", "mib", "build_s", "load_s"):
            assert f"scale_1500_{method}_{figure}" in figures
    assert figures["scale_1500_method"] in ("exact", "ivf", "ivf_fp16", "ivf_flat", "hnsw")
    # method `ivf` is the service's default codec, re-ranked; ivf_flat is IVF-Flat, not re-ranked
    assert "codec=pq4fs,rerank=16" in figures["scale_1500_ivf_params"]
    assert "codec=flat,rerank=0" in figures["scale_1500_ivf_flat_params"]
    assert figures["scale_1500_recall_at_10"] >= 0.95
