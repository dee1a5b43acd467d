"""Pop: every new user gets the items ranked by their number of interactions in D_old.

New items (never seen before T) all score 0 and tie; see `metrics` for how ties are ranked."""

from __future__ import annotations

import numpy as np

from training.evaluation.protocol import Method, TrainData, Validator


def item_counts(old_seqs: list[np.ndarray], n_items: int) -> np.ndarray:
    """(N+1,) float32 interaction counts per item in D_old (index 0 = pad, always 0)."""
    flat = np.concatenate(old_seqs) if old_seqs else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=n_items + 1)[: n_items + 1].astype(np.float32)


class Pop(Method):
    name = "pop"

    def fit(self, data: TrainData, validator: Validator) -> None:
        self.counts = item_counts(data.old_seqs, data.n_items)
        self.counts[0] = 0.0

    def score(self, users: np.ndarray, history: np.ndarray, state: object) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()
