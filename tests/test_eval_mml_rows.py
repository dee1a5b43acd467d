"""MML, its ablations and PT-FT through the protocol, on a small synthetic split with a tiny training
config: every row scores the whole catalogue, and no held-out item reaches training or warm-up."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluation.mml_rows import ROWS, MMLRow, training_split
from training.evaluation.protocol import evaluate, train_data
from training.evaluation.runner import OPTIONAL_ROWS
from training.synthetic import synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {  # a few seconds per run (the training stage's own test settings)
    "model": {"d": 16, "d_ffn": 32, "max_len": 12, "n_neighbours": 4, "cooc_neighbours": 5},
    "stage1": {
        "epochs": 1,
        "meta_batch": 16,
        "chunk": 16,
        "inner_steps": 1,
        "lr_id": 1e-2,
        "pretrain": {"steps": 6, "eval_every": 3, "batch": 16},
        "steps": 2,
        "eval_every": 1,
    },
    "stage2": {"epochs": 1, "batch": 64},
    "stage3": {"epochs": 1, "batch": 64, "user_fraction": 1.0},
    "warmup": {"steps": 1, "grid_steps": (0, 1), "grid_lrs": (1e-2,), "grid_params": ("theta",)},
    "cooc": {"windows": (1, 2)},
    "eval_tasks": 16,
}
HELD_OUT = 60  # the last catalogue item: only ever a validation / query item below


def _split(query_item: int = HELD_OUT):
    split, features = synthetic(n_old_users=48, n_new_users=12)
    split.new_support = np.where(split.new_support == HELD_OUT, 51, split.new_support).astype(np.int32)
    split.old_seqs = [np.where(s == HELD_OUT, 1, s).astype(np.int32) for s in split.old_seqs]
    split.new_valid = np.full(len(split.new_valid), HELD_OUT, np.int32)
    split.new_query = np.full(len(split.new_query), query_item, np.int32)
    return split, features


class RecordingRow(MMLRow):
    def fit(self, data, validator):
        self.seen_fit = data
        super().fit(data, validator)

    def adapt(self, users, support, validator):
        self.seen_adapt = [*getattr(self, "seen_adapt", []), support.copy()]
        return super().adapt(users, support, validator)


def test_training_split_holds_no_held_out_item_and_ignores_the_query() -> None:
    from training.run import data_fingerprint

    split, features = _split()
    other, _ = _split(query_item=5)
    first, second = training_split(train_data(split, features)), training_split(train_data(other, features))
    for part in (first.new_valid, first.new_query, first.new_support, *first.old_seqs):
        assert not np.isin(HELD_OUT, part).any()
    # the training stage fingerprints everything it receives: identical for different query items
    assert data_fingerprint(first, features) == data_fingerprint(second, features)


def test_every_row_scores_the_catalogue_from_one_trained_run(tmp_path) -> None:
    split, features = _split()
    results = {}
    for name in ROWS:
        if name in OPTIONAL_ROWS:  # the paper's recipe: test below
            continue
        method = RecordingRow(name, "quick", overrides=TINY)
        results[name] = evaluate(method, split, features=features, seed=0, work_dir=str(tmp_path))
        assert not np.isin(
            HELD_OUT, np.concatenate([*method.seen_fit.old_seqs, method.seen_fit.new_support.ravel()])
        )
        assert not np.isin(HELD_OUT, np.concatenate(method.seen_adapt)).any()
        assert 0.0 <= results[name].means()["recall@20"] <= 1.0
    # one MML run and one PT-FT run were trained; the ablations reused the MML run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mml-quick-seed0", "ptft-quick-seed0"]
    assert results["mml_zero_shot"].info["warmup_steps"] == 0
    chosen = results["mml"].info["warmup"]
    tried = results["mml"].info["selection"]["warmup_selection"]
    assert {t["steps"] for t in tried} == {0, 1}  # the grid includes no warm-up at all
    best = max(tried, key=lambda t: t["mrr@10"])
    assert chosen["steps"] in (0, best["steps"])  # 0 when the trained fusion did better without it
    assert results["mml"].info["warmup_steps"] == chosen["steps"]
    # PT-FT: pre-training only, no meta-update
    ptft = results["pt_ft"].info["selection"]["selection"]
    assert all(step == 0 for step in ptft["best_step"].values())
    # the co-occurrence row's run chose its window on the validation item from the grid
    assert set(results["mml_cooc"].info["selection"]["cooc_windows"]) == {"1", "2"}


def test_paper_row_trains_the_papers_recipe(tmp_path) -> None:
    import json

    split, features = _split()
    method = RecordingRow(
        "mml_paper", "quick", overrides={**TINY, "model": {**TINY["model"], "cooc_neighbours": 0}}
    )
    result = evaluate(method, split, features=features, seed=0, work_dir=str(tmp_path))
    assert 0.0 <= result.means()["recall@20"] <= 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["paper-paper-quick-seed0"]
    config = json.loads((tmp_path / "paper-paper-quick-seed0" / "config.json").read_text())
    assert config["stage1"]["loss"] == "bpr" and config["tasks"]["query_share"] == 0.0


def test_evaluate_set_reaches_the_training_config_and_the_cache_key() -> None:
    """`mml evaluate --set KEY=VALUE`: the MML rows train with it, and runs cached without it (or
    with another value) are not reused."""
    from training.evaluation.mml_rows import mml_method, train_config
    from training.evaluation.runner import config_hash, get_profile

    quick = get_profile("quick")
    longer = quick.model_copy(update={"train_overrides": {"tasks": {"max_len": None}}})
    assert config_hash("mml", longer) != config_hash("mml", quick)
    assert config_hash("pop", longer) == config_hash("pop", quick)  # baselines are not MML's training
    row = mml_method("mml_cooc", "quick", threads=1, overrides=longer.train_overrides)
    cfg = train_config(row.kind, row.train_profile, 0, row.overrides)
    assert cfg.tasks.max_len is None and cfg.threads == 1
    assert train_config("mml", "quick", 0).tasks.max_len == 21
