"""Aggregate runs into `docs/results/<dataset>.json` and generate `docs/results.md`.

JSON layout (unmasked = the primary variant at the top level, the masked variant under "masked"):

    {setting: {method: {metric: {"mean": x, "std": y, "n_seeds": n}}},
     "masked": {setting: {method: {metric: {...}}}},
     "significance": {variant: {setting: {metric: {...}}}},
     "rq4": {...} (when run), "meta": {...}}

`std` is the sample standard deviation over seeds (0 with one seed). Everything in the markdown
file is generated from the JSON except `docs/results/discussion.md`, which is written by hand from
the numbers and included verbatim.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation.metrics import METRICS
from training.evaluation.protocol import VARIANTS, RunResult
from training.evaluation.runner import BASELINES, MML_ROWS, OPTIONAL_ROWS, SETTINGS
from training.evaluation.significance import ALPHA, holm, paired_test

LABELS = {
    "pop": "Pop",
    "itemknn": "ItemKNN",
    "sasrec": "SASRec",
    "gru4rec": "GRU4Rec",
    "full_retrain": "Full",
    "pt_ft": "PT-FT",
    "sasrec_ft": "SASRec + FT",
    "sml": "SML",
    "cbml": "CBML",
    "metatl": "MetaTL",
    "mml": "MML",
    "no_gen": "No-Gen",
    "no_fusion": "No-Fusion",
    "mml_id": "MML<sub>ID</sub>",
    "mml_zero_shot": "MML (0 warm-up steps)",
    "mml_cooc": "MML + co-occurrence",
    "mml_text": "MML<sub>text</sub>",
    "mml_image": "MML<sub>image</sub>",
    "mml_paper": "MML (paper's recipe)",
    "sasrec_cooc": "SASRec + co-occurrence",
    "mml_ce": "MML (CE loss)",
    "mml_ce_long": "MML (CE loss, 10 stage-1 epochs)",
    "mml_q": "MML (query = last 80 %)",
    "mml_ce_q": "MML (CE loss, query = last 80 %)",
    "mml_id_q": "MML<sub>ID</sub> (query = last 80 %)",
}
SETTING_LABELS = {"cold_users": "cold users", "cold_users_items": "cold users + cold items (10%)"}
ABLATION_METRICS = ("mrr@10", "ndcg@10")  # the paper's Table 4
# report titles by dataset name (a doc naming no dataset is ML-1M's); any other dataset: its name
DATASET_TITLES = {"ml-1m": "MovieLens-1M"}
# what the choices table shows of each run's `info` (chosen on the validation item)
CHOICE_KEYS = (
    "loss",
    "lr",
    "dropout",
    "d",
    "best_step",
    "window",
    "ft_group",
    "ft_lr",
    "ft_steps",
    "meta_lr",
    "meta_loss",
    "passes",
    "train_profile",
)


# How each baseline of training/evaluation/baselines/ is trained and selected (rendered under "Method
# notes" for the methods in the report; the module docstrings have the details).
METHOD_NOTES: dict[str, str] = {
    "pop": "items ranked by their number of interactions in D_old.",
    "itemknn": "item-to-item cosine co-occurrence in D_old (window chosen on validation), scored from the "
    "history with linear recency weights.",
    "sasrec": "SASRec (2 blocks, 2 heads, learned positions, tied output) trained from scratch on D_old with "
    "full-softmax cross-entropy at every position of each old user's last 50+1 items; Adam; a step budget "
    "that scales with the data (with a floor) and early stopping on the validation item; loss, learning "
    "rate, dropout and size chosen by coordinate search over the grids above.",
    "gru4rec": "GRU4Rec (one GRU layer over item embeddings, dropout on its input and output, tied output), "
    "trained and selected exactly like SASRec (cross-entropy at every position, same windows, budget and "
    "early stopping) over its own grids.",
    "full_retrain": "SASRec trained on D_old plus the new users' support sequences, with SASRec's selection.",
    "pt_ft": "as the paper defines it: MML's structure pre-trained on D_old (stage 1a, the weights best on validation), no "
    "meta-training, its own generator and fusion, then per-user fine-tuning on the support items with the parameter "
    "group, steps (grid with 0) and lr chosen on the validation item (training/evaluation/mml_rows.py).",
    "mml": "MML, our recipe (docs/model.md): the paper's three learners, generator and fusion; learners pre-trained with "
    "next-item CE (ID table from the SVD of D_old's co-occurrence), then MAML with CE and a query share, each kept at "
    "its best validation state; warm-up and fusion start chosen on the validation item.",
    "mml_cooc": "the same trained MML with the co-occurrence learner as a fourth learner of a second fusion layer "
    "(mml/cooc.py; window chosen on validation, top-100 neighbours per item), served exactly by the mml_cooc arm.",
    "mml_paper": "MML trained with the paper's recipe (MAML from scratch, BPR, the last item as the query) at the "
    "profile's budget (`paper-quick` for quick): the paper's row.",
    "sasrec_cooc": "the SASRec row's model and the co-occurrence learner, each score vector standardised over the "
    "catalogue (Eq. 9), summed with one weight chosen on the validation item (training/evaluation/fused_rows.py).",
    "sasrec_ft": "the SASRec row's model, then per-user fine-tuning on the 8 support items (Adam, next-item "
    "cross-entropy, dropout off); learning rate, steps (the grid includes 0 = SASRec itself) and parameter "
    "group (all weights / item table / everything but the item table) chosen on the validation item.",
    "sml": "SML (Zhang et al., SIGIR 2020): period-by-period retraining W_t = f(W_{t-1}, W_hat_t) with the "
    "reference's convolutional transfer f, trained on the next period. Periods = old users by first "
    "interaction (earliest 60 % train the base model, the rest in 4 periods), the new users' supports the "
    "last period. Deviations: base model = SASRec with CE (reference: MF with BCE), the transfer acts on "
    "every weight viewed as rows of d values, residual on W_hat with a zero-initialised output layer, a "
    "fixed number of Adam steps per period, the best pass over the periods kept on validation.",
    "cbml": "CBML (Song et al., CIKM 2021): MAML over few-shot tasks (10-item windows of old users: 8 "
    "support, 2 query) with tasks soft-clustered by their items' attributes (ML-1M genres, as MML's paper "
    "uses categories) and a cluster-aware sigmoid gate on the initial adapted parameters; GRU session "
    "encoder, full-softmax CE. Deviations: the local update adapts the output head only (ANIL-style) "
    "with SGD lr 1e-2, no auxiliary clustering loss, outer learning rate from the grid, step budget and "
    "early stopping on validation.",
    "metatl": "MetaTL (Wang et al., SIGIR 2021): translation-based transitions -||e_h + r - e_t|| with a "
    "user relation r from an MLP over the support transitions, one inner gradient step on r, margin "
    "ranking loss with sampled negatives; tasks = 10-item windows of old users (7 support transitions, "
    "2 query). Deviations: d = 64 (reference 100), no BatchNorm, the inner step on the per-task loss "
    "(beta 0.01), full-catalogue ranking, step budget and early stopping on validation, and the loss "
    "chosen on validation between the reference's margin loss and full-softmax cross-entropy over the "
    "negative distances (the margin loss with one uniform negative learns mostly popularity under "
    "full ranking).",
}


def grids_lines(profile: dict[str, Any], methods: list[str]) -> list[str]:
    """The selection grids and training budgets of the trained baselines in `methods`."""

    def seq(cfg: dict[str, Any]) -> str:
        return (
            f"loss {cfg['losses']}, lr {cfg['lrs']}, dropout {cfg['dropouts']}, d {cfg['ds']}; windows "
            f"`{cfg['windows']}`, batch {cfg['batch_windows']} windows, budget clip({cfg['budget_epochs']:g} "
            f"epochs, {cfg['min_steps']}, {cfg['max_steps']}) steps, patience {cfg['patience']} validations"
        )

    lines = []
    sequential = profile.get("sequential")
    if sequential and {"sasrec", "full_retrain", "sasrec_ft", "sml"} & set(methods):
        lines.append(f"- Grids, SASRec / Full Retrain (coordinate search): {seq(sequential)}.")
    if "gru4rec" in methods and sequential:
        lines.append(f"- Grids, GRU4Rec (coordinate search): {seq(profile.get('gru4rec') or sequential)}.")
    finetune = profile.get("finetune")
    if finetune and "sasrec_ft" in methods:
        lines.append(
            f"- Grids, SASRec + FT: lr {finetune['lrs']}, steps {finetune['steps']}, groups {finetune['groups']}."
        )
    meta = profile.get("meta")
    if meta and {"sml", "cbml", "metatl"} & set(methods):
        lines.append(
            f"- Grids, SML / CBML / MetaTL: outer lr {meta['lrs']} (CBML, MetaTL), d {meta['d']}, {meta['batch_tasks']} "
            f"tasks per step, budget clip({meta['budget_epochs']:g} epochs, {meta['min_steps']}, {meta['max_steps']}) "
            f"steps, patience {meta['patience']}; CBML {meta['cbml_clusters']} clusters, {meta['cbml_inner_steps']} "
            f"local step(s) at {meta['cbml_inner_lr']:g}; MetaTL beta {meta['metatl_inner_lr']:g}, margin "
            f"{meta['metatl_margin']:g}; SML {meta['sml_periods']} periods, {meta['sml_passes']} passes, "
            f"{meta['sml_steps']} steps per period at lr {meta['sml_lr']:g}."
        )
    return lines


def method_notes(methods: list[str]) -> list[str]:
    return [f"- **{LABELS.get(m, m)}**: {METHOD_NOTES[m]}" for m in methods if m in METHOD_NOTES]


def summarise(runs: list[RunResult], variant: str) -> dict[str, dict[str, float | int]]:
    out = {}
    for metric in METRICS:
        values = np.array([run.means(variant)[metric] for run in runs])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[metric] = {"mean": float(values.mean()), "std": std, "n_seeds": len(values)}
    return out


def per_user_over_seeds(runs: list[RunResult], variant: str, metric: str) -> np.ndarray:
    """Each user's value averaged over seeds (the unit of the paired tests)."""
    return np.mean([run.per_user[variant][metric] for run in runs], axis=0)


