"""The co-occurrence learner: sequential item-to-item co-occurrence from D_old (numpy/scipy, no torch:
training, evaluation and the service share it).

    C[i, j]  = times j occurs within `window` positions of i in an old user's sequence (both ways)
    sim[i, j] = C[i, j] / sqrt(n_i n_j)          n_i = occurrences of i in D_old; sim[i, i] = 0
    table    = each item's top-M neighbours by sim: items (N+1, M) int32, weights (N+1, M) float32
               (0 / 0.0 where an item has fewer than M neighbours; row 0 = pad)
    score    c_j = sum_p w_p sim_M[h_p, j],  w_p = p / L   (recency-weighted, V-SKNN's linear decay)

sim_M is sim restricted to the table, so the scores the fusion learns from in training, the
evaluation's and the service's are the same numbers. An item outside the neighbour lists of a
history scores exactly 0; a new item has no co-occurrence until it appears in D_old.

For the fusion (model/fusion.py, Eq. 9 applied to this learner), a score vector is standardised
over the catalogue items 1..N. Because c is sparse, its mean and variance come from its non-zero
entries alone (`moments`), so the service standardises exactly without densifying.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scipy import sparse  # imported where the table is built: the service reads it without scipy


@dataclass(frozen=True)
class CoocTable:
    items: np.ndarray  # (N+1, M) int32 neighbour item indices, 0 = none
    weights: np.ndarray  # (N+1, M) float32 similarities, descending per row, 0.0 = none
    window: int

    @property
    def n_items(self) -> int:
        return self.items.shape[0] - 1

    @property
    def m(self) -> int:
        return self.items.shape[1]


def counts(old_seqs: list[np.ndarray], n_items: int, window: int) -> sparse.csr_matrix:
    """(N+1, N+1) symmetric co-occurrence counts within `window` positions, zero diagonal."""
    from scipy import sparse

    if window < 1:
        raise ValueError(f"cooc window must be >= 1, got {window}")
    rows, cols = [], []
    for seq in old_seqs:
        seq = np.asarray(seq, dtype=np.int64)
        for shift in range(1, min(window, len(seq) - 1) + 1):
            rows.append(seq[:-shift])
            cols.append(seq[shift:])
    size = n_items + 1
    if not rows:
        return sparse.csr_matrix((size, size), dtype=np.float32)
    r, c = np.concatenate(rows), np.concatenate(cols)
    keep = r != c
    r, c = r[keep], c[keep]
    both_r, both_c = np.concatenate([r, c]), np.concatenate([c, r])
    out = sparse.coo_matrix((np.ones(len(both_r), np.float32), (both_r, both_c)), shape=(size, size))
    return out.tocsr()  # duplicates summed


def build_table(old_seqs: list[np.ndarray], n_items: int, window: int, m: int) -> CoocTable:
    """The top-`m` neighbour table of the catalogue (items 1..n_items) from the sequences."""
    if m < 1:
        raise ValueError(f"cooc neighbours M must be >= 1, got {m}")
    from scipy import sparse

    size = n_items + 1
    flat = np.concatenate(old_seqs) if old_seqs else np.zeros(0, np.int64)
    occ = np.bincount(flat, minlength=size)[:size].astype(np.float64)
    norm = 1.0 / np.sqrt(np.maximum(occ, 1.0))
    sim = sparse.diags(norm) @ counts(old_seqs, n_items, window) @ sparse.diags(norm)
    sim = sim.tocsr()
    sim.sort_indices()
    items = np.zeros((size, m), dtype=np.int32)
    weights = np.zeros((size, m), dtype=np.float32)
    for i in range(1, size):
        lo, hi = sim.indptr[i], sim.indptr[i + 1]
        if lo == hi:
            continue
        cols, vals = sim.indices[lo:hi], sim.data[lo:hi]
        top = np.argsort(-vals, kind="stable")[:m]
        items[i, : len(top)] = cols[top]
        weights[i, : len(top)] = vals[top]
    return CoocTable(items, weights, window)


def recency_weights(valid: np.ndarray) -> np.ndarray:
    """(U, L) bool right-padded validity -> (U, L) weights p / len (most recent 1, oldest 1/len)."""
    lengths = valid.sum(axis=1, keepdims=True)
    positions = np.cumsum(valid, axis=1)
    return np.where(valid, positions / np.maximum(lengths, 1), 0.0).astype(np.float32)


def dense_scores(table: CoocTable, histories: np.ndarray) -> np.ndarray:
    """(U, N+1) co-occurrence scores for right-padded histories (U, L) (0 = pad or unknown item:
    an index beyond the table, e.g. a registered new item, counts as no co-occurrence)."""
    histories = np.asarray(histories, dtype=np.int64)
    known = (histories > 0) & (histories <= table.n_items)
    rows = np.where(known, histories, 0)
    w = recency_weights(histories > 0)[:, :, None] * table.weights[rows] * known[:, :, None]
    out = np.zeros((histories.shape[0], table.n_items + 1), dtype=np.float32)
    users = np.broadcast_to(np.arange(histories.shape[0])[:, None, None], w.shape)
    np.add.at(out, (users.ravel(), table.items[rows].ravel()), w.ravel())
    out[:, 0] = 0.0
    return out


def sparse_scores(table: CoocTable, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One history (L,) (oldest first) -> (items, scores) of its non-zero co-occurrence scores."""
    history = np.asarray(history, dtype=np.int64)
    history = history[history > 0]
    recency = np.arange(1, len(history) + 1, dtype=np.float32) / max(len(history), 1)
    known = history <= table.n_items  # registered new items: a position, no co-occurrence
    history, recency = history[known], recency[known]
    if not len(history):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    w = (recency[:, None] * table.weights[history]).ravel()
    # per-item sums by a stable sort + reduceat: the same float64 sums in the same order as
    # np.unique + np.bincount, about twice as fast at 50 x 100 entries (the service's request path)
    flat = table.items[history].ravel()
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    items = ordered[starts]
    scores = np.add.reduceat(w[order].astype(np.float64), starts).astype(np.float32)
    keep = (items > 0) & (scores > 0)
    return items[keep], scores[keep]  # items ascending


