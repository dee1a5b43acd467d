"""Pop and ItemKNN on toy splits, computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.data import Split
from training.evaluation.baselines.itemknn import ItemKNN, cooccurrence, knn_scores
from training.evaluation.baselines.pop import Pop
from training.evaluation.protocol import evaluate


def _split(old_seqs, support, valid, query, n_items: int, n_old_items: int) -> Split:
    return Split(
        n_items=n_items,
        n_old_items=n_old_items,
        old_users=np.array([f"o{i}" for i in range(len(old_seqs))]),
        old_seqs=[np.array(s, dtype=np.int32) for s in old_seqs],
        new_users=np.array([f"n{i}" for i in range(len(query))]),
        new_support=np.array(support, dtype=np.int32),
        new_valid=np.array(valid, dtype=np.int32),
        new_query=np.array(query, dtype=np.int32),
    )


def test_pop_by_hand() -> None:
    # D_old counts: item 1 x1, item 2 x2, item 3 x3; items 4, 5 are new (count 0)
    split = _split(
        [[1, 2, 3], [2, 3], [3]],
        support=[[1], [3], [1]],
        valid=[2, 1, 3],
        query=[3, 2, 4],
        n_items=5,
        n_old_items=3,
    )
    result = evaluate(Pop(), split)
    unmasked = result.per_user["unmasked"]
    # user 0: item 3 is the most popular -> rank 1; user 1: item 2 -> rank 2;
    # user 2: new item 4 ties with new item 5 behind items 3, 2, 1 -> position 4 or 5
    assert unmasked["mrr@5"] == pytest.approx([1.0, 0.5, (1 / 4 + 1 / 5) / 2])
    assert unmasked["recall@5"] == pytest.approx([1.0, 1.0, 1.0])
    assert unmasked["ndcg@5"][1] == pytest.approx(1 / math.log2(3))
    masked = result.per_user["masked"]
    # user 1's history (3, 1) is masked: item 2 becomes first; user 2's history (1, 3): item 4 ties
    # with item 5 right behind item 2
    assert masked["mrr@5"] == pytest.approx([1.0, 1.0, (1 / 2 + 1 / 3) / 2])
    # user 0: history (1, 2) masked, item 3 stays first
    assert masked["recall@5"][0] == 1.0


def test_itemknn_user_level_similarity_and_recency_weights_by_hand() -> None:
    old = [np.array([1, 2]), np.array([1, 2]), np.array([1, 3])]
    counts = cooccurrence(old, n_items=4, window=None)
    assert counts[1, 2] == 2 and counts[2, 1] == 2 and counts[1, 3] == 1 and counts[2, 3] == 0
    assert np.all(np.diag(counts) == 0)

    knn = ItemKNN(windows=(None,))
    split = _split(old, support=[[2, 3]], valid=[1], query=[2], n_items=4, n_old_items=3)
    result = evaluate(knn, split)
    # users holding each item: n1 = 3, n2 = 2, n3 = 1 -> sim(1,2) = 2/sqrt(6), sim(1,3) = 1/sqrt(3)
    sim12, sim13 = 2 / math.sqrt(6), 1 / math.sqrt(3)
    assert knn.sim[1, 2] == pytest.approx(sim12) and knn.sim[1, 3] == pytest.approx(sim13)
    # history (2, 3) weighted 1/2 and 1 (most recent weighs 1): only item 1 gets a score
    scores = knn_scores(knn.sim, np.array([[2, 3]]))
    assert scores[0] == pytest.approx([0.0, 0.5 * sim12 + sim13, 0.0, 0.0, 0.0])
    # the query is ranked from support + validation item (2, 3, 1): item 2 scores sim(1,2) = 0.816,
    # above item 1 (sim12 / 3 + 2 * sim13 / 3 = 0.657) and item 3 (sim13 = 0.577)
    assert result.per_user["unmasked"]["mrr@5"][0] == 1.0
    assert knn_scores(knn.sim, np.array([[2, 3, 1]]))[0] == pytest.approx(
        [0.0, sim12 / 3 + 2 * sim13 / 3, sim12, sim13, 0.0]
    )


def test_itemknn_window_counts_only_nearby_pairs_and_is_chosen_on_validation() -> None:
    old = [np.array([1, 2, 3, 4])] * 3
    near = cooccurrence(old, n_items=4, window=1)
    assert near[1, 2] == 3 and near[2, 3] == 3 and near[1, 3] == 0 and near[1, 4] == 0
    assert cooccurrence(old, n_items=4, window=2)[1, 3] == 3
    # the next item after 1 is 2 in D_old: window 1 ranks it first, user-level co-occurrence ties
    # 2, 3 and 4; the validation item (2) must pick window 1
    knn = ItemKNN(windows=(None, 1))
    evaluate(knn, _split(old, support=[[1]], valid=[2], query=[3], n_items=4, n_old_items=4))
    assert knn.window == 1
    assert knn.info["validation"]["1"] > knn.info["validation"]["None"]
