"""RQ4 (paper Sec. 5.5, Fig. 2): MML vs PT-FT trained on 20/40/60/80/100% of the old users.

The new users (and so the test set) are fixed; each fraction keeps a seeded uniform sample of the old
users' sequences of D_old (the catalogue and the item indices do not change). Runs are cached like the
main grid under `cache/rq4/<method>/f<fraction>/seed<seed>.npz`; the 100% point is the main grid's
cold-users run when it exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation.protocol import RunResult, evaluate
from training.evaluation.runner import EvalProfile, build_method, load_run, run_path, save_run

FRACTIONS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
RQ4_METHODS: tuple[str, ...] = ("pt_ft", "mml")
SAMPLE_SEED = 2020  # the old-user sample of each fraction (the same for every method and seed)


def subsample_old_users(split, fraction: float, seed: int = SAMPLE_SEED):
    """A copy of `split` keeping a seeded uniform `fraction` of the old users (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = len(split.old_seqs)
    keep = np.sort(np.random.default_rng(seed).permutation(n)[: max(1, round(fraction * n))])
    return replace(
        split,
        old_users=np.asarray(split.old_users)[keep],
        old_seqs=[split.old_seqs[i] for i in keep],
        stats={**split.stats, "n_old_users": len(keep), "old_user_fraction": fraction},
    )


def run_rq4(
    split,
    features,
    data_dir: Path,
    profile: EvalProfile,
    seeds: list[int],
    cache: Path,
    methods: tuple[str, ...] = RQ4_METHODS,
    fractions: tuple[float, ...] = FRACTIONS,
    log: Callable[[str], None] = print,
) -> dict[str, dict[float, list[RunResult]]]:
    out: dict[str, dict[float, list[RunResult]]] = {name: {} for name in methods}
    for fraction in fractions:
        sub = subsample_old_users(split, fraction)
        for name in methods:
            runs = []
            for seed in seeds:
                path = run_path(cache / "rq4", name, f"f{fraction:g}", seed)
                result = load_run(path, profile, name)
                if result is None and fraction == 1.0:  # all old users: the main grid's run
                    result = load_run(run_path(cache, "cold_users", name, seed), profile, name)
                if result is None:
                    result = evaluate(
                        build_method(name, profile),
                        sub,
                        features=features,
                        seed=seed,
                        data_dir=str(data_dir),
                        work_dir=str(cache / "rq4" / f"f{fraction:g}" / "runs"),
                    )
                    save_run(path, result, profile, name)
                    log(f"rq4 {name} {fraction:.0%} seed {seed}: recall@10 {result.means()['recall@10']:.4f}")
                runs.append(result)
            out[name][fraction] = runs
    return out


def summarise_rq4(
    results: dict[str, dict[float, list[RunResult]]], setting: str, seeds: list[int]
) -> dict[str, Any]:
    from training.evaluation.report import summarise

    fractions = sorted({f for series in results.values() for f in series})
    return {
        "setting": setting,
        "seeds": seeds,
        "fractions": fractions,
        "methods": {
            name: {str(f): summarise(runs, "unmasked") for f, runs in series.items()}
            for name, series in results.items()
        },
    }
