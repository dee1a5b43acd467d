"""A user's items as the local update (Eq. 18) sees them: a `TaskBatch` of right-padded prefix ->
next-item positions with a support and a query mask, and the meta-test support set of a new user
(every prefix pair of the items it clicked). Shared by training (training/tasks.py cuts the
meta-training windows) and serving (per-request adaptation, service/adapt.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch


@dataclass
class TaskBatch:
    seq: np.ndarray  # (B, L) int64 input items, right-padded with 0
    target: np.ndarray  # (B, L) int64 next item at every position (0 where none)
    negative: np.ndarray  # (B, L) int64 one sampled negative per position (BPR)
    support: np.ndarray  # (B, L) bool positions of the support set
    query: np.ndarray  # (B, L) bool positions of the query (the last q targets of each row)

    def __len__(self) -> int:
        return self.seq.shape[0]

    def rows(self, index: slice | np.ndarray) -> TaskBatch:
        return TaskBatch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def lengths(self) -> np.ndarray:
        return (self.seq > 0).sum(axis=1)

    def trimmed(self) -> TaskBatch:
        """The same tasks without the all-pad columns at the right (less compute for short windows;
        the learners accept any length up to max_len)."""
        width = max(int(self.lengths().max(initial=0)), 1)
        return TaskBatch(**{f.name: getattr(self, f.name)[:, :width] for f in fields(self)})

    def torch(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {f.name: torch.as_tensor(getattr(self, f.name), device=device) for f in fields(self)}


def sample_negatives(target: np.ndarray, n_candidates: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform over items 1..n_candidates except the target (0 where the target is 0 = no sample)."""
    if n_candidates < 2:
        raise ValueError(f"negative sampling needs at least 2 candidate items, got {n_candidates}")
    neg = rng.integers(1, n_candidates, size=target.shape)  # 1..n-1, then skip over the target
    neg = neg + (neg >= target)
    return np.where(target > 0, neg, 0).astype(np.int64)


def support_tasks(items: np.ndarray, max_len: int, n_candidates: int, rng: np.random.Generator) -> TaskBatch:
    """Meta-test support sets (U, S) -> tasks whose support = every prefix pair inside the S items
    (input items 1..S-1, targets 2..S); no query."""
    items = np.asarray(items, dtype=np.int64)
    users, size = items.shape
    if size - 1 > max_len or size < 2:
        raise ValueError(f"support sets must hold 2..{max_len + 1} items, got {size}")
    seq = np.zeros((users, max_len), dtype=np.int64)
    target = np.zeros((users, max_len), dtype=np.int64)
    seq[:, : size - 1] = items[:, :-1]
    target[:, : size - 1] = items[:, 1:]
    support = (seq > 0) & (target > 0)
    return TaskBatch(
        seq, target, sample_negatives(target, n_candidates, rng), support, np.zeros_like(support)
    )


def pad_sequences(items: np.ndarray, max_len: int) -> np.ndarray:
    """(U, S) item sequences (S <= max_len, 0 = pad at the end) -> (U, max_len) right-padded int64."""
    items = np.asarray(items, dtype=np.int64)
    if items.shape[1] > max_len:
        raise ValueError(f"sequences of {items.shape[1]} items exceed max_len={max_len}")
    out = np.zeros((items.shape[0], max_len), dtype=np.int64)
    out[:, : items.shape[1]] = items
    return out
