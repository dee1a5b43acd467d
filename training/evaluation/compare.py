"""Paired comparisons of two evaluated methods from `mml evaluate`'s run cache, per user, each user's
value averaged over the seeds both methods have (the same design as the report's MML-vs-baseline
tests, for any pair, e.g. a training variant against the method it changes), Holm-corrected over the
table's tests.

    python -m training.evaluation.compare --cache artifacts/eval/ml-1m/quick/cold_users \\
        --pairs mml_q:mml,mml_ce_q:mml_ce --out docs/results/diagnostics/query-share-paired.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from training.evaluation.runner import load_run
from training.evaluation.significance import ALPHA, holm, paired_test

METRICS = ("recall@10", "ndcg@10", "mrr@10", "recall@20")


def per_user(cache: Path, method: str, seeds: list[int], variant: str, metric: str) -> np.ndarray:
    runs = [load_run(cache / method / f"seed{seed}.npz") for seed in seeds]
    return np.mean([run.per_user[variant][metric] for run in runs], axis=0)


def seeds_of(cache: Path, method: str) -> set[int]:
    return {int(p.stem.removeprefix("seed")) for p in (cache / method).glob("seed*.npz")}


def compare(cache: Path, pairs: list[tuple[str, str]], variant: str = "unmasked") -> str:
    rows, pvalues = [], []
    for a, b in pairs:
        seeds = sorted(seeds_of(cache, a) & seeds_of(cache, b))
        if not seeds:
            raise SystemExit(f"no seed evaluated for both {a} and {b} under {cache}")
        for metric in METRICS:
            test = paired_test(
                per_user(cache, a, seeds, variant, metric), per_user(cache, b, seeds, variant, metric)
            )
            rows.append((a, b, metric, len(seeds), test))
            pvalues.append(test.wilcoxon_pvalue)
    adjusted = holm(pvalues)
    lines = [
        f"Paired per-user tests ({variant}, {rows[0][4].n_users} users; values averaged over the seeds "
        f"both methods have), Wilcoxon signed-rank p Holm-adjusted over the {len(rows)} tests below; "
        f"\\* = p < {ALPHA}. Command: `python -m training.evaluation.compare --cache {cache} --pairs "
        f"{','.join(f'{a}:{b}' for a, b in pairs)}`",
        "",
        "| A | B | metric | seeds | A | B | A - B | relative | Wilcoxon p (Holm) | t-test p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (a, b, metric, n_seeds, t), p in zip(rows, adjusted, strict=True):
        rel = f"{t.mean_diff / t.mean_b:+.0%}" if t.mean_b else "-"
        star = "\\*" if p < ALPHA else ""
        lines.append(
            f"| {a} | {b} | {metric} | {n_seeds} | {t.mean_a:.4f} | {t.mean_b:.4f} | {t.mean_diff:+.4f} | {rel} "
            f"| {p:.2g}{star} | {t.t_pvalue:.2g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, required=True, help="artifacts/eval/<dataset>/<profile>/<setting>"
    )
    parser.add_argument("--pairs", required=True, help="comma-separated A:B method pairs")
    parser.add_argument("--variant", default="unmasked", choices=("unmasked", "masked"))
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: print)")
    args = parser.parse_args()
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",")]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise SystemExit("--pairs takes A:B,C:D")
    text = compare(args.cache, pairs, args.variant)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
