"""Pop and ItemKNN on toy splits, computed by hand; the trained baselines (SASRec, GRU4Rec, SASRec +
fine-tune, SML, CBML, MetaTL) on a tiny split with a planted sequential pattern."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.data import Split
from training.evaluation.baselines.cbml import CBML, genre_matrix
from training.evaluation.baselines.finetune import FinetuneConfig, SASRecFinetune, finetune_user
from training.evaluation.baselines.itemknn import ItemKNN, cooccurrence, knn_scores
from training.evaluation.baselines.meta_common import MetaBaselineConfig
from training.evaluation.baselines.metatl import MetaTL
from training.evaluation.baselines.pop import Pop
from training.evaluation.baselines.sequential import (
    SequentialBaseline,
    SequentialConfig,
    coordinate_search,
    step_budget,
)
from training.evaluation.baselines.sml import SML
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


# ---- trained baselines on a planted sequential pattern --------------------------------------------
#
# Items 1..40 lie on a line and every user walks along it one item at a time (a few random jumps
# in D_old), starting anywhere; popular items are the middle ones. The next item is the current one
# + 1, which no popularity ranking gets: every trained baseline must beat Pop by a wide margin.

N_LINE = 40


def _line_split(n_old: int = 300, n_new: int = 40, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)

    def walk(length: int) -> np.ndarray:
        start = int(rng.integers(1, N_LINE - length + 2))
        seq = np.arange(start, start + length)
        if length > 12 and rng.random() < 0.3:  # a jump in the middle of some old sequences
            cut = int(rng.integers(3, length - 3))
            seq[cut:] = np.clip(seq[cut:] + int(rng.integers(-3, 4)), 1, N_LINE)
        return seq.astype(np.int32)

    old = [walk(int(rng.integers(12, 25))) for _ in range(n_old)]
    new = np.stack([walk(10) for _ in range(n_new)])
    return _split(old, new[:, :8], new[:, 8], new[:, 9], n_items=N_LINE, n_old_items=N_LINE)


def _mrr(method, split) -> float:
    return float(evaluate(method, split).per_user["unmasked"]["mrr@10"].mean())


def _pop_mrr(split) -> float:
    return _mrr(Pop(), split)


TINY = MetaBaselineConfig(
    d=16, lrs=(1e-2,), batch_tasks=64, budget_epochs=1, min_steps=150, max_steps=150, eval_every=50,
    patience=3, dropout=0.0, metatl_hidden=(32, 16), cbml_clusters=2, cbml_inner_steps=1, threads=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def line():
    split = _line_split()
    return split, _pop_mrr(split)


def test_metatl_learns_the_transition(line) -> None:
    split, pop = line
    method = MetaTL(TINY)
    value = _mrr(method, split)
    assert value > pop + 0.3, (value, pop)
    assert method.info["meta_lr"] == 1e-2 and method.info["best_step"] > 0
    # the loss is chosen on validation: the reference's margin loss or full-softmax CE
    assert set(method.info["validation"]) == {"loss=margin/lr=0.01", "loss=ce/lr=0.01"}
    best = max(method.info["validation"].items(), key=lambda kv: kv[1]["value"])[0]
    assert best == f"loss={method.info['meta_loss']}/lr=0.01"


def test_cbml_learns_the_transition_and_uses_item_attributes(line) -> None:
    split, pop = line
    # two "genres": items 1..20 and 21..40, one item with both
    genres, n = genre_matrix(np.arange(1, 41), ["A"] * 19 + ["A|B"] + ["B"] * 20, 40)
    assert n == 2 and genres[20].tolist() == [1, 2] and genres[21].tolist() == [2, 0]
    method = CBML(TINY, genres=genres)
    value = _mrr(method, split)
    assert value > pop + 0.3, (value, pop)
    assert method.info["n_genres"] == 2


TINY_SEQ = SequentialConfig(
    ds=(16,), layers=1, heads=1, ffn_factor=2, dropouts=(0.0,), max_len=12, lrs=(1e-2,), losses=("ce",),
    windows="all", budget_epochs=1, min_steps=120, max_steps=120, eval_every=40, patience=3, threads=1,
)  # fmt: skip


@pytest.mark.parametrize("architecture", ["sasrec", "gru4rec"])
def test_sequential_baselines_learn_the_transition_with_early_stopping(line, architecture) -> None:
    split, pop = line
    method = SequentialBaseline(architecture, TINY_SEQ, architecture)
    value = _mrr(method, split)
    assert value > pop + 0.3, (value, pop)
    run = method.info["validation"]["loss=ce lr=0.01 dropout=0 d=16"]
    assert [step for step, _ in run["curve"]] == [40, 80, 120][: len(run["curve"])]
    assert method.info["best_step"] in (40, 80, 120) and method.info["d"] == 16


def test_step_budget_scales_with_the_data_but_has_a_floor() -> None:
    cfg = SequentialConfig(batch_windows=64, budget_epochs=20, min_steps=600, max_steps=1500)
    assert step_budget(5365, cfg) == (84, 1500, 84)  # ML-1M: capped
    assert step_budget(2000, cfg) == (32, 640, 32)  # 20 epochs
    # ten times fewer windows: the same floor of updates, not ten times fewer; validated every 20 steps
    assert step_budget(200, cfg) == (4, 600, 20)


def test_coordinate_search_tries_one_hyperparameter_at_a_time_and_keeps_the_best() -> None:
    calls = []

    def train(hp):
        calls.append(dict(hp))
        value = {3e-3: 0.5, 1e-3: 0.4}[hp["lr"]] + {0.2: 0.0, 0.5: 0.05}[hp["dropout"]] + hp["d"] / 1000
        return f"model{len(calls)}", value, {"best_step": 1}

    grid = {"loss": ("ce",), "lr": (1e-3, 3e-3), "dropout": (0.2, 0.5), "d": (64, 128)}
    hp, model, value, tried = coordinate_search(train, grid)
    assert hp == {"loss": "ce", "lr": 3e-3, "dropout": 0.5, "d": 128}
    assert len(calls) == 4 and model == "model4" and value == pytest.approx(0.5 + 0.05 + 0.128)
    assert calls[0] == {"loss": "ce", "lr": 1e-3, "dropout": 0.2, "d": 64}
    assert len(tried) == 4


def test_sasrec_finetune_grid_zero_steps_is_the_pretrained_sasrec(line) -> None:
    split, pop = line
    sasrec = SequentialBaseline("sasrec", TINY_SEQ, "sasrec")
    plain = evaluate(sasrec, split).per_user["unmasked"]["mrr@10"]
    zero = SASRecFinetune(TINY_SEQ, FinetuneConfig(steps=(0,), threads=1))
    np.testing.assert_allclose(evaluate(zero, split).per_user["unmasked"]["mrr@10"], plain)
    assert zero.info["ft_steps"] == 0
    # with a grid: the 0-step entry is the pre-trained model's validation value, and the chosen entry
    # is at least as good on validation
    tuned = SASRecFinetune(
        TINY_SEQ, FinetuneConfig(lrs=(1e-2,), steps=(0, 2), groups=("all", "items"), threads=1)
    )
    evaluate(tuned, split)
    table = tuned.info["ft_validation"]
    assert table["steps=0"] == pytest.approx(tuned.info["validation_best"])
    assert tuned.info["ft_validation_best"] >= table["steps=0"]
    assert set(table) == {"steps=0", "all/lr=0.01/steps=2", "items/lr=0.01/steps=2"}
    # fine-tuning moves only the chosen group
    support = split.new_support[0]
    items_only = finetune_user(tuned.net, support, "items", 1e-2, 2)
    assert set(items_only) == {"items.weight"}
    assert not np.allclose(items_only["items.weight"].numpy(), tuned.net.items.weight.detach().numpy())


def test_sml_learns_the_transition_through_its_periods(line) -> None:
    split, pop = line
    cfg = TINY.model_copy(update={"sml_periods": 2, "sml_passes": 2, "sml_steps": 10, "sml_lr": 1e-2})
    method = SML(cfg, TINY_SEQ)
    value = _mrr(method, split)
    assert value > pop + 0.3, (value, pop)
    assert method.info["passes"] in (1, 2) and len(method.info["validation_curve"]) == 2
