"""Our training recipe (docs/model.md, "Deviations"): pre-training with early stopping, meta-training
that keeps each learner's best validation state, the warm-up grid with 0 steps, the co-occurrence
learner and its second fusion layer, on a small synthetic split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.mml import LEARNERS, MML
from training.config import PretrainConfig, profile
from training.maml import learner_parameters
from training.pretrain import cooc_svd_embeddings, pretrain, sample_batch
from training.synthetic import synthetic
from training.validation import BestPerLearner, Validation, per_learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = {"d": 16, "d_ffn": 32, "max_len": 12, "n_neighbours": 4, "cooc_neighbours": 5}


@pytest.fixture(scope="module")
def data():
    split, features = synthetic(n_old_users=48)
    return split, features, Validation.from_items(split.new_support, split.new_valid)


def _model(split, features, seed: int = 0) -> MML:
    torch.manual_seed(seed)
    cfg = profile("quick", model=MODEL)
    return MML(cfg.model, split.n_old_items, features.text, features.image, features.image_mask)


def test_sample_batch_recent_windows_are_each_users_last_items():
    seqs = [np.arange(1, 31), np.array([5, 6, 7])]
    seq, target = sample_batch(seqs, 8, 11, "recent", np.random.default_rng(0))
    for inputs, targets in zip(seq, target, strict=True):
        n = int((inputs > 0).sum())
        if n == 10:
            np.testing.assert_array_equal(inputs, np.arange(20, 30))
            np.testing.assert_array_equal(targets, np.arange(21, 31))
        else:
            np.testing.assert_array_equal(inputs[:2], [5, 6])
            np.testing.assert_array_equal(targets[:2], [6, 7])
            assert n == 2 and (targets[2:] == 0).all()


def test_svd_start_puts_co_occurring_items_close():
    split, _ = synthetic(n_old_users=48)
    table = cooc_svd_embeddings(split.old_seqs, split.n_items, 16, 3, 0.06)
    assert table.shape == (split.n_items + 1, 16) and not table[0].any()
    assert table[1:].std() == pytest.approx(0.06, rel=1e-3)
    # synthetic users walk inside topics: an item's nearest row by cosine shares its topic more often
    # than chance would have it (the features hold the topics; the SVD sees only co-occurrence)
    rows = table[1 : split.n_old_items + 1]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    sim = rows @ rows.T
    np.fill_diagonal(sim, -1)
    nearest = sim.argmax(axis=1)
    text = synthetic(n_old_users=48)[1].text[1 : split.n_old_items + 1]  # noisy topic centroids
    topic = text @ text.T
    assert topic[np.arange(len(nearest)), nearest].mean() > topic.mean() + 0.1


def test_pretraining_ends_at_each_learners_best_validation_state(data):
    split, features, validation = data
    model = _model(split, features)
    cfg = PretrainConfig(steps=12, eval_every=3, patience=10, batch=16, lr=1e-2)
    record = pretrain(model, split.old_seqs, cfg, 13, validation, np.random.default_rng(0))
    final = per_learner(model, validation)
    for name in LEARNERS:
        assert final[name] == pytest.approx(record["best"][name])
        assert record["best"][name] == max(point[name] for point in record["curve"])
    assert record["curve"][0]["step"] == 0 and record["steps"] == 12


def test_patience_stops_a_learner_that_does_not_improve(data):
    split, features, validation = data

    calls = []

    def flat(scores, users):  # a validation signal that never improves
        calls.append(1)
        return np.zeros(len(users))

    model = _model(split, features)
    cfg = PretrainConfig(steps=50, eval_every=2, patience=2, batch=8)
    record = pretrain(
        model, split.old_seqs, cfg, 13, Validation(validation.support, flat), np.random.default_rng(0)
    )
    assert record["steps"] == 4  # two measurements without improvement for every learner
    assert all(step == 0 for step in record["best_step"].values())


def test_best_per_learner_restores_the_start_when_nothing_improves(data):
    split, features, validation = data
    model = _model(split, features)
    before = {n: [p.detach().clone() for p in learner_parameters(model, n)] for n in LEARNERS}
    selection = BestPerLearner(
        model, Validation(validation.support, lambda s, u: np.zeros(len(u))), learner_parameters
    )
    with torch.no_grad():
        for name in LEARNERS:
            for p in learner_parameters(model, name):
                p.add_(1.0)
    selection.measure(1)
    selection.restore()
    for name in LEARNERS:
        for p, q in zip(learner_parameters(model, name), before[name], strict=True):
            assert torch.equal(p, q)


def test_recipe_end_to_end_with_warmup_grid_and_cooc(data, tmp_path):
    from training.run import train

    split, features, _ = data
    cfg = profile(
        "quick",
        model=MODEL,
        stage1={
            "meta_batch": 16,
            "chunk": 16,
            "pretrain": {"steps": 6, "eval_every": 3, "batch": 16},
            "steps": 2,
            "eval_every": 1,
        },
        stage2={"epochs": 1, "batch": 64},
        stage3={"epochs": 2, "batch": 64, "user_fraction": 0.5},
        warmup={"grid_steps": (0, 1), "grid_lrs": (1e-2,), "grid_params": ("theta", "head")},
        cooc={"windows": (1, 2)},
        eval_tasks=16,
        threads=1,
    )
    metrics = train(split, features, tmp_path, cfg, show_progress=False)
    tried = metrics["stage3"]["warmup_selection"]
    assert [(t["params"], t["steps"]) for t in tried] == [("theta", 0), ("theta", 1), ("head", 1)]
    best = max(tried, key=lambda t: t["mrr@10"])
    confirmed = metrics["stage3"].get("warmup_confirmed")
    if confirmed is None:  # the grid chose 0 steps
        assert best["steps"] == 0 and metrics["warmup"]["steps"] == 0
    elif confirmed["0"] >= confirmed[str(best["steps"])]:  # the fused model did better without it
        assert metrics["warmup"]["steps"] == 0
    else:
        assert (metrics["warmup"]["params"], metrics["warmup"]["steps"]) == (best["params"], best["steps"])
    assert metrics["stage3"]["cooc_window"] in (1, 2)
    assert set(metrics["stage3"]["cooc_windows"]) == {"1", "2"}
    for name in ("id", "text", "image"):
        assert metrics["stage1"]["selection"]["best"][name] >= metrics["stage1"]["pretrain"]["best"][name]
    # each fusion layer ends at least as good on the validation item as its best single learner
    fusion = metrics["stage3"]["selection"]
    for layer in ("fusion", "fusion_cooc"):
        assert fusion["best"][layer] >= max(fusion["start"][layer].values()) - 1e-12, layer
    assert set(fusion["start"]["fusion_cooc"]) == {"uniform", "id", "text", "image", "cooc"}
    for layer in ("fusion", "fusion_cooc"):  # training starts from uniform, whichever candidate is best
        assert fusion["curve"][0][layer] == pytest.approx(fusion["start"][layer]["uniform"]), layer
    # the served table is D_old's whole table, not the held-out one stage 3 trained on
    from mml.cooc import build_table
    from training.checkpoint import load_model

    model, _ = load_model(tmp_path)
    full = build_table(
        split.old_seqs, split.n_items, metrics["stage3"]["cooc_window"], MODEL["cooc_neighbours"]
    )
    np.testing.assert_array_equal(model.cooc_items.numpy(), full.items)
    assert model.fusion_cooc.cooc_gamma() > 0
