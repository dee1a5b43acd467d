"""Integration: the quick profile on a slice of the real ML-1M split (a few hundred old users) trains
all three stages end to end and lowers each stage's loss; the run loads back for export."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_quick_profile_on_a_slice_of_ml1m(ml1m_features_dir, tmp_path):
    from training.checkpoint import load_model
    from training.config import profile
    from training.data.split import load_split
    from training.features.types import load_features
    from training.run import train

    split, features = load_split(ml1m_features_dir), load_features(ml1m_features_dir)
    cfg = profile(
        "quick",
        max_old_users=300,
        max_new_users=100,
        eval_tasks=64,
        threads=1,
        stage1={"epochs": 2, "meta_batch": 32, "chunk": 32, "inner_steps": 1},
        stage2={"epochs": 2, "batch": 64},
        stage3={"epochs": 2, "batch": 64, "user_fraction": 1.0},
    )
    metrics = train(split, features, tmp_path, cfg, show_progress=False, data_dir=ml1m_features_dir)

    for learner in ("id", "text", "image"):
        stage1 = metrics["stage1"][learner]
        assert stage1["final_loss"] < stage1["initial_loss"], (learner, stage1)
    for stage in ("stage2", "stage3"):
        assert metrics[stage]["final_loss"] < metrics[stage]["initial_loss"], (stage, metrics[stage])
    validation = metrics["validation"]["warmup_steps_1"]["fused"]
    assert 0.0 <= validation["ndcg@10"] <= validation["recall@10"] <= 1.0
    assert metrics["n_old_users"] == 300 and metrics["n_items"] == split.n_items

    model, loaded_cfg = load_model(tmp_path)
    assert loaded_cfg == cfg
    new = model.new_items()
    assert len(new) == split.n_items - split.n_old_items
    assert torch.allclose(model.item_emb.weight[new], model.generate(new), atol=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["validation"] == metrics["validation"]
