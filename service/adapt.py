"""Meta-test warm-up per request (`adapt_steps > 0` in the arms config). NEEDS TORCH: this module is
imported only when an arm asks for it, never on the service's default path.

The paper adapts the meta-learned model to each new user's support items before predicting. Here
the request's own history is the support set: every prefix -> next-item pair of it (the most recent
max_len items), the same local update as training's warm-up (`model.adapt.adapted_hidden`: SGD on
each learner's Theta, or the part of it the bundle's warm-up names, one uniform negative per
position for BPR), `adapt_steps` steps at the warm-up learning rate recorded in the bundle
(`torch/model.json`). ONNX Runtime cannot take gradients, so the bundle's
eager model (`torch/`, loaded by `model.from_bundle.load_torch_model`) runs this path.

After adaptation the fusion weights and user vectors give (query, bias) in the same closed form as
recall.onnx, with the catalogue moments of the exported bundle, so the scoring stage (catalogue +
registered new items, exclusions, top-k) is the ONNX path's chain with this model stage, and `adapt_steps = 0` here
gives the ONNX path's answer (a test checks it). Registered new items take part in the support
loss through their generated ID embeddings and projected features.

A history of one item has no prefix -> next pair: it is scored without adaptation.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from service.items import TableSnapshot
from service.runtime import Runtime

ADAPT_SEED = 0  # negatives are drawn from a fixed seed: the same request gets the same answer


class AdaptingModel:
    """The `model` stage of an arm with adapt_steps > 0 (service/recall.py): ctx.known (catalogue
    rows and new-item positions, most recent max_len) -> ctx.query, ctx.bias after `steps` local
    updates on the request's own history."""

    name = "model"

    def __init__(self, runtime: Runtime, steps: int) -> None:
        import torch

        from mml.bundle_loader import TORCH_CONFIG
        from mml.errors import BundleError
        from model.from_bundle import load_torch_model
        from model.fusion import catalogue_moments
        from model.mml import LEARNERS

        self.runtime = runtime
        if runtime.bundle.torch_dir is None:
            raise BundleError(
                f"bundle {runtime.model_version} ships no torch/ weights: adapt_steps > 0 needs them "
                "(re-export it, or set adapt_steps: 0)"
            )
        torch.set_num_threads(1)  # one request per core, as the ONNX path
        self.torch = torch
        self.model = load_torch_model(runtime.path)
        warmup = json.loads((runtime.path / TORCH_CONFIG).read_text()).get("warmup", {})
        self.lr = float(warmup.get("lr", 1e-3))
        self.group = str(warmup.get("params", "theta"))
        stage1 = runtime.manifest.training.get("config", {}).get("stage1", {})
        self.loss = stage1.get("loss", "bpr")
        self.steps = steps
        self.model_version = f"{runtime.model_version}+adapt{steps}"
        with torch.no_grad():  # the catalogue's moments, as recall.onnx holds them
            self.moments = [
                tuple(m.float() for m in catalogue_moments(self.model.item_table(name).double()))
                for name in LEARNERS
            ]
        self._extended: tuple[TableSnapshot, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def _extended_model(self, table: TableSnapshot) -> dict[str, Any]:
        """The model over catalogue + registered new items (rows N+1.. = the table), its ID table
        and item vectors, for this table snapshot (rebuilt when the snapshot changes)."""
        cached = self._extended
        if cached is not None and cached[0] is table:
            return cached[1]
        from model.adapt import with_items

        torch, model = self.torch, self.model
        with self._lock, torch.no_grad():
            extended = with_items(
                model,
                torch.from_numpy(table.text),
                torch.from_numpy(table.image),
                torch.from_numpy(table.image_mask),
            )
            id_table = torch.cat([model.item_emb.weight, torch.from_numpy(table.id_emb)])
            out = {"model": extended, "id_table": id_table, "tables": extended.item_tables(id_table)}
            self._extended = (table, out)
        return out

    def __call__(self, ctx) -> None:
        if ctx.fallback:
            return
        n_catalogue = self.runtime.dims.n_items + 1
        items = np.asarray([row if row >= 0 else n_catalogue + pos for row, pos in ctx.known], np.int64)
        ctx.query, ctx.bias = self._query(items, ctx.snapshot.new_items)

    def _query(self, items: np.ndarray, table: TableSnapshot) -> tuple[np.ndarray, float]:
        torch = self.torch
        from model.adapt import adapted_hidden
        from model.fusion import closed_form
        from model.learners import last_hidden
        from model.mml import LEARNERS
        from model.tasks import support_tasks

        ext = self._extended_model(table)
        model = ext["model"]
        seq = torch.as_tensor(items[None, :])
        steps = self.steps if len(items) >= 2 else 0  # one item: no prefix -> next pair to adapt on
        support = None
        if steps:
            rng = np.random.default_rng(ADAPT_SEED)
            support = support_tasks(items[None, :], self.runtime.dims.max_len, model.n_items, rng).torch()
        hidden = {
            name: adapted_hidden(
                model,
                name,
                support,
                seq,
                steps,
                self.lr,
                self.loss,
                id_table=ext["id_table"],
                table=ext["tables"][name],
                group=self.group,
            )  # fmt: skip
            for name in LEARNERS
        }
        with torch.no_grad():
            valid = seq > 0
            weights = model.fusion.weights(hidden["id"], hidden["text"], hidden["image"], valid)
            users = [last_hidden(hidden[name], valid) for name in LEARNERS]
            query, bias = closed_form(model.fusion, users, weights, self.moments)
        return query[0].numpy().astype(np.float32), float(bias[0])
