"""Paired significance tests on per-user metric values (MML vs the best baseline).

Both methods are scored on the same new users, so the test is paired per user. Each user's value
is first averaged over seeds (the seeds vary training, not the users). We report:

- the paired t-test (two-sided) on the per-user differences;
- the Wilcoxon signed-rank test (two-sided; zero differences dropped, normal approximation with tie
  correction when n > 50, exact otherwise), which does not assume normal differences: per-user hit
  indicators are far from normal.
- Holm's step-down correction over the family of tests of one table (settings x metrics), so "*"
  (p < 0.01, the paper's threshold) is not an artefact of testing 18 metrics at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHA = 0.01  # the paper's Table 2 threshold


@dataclass(frozen=True)
class PairedTest:
    n_users: int
    mean_a: float
    mean_b: float
    mean_diff: float  # mean of a - b
    t_statistic: float
    t_pvalue: float
    wilcoxon_statistic: float
    wilcoxon_pvalue: float

    def as_dict(self) -> dict[str, float | int]:
        return {key: _finite(value) for key, value in self.__dict__.items()}


def _finite(value: float | int) -> float | int | None:
    return None if isinstance(value, float) and not np.isfinite(value) else value


def paired_test(a: np.ndarray, b: np.ndarray) -> PairedTest:
    """Paired tests of per-user values a (e.g. MML) against b (a baseline); same users, same order."""
    from scipy import stats

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"paired_test: a and b must be 1-d arrays of equal length, got {a.shape} and {b.shape}"
        )
    diff = a - b
    if np.allclose(diff, 0.0):  # identical: nothing to test
        t_stat, t_p, w_stat, w_p = 0.0, 1.0, 0.0, 1.0
    else:
        t = stats.ttest_rel(a, b)
        t_stat, t_p = float(t.statistic), float(t.pvalue)
        w = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
        w_stat, w_p = float(w.statistic), float(w.pvalue)
    return PairedTest(
        n_users=len(a),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        mean_diff=float(diff.mean()),
        t_statistic=t_stat,
        t_pvalue=t_p,
        wilcoxon_statistic=w_stat,
        wilcoxon_pvalue=w_p,
    )


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