def best_baseline(table: dict[str, dict[str, dict]], metric: str) -> str | None:
    present = [name for name in BASELINES if name in table]
    return max(present, key=lambda name: table[name][metric]["mean"]) if present else None


def significance(
    results: dict[str, dict[str, list[RunResult]]],
    tables: dict[str, dict[str, dict]],
    variant: str,
    row: str = "mml",
    against: str | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """`row` (default MML) against the best single-method baseline (by mean) for every metric, or
    against the method `against`; Holm over settings x metrics."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    family: list[tuple[str, str]] = []
    for setting, methods in results.items():
        if row not in methods or (against is not None and against not in methods):
            continue
        out[setting] = {}
        for metric in METRICS:
            baseline = best_baseline(tables[setting], metric) if against is None else against
            if baseline is None:
                continue
            test = paired_test(
                per_user_over_seeds(methods[row], variant, metric),
                per_user_over_seeds(methods[baseline], variant, metric),
            )
            out[setting][metric] = {"baseline": baseline, **test.as_dict()}
            family.append((setting, metric))
    for key in ("t_pvalue", "wilcoxon_pvalue"):
        adjusted = holm([out[s][m][key] for s, m in family]) if family else []
        for (setting, metric), value in zip(family, adjusted, strict=True):
            out[setting][metric][f"{key}_holm"] = value
    return out


def aggregate(results: dict[str, dict[str, list[RunResult]]], meta: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    masked: dict[str, Any] = {}
    for setting, methods in results.items():
        doc[setting] = {name: summarise(runs, "unmasked") for name, runs in methods.items()}
        masked[setting] = {name: summarise(runs, "masked") for name, runs in methods.items()}
    doc["masked"] = masked
    doc["significance"] = {
        "unmasked": significance(results, {s: doc[s] for s in results}, "unmasked"),
        "masked": significance(results, masked, "masked"),
    }
    # MML + co-occurrence against the best single-method baseline and against plain ensembling
    doc["significance_cooc"] = {
        f"{variant}_vs_{name}": significance(
            results, doc if variant == "unmasked" else masked, variant, "mml_cooc", against
        )
        for variant in VARIANTS
        for name, against in (("best", None), ("sasrec_cooc", "sasrec_cooc"))
    }
    info = {
        setting: {
            name: {"seconds": [round(r.seconds, 1) for r in runs], "info": runs[0].info}
            for name, runs in methods.items()
        }
        for setting, methods in results.items()
    }
    doc["meta"] = {**meta, "runs": info}
    return doc


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ---- markdown -------------------------------------------------------------------------------------


def _cell(entry: dict[str, float], mark: str = "") -> str:
    text = f"{entry['mean']:.4f}"
    if entry["n_seeds"] > 1:
        text += f" ± {entry['std']:.4f}"
    return f"{mark[:2]}{text}{mark[2:]}" if mark else text


def _table2(table: dict[str, dict], sig: dict[str, dict], methods: list[str]) -> list[str]:
    """Rows = metrics, columns = methods (paper Table 2); best bold, runner-up underlined among the
    baselines and MML; '*' = Holm-adjusted Wilcoxon p < ALPHA against the best baseline."""
    ranked = [m for m in methods if m in BASELINES or m in ("mml", "mml_cooc", "sasrec_cooc")]
    header = ["Metric", *[LABELS[m] for m in methods]]
    if "mml" in methods:
        header += ["MML vs best baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in METRICS:
        order = sorted(ranked, key=lambda m: -table[m][metric]["mean"])
        cells = [metric]
        for name in methods:
            entry = table[name][metric]
            text = _cell(entry)
            if name in ranked and order and name == order[0]:
                text = f"**{text}**"
            elif name in ranked and len(order) > 1 and name == order[1]:
                text = f"<u>{text}</u>"
            if name == "mml" and metric in sig and sig[metric].get("wilcoxon_pvalue_holm", 1.0) < ALPHA:
                text += "\\*"
            cells.append(text)
        if "mml" in methods and metric in sig:
            base = sig[metric]["baseline"]
            b, a = table[base][metric]["mean"], table["mml"][metric]["mean"]
            change = f"{(a - b) / b * 100:+.1f}%" if b > 0 else "n/a"
            cells.append(f"{change} (vs {LABELS[base]})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ablation_table(doc: dict[str, Any], variant_tables: dict[str, dict], rows: list[str]) -> list[str]:
    settings = [s for s in SETTINGS if s in variant_tables]
    header = ["Method", *[f"{m} ({SETTING_LABELS[s]})" for s in settings for m in ABLATION_METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in rows:
        cells = [LABELS[name]]
        for setting in settings:
            for metric in ABLATION_METRICS:
                entry = variant_tables[setting].get(name, {}).get(metric)
                cells.append(_cell(entry) if entry else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _significance_table(sig: dict[str, dict[str, dict]]) -> list[str]:
    header = [
        "Setting",
        "Metric",
        "best baseline",
        "MML",
        "baseline",
        "t-test p",
        "Wilcoxon p",
        "Wilcoxon p (Holm)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, metrics in sig.items():
        for metric, row in metrics.items():
            lines.append(
                "| "
                + " | ".join(
                    [
                        SETTING_LABELS[setting],
                        metric,
                        LABELS[row["baseline"]],
                        f"{row['mean_a']:.4f}",
                        f"{row['mean_b']:.4f}",
                        _p(row["t_pvalue"]),
                        _p(row["wilcoxon_pvalue"]),
                        _p(row["wilcoxon_pvalue_holm"]),
                    ]
                )
                + " |"
            )
    return lines


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def _choices_table(meta: dict[str, Any]) -> list[str]:
    lines = ["| Setting | Method | chosen on validation | seconds per seed |", "|---|---|---|---|"]
    for setting, methods in meta.get("runs", {}).items():
        for name, run in methods.items():
            info = run["info"]
            chosen = ", ".join(f"{k}={info[k]}" for k in CHOICE_KEYS if k in info)
            seconds = ", ".join(f"{s:.0f}" for s in run["seconds"])
            lines.append(
                f"| {SETTING_LABELS.get(setting, setting)} | {LABELS.get(name, name)} | {chosen or '—'} | {seconds} |"
            )
    return lines


def render_markdown(doc: dict[str, Any], discussion: str | None, figures: dict[str, str]) -> str:
    meta = doc["meta"]
    settings = [s for s in SETTINGS if s in doc]
    n_seeds = len(meta["seeds"])
    dataset = meta.get("dataset", "ml-1m")
    lines = [
        f"# Cold-start evaluation on {DATASET_TITLES.get(dataset, dataset)}",
        "",
        "<!-- Generated by `mml evaluate` (training/evaluation/report.py): do not edit by hand. -->",
        "",
    ]
    if meta["profile"] != "full":
        lines += [
            f"> **Quick-profile result ({meta['profile']} profile, {n_seeds} seed(s)).** These numbers come from "
            "shortened training (see the profile below) and are **not** the full-profile result; "
            "`mml evaluate --profile full --seeds 3` produces that.",
            "",
        ]
    elif n_seeds < 3:
        lines += [
            f"> **Full profile, {n_seeds} seed(s).** Means without a spread across seeds; "
            "`mml evaluate --profile full --seeds 3` gives the report's three.",
            "",
        ]
    lines += [
        "## How these numbers were made",
        "",
        f"- Command: `{meta['command']}`",
        f"- Time on this machine: {meta['seconds'] / 3600:.1f} h of compute summed over every run "
        f"(RQ4: {meta.get('seconds_rq4', 0.0) / 3600:.1f} h), {meta['machine']}; each run was timed when it "
        "ran (the grid resumes from its cache, so one invocation may reuse runs of earlier ones; per-run "
        "seconds are in the last table).",
        f"- Profile `{meta['profile']}`, seeds {meta['seeds']}; data: {meta['data']}.",
        *(
            [
                f"- **Not run** (no cached run; compute ran out, see the discussion): {', '.join(meta['missing'])}."
            ]
            if meta.get("missing")
            else []
        ),
        "- Protocol: every new user has 8 support items, a validation item (9th) and a query item (10th). "
        "Methods learn from D_old and the support items only; the validation item is used for model "
        "selection only (learning rate, loss variant, epochs, kNN window); the query item only for these "
        "numbers. Full ranking over the whole catalogue (pad excluded, no sampled negatives); the query is "
        "ranked given support + validation item. Ties count as a uniformly random order of the tied block "
        "(the exact expectation; see `training/evaluation/metrics.py`). Recall@k = hit@k (one target per user).",
        "- **Unmasked** (primary, what the paper's code does): scores as returned. **Masked**: the user's "
        "support and validation items set to -inf (what the service returns with `exclude_history`).",
        f"- Mean ± sample std over seeds. \\* = MML better or worse than the best baseline with Holm-adjusted "
        f"Wilcoxon signed-rank p < {ALPHA} (paired per user, per-user values averaged over seeds). "
        "**Bold** best, <u>underlined</u> runner-up among baselines and MML.",
        *grids_lines(meta.get("profile_config", {}), _methods_in(doc, settings)),
        "",
    ]
    notes = method_notes(_methods_in(doc, settings))
    if notes:
        lines += ["### Method notes", "", *notes, ""]
    for variant in VARIANTS:
        tables = doc if variant == "unmasked" else doc["masked"]
        title = (
            "Overall performance (paper Table 2)"
            if variant == "unmasked"
            else "Masked variant (history excluded)"
        )
        lines += [f"## {title}", ""]
        for setting in settings:
            methods = [m for m in (*BASELINES, "sasrec_cooc", "mml", "mml_cooc") if m in tables[setting]]
            sig = doc["significance"][variant].get(setting, {})
            lines += [
                f"### {SETTING_LABELS[setting]} ({variant})",
                "",
                *_table2(tables[setting], sig, methods),
                "",
            ]
    ablations = [
        m
        for m in (*(r for r in MML_ROWS if r not in ("mml", "mml_cooc")), *OPTIONAL_ROWS, "mml", "mml_cooc")
        if any(m in doc[s] for s in settings)
    ]
    if ablations:
        lines += ["## Ablations (paper Table 4)", ""]
        for variant in VARIANTS:
            tables = doc if variant == "unmasked" else doc["masked"]
            lines += [
                f"{variant}:",
                "",
                *_ablation_table(doc, {s: tables[s] for s in settings}, ablations),
                "",
            ]
    for variant in VARIANTS:
        sig = doc["significance"][variant]
        if sig:
            lines += [
                f"## Significance: MML vs the best baseline ({variant})",
                "",
                "Paired per user (n = new users); two-sided. Holm's correction over the 2 settings x 9 metrics.",
                "",
                *_significance_table(sig),
                "",
            ]
    for key, sig in doc.get("significance_cooc", {}).items():
        if sig:
            variant, _, against = key.partition("_vs_")
            title = "the best single-method baseline" if against == "best" else LABELS[against]
            lines += [
                f"## Significance: MML + co-occurrence vs {title} ({variant})",
                "",
                "Paired per user; two-sided; Holm over the settings x 9 metrics. "
                "The 'MML' column is MML + co-occurrence.",
                "",
                *_significance_table(sig),
                "",
            ]
    if "rq4" in doc:
        lines += ["## Influence of the amount of training data (RQ4)", ""]
        lines += render_rq4(doc["rq4"], figures.get("rq4"))
    lines += ["## What each method chose on the validation item", "", *_choices_table(meta), ""]
    lines += OWN_DATA
    if discussion:
        lines += [
            "## Discussion",
            "",
            "_Written by hand from the numbers above._",
            "",
            discussion.strip(),
            "",
        ]
    return "\n".join(lines) + "\n"


OWN_DATA = [
    "## Evaluate on your own data",
    "",
    "Any dataset in the generic format (docs/data.md section 2: interactions with timestamps, items "
    "with a title and optionally genres, a description and an image) goes through the same "
    "commands, with no code change:",
    "",
    "```bash",
    "make results DATA=artifacts/data/shop SOURCE=/data/shop T=2024-01-01T00:00:00Z",
    "```",
    "",
    "This prepares the cold-start split of `SOURCE` at the reference time `T` (and, next to it, the "
    "cold-items split), encodes its text and images with the same pretrained encoders, trains and "
    "evaluates every method with the same selection rules and budgets that scale with the data, "
    "and writes `docs/results/<dataset>.json` and `docs/results-shop.md`. A split that is already "
    "prepared needs only `DATA=`. `EVAL_PROFILE=full` selects the report's full budget.",
    "",
]


def _methods_in(doc: dict[str, Any], settings: list[str]) -> list[str]:
    seen: list[str] = []
    for setting in settings:
        seen += [m for m in doc[setting] if m not in seen]
    return seen


def render_rq4(rq4: dict[str, Any], figure: str | None) -> list[str]:
    lines = []
    if figure:
        lines += [f"![MML vs PT-FT with a fraction of the old users]({figure})", ""]
    fractions = rq4["fractions"]
    header = [
        "Method",
        *[f"{int(f * 100)}% R@10" for f in fractions],
        *[f"{int(f * 100)}% R@20" for f in fractions],
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, series in rq4["methods"].items():
        cells = [LABELS.get(name, name)]
        for metric in ("recall@10", "recall@20"):
            cells += [_cell(series[str(f)][metric]) for f in fractions]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Setting: {SETTING_LABELS.get(rq4['setting'], rq4['setting'])}; seeds {rq4['seeds']}; "
        f"old users sampled uniformly at random (seeded) per fraction; the new users are the same.",
        "",
    ]
    return lines


def plot_rq4(rq4: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = rq4["fractions"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, metric in zip(axes, ("recall@10", "recall@20"), strict=True):
        for name, series in rq4["methods"].items():
            means = [series[str(f)][metric]["mean"] for f in fractions]
            stds = [series[str(f)][metric]["std"] for f in fractions]
            axis.errorbar(
                [f * 100 for f in fractions],
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                label=LABELS.get(name, name),
            )
        axis.set_xlabel("old users used for training (%)")
        axis.set_ylabel(metric.replace("recall", "Recall"))
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
