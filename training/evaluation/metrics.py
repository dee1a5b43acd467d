"""Full-ranking metrics for one held-out target per user (paper Sec. 5.2.1).

Every catalogue item is a candidate (never sampled negatives); column 0 of a score matrix is the
padding id and is never ranked. With one target per user:

    Recall@k = hit@k = [rank <= k],   MRR@k = [rank <= k] / rank,   NDCG@k = [rank <= k] / log2(rank + 1)

Ties. The target's rank is `1 + (number of items with a strictly greater score)` when no other item
has the same score. When `t` other items share the target's score, a ranking would order them
arbitrarily; we report the **expected** metric over a uniformly random order of the tied block,
i.e. the target sits at each position `g+1 .. g+t+1` with probability `1/(t+1)` (`g` = items with a
strictly greater score). This is the exact version of "count half of the ties": a method that gives
every item the same score gets the metrics of a random ranking, not a perfect one (the optimistic
"strictly greater" rule would give it rank 1 for everyone). Scores from trained neural models almost
never tie, so for them both rules agree; for count-based methods (pop, itemknn) ties are common.
`tie_policy="optimistic"` gives the strictly-greater rule for comparison.

`-inf` marks an item the method can never return (e.g. a masked history item). A target scored
`-inf` is a miss at every k, and `-inf` items never count as "greater". NaN scores are an error.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

KS: tuple[int, ...] = (5, 10, 20)
KINDS: tuple[str, ...] = ("recall", "mrr", "ndcg")
# Report order of the paper's Table 2: Recall@5,10,20, MRR@5,10,20, NDCG@5,10,20.
METRICS: tuple[str, ...] = tuple(f"{kind}@{k}" for kind in KINDS for k in KS)

TiePolicy = Literal["expected", "optimistic"]


def parse_metric(name: str) -> tuple[str, int]:
    """'ndcg@10' -> ('ndcg', 10); a clear error for anything else."""
    kind, sep, k = name.partition("@")
    if not sep or kind not in KINDS or not k.isdigit() or int(k) < 1:
        raise ValueError(f"metric {name!r}: expected one of {KINDS} followed by @k (k >= 1), e.g. 'ndcg@10'")
    return kind, int(k)


def target_positions(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: (greater, ties, retrievable).

    scores: (U, N+1) float, column 0 = pad (ignored); targets: (U,) item indices in 1..N.
    greater = items in 1..N with a strictly greater (finite) score than the target;
    ties = other items in 1..N with exactly the target's score; retrievable = target score finite.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (U, N+1) and targets (U,); got {scores.shape} and {targets.shape}")
    n_items = scores.shape[1] - 1
    if targets.size and (targets.min() < 1 or targets.max() > n_items):
        raise ValueError(f"targets must be item indices in 1..{n_items} (0 is the padding id)")
    items = scores[:, 1:]
    if np.isnan(items).any():
        raise ValueError("scores contain NaN")
    target_score = scores[np.arange(len(targets)), targets][:, None]
    greater = (items > target_score).sum(axis=1)
    ties = (items == target_score).sum(axis=1) - 1  # the target itself is not a tie
    retrievable = np.isfinite(target_score[:, 0])
    return greater, ties, retrievable


def _gain(kind: str, positions: np.ndarray) -> np.ndarray:
    if kind == "recall":
        return np.ones_like(positions, dtype=np.float64)
    if kind == "mrr":
        return 1.0 / positions
    return 1.0 / np.log2(positions + 1.0)


def per_user_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    metrics: tuple[str, ...] = METRICS,
    tie_policy: TiePolicy = "expected",
) -> dict[str, np.ndarray]:
    """{metric: (U,) float64 per-user value} for the target of each user (see module docstring)."""
    if tie_policy not in ("expected", "optimistic"):
        raise ValueError(f"tie_policy must be 'expected' or 'optimistic', got {tie_policy!r}")
    greater, ties, retrievable = target_positions(scores, targets)
    if tie_policy == "optimistic":
        ties = np.zeros_like(ties)
    n_items = scores.shape[1] - 1
    positions = np.arange(1, n_items + 1, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for name in metrics:
        kind, k = parse_metric(name)
        # prefix[m] = sum of the gain over positions 1..m (only positions <= k count).
        gain = _gain(kind, positions) * (positions <= k)
        prefix = np.concatenate([[0.0], np.cumsum(gain)])
        last = greater + ties + 1  # the tied block occupies positions greater+1 .. last
        value = (prefix[np.minimum(last, n_items)] - prefix[np.minimum(greater, n_items)]) / (ties + 1)
        out[name] = np.where(retrievable, value, 0.0)
    return out


def mask_history(scores: np.ndarray, history: np.ndarray) -> np.ndarray:
    """A copy of scores with each user's history items set to -inf (pad entries 0 ignored).

    This is what a service returns with `exclude_history`: items the user already interacted with
    are never recommended again, so a target inside the history becomes a miss."""
    masked = np.array(scores, dtype=np.float32, copy=True)
    rows = np.repeat(np.arange(history.shape[0]), history.shape[1])
    cols = history.reshape(-1)
    keep = cols > 0
    masked[rows[keep], cols[keep]] = -np.inf
    masked[:, 0] = -np.inf
    return masked


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) if values.size else float("nan") for name, values in per_user.items()}
