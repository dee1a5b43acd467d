"""training.evaluation.compare: paired per-user tests between any two cached methods."""

from __future__ import annotations

import numpy as np

from training.evaluation.compare import compare
from training.evaluation.metrics import METRICS
from training.evaluation.protocol import VARIANTS, RunResult
from training.evaluation.runner import PROFILES, run_path, save_run


def _save(cache, method: str, seed: int, hits: np.ndarray) -> None:
    per_user = {v: {m: hits.astype(float) for m in METRICS} for v in VARIANTS}
    save_run(
        run_path(cache, "cold_users", method, seed), RunResult(method, seed, per_user, 1.0), PROFILES["quick"]
    )


def test_a_clearly_better_method_is_significant_and_only_shared_seeds_count(tmp_path):
    rng = np.random.default_rng(0)
    users = 400
    for seed in range(2):
        _save(tmp_path, "better", seed, rng.random(users) < 0.5)
        _save(tmp_path, "worse", seed, rng.random(users) < 0.1)
    _save(tmp_path, "better", 2, np.zeros(users, bool))  # no "worse" run with seed 2: left out
    text = compare(tmp_path, "cold_users", [("better", "worse"), ("worse", "worse")])
    rows = [
        line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| better") or line.startswith("| worse")
    ]
    better = [r for r in rows if r[0] == "| better"]
    assert len(better) == 4 and all(r[3] == "2" for r in better)  # seeds 0 and 1 only
    assert all(r[8].endswith("\\*") for r in better)  # Holm-adjusted p < 0.01
    same = [r for r in rows if r[0] == "| worse"]
    assert all(r[6] == "+0.0000" and not r[8].endswith("\\*") for r in same)
