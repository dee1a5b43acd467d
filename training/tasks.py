"""Tasks and batches (paper Sec. 4.4.1). One task = one user's window w = (w_1 .. w_n):

    input    x = (w_1 .. w_{n-1}) right-padded to max_len, one causal pass gives every prefix
    target   y = (w_2 .. w_n)
    support  positions 0 .. n-q-2: the prefix -> next-item pairs <w_1..w_j> -> w_{j+1}, j < n-q
    query    positions n-q-1 .. n-2: the last q items, each predicted from every item before it

q = 1 (the last item) is the paper's and the reference code's task; `TaskConfig.query_share` > 0
makes the query the last round(share * (n - 1)) targets (at least 1, leaving at least one support
pair), so the global update of Gamma sees more than one target per user and epoch.

A meta-training window is cut from an old user's D_old history (TaskConfig): `sampled` draws, each
epoch, a contiguous window with a length uniform in [min_len, max_len] at a uniform position;
`recent` takes the most recent max_len items. Histories shorter than 3 items make no task.
"""

from __future__ import annotations

import numpy as np

from model.tasks import TaskBatch, sample_negatives

MIN_TASK_LEN = 3  # one support pair + the query


def sample_windows(
    seqs: list[np.ndarray], rng: np.random.Generator, mode: str, min_len: int, max_len: int
) -> list[np.ndarray]:
    """One window per history with >= 3 items (see the module docstring)."""
    if not MIN_TASK_LEN <= min_len <= max_len:
        raise ValueError(f"need {MIN_TASK_LEN} <= min_len ({min_len}) <= max_len ({max_len})")
    out = []
    for seq in seqs:
        n = len(seq)
        if n < MIN_TASK_LEN:
            continue
        if mode == "recent":
            out.append(seq[-max_len:])
            continue
        if mode != "sampled":
            raise ValueError(f"window must be 'sampled' or 'recent', got {mode!r}")
        length = int(rng.integers(min(min_len, n), min(max_len, n) + 1))
        end = int(rng.integers(length, n + 1))
        out.append(seq[end - length : end])
    return out


def query_size(n: int, share: float) -> int:
    """Query targets of a window of n items: 1 for share 0, else round(share * (n - 1)) within
    1 .. n - 2 (the window has n - 1 targets, at least one of which stays in the support set)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"query share must be in [0, 1), got {share}")
    return min(max(1, round(share * (n - 1))), n - 2)


def make_tasks(
    windows: list[np.ndarray],
    max_len: int,
    n_candidates: int,
    rng: np.random.Generator,
    query_share: float = 0.0,
) -> TaskBatch:
    """Windows (each 3 .. max_len+1 items) -> a TaskBatch of one task per window."""
    batch = len(windows)
    seq = np.zeros((batch, max_len), dtype=np.int64)
    target = np.zeros((batch, max_len), dtype=np.int64)
    support = np.zeros((batch, max_len), dtype=bool)
    query = np.zeros((batch, max_len), dtype=bool)
    for row, window in enumerate(windows):
        n = len(window)
        if not MIN_TASK_LEN <= n <= max_len + 1:
            raise ValueError(f"a task window must hold 3..{max_len + 1} items, got {n}")
        q = query_size(n, query_share)
        seq[row, : n - 1] = window[:-1]
        target[row, : n - 1] = window[1:]
        support[row, : n - 1 - q] = True
        query[row, n - 1 - q : n - 1] = True
    return TaskBatch(seq, target, sample_negatives(target, n_candidates, rng), support, query)
