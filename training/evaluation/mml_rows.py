"""MML, its ablations and PT-FT under the evaluation protocol, on top of the training package.

One trained run per (setting, seed, kind) serves several rows: the run is made with
`training.run.train` (resumable: a finished run is loaded, not retrained) in the method's work folder,
with the protocol's validator as its selection signal (early stopping, warm-up grid, co-occurrence
window), then each row scores differently:

| row            | run                                   | scoring                                              |
|----------------|---------------------------------------|------------------------------------------------------|
| mml            | MML (the profile's recipe)            | fused scores of the three learners after the warm-up |
| mml_cooc       | MML                                   | fused with the co-occurrence learner (`fusion_cooc`) |
| mml_zero_shot  | MML                                   | fused scores with 0 warm-up steps                    |
| no_gen         | MML                                   | new items' ID rows = random N(0, init_std) instead of generated |
| no_fusion      | MML                                   | average of the three learners' standardised scores (A = 1/3) |
| mml_id         | MML                                   | the ID learner's scores alone                        |
| mml_text       | MML                                   | the text learner's scores alone                      |
| mml_image      | MML                                   | the image learner's scores alone                     |
| pt_ft          | the recipe without meta-training      | fused scores after the warm-up chosen for it         |
| mml_paper      | the paper's recipe (MAML from scratch, BPR, last item as query; `paper-quick` / `paper`) | fused scores after its warm-up |

PT-FT, as the paper defines it: the model with MML's structure pre-trained on D_old (stage 1a, the
weights best on validation), no meta-training (stage 1b has 0 updates), then fine-tuned on each new
user's support items with the warm-up whose parameter group, steps and learning rate are chosen on
the validation item from a grid that includes 0 steps.

The ablations are inference-time variants of one trained model (they differ from MML only in how the
trained parts are combined), so their differences to MML measure the contribution of each part as
trained, not of a model retrained without it.

What `train` receives: D_old and the new users' support items. Its Split also needs a validation and
a query item per new user (for the run's own metrics.json summary); both are set to the user's LAST
SUPPORT item, so the held-out items never reach training; selection goes through the validator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mml.errors import MMLError
from training.config import merge_settings
from training.evaluation.protocol import Method, TrainData, Validator

ROWS: dict[str, str] = {  # row -> run kind
    "mml": "mml",
    "mml_cooc": "mml",
    "mml_zero_shot": "mml",
    "no_gen": "mml",
    "no_fusion": "mml",
    "mml_id": "mml",
    "mml_text": "mml",
    "mml_image": "mml",
    "pt_ft": "ptft",
    "mml_paper": "paper",
}
SINGLE_LEARNER = {"mml_id": "id", "mml_text": "text", "mml_image": "image"}
PAPER_PROFILE = {"quick": "paper-quick", "full": "paper"}  # the paper's recipe at a comparable budget


def train_config(kind: str, profile: str, seed: int, overrides: dict[str, Any] | None = None):
    """The TrainConfig of a run: the named profile (the paper's recipe for kind `paper`), `overrides`
    (tests), then the kind's own settings."""
    from training.config import profile as make_profile

    settings: dict[str, Any] = {"seed": seed}
    if kind == "ptft":
        settings["stage1"] = {"steps": 0}  # pre-training only: no meta-update
    if kind == "paper":
        profile = PAPER_PROFILE.get(profile, profile)
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
        self.kind = ROWS[name]
        self.train_profile = train_profile

    def fit(self, data: TrainData, validator: Validator) -> None:
        import torch

        from training.checkpoint import load_model
        from training.run import train
        from training.validation import Validation

        if data.features is None:
            raise MMLError(f"{self.name}: needs the item features (mml data features --data DIR)")
        if data.work_dir is None:
            raise MMLError(f"{self.name}: needs a work folder for its training run")
        cfg = train_config(self.kind, self.train_profile, data.seed, self.overrides)
        run_dir = Path(data.work_dir) / f"{self.kind}-{cfg.profile}-seed{data.seed}"
        split = training_split(data)
        if not _finished(run_dir, cfg, split, data.features):
            self.log(f"training {run_dir.name} ({cfg.profile} profile)")
            validation = Validation(np.asarray(data.new_support), validator.per_user)
            # MML and PT-FT share their stage-1a pre-training (same data, seed and settings)
            siblings = tuple(p for p in Path(data.work_dir).glob(f"*-seed{data.seed}") if p != run_dir)
            train(
                split, data.features, run_dir, cfg, show_progress=False, validation=validation,
                pretrained_from=siblings,
            )  # fmt: skip
        self.model, self.cfg = load_model(run_dir)
        if self.name == "mml_cooc" and not self.model.has_cooc:
            raise MMLError(f"{self.name}: the {cfg.profile} profile trains no co-occurrence learner")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        self.info.update(
            train_profile=cfg.profile,
            run=str(run_dir),
            train_seconds=metrics.get("wall_s"),
            stages_loaded=metrics.get("stages_loaded"),
            warmup=metrics.get("warmup"),
            selection={
                key: metrics.get(f"stage{stage}", {}).get(key)
                for stage, key in (
                    (1, "pretrain"),
                    (1, "selection"),
                    (3, "warmup_selection"),
                    (3, "cooc_windows"),
                )
            },
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
        from training.warmup import average_scores, warm_scores

        out = []
        cooc = self.name == "mml_cooc"
        for _rows, fused, per_learner in warm_scores(
            self.model, state, history, self.cfg, self.steps, seed=0, cooc=cooc
        ):
            if self.name in SINGLE_LEARNER:
                scores = per_learner[SINGLE_LEARNER[self.name]]
            elif self.name == "no_fusion":
                scores = average_scores(per_learner)
            else:
                scores = fused
            out.append(scores.numpy())
        scores = np.concatenate(out).astype(np.float32)
        scores[:, 0] = 0.0  # the pad column is ignored by the metrics; keep the matrix finite
        return scores


def mml_method(
    name: str, train_profile: str, threads: int | None = None, overrides: dict[str, Any] | None = None
) -> Method:
    """The row `name` trained with `train_profile` plus `overrides` (`mml train --set` settings)."""
    settings = {**(overrides or {}), **({"threads": threads} if threads else {})}
    return MMLRow(name, train_profile, overrides=settings or None)
