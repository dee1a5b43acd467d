"""Paired comparisons of two evaluated methods from `mml evaluate`'s run cache, per user, each user's
value averaged over the seeds both methods have (the same design as the report's MML-vs-baseline
tests, for any pair, e.g. a training variant against the method it changes), Holm-corrected over the
tests of each setting's table.

    python -m training.evaluation.compare --cache artifacts/eval/ml-1m/quick \\
        --settings cold_users,cold_users_items --pairs mml_q:mml,mml_ce_q:mml_ce \\
        --out docs/results/diagnostics/query-share-paired.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from training.evaluation.report import SETTING_LABELS, per_user_over_seeds
from training.evaluation.runner import SETTINGS, load_run, run_path
from training.evaluation.significance import ALPHA, holm, paired_test

METRICS = ("recall@10", "ndcg@10", "mrr@10", "recall@20")


def seeds_of(cache: Path, setting: str, method: str) -> set[int]:
    folder = run_path(cache, setting, method, 0).parent
    return {int(p.stem.removeprefix("seed")) for p in folder.glob("seed*.npz")}


def new_item_queries(data_dir: Path) -> np.ndarray:
    """(U,) bool: the new users whose query item is a new item (not in D_old), in the split's order."""
    from training.data import load_split

    split = load_split(data_dir)
    return np.asarray(split.new_query) > split.n_old_items


def compare(
    cache: Path,
    setting: str,
    pairs: list[tuple[str, str]],
    variant: str = "unmasked",
    users: np.ndarray | None = None,
) -> str:
    """One setting's table of paired tests (markdown); `users`: a bool mask of the users to test on."""
    rows, pvalues = [], []
    for a, b in pairs:
        seeds = sorted(seeds_of(cache, setting, a) & seeds_of(cache, setting, b))
        if not seeds:
            raise SystemExit(f"no seed evaluated for both {a} and {b} under {cache}/{setting}")
        runs = {m: [load_run(run_path(cache, setting, m, seed)) for seed in seeds] for m in (a, b)}
        for metric in METRICS:
            values = [per_user_over_seeds(runs[m], variant, metric) for m in (a, b)]
            if users is not None:
                values = [v[users] for v in values]
            test = paired_test(*values)
            rows.append((a, b, metric, len(seeds), test))
            pvalues.append(test.wilcoxon_pvalue)
    adjusted = holm(pvalues)
    lines = [
        f"Paired per-user tests ({variant}, {rows[0][4].n_users} users; values averaged over the seeds "
        f"both methods have), Wilcoxon signed-rank p Holm-adjusted over the {len(rows)} tests below; "
        f"\\* = p < {ALPHA}.",
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
    parser.add_argument("--cache", type=Path, required=True, help="artifacts/eval/<dataset>/<profile>")
    parser.add_argument("--settings", default="cold_users", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--pairs", required=True, help="comma-separated A:B method pairs")
    parser.add_argument("--variant", default="unmasked", choices=("unmasked", "masked"))
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default: print)")
    parser.add_argument(
        "--new-item-queries",
        type=Path,
        default=None,
        help="the setting's split folder: test only the users whose query item is a new item",
    )
    args = parser.parse_args()
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",")]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise SystemExit("--pairs takes A:B,C:D")
    settings = args.settings.split(",")
    command = (
        f"python -m training.evaluation.compare --cache {args.cache} --settings {args.settings} "
        f"--pairs {args.pairs}"
        + (f" --variant {args.variant}" if args.variant != "unmasked" else "")
        + (f" --new-item-queries {args.new_item_queries}" if args.new_item_queries else "")
    )
    users = new_item_queries(args.new_item_queries) if args.new_item_queries else None
    parts = ["# Paired tests", "", f"Command: `{command}`", ""]
    for setting in settings:
        parts += [
            f"## {SETTING_LABELS.get(setting, setting)}",
            "",
            *(
                [f"Only the {int(users.sum())} users whose query item is a new item.", ""]
                if users is not None
                else []
            ),
            compare(args.cache, setting, pairs, args.variant, users),
        ]
    text = "\n".join(parts)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
