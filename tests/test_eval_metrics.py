"""Full-ranking metrics against rankings computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluation.metrics import METRICS, mask_history, parse_metric, per_user_metrics


def _one(scores: list[float], target: int, metrics: tuple[str, ...], **kw) -> dict[str, float]:
    values = per_user_metrics(np.array([scores], dtype=np.float32), np.array([target]), metrics, **kw)
    return {name: float(v[0]) for name, v in values.items()}


def test_target_at_rank_two() -> None:
    # items 1..4 scored 0.9, 0.5, 0.7, 0.1; the target (item 3) is second
    got = _one([0.0, 0.9, 0.5, 0.7, 0.1], 3, ("recall@1", "recall@2", "mrr@2", "ndcg@2", "mrr@1"))
    assert got == pytest.approx(
        {"recall@1": 0.0, "recall@2": 1.0, "mrr@2": 0.5, "ndcg@2": 1 / math.log2(3), "mrr@1": 0.0}
    )


def test_target_at_rank_one_and_pad_column_is_ignored() -> None:
    # the pad column (index 0) has the highest score but is never a candidate
    got = _one([99.0, 0.2, 0.9, 0.1], 2, ("recall@1", "mrr@1", "ndcg@1"))
    assert got == {"recall@1": 1.0, "mrr@1": 1.0, "ndcg@1": 1.0}


def test_target_outside_top_k_scores_zero() -> None:
    got = _one([0.0, 0.9, 0.8, 0.7, 0.1], 4, ("recall@3", "mrr@3", "ndcg@3"))  # rank 4
    assert got == {"recall@3": 0.0, "mrr@3": 0.0, "ndcg@3": 0.0}
    assert _one([0.0, 0.9, 0.8, 0.7, 0.1], 4, ("mrr@4",))["mrr@4"] == pytest.approx(0.25)


def test_ties_count_as_a_uniformly_random_order_of_the_tied_block() -> None:
    # items 1, 2, 3 tie at 0.5; the target (2) is at position 1, 2 or 3 with probability 1/3 each
    scores = [0.0, 0.5, 0.5, 0.5, 0.1]
    got = _one(scores, 2, ("recall@1", "recall@2", "recall@3", "mrr@3", "ndcg@2"))
    assert got == pytest.approx(
        {
            "recall@1": 1 / 3,
            "recall@2": 2 / 3,
            "recall@3": 1.0,
            "mrr@3": (1 + 1 / 2 + 1 / 3) / 3,
            "ndcg@2": (1 + 1 / math.log2(3)) / 3,
        }
    )
    # the optimistic rule (1 + strictly greater) puts the target first
    assert _one(scores, 2, ("recall@1", "mrr@3"), tie_policy="optimistic") == {"recall@1": 1.0, "mrr@3": 1.0}


def test_constant_scores_give_the_metrics_of_a_random_ranking() -> None:
    n_items = 40
    values = per_user_metrics(np.zeros((3, n_items + 1)), np.array([1, 17, 40]), ("recall@10", "mrr@40"))
    assert values["recall@10"] == pytest.approx([10 / n_items] * 3)
    harmonic = sum(1 / p for p in range(1, n_items + 1))
    assert values["mrr@40"] == pytest.approx([harmonic / n_items] * 3)


def test_k_larger_than_the_catalogue() -> None:
    got = _one([0.0, 0.3, 0.2, 0.9, 0.1], 2, ("recall@50", "mrr@50", "ndcg@50"))  # rank 3 of 4 items
    assert got == pytest.approx({"recall@50": 1.0, "mrr@50": 1 / 3, "ndcg@50": 1 / math.log2(4)})


def test_masked_history_target_is_a_miss_even_for_a_large_k() -> None:
    scores = np.array([[0.0, 0.9, 0.5, 0.7, 0.1]], dtype=np.float32)
    masked = mask_history(scores, np.array([[1, 3, 0]]))  # history items 1 and 3, one pad entry
    assert masked[0, 1] == -np.inf and masked[0, 3] == -np.inf and masked[0, 2] == 0.5
    # item 2 moves from rank 3 to rank 1 once items 1 and 3 are masked
    assert per_user_metrics(masked, np.array([2]), ("mrr@5",))["mrr@5"][0] == 1.0
    # a target in the history can never be returned
    assert per_user_metrics(masked, np.array([3]), ("recall@50",))["recall@50"][0] == 0.0
    assert scores[0, 1] == np.float32(0.9)  # the input is not modified


def test_several_users_and_the_default_metric_set() -> None:
    scores = np.array([[0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    values = per_user_metrics(scores, np.array([1, 1]))
    assert tuple(values) == METRICS
    assert values["mrr@5"] == pytest.approx([1.0, 1 / 3])
    assert values["recall@5"] == pytest.approx([1.0, 1.0])


def test_bad_inputs_are_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _one([0.0, float("nan"), 0.1], 2, ("recall@5",))
    with pytest.raises(ValueError, match="padding"):
        _one([0.0, 0.2, 0.1], 0, ("recall@5",))
    with pytest.raises(ValueError, match="metric 'hits@5'"):
        parse_metric("hits@5")
    with pytest.raises(ValueError, match="tie_policy"):
        _one([0.0, 0.2, 0.1], 1, ("recall@5",), tie_policy="pessimistic")  # type: ignore[arg-type]
