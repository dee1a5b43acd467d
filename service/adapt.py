"""Meta-test warm-up per request (`adapt_steps > 0` in the arms config). NEEDS TORCH: this module is
imported only when an arm asks for it, never on the service's default path.

The paper adapts the meta-learned model to each new user's support items before predicting. Here
the request's own history is the support set: every prefix -> next-item pair of it (the most recent
max_len items), the same local update as training (`training.maml.adapt`: SGD on each learner's
Theta, one uniform negative per position for BPR), `adapt_steps` steps at the warm-up learning rate
recorded in the bundle (`torch/model.json`). ONNX Runtime cannot take gradients, so the bundle's
eager model (`torch/`, loaded by `training.export.load_torch_model`) runs this path.

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
        from training.export import load_torch_model
        from training.export.tables import fusion_moments, item_vectors

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
        stage1 = runtime.manifest.training.get("config", {}).get("stage1", {})
        self.loss = stage1.get("loss", "bpr")
        self.steps = steps
        self.model_version = f"{runtime.model_version}+adapt{steps}"
        means, covs = fusion_moments(item_vectors(self.model))  # the catalogue's, as in recall.onnx
        self.moments = [(means[m].float(), covs[m].float()) for m in range(3)]
        self._extended: tuple[TableSnapshot, dict] | None = None
        self._lock = threading.Lock()

    def _tensors(self, table: TableSnapshot) -> dict:
        """Catalogue + registered new items as one extended catalogue (rows N+1.. = the table), for
        this table snapshot (rebuilt when the snapshot changes)."""
        cached = self._extended
        if cached is not None and cached[0] is table:
            return cached[1]
        torch, model = self.torch, self.model
        with self._lock, torch.no_grad():
            text = torch.cat([model.text, torch.from_numpy(table.text)])
            image = torch.cat([model.image, torch.from_numpy(table.image)])
            mask = torch.cat([model.image_mask, torch.from_numpy(table.image_mask)])
            id_table = torch.cat([model.item_emb.weight, torch.from_numpy(table.id_emb)])
            tensors = {
                "text": text,
                "image": image,
                "mask": mask,
                "tables": {
                    "id": id_table,
                    "text": model.text_learner.item_vectors(text),
                    "image": model.image_learner.item_vectors(image, mask),
                },
            }
            self._extended = (table, tensors)
        return tensors

    def __call__(self, ctx) -> None:
        if ctx.fallback:
            return
        n_catalogue = self.runtime.dims.n_items + 1
        items = np.asarray([row if row >= 0 else n_catalogue + pos for row, pos in ctx.known], np.int64)
        ctx.query, ctx.bias = self._query(items, ctx.snapshot.new_items)

    def _inputs(self, name: str, seq, ext: dict):
        valid = seq > 0
        model = self.model
        if name == "id":
            x, sims = model.id_learner.embed(
                ext["tables"]["id"][seq], ext["text"][seq], ext["image"][seq], ext["mask"][seq], valid
            )
            return x, valid, sims
        if name == "text":
            return model.text_learner.embed(ext["text"][seq])[0], valid, None
        return model.image_learner.embed(ext["image"][seq], ext["mask"][seq])[0], valid, None

    def _query(self, items: np.ndarray, table: TableSnapshot) -> tuple[np.ndarray, float]:
        torch, model = self.torch, self.model
        from torch.func import functional_call, vmap

        from model.fusion import closed_form
        from model.learners import last_hidden
        from model.mml import LEARNERS
        from training.maml import adapt, theta
        from training.tasks import pad_sequences, support_tasks

        ext = self._tensors(table)
        max_len = self.runtime.dims.max_len
        seq = torch.as_tensor(pad_sequences(items[None, :], max_len))
        adapting = self.steps > 0 and len(items) >= 2
        if adapting:
            n_candidates = len(ext["text"]) - 1
            rng = np.random.default_rng(ADAPT_SEED)
            support = support_tasks(items[None, :], max_len, n_candidates, rng).torch()
        hidden = {}
        for name in LEARNERS:
            learner = model.learner(name)
            x, valid, sims = self._inputs(name, seq, ext)
            if not adapting:
                with torch.no_grad():
                    hidden[name] = learner(x, valid, sims)
                continue
            params = {k: v.detach() for k, v in theta(model, name).items()}
            local = adapt(
                model, name, params, self._inputs(name, support["seq"], ext), ext["tables"][name].detach(),
                support["target"], support["negative"], support["support"], self.steps, self.lr, self.loss,
            )  # fmt: skip

            def encode(th, x, valid, sims, learner=learner):
                batched = None if sims is None else (sims[0].unsqueeze(0), sims[1].unsqueeze(0))
                return functional_call(learner, th, (x.unsqueeze(0), valid.unsqueeze(0), batched)).squeeze(0)

            with torch.no_grad():
                sims_dim = None if sims is None else 0
                hidden[name] = vmap(encode, in_dims=(0, 0, 0, sims_dim))(
                    {k: v.detach() for k, v in local.items()}, x, valid, sims
                )
        with torch.no_grad():
            valid = seq > 0
            weights = model.fusion.weights(hidden["id"], hidden["text"], hidden["image"], valid)
            users = [last_hidden(hidden[name], valid) for name in LEARNERS]
            query, bias = closed_form(model.fusion, users, weights, self.moments)
        return query[0].numpy().astype(np.float32), float(bias[0])
