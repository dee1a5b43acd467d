"""The eager model of a serving bundle: torch/ (weights and config, written by the exporter) plus the
feature tables of tables/items.npz. Serving needs it only for per-request adaptation
(service/adapt.py), which takes gradients and so cannot run in ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mml.bundle_loader import TORCH_CONFIG, TORCH_STATE, load_bundle
from mml.errors import MMLError
from model.config import ModelConfig
from model.mml import MML

FEATURE_BUFFERS = ("text", "image", "image_mask")  # shipped in tables/items.npz, not in torch/


def load_torch_model(bundle_dir: str | Path) -> MML:
    """The eager model of a bundle (for warm-up with gradients): torch/ + the feature tables."""
    bundle = load_bundle(bundle_dir, roles=())
    if bundle.torch_dir is None:
        raise MMLError(f"{bundle_dir}: this bundle ships no torch/ weights")
    config = json.loads((Path(bundle_dir) / TORCH_CONFIG).read_text())
    t = bundle.tables
    model = MML(
        ModelConfig.model_validate(config["model"]),
        config["n_old_items"],
        t["text"].copy(),
        t["image"].copy(),
        t["image_mask"].copy(),
        neighbours=np.zeros((len(t["text"]), config["model"]["n_neighbours"]), dtype=np.int64),
    )
    state = torch.load(Path(bundle_dir) / TORCH_STATE, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(FEATURE_BUFFERS):
        raise MMLError(
            f"{bundle_dir}: torch/ weights do not fit the model (missing {missing}, unexpected {unexpected})"
        )
    return model.eval()
