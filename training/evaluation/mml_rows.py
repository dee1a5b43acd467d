"""MML, its ablations and PT-FT under the evaluation protocol, on top of the training package.

One trained run per (setting, seed, kind) serves several rows: the run is made with
`training.run.train` (resumable: a finished run is loaded, not retrained) in the method's work folder,
then each row scores differently:

| row            | run                          | scoring                                                      |
|----------------|------------------------------|--------------------------------------------------------------|
| mml            | MML, stage-1 loss BPR        | fused scores after the warm-up (cfg.warmup.steps)            |
| mml_ce         | MML, stage-1 loss CE         | the same                                                      |
| mml_q          | MML (BPR), query = last 80 % | fused scores after the warm-up                                |
| mml_ce_q       | MML (CE), query = last 80 %  | the same                                                      |
| mml_id_q       | MML (BPR), query = last 80 % | the ID learner's scores alone                                 |
| mml_zero_shot  | MML (BPR)                    | fused scores with 0 warm-up steps (the global parameters)    |
| no_gen         | MML (BPR)                    | new items' ID rows = random N(0, init_std) instead of generated |
| no_fusion      | MML (BPR)                    | average of the three learners' standardised scores (Eq. 9 without the learned affine, A = 1/3) |
| mml_id         | MML (BPR)                    | the ID learner's scores alone (no text/image learner, no fusion) |
| pt_ft          | stage 1 with 0 local steps   | fused scores after the same warm-up (fine-tuning on the support) |

PT-FT keeps MML's structure and every stage but replaces MAML by plain multi-task pre-training: with
no local update, stage 1 trains the global parameters directly on the same tasks' query items; the
per-user fine-tuning is the same warm-up as MML's (same steps, same learning rate).

The ablations are inference-time variants of one trained model (they differ from MML only in how the
trained parts are combined), so their differences to MML measure the contribution of each part as
trained, not of a model retrained without it.

What `train` receives: D_old and the new users' support items. Its Split also needs a validation and
a query item per new user (for the run's own metrics.json summary); both are set to the user's LAST
SUPPORT item, so the held-out items never reach training. (Hook asked of the training stage: a
`train(..., validate=False)` that needs no held-out items.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mml.errors import MMLError
from training.config import merge_settings
from training.evaluation.protocol import Method, TrainData, Validator

ROWS: dict[str, tuple[str, str]] = {  # row -> (run kind, stage-1 loss)
    "mml": ("mml", "bpr"),
    "mml_ce": ("mml", "ce"),
    "mml_zero_shot": ("mml", "bpr"),
    "no_gen": ("mml", "bpr"),
    "no_fusion": ("mml", "bpr"),
    "mml_id": ("mml", "bpr"),
    "pt_ft": ("ptft", "bpr"),
    "mml_ce_long": ("mml", "ce"),
    "mml_q": ("mml", "bpr"),
    "mml_ce_q": ("mml", "ce"),
    "mml_id_q": ("mml", "bpr"),
}
# Rows whose training differs from the profile's beyond the loss: (run-name suffix, settings).
# mml_ce_long: stage 1 with 10 meta-epochs instead of the quick profile's 2 (840 Adam steps per
# learner on ML-1M, about SASRec's budget in the quick evaluation profile): is MML's gap budget?
# mml_q / mml_ce_q / mml_id_q: the query set of each meta-training task is the last 80 % of its
# targets instead of the last item (TaskConfig.query_share): the item embeddings Gamma learn only from
# query targets, one per user and epoch in the paper's tasks (docs/model.md, "query share").
QUERY_SHARE = 0.8
ROW_TRAINING: dict[str, tuple[str, dict[str, Any]]] = {
    "mml_ce_long": ("long", {"stage1": {"epochs": 10}}),
    "mml_q": ("q", {"tasks": {"query_share": QUERY_SHARE}}),
    "mml_ce_q": ("q", {"tasks": {"query_share": QUERY_SHARE}}),
    "mml_id_q": ("q", {"tasks": {"query_share": QUERY_SHARE}}),
}


def train_config(kind: str, profile: str, loss: str, seed: int, overrides: dict[str, Any] | None = None):
    """The TrainConfig of a run: the named profile, `overrides` (tests), then the row's own settings."""
    from training.config import profile as make_profile

    settings: dict[str, Any] = {"seed": seed, "stage1": {"loss": loss}}
    if kind == "ptft":
        settings["stage1"]["inner_steps"] = 0  # no local update: plain multi-task pre-training
    return make_profile(profile, **merge_settings(overrides or {}, settings))


