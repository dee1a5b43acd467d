"""Integration: the quick profile (our recipe) on a slice of the real ML-1M split (a few hundred old
users) trains all three stages end to end: pre-training and meta-training never leave a learner worse
on the validation item than where it started, the generator and the fusion lower their losses, the
run loads back for export with the warm-up it chose."""

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
        stage1={
            "meta_batch": 32,
            "chunk": 32,
            "pretrain": {"steps": 40, "eval_every": 20, "batch": 64},
            "steps": 6,
            "eval_every": 3,
        },
        stage2={"epochs": 2, "batch": 64},
        stage3={"epochs": 2, "batch": 64, "user_fraction": 1.0},
        warmup={"grid_steps": (0, 1), "grid_lrs": (1e-2,), "grid_params": ("theta",)},
        cooc={"windows": (1, 3)},
    )
    metrics = train(split, features, tmp_path, cfg, show_progress=False, data_dir=ml1m_features_dir)

    pre, meta = metrics["stage1"]["pretrain"], metrics["stage1"]["selection"]
    for learner in ("id", "text", "image"):
        assert pre["best"][learner] >= pre["start"][learner], (learner, pre)
        assert meta["best"][learner] >= meta["start"][learner] == pre["best"][learner], (learner, meta)
    for stage in ("stage2", "stage3"):
        assert metrics[stage]["final_loss"] < metrics[stage]["initial_loss"], (stage, metrics[stage])
    steps = metrics["warmup"]["steps"]
    validation = metrics["validation"][f"warmup_steps_{steps}"]
    assert 0.0 <= validation["fused"]["ndcg@10"] <= validation["fused"]["recall@10"] <= 1.0
    assert set(validation) == {"fused", "id", "text", "image", "fused_cooc", "cooc"}
    assert metrics["stage3"]["cooc_window"] in (1, 3)
    assert metrics["n_old_users"] == 300 and metrics["n_items"] == split.n_items

    model, loaded_cfg = load_model(tmp_path)
    assert loaded_cfg.warmup.steps == steps and not loaded_cfg.warmup.select
    assert loaded_cfg.model == cfg.model and loaded_cfg.stage1 == cfg.stage1
    new = model.new_items()
    assert len(new) == split.n_items - split.n_old_items
    assert torch.allclose(model.item_emb.weight[new], model.generate(new), atol=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["validation"] == metrics["validation"]