def moments(scores: np.ndarray, n_items: int) -> tuple[float, float]:
    """Mean and population variance over the n_items catalogue items of a score vector that is zero
    outside `scores` (its non-zero entries)."""
    total = float(np.sum(scores, dtype=np.float64))
    mean = total / n_items
    var = float(np.sum(np.square(scores, dtype=np.float64))) / n_items - mean * mean
    return mean, max(var, 0.0)


def fused_cooc(
    scores: np.ndarray, weight: float, n_items: int, eps: float = 1e-12
) -> tuple[np.ndarray, float]:
    """The co-occurrence learner's term of the fused score (model/fusion.py), weight * (c - mean) /
    sigma, split as (bonus, shift): for the non-zero `scores` c of one user, bonus = weight * c /
    sigma >= 0; every catalogue item's term also holds shift = -weight * mean / sigma, the same for
    all items (it never changes their order). `weight` = A_c * gamma_c >= 0, the recall graph's
    output for this user."""
    mean, var = moments(scores, n_items)
    scale = weight / np.sqrt(var + eps)
    return scores * scale, -mean * scale


def merge_topk(
    dense_items: np.ndarray,
    dense_scores: np.ndarray,
    cooc_items: np.ndarray,
    cooc_bonus: np.ndarray,
    cooc_dense: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of (dense score + co-occurrence bonus) from two candidate sets: the dense part's
    top-k (`dense_items`, `dense_scores`, exclusions already applied) and the co-occurrence candidates
    (`cooc_items`, their `cooc_bonus` >= 0 from `fused_cooc` and their dense scores `cooc_dense`,
    exclusions already applied). Every other item has bonus 0, so it scores at most the k-th dense
    score, which the union already holds k times: the union's top-k is the exact top-k. Returns
    (items, scores) best first (ties by item index). Add `fused_cooc`'s shift for the fused score."""
    rest = ~np.isin(dense_items, cooc_items)
    items = np.concatenate([dense_items[rest], cooc_items])
    scores = np.concatenate([dense_scores[rest], cooc_dense + cooc_bonus])
    order = np.lexsort((items, -scores))[:k]
    return items[order], scores[order]
