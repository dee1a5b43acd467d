"""Shared pieces of the meta-learning baselines (SML, CBML, MetaTL): their settings, the few-shot
training tasks cut from D_old, and validation-driven training (a step budget with early stopping).

Every method here trains under the rules of the other baselines: a budget of optimisation steps
that scales with the data but has a floor (`clip(budget_epochs * steps_per_epoch, min_steps,
max_steps)`, one epoch = one task per old user), a validation (MRR@10 of the 9th item of every new
user, after the method's own per-user adaptation on the support items) every `eval_every` steps,
the best parameters kept, and a stop after `patience` validations without improvement. The outer
learning rate is chosen from `lrs` on the validation item.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from training.evaluation.protocol import Validator

SUPPORT = 8  # the protocol's support size: tasks cut from D_old have the same shape


class MetaBaselineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    d: int = Field(64, ge=1, description="embedding size (paper: 64 for every method)")
    lrs: tuple[float, ...] = Field((1e-3, 3e-4), description="outer (global) Adam learning-rate grid")
    batch_tasks: int = Field(256, ge=1, description="tasks (old-user windows) per outer step")
    budget_epochs: float = Field(
        30.0, gt=0, description="step budget = this many passes over the old users ..."
    )
    min_steps: int = Field(600, ge=1, description="... but at least this many steps ...")
    max_steps: int = Field(6000, ge=1, description="... and at most this many")
    eval_every: int = Field(
        0, ge=0, description="steps between validations (0: one epoch, clipped to 20..200)"
    )
    patience: int = Field(3, ge=1, description="validations without improvement before stopping")
    es_after: float = Field(0.3, ge=0.0, le=1.0, description="no early stop before this share of the budget")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout of the CBML / MetaTL networks")
    # MetaTL (Wang et al. 2021; reference code defaults)
    metatl_inner_lr: float = Field(0.01, gt=0, description="beta: the one inner step on the relation r")
    metatl_margin: float = Field(1.0, gt=0, description="margin of the ranking loss")
    metatl_losses: tuple[str, ...] = Field(
        ("margin", "ce"), description="margin ranking (reference) / full-softmax CE over -distances; chosen"
    )
    metatl_hidden: tuple[int, int] = Field((500, 200), description="relation MLP hidden sizes")
    # CBML (Song et al. 2021)
    cbml_clusters: int = Field(8, ge=1, description="soft clusters of the task (attribute) embeddings")
    cbml_inner_steps: int = Field(5, ge=0, description="local updates per task (MML paper: 5)")
    cbml_inner_lr: float = Field(1e-2, gt=0, description="local SGD step on the adapted head")
    # SML (Zhang et al. 2020)
    sml_periods: int = Field(4, ge=1, description="time periods the later old users are cut into")
    sml_base_share: float = Field(
        0.6, gt=0, lt=1, description="share of old users (earliest) before the periods"
    )
    sml_passes: int = Field(3, ge=1, description="passes over the periods (reference code: 10)")
    sml_steps: int = Field(
        60, ge=1, description="steps training W_hat on one period (and the transfer on the next)"
    )
    sml_lr: float = Field(
        1e-3, gt=0, description="Adam learning rate of W_hat and of the transfer (reference: 1e-3)"
    )
    sml_l2: float = Field(1e-4, ge=0, description="weight decay of the transfer (reference: 1e-4)")
    threads: int = Field(2, ge=1, description="torch CPU threads (speed only)")

    def for_method(self, name: str) -> dict[str, Any]:
        """The settings `name` depends on (its cache key)."""
        common = (
            "d",
            "lrs",
            "batch_tasks",
            "budget_epochs",
            "min_steps",
            "max_steps",
            "eval_every",
            "patience",
            "dropout",
        )
        own = {"metatl": "metatl_", "cbml": "cbml_", "sml": "sml_"}[name]
        dump = self.model_dump(mode="json")
        return {k: v for k, v in dump.items() if k in common or k.startswith(own)}


def build(name: str, cfg: MetaBaselineConfig, sasrec_cfg, chosen: dict[str, Any] | None):
    if name == "metatl":
        from training.evaluation.baselines.metatl import MetaTL

        return MetaTL(cfg, chosen)
    if name == "cbml":
        from training.evaluation.baselines.cbml import CBML

        return CBML(cfg, chosen)
    from training.evaluation.baselines.sml import SML

    return SML(cfg, sasrec_cfg, chosen)


def sample_tasks(
    old_seqs: list[np.ndarray], size: int, rng: np.random.Generator, length: int = SUPPORT + 2
) -> np.ndarray:
    """(size, length) int64 windows of `length` consecutive items of random old users with at least
    `length` items (support = the first 8, then two targets: the protocol's 9th and 10th)."""
    eligible = [s for s in old_seqs if len(s) >= length]
    if not eligible:
        raise ValueError(f"no old sequence has {length} items")
    users = rng.integers(0, len(eligible), size=size)
    out = np.empty((size, length), np.int64)
    for row, user in enumerate(users):
        seq = eligible[user]
        start = int(rng.integers(0, len(seq) - length + 1))
        out[row] = seq[start : start + length]
    return out


def budget(n_tasks_per_epoch: int, cfg: MetaBaselineConfig) -> tuple[int, int]:
    """(total steps, steps between validations)."""
    per_epoch = max(1, -(-n_tasks_per_epoch // cfg.batch_tasks))
    total = int(min(cfg.max_steps, max(cfg.min_steps, round(cfg.budget_epochs * per_epoch))))
    every = cfg.eval_every or int(min(200, max(20, per_epoch)))
    return total, min(every, total)


def train_with_early_stopping(
    module,
    step: Callable[[int], float],
    validate: Callable[[], float],
    total: int,
    every: int,
    patience: int,
    log: Callable[[str], None],
    label: str,
    es_after: float = 0.0,
) -> tuple[float, dict[str, Any]]:
    """Run `step(i)` up to `total` times, `validate()` every `every` steps; restores the best state
    of `module`; returns (best value, {curve, best_step, steps})."""
    best_value, best_state, best_step, stale, curve, done = -1.0, None, 0, 0, [], 0
    while done < total:
        losses = [step(done + i) for i in range(min(every, total - done))]
        done += len(losses)
        value = validate()
        curve.append((done, round(value, 5)))
        log(f"{label} step {done}/{total}: loss {np.mean(losses):.4f} validation mrr@10 {value:.4f}")
        if value > best_value:
            best_value, best_state, best_step, stale = value, copy.deepcopy(module.state_dict()), done, 0
        else:
            stale += 1
            if stale >= patience and done >= es_after * total:
                break
    module.load_state_dict(best_state)
    return best_value, {"curve": curve, "best_step": best_step, "steps": done, "budget": total}


def select_lr(
    train: Callable[[float], tuple[Any, float, dict[str, Any]]], lrs: tuple[float, ...], info: dict[str, Any]
) -> Any:
    """Train once per outer learning rate; keep the best on validation; fills `info`."""
    best = None
    for lr in lrs:
        model, value, extra = train(lr)
        info.setdefault("validation", {})[f"lr={lr:g}"] = {"value": value, **extra}
        if best is None or value > best[0]:
            best = (value, lr, model, extra)
    assert best is not None
    info["validation_best"], info["meta_lr"], model, extra = best
    info["best_step"] = extra["best_step"]
    return model


def validate_in_chunks(
    scores_of: Callable[[np.ndarray], np.ndarray], n_users: int, validator: Validator, chunk: int = 256
) -> float:
    total = 0.0
    for begin in range(0, n_users, chunk):
        users = np.arange(begin, min(begin + chunk, n_users))
        total += float(validator.per_user(scores_of(users), users).sum())
    return total / n_users
