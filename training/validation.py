"""Model selection on the new users' validation item (every stage's early stopping and grids).

A `Validation` holds the new users' support items and a scorer that turns a score matrix computed
from them into per-user values of the selection metric (MRR@10 of the validation item, the metric
the evaluation protocol's `Validator` hands out). Training never sees the validation items
themselves: `mml train` builds the scorer from the split's `new_valid`, the evaluation passes its
`Validator.per_user`, so the same selection runs in both places.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from model.mml import LEARNERS, MML

SELECTION_METRIC = "mrr@10"

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (scores (u, N+1), user rows) -> (u,) values


@dataclass
class Validation:
    support: np.ndarray  # (U, S) the new users' support items
    per_user: Scorer

    @classmethod
    def from_items(cls, support: np.ndarray, valid: np.ndarray) -> Validation:
        from training.evaluation.metrics import per_user_metrics

        valid = np.asarray(valid)

        def scorer(scores: np.ndarray, users: np.ndarray) -> np.ndarray:
            return per_user_metrics(scores, valid[users], (SELECTION_METRIC,))[SELECTION_METRIC]

        return cls(np.asarray(support), scorer)

    def __len__(self) -> int:
        return len(self.support)


@torch.no_grad()
def learner_scores(model: MML, seqs: np.ndarray, chunk: int = 512) -> dict[str, np.ndarray]:
    """{learner: (U, N+1) raw scores} at the global parameters (no warm-up), dropout off; the pad
    column is -inf. `seqs` (U, S) right-padded item sequences."""
    from model.learners import last_hidden

    was_training = model.training
    model.eval()
    try:
        tables = model.item_tables()
        out: dict[str, list[np.ndarray]] = {name: [] for name in LEARNERS}
        for start in range(0, len(seqs), chunk):
            seq = torch.as_tensor(
                np.asarray(seqs[start : start + chunk], dtype=np.int64), device=model.device
            )
            hidden = model.hidden(seq)
            for name in LEARNERS:
                scores = last_hidden(hidden[name], seq > 0) @ tables[name].T
                scores[:, 0] = float("-inf")
                out[name].append(scores.float().cpu().numpy())
        return {name: np.concatenate(parts) for name, parts in out.items()}
    finally:
        model.train(was_training)


def per_learner(model: MML, validation: Validation) -> dict[str, float]:
    """Mean selection metric of each learner alone (0 warm-up steps) on the validation item."""
    users = np.arange(len(validation))
    scores = learner_scores(model, validation.support)
    return {name: float(validation.per_user(s, users).mean()) for name, s in scores.items()}


class BestPerLearner:
    """Each learner's best state on the validation item so far, its starting state included.
    `params(model, name)` = the parameters that make up a learner's state."""

    def __init__(
        self, model: MML, validation: Validation, params: Callable[[MML, str], list[torch.nn.Parameter]]
    ) -> None:
        self.model, self.validation, self.params = model, validation, params
        self.start = per_learner(model, validation)
        self.best = dict(self.start)
        self.best_step = dict.fromkeys(LEARNERS, 0)
        self.saved = {name: self._copy(name) for name in LEARNERS}
        self.curve: list[dict[str, float]] = [{"step": 0, **self.start}]
        self.since_best = dict.fromkeys(LEARNERS, 0)  # measurements without improvement

    def _copy(self, name: str) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params(self.model, name)]

    def measure(self, step: int) -> dict[str, float]:
        metric = per_learner(self.model, self.validation)
        self.curve.append({"step": step, **metric})
        for name in LEARNERS:
            if metric[name] > self.best[name]:
                self.best[name], self.best_step[name], self.since_best[name] = metric[name], step, 0
                self.saved[name] = self._copy(name)
            else:
                self.since_best[name] += 1
        return metric

    def restore(self) -> dict:
        """Put every learner back at its best state; the selection record for metrics.json."""
        with torch.no_grad():
            for name in LEARNERS:
                for p, value in zip(self.params(self.model, name), self.saved[name], strict=True):
                    p.copy_(value)
        return {"start": self.start, "best": self.best, "best_step": self.best_step, "curve": self.curve}