def training_split(data: TrainData):
    """A training.data.Split holding only what a method may learn from (see the module docstring)."""
    from training.data import Split

    last = data.new_support[:, -1].copy()
    return Split(
        n_items=data.n_items,
        n_old_items=data.n_old_items,
        old_users=np.array([f"old{i}" for i in range(len(data.old_seqs))]),
        old_seqs=list(data.old_seqs),
        new_users=np.array([f"new{i}" for i in range(len(data.new_support))]),
        new_support=data.new_support,
        new_valid=last,
        new_query=last,
        stats={"n_items": data.n_items, "n_old_items": data.n_old_items, "n_old_users": len(data.old_seqs)},
    )


def _finished(run_dir: Path, cfg, split, features) -> bool:
    """The run's final checkpoint exists and was made from these data and settings."""
    from training.checkpoint import read_stage, stage_key
    from training.run import data_fingerprint

    if not (run_dir / "metrics.json").is_file():
        return False
    final = read_stage(run_dir, 3)
    return final is not None and final["key"] == stage_key(cfg, data_fingerprint(split, features), 3)


class MMLRow(Method):
    def __init__(self, name: str, train_profile: str, overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.overrides = overrides
        if name not in ROWS:
            raise MMLError(f"unknown MML row {name!r}; choose from {', '.join(ROWS)}")
        self.name = name
        self.kind, self.loss = ROWS[name]
        self.train_profile = train_profile

    def fit(self, data: TrainData, validator: Validator) -> None:
        import torch

        from training.checkpoint import load_model
        from training.run import train

        if data.features is None:
            raise MMLError(f"{self.name}: needs the item features (mml data features --data DIR)")
        if data.work_dir is None:
            raise MMLError(f"{self.name}: needs a work folder for its training run")
        suffix, extra = ROW_TRAINING.get(self.name, ("", {}))
        overrides = merge_settings(self.overrides or {}, extra)
        cfg = train_config(self.kind, self.train_profile, self.loss, data.seed, overrides)
        profile_name = f"{self.train_profile}-{suffix}" if suffix else self.train_profile
        run_dir = Path(data.work_dir) / f"{self.kind}-{self.loss}-{profile_name}-seed{data.seed}"
        split = training_split(data)
        if not _finished(run_dir, cfg, split, data.features):
            self.log(f"training {run_dir.name} ({self.train_profile} profile)")
            train(split, data.features, run_dir, cfg, show_progress=False)
        self.model, self.cfg = load_model(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        self.info.update(
            train_profile=self.train_profile,
            run=str(run_dir),
            train_seconds=metrics.get("wall_s"),
            stages_loaded=metrics.get("stages_loaded"),
        )
        if self.name == "no_gen":
            generator = torch.Generator().manual_seed(data.seed)
            new = self.model.new_items()
            with torch.no_grad():
                rows = torch.randn(len(new), self.cfg.model.d, generator=generator) * self.cfg.model.init_std
                self.model.item_emb.weight[new] = rows
        self.steps = 0 if self.name == "mml_zero_shot" else self.cfg.warmup.steps
        self.info["warmup_steps"] = self.steps

    def adapt(self, users: np.ndarray, support: np.ndarray, validator: Validator) -> Any:
        # The warm-up runs inside `training.warmup.warm_scores` together with the scoring pass; it
        # adapts on exactly these support items (the state handed to `score`).
        return support

    def score(self, users: np.ndarray, history: np.ndarray, state: Any) -> np.ndarray:
        from training.warmup import warm_scores

        out = []
        for _rows, fused, per_learner in warm_scores(
            self.model, state, history, self.cfg, self.steps, seed=0
        ):
            if self.name in ("mml_id", "mml_id_q"):
                scores = per_learner["id"]
            elif self.name == "no_fusion":
                scores = _average(per_learner)
            else:
                scores = fused
            out.append(scores.numpy())
        scores = np.concatenate(out).astype(np.float32)
        scores[:, 0] = 0.0  # the pad column is ignored by the metrics; keep the matrix finite
        return scores


def _average(per_learner: dict) -> Any:
    """Mean of the learners' scores standardised over the items 1..N (Eq. 9 with gamma=1, beta=0)."""
    import torch

    parts = []
    for scores in per_learner.values():
        items = scores[:, 1:]
        normed = (items - items.mean(dim=1, keepdim=True)) / items.std(
            dim=1, unbiased=False, keepdim=True
        ).clamp_min(1e-12)
        parts.append(normed)
    mean = torch.stack(parts).mean(dim=0)
    return torch.cat([torch.zeros_like(mean[:, :1]), mean], dim=1)


def mml_method(name: str, train_profile: str, threads: int | None = None) -> Method:
    return MMLRow(name, train_profile, overrides={"threads": threads} if threads else None)
