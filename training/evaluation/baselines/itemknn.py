"""ItemKNN: item-to-item co-occurrence similarity from D_old, scored from the user's recent items.

Similarity (cosine on co-occurrence counts, as in item-based CF):

    C[i, j] = number of times i and j occur in the same old sequence within `window` positions
              (window None: anywhere in the same user's sequence)
    sim[i, j] = C[i, j] / sqrt(n_i * n_j),  n_i = occurrences of i in D_old;  sim[i, i] = 0

Score of item j for a history h_1..h_L (oldest first), weighted by recency as in session-based kNN
(V-SKNN, Ludewig & Jannach 2018, linear decay): score_j = sum_p (p / L) * sim[h_p, j].
Items never seen in D_old (new items) have no co-occurrence and score 0.

The window is chosen from `windows` on the validation item (the same selection every method gets).
"""

from __future__ import annotations

import numpy as np

from training.evaluation.protocol import Method, TrainData, Validator


def cooccurrence(old_seqs: list[np.ndarray], n_items: int, window: int | None) -> np.ndarray:
    """(N+1, N+1) float32 symmetric co-occurrence counts, zero diagonal."""
    size = n_items + 1
    if window is None:
        from scipy import sparse

        rows = np.concatenate([np.full(len(s), u) for u, s in enumerate(old_seqs)]) if old_seqs else []
        cols = np.concatenate(old_seqs) if old_seqs else []
        presence = sparse.csr_matrix(
            (np.ones(len(cols), np.float32), (rows, cols)), shape=(len(old_seqs), size)
        )
        presence.data[:] = 1.0  # a user counts once per item pair (duplicates summed by csr)
        counts = (presence.T @ presence).toarray().astype(np.float32)
    else:  # the co-occurrence learner's counts (mml/cooc.py), dense
        from mml.cooc import counts as window_counts

        if window < 1:
            raise ValueError(f"itemknn window must be >= 1 or None, got {window}")
        counts = window_counts(old_seqs, n_items, window).toarray().astype(np.float32)
    np.fill_diagonal(counts, 0.0)
    return counts


def cosine_similarity(counts: np.ndarray, occurrences: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.maximum(occurrences.astype(np.float64), 1.0))
    sim = counts / norm[:, None] / norm[None, :]
    sim[0, :] = 0.0
    sim[:, 0] = 0.0
    return sim.astype(np.float32)


def recency_weights(length: int) -> np.ndarray:
    """Linear decay: the most recent of `length` items weighs 1, the oldest 1/length."""
    return np.arange(1, length + 1, dtype=np.float32) / length


def knn_scores(sim: np.ndarray, history: np.ndarray) -> np.ndarray:
    """(U, N+1) scores for histories (U, L) of item indices (0 = pad, ignored)."""
    weights = recency_weights(history.shape[1])[None, :] * (history > 0)
    return np.einsum("ul,uln->un", weights, sim[history], optimize=True)


class ItemKNN(Method):
    name = "itemknn"

    def __init__(self, windows: tuple[int | None, ...] = (None,)) -> None:
        super().__init__()
        if not windows:
            raise ValueError("itemknn: windows must name at least one window")
        self.windows = windows

    def fit(self, data: TrainData, validator: Validator) -> None:
        flat = np.concatenate(data.old_seqs) if data.old_seqs else np.zeros(0, np.int64)
        occurrences = np.bincount(flat, minlength=data.n_items + 1)[: data.n_items + 1]
        best = None
        for window in self.windows:
            counts = cooccurrence(data.old_seqs, data.n_items, window)
            if window is None:
                # user-level: n_i = number of users with i
                occ = np.bincount(
                    np.concatenate([np.unique(s) for s in data.old_seqs]), minlength=data.n_items + 1
                )[: data.n_items + 1]
            else:
                occ = occurrences
            sim = cosine_similarity(counts, occ)
            value = validator.mean(knn_scores(sim, data.new_support))
            self.info.setdefault("validation", {})[str(window)] = value
            if best is None or value > best[0]:
                best = (value, window, sim)
        assert best is not None
        _, self.window, self.sim = best
        self.info["window"] = self.window

    def score(self, users: np.ndarray, history: np.ndarray, state: object) -> np.ndarray:
        return knn_scores(self.sim, history)
