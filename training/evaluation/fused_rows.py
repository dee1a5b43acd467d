"""SASRec + co-occurrence: the "plain ensembling" row next to MML + co-occurrence.

SASRec (the same baseline as its own row, with SASRec's selected settings) and the co-occurrence
learner (mml/cooc.py, window chosen on the validation item, the same top-M table as MML's) are fused
the way MML's fusion layer combines learners, Eq. 9 + 13: each score vector standardised over the
catalogue items, then a weighted sum, (1 - a) z(SASRec) + a z(cooc). MML's fusion learns its weights
per user; here the single weight `a` is chosen on the validation item from a grid (a learned
per-user weight would need a fusion network trained on top of SASRec, which is what MML is).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.evaluation.protocol import Method, TrainData, Validator

WEIGHTS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))  # a, 0 = SASRec alone
COOC_NEIGHBOURS = 100  # M, as the MML profiles' model.cooc_neighbours


def standardise(scores: np.ndarray) -> np.ndarray:
    """Eq. 9 without the learned affine: (s - mean) / std over the items 1..N, per row."""
    items = scores[:, 1:].astype(np.float64)
    std = items.std(axis=1, keepdims=True)
    normed = (items - items.mean(axis=1, keepdims=True)) / np.maximum(std, 1e-12)
    return np.concatenate([np.zeros((len(scores), 1)), normed], axis=1).astype(np.float32)


class SASRecCooc(Method):
    name = "sasrec_cooc"

    def __init__(self, sasrec: Method) -> None:
        super().__init__()
        self.sasrec = sasrec

    def fit(self, data: TrainData, validator: Validator) -> None:
        from training.config import CoocConfig
        from training.cooc_learner import choose_table
        from training.validation import Validation

        self.sasrec.log = self.log
        self.sasrec.fit(data, validator)
        self.info["sasrec"] = dict(self.sasrec.info)
        from training.evaluation.runner import CHOSEN_KEYS

        # SASRec's selection, for later seeds (runner.chosen_config)
        self.info.update({k: v for k, v in self.sasrec.info.items() if k in CHOSEN_KEYS and k != "window"})
        validation = Validation(np.asarray(data.new_support), validator.per_user)
        self.table, tried = choose_table(
            data.old_seqs, data.n_items, COOC_NEIGHBOURS, CoocConfig(), validation
        )
        self.info.update(cooc_windows=tried, cooc_window=self.table.window)
        users = np.arange(len(data.new_support))
        state = self.sasrec.adapt(users, np.asarray(data.new_support), validator)
        dense = standardise(np.asarray(self.sasrec.score(users, np.asarray(data.new_support), state)))
        cooc = standardise(self._cooc(np.asarray(data.new_support)))
        values = {a: validator.mean((1 - a) * dense + a * cooc, users) for a in WEIGHTS}
        self.weight = max(values, key=values.get)
        self.info.update(weights={str(a): v for a, v in values.items()}, weight=self.weight)

    def _cooc(self, history: np.ndarray) -> np.ndarray:
        from mml.cooc import dense_scores

        return dense_scores(self.table, history)

    def adapt(self, users: np.ndarray, support: np.ndarray, validator: Validator) -> Any:
        return self.sasrec.adapt(users, support, validator)

    def score(self, users: np.ndarray, history: np.ndarray, state: Any) -> np.ndarray:
        dense = standardise(np.asarray(self.sasrec.score(users, history, state)))
        return (1 - self.weight) * dense + self.weight * standardise(self._cooc(history))
