"""Run folder: RUN/config.json, RUN/stage{1,2,3}.pt, RUN/metrics.json, RUN/run.json (data folder).

A stage checkpoint holds the whole model state (features and neighbour table included, so a run
folder is self-contained), the key of the configuration that produced it, and the stage's losses.
A stage whose checkpoint carries the current key is not trained again (resumable runs).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from mml.errors import MMLError
from model.mml import MML
from training.config import TrainConfig

STAGES = (1, 2, 3)


RUN_INFO = "run.json"  # where the run records its data folder (for `mml export` without --data)


def write_run_info(run_dir: Path, data_dir: str | Path, fingerprint: str) -> None:
    info = {"data": str(Path(data_dir).resolve()), "data_fingerprint": fingerprint}
    (Path(run_dir) / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n")


def run_data_dir(run_dir: str | Path) -> Path | None:
    """The data folder a run was trained on (None when the run does not record it)."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return None
    return Path(json.loads(path.read_text())["data"])


def stage_path(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / f"stage{stage}.pt"


def stage_key(cfg: TrainConfig, data_fingerprint: str, stage: int) -> str:
    """Hash of everything stage `stage` depends on: data, seed, model and stages 1..stage settings."""
    parts: dict[str, Any] = {
        "data": data_fingerprint,
        "seed": cfg.seed,
        "model": cfg.model.model_dump(),
        "tasks": cfg.tasks.model_dump(),
        "users": [cfg.max_old_users],
        "stage1": cfg.stage1.model_dump(),
    }
    if stage >= 2:
        parts["stage2"] = cfg.stage2.model_dump()
    if stage >= 3:
        parts["stage3"] = cfg.stage3.model_dump()
        parts["warmup"] = cfg.warmup.model_dump()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_key(cfg: TrainConfig, data_fingerprint: str) -> str:
    """Hash of what stage 1a (next-item pre-training) depends on: two runs that differ only after it
    (MML and PT-FT) share its result (`PRETRAINED`)."""
    parts = {
        "data": data_fingerprint,
        "seed": cfg.seed,
        "model": cfg.model.model_dump(),
        "window": cfg.window_max,
        "users": [cfg.max_old_users],
        "pretrain": cfg.stage1.pretrain.model_dump(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


PRETRAINED = "stage1a.pt"  # the model after stage 1a, with its pretrain_key and selection record


def save_stage(run_dir: Path, stage: int, key: str, model: MML, cfg: TrainConfig, losses: dict) -> None:
    path = stage_path(run_dir, stage)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "stage": stage,
            "key": key,
            "config": cfg.model_dump(mode="json"),
            "n_old_items": model.n_old_items,
            "state": {k: v.cpu() for k, v in model.state_dict().items()},  # loadable without the device
            "losses": losses,
        },
        tmp,
    )
    os.replace(tmp, path)


def read_stage(run_dir: Path, stage: int) -> dict | None:
    path = stage_path(run_dir, stage)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated / foreign file: retrain that stage
        raise MMLError(f"{path}: unreadable checkpoint ({exc}); delete it to retrain the stage") from exc


def model_from_state(cfg: TrainConfig, n_old_items: int, state: dict[str, torch.Tensor]) -> MML:
    model = MML(
        cfg.model,
        n_old_items,
        state["text"].numpy(),
        state["image"].numpy(),
        state["image_mask"].numpy(),
        state["neighbours"].numpy(),
    )
    model.load_state_dict(state)
    return model


def load_model(run_dir: str | Path, stage: int = 3) -> tuple[MML, TrainConfig]:
    """The trained model of a run folder (default: after stage 3) and its TrainConfig, in eval mode."""
    run_dir = Path(run_dir)
    ckpt = read_stage(run_dir, stage)
    if ckpt is None:
        raise MMLError(
            f"{stage_path(run_dir, stage)} not found: train the run first (mml train --out {run_dir})"
        )
    cfg = TrainConfig.model_validate(ckpt["config"])
    model = model_from_state(cfg, int(ckpt["n_old_items"]), ckpt["state"])
    model.eval()
    return model, cfg
