"""The three stages end to end on a small synthetic split: checkpoints, resume, load_model, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import load_model, run_data_dir
from training.config import TrainConfig, profile
from training.run import train
from training.synthetic import synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# tiny and fast: a few meta-batches per epoch, a larger ID learning rate so 2 epochs show progress
TINY = {
    "model": {"d": 16, "d_ffn": 32, "max_len": 12, "n_neighbours": 4},
    "stage1": {"epochs": 2, "meta_batch": 16, "chunk": 16, "inner_steps": 1, "lr_id": 1e-2},
    "stage2": {"epochs": 2, "batch": 64},
    "stage3": {"epochs": 2, "batch": 64, "user_fraction": 1.0},
    "warmup": {"steps": 1},
    "eval_tasks": 32,
    "threads": 1,
}


def _config(**overrides) -> TrainConfig:
    return profile("paper-quick", **{**TINY, **overrides})  # the paper's recipe (test_train_recipe.py: ours)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    split, features = synthetic(n_old_users=48)
    out = tmp_path_factory.mktemp("run")
    metrics = train(split, features, out, _config(), show_progress=False, data_dir=out)
    return out, metrics


def test_run_folder_and_metrics(trained):
    out, metrics = trained
    for name in ("config.json", "stage1.pt", "stage2.pt", "stage3.pt", "metrics.json", "run.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["validation"]["warmup_steps_1"]["fused"].keys() == {"recall@10", "ndcg@10"}
    assert set(saved["validation"]) == {"warmup_steps_0", "warmup_steps_1"}
    for stage in ("stage2", "stage3"):
        assert saved[stage]["final_loss"] < saved[stage]["initial_loss"], stage
    for learner in ("id", "text", "image"):
        assert saved["stage1"][learner]["final_loss"] < saved["stage1"][learner]["initial_loss"], learner
    assert run_data_dir(out) == out.resolve()


def test_load_model_restores_the_trained_model(trained):
    out, _ = trained
    model, cfg = load_model(out)
    assert cfg.model.d == 16 and not model.training
    state = torch.load(out / "stage3.pt", weights_only=True)["state"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    new = model.new_items()
    assert torch.allclose(model.item_emb.weight[new], model.generate(new), atol=1e-6)  # generated rows


def test_a_finished_run_is_resumed_not_retrained(trained, tmp_path):
    out, metrics = trained
    split, features = synthetic(n_old_users=48)
    again = train(split, features, out, _config(), show_progress=False)
    assert again["stages_loaded"] == [1, 2, 3]
    assert again["validation"] == metrics["validation"]
    # a changed stage-3 setting keeps stages 1-2 and retrains stage 3 only
    changed = train(split, features, out, _config(stage3={**TINY["stage3"], "lr": 5e-3}), show_progress=False)
    assert changed["stages_loaded"] == [1, 2]


def test_cli_refuses_a_bad_profile(tmp_path):
    from typer.testing import CliRunner

    from mml.cli import app

    result = CliRunner().invoke(
        app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--profile", "huge"]
    )
    assert result.exit_code != 0
    assert "profile" in str(result.exception) + result.output


def test_set_overrides_are_parsed_into_nested_settings_and_validated():
    from pydantic import ValidationError

    from mml.errors import MMLError
    from training.cli import parse_settings
    from training.config import profile

    settings = parse_settings(["stage1.epochs=7", "tasks.query_share=0.5", "tasks.window=recent"])
    assert settings == {"stage1": {"epochs": 7}, "tasks": {"query_share": 0.5, "window": "recent"}}
    cfg = profile("quick", **settings)
    assert (cfg.stage1.epochs, cfg.tasks.query_share, cfg.tasks.window) == (7, 0.5, "recent")
    with pytest.raises(ValidationError, match="epochz"):
        profile("quick", **parse_settings(["stage1.epochz=3"]))
    with pytest.raises(ValidationError, match="query_share"):
        profile("quick", **parse_settings(["tasks.query_share=1.5"]))
    with pytest.raises(MMLError, match="KEY=VALUE"):
        parse_settings(["stage1.epochs"])


def test_device_setting_is_validated_and_a_missing_gpu_is_a_clear_error(tmp_path):
    from pydantic import ValidationError

    from mml.errors import MMLError

    with pytest.raises(ValidationError, match="device"):
        _config(device="gpu")
    assert _config(device="cuda:1").device == "cuda:1"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error case cannot happen here")
    split, features = synthetic(n_old_users=48)
    with pytest.raises(MMLError, match="no CUDA device"):
        train(split, features, tmp_path, _config(device="cuda"), show_progress=False)


def test_checkpoints_hold_cpu_tensors_and_device_is_not_part_of_the_stage_key(trained):
    from training.checkpoint import read_stage, stage_key

    out, metrics = trained
    assert (
        metrics["device"] == "cpu" and 0.05 < metrics["peak_rss_gib"] < 24 and "peak_gpu_gib" not in metrics
    )
    state = read_stage(out, 3)["state"]
    assert all(t.device.type == "cpu" for t in state.values())
    assert stage_key(_config(), "data", 3) == stage_key(_config(device="cuda"), "data", 3)
