"""The evaluation grid: settings x methods x seeds, each run cached on disk.

A run (one method, one setting, one seed) stores its per-user metric values under
`cache/<setting>/<method>/seed<seed>.npz` with a JSON sidecar (what the method chose, seconds, a hash
of the settings the method depends on). A rerun with the same settings reuses it, so an interrupted
`mml evaluate` resumes, a change to one method's settings reruns only that method, and the report
can be regenerated without training anything.

Model selection that is expensive (the learning-rate x loss sweep of the non-transfer baselines, the
kNN window) runs once, on the first seed of the first setting, on that setting's validation items;
every later seed and setting trains the chosen configuration (MML's learning rates are fixed too).
The sweep is recorded in the first run's `info`. Full Retrain (SASRec on D_old + support items)
reuses SASRec's selection.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mml.errors import DataError, MMLError
from training.evaluation.baselines.finetune import FinetuneConfig
from training.evaluation.baselines.meta_common import MetaBaselineConfig
from training.evaluation.baselines.sequential import SequentialConfig
from training.evaluation.metrics import METRICS
from training.evaluation.protocol import VARIANTS, Method, RunResult, evaluate

SETTINGS: tuple[str, ...] = ("cold_users", "cold_users_items")
COLD_ITEMS_FRACTION = 0.1  # the second setting: `mml data prepare --cold-items 0.1`
BASELINES: tuple[str, ...] = (
    "pop",
    "itemknn",
    "sasrec",
    "gru4rec",
    "full_retrain",
    "pt_ft",
    "sasrec_ft",
    "sml",
    "cbml",
    "metatl",
)
# the trained baselines of training/evaluation/baselines/ and the profile field each one's settings
# (its cache key) come from
SEQUENTIAL = ("sasrec", "gru4rec", "full_retrain")
MML_ROWS: tuple[str, ...] = (
    "mml",
    "mml_cooc",
    "no_gen",
    "no_fusion",
    "mml_id",
    "mml_text",
    "mml_image",
    "mml_zero_shot",
)
# the paper's recipe at a comparable budget (mml_rows.py), and SASRec fused with the co-occurrence
# learner (fused_rows.py): the rows that show what the recipe and the meta-learning add
OPTIONAL_ROWS: tuple[str, ...] = ("mml_paper", "sasrec_cooc")
TRAINED_BASELINES = ("sasrec_ft", "sml", "cbml", "metatl")  # no item features needed
METHODS: tuple[str, ...] = BASELINES + MML_ROWS
ALL_METHODS: tuple[str, ...] = METHODS + OPTIONAL_ROWS


class EvalProfile(BaseModel):
    """How much compute each method gets; every method of one profile gets comparable effort."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    sequential: SequentialConfig = Field(description="SASRec / Full Retrain training and selection grids")
    gru4rec: SequentialConfig | None = Field(None, description="GRU4Rec's, when not `sequential`")
    finetune: FinetuneConfig = Field(FinetuneConfig(), description="SASRec + fine-tune: the per-user grid")
    meta: MetaBaselineConfig = Field(MetaBaselineConfig(), description="SML, CBML, MetaTL training")
    itemknn_windows: tuple[int | None, ...] = Field(
        description="co-occurrence windows tried (None = whole user)"
    )
    train_profile: str = Field(description="`mml train --profile` for MML, its ablations and PT-FT")
    train_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="`mml train --set` settings on top of `train_profile` for MML, its ablations and "
        "PT-FT (`mml evaluate --set`, experiments; the report's profiles set none). A cache key",
    )
    train_threads: int = Field(
        2, ge=1, description="torch threads of MML / PT-FT training (speed only, not a cache key)"
    )


PROFILES: dict[str, EvalProfile] = {
    # The report's profile: the baselines' full grids (the paper's learning rates, Sec. 5.1.3), MML
    # with the recipe at its full budget (`mml train --profile full`; the paper's own recipe is the
    # mml_paper row, `--profile paper`).
    "full": EvalProfile(
        name="full",
        sequential=SequentialConfig(),
        itemknn_windows=(None, 2, 3, 5, 10, 20),
        train_profile="full",
    ),
    # A few hours on 2 CPU cores: two learning rates, sampled windows, short early stopping.
    "quick": EvalProfile(
        name="quick",
        # The known-good SASRec recipe (CE, lr 3e-3, dropout 0.2, d 64, the last 50+1 items of each
        # user) as a one-point grid, for SASRec, Full Retrain and GRU4Rec alike; the paper profile
        # searches the full grids (coordinate search, training/evaluation/baselines/sequential.py). Each training runs >= 40 % of its step budget, then stops early on the
        # validation item. Budgets sized for 2 shared CPU cores (docs/results.md, method notes).
        sequential=SequentialConfig(
            ds=(64,),
            dropouts=(0.2,),
            lrs=(3e-3,),
            losses=("ce",),
            windows="last",
            budget_epochs=20,
            min_steps=600,
            max_steps=1500,
            patience=3,
            es_after=0.4,
            threads=1,
        ),
        gru4rec=SequentialConfig(
            ds=(64,),
            dropouts=(0.2,),
            lrs=(3e-3,),
            losses=("ce",),
            windows="last",
            budget_epochs=20,
            min_steps=600,
            max_steps=1500,
            patience=3,
            es_after=0.4,
            threads=1,
        ),
        finetune=FinetuneConfig(lrs=(1e-4, 1e-3), steps=(0, 1, 3), groups=("all", "items"), threads=1),
        meta=MetaBaselineConfig(
            threads=1,
            lrs=(1e-3,),
            budget_epochs=100,
            min_steps=600,
            max_steps=600,
            eval_every=100,
            cbml_inner_steps=1,
            sml_passes=2,
            sml_steps=30,
        ),
        itemknn_windows=(None, 2, 5, 20),
        train_profile="quick",
        # one thread per process: two evaluation processes (or a job beside one) on 2 cores, where
        # two-thread OpenMP regions stall on descheduled threads (measured > 10x slower under load)
        train_threads=1,
    ),
}


def get_profile(name: str) -> EvalProfile:
    if name not in PROFILES:
        raise MMLError(f"profile must be one of {sorted(PROFILES)}, got {name!r}")
    return PROFILES[name]


def method_settings(name: str, profile: EvalProfile) -> dict[str, Any]:
    """The part of a profile that a method's result depends on (its cache key)."""
    if name == "itemknn":
        return {"windows": list(profile.itemknn_windows)}
    if name in SEQUENTIAL:
        return sequential_config(name, profile).model_dump(mode="json", exclude={"threads"})  # speed only
    if name == "sasrec_ft":
        return {
            "sasrec": profile.sequential.model_dump(mode="json", exclude={"threads"}),
            "finetune": profile.finetune.model_dump(mode="json", exclude={"threads"}),
        }
    if name in ("sml", "cbml", "metatl"):
        return {
            "sasrec": profile.sequential.model_dump(mode="json", exclude={"threads"}),
            "meta": profile.meta.for_method(name),
        }
    if name == "pop":
        return {}
    if name == "sasrec_cooc":
        return {"sasrec": profile.sequential.model_dump(mode="json", exclude={"threads"}), "cooc": "v1"}
    from training.evaluation.mml_rows import ROWS, train_config

    if name not in ROWS:  # a name no method of this harness carries (e.g. a test's own)
        return {"train_profile": profile.train_profile}
    # the whole TrainConfig of the row's run (seed aside): a change of recipe invalidates the cache
    cfg = train_config(
        ROWS[name], profile.train_profile, seed=0, overrides=profile.train_overrides
    ).model_dump(mode="json", exclude={"seed", "threads"})
    return {"train_profile": profile.train_profile, "training": cfg}


def config_hash(name: str, profile: EvalProfile) -> str:
    text = json.dumps({"method": name, **method_settings(name, profile)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# Full Retrain is SASRec trained on more data: it reuses SASRec's selected loss, learning rate,
# dropout and size when SASRec ran first (one search fewer; the selection is still made on the
# validation items). SASRec + fine-tune and SML start from that SASRec too.
SELECTION_FROM = {"sasrec_cooc": "sasrec", "full_retrain": "sasrec", "sasrec_ft": "sasrec", "sml": "sasrec"}


def sequential_config(name: str, profile: EvalProfile) -> SequentialConfig:
    if name == "gru4rec" and profile.gru4rec is not None:
        return profile.gru4rec
    return profile.sequential


def restrict(cfg: SequentialConfig, chosen: dict[str, Any] | None) -> SequentialConfig:
    """The config with its grids narrowed to what an earlier run chose."""
    if not chosen or "loss" not in chosen:
        return cfg
    update: dict[str, Any] = {"losses": (chosen["loss"],), "lrs": (chosen["lr"],)}
    if "dropout" in chosen:
        update["dropouts"] = (chosen["dropout"],)
    if "d" in chosen:
        update["ds"] = (chosen["d"],)
    return cfg.model_copy(update=update)


def build_method(name: str, profile: EvalProfile, chosen: dict[str, Any] | None = None) -> Method:
    """The method called `name`; `chosen` = the (loss, lr) picked by an earlier seed's sweep."""
    if name == "pop":
        from training.evaluation.baselines.pop import Pop

        return Pop()
    if name == "itemknn":
        from training.evaluation.baselines.itemknn import ItemKNN

        windows = (chosen["window"],) if chosen and "window" in chosen else profile.itemknn_windows
        return ItemKNN(windows=windows)
    if name in SEQUENTIAL:
        from training.evaluation.baselines.sequential import SequentialBaseline

        cfg = restrict(sequential_config(name, profile), chosen)
        architecture = "gru4rec" if name == "gru4rec" else "sasrec"
        return SequentialBaseline(architecture, cfg, name, with_new_support=name == "full_retrain")
    if name == "sasrec_ft":
        from training.evaluation.baselines.finetune import SASRecFinetune

        return SASRecFinetune(restrict(profile.sequential, chosen), profile.finetune, chosen)
    if name in ("sml", "cbml", "metatl"):
        from training.evaluation.baselines import meta_common

        return meta_common.build(name, profile.meta, restrict(profile.sequential, chosen), chosen)
    if name == "sasrec_cooc":
        from training.evaluation.baselines.sequential import SequentialBaseline
        from training.evaluation.fused_rows import SASRecCooc

        cfg = restrict(sequential_config("sasrec", profile), chosen)
        return SASRecCooc(SequentialBaseline("sasrec", cfg, "sasrec"))
    if name == "pt_ft" or name in MML_ROWS or name in OPTIONAL_ROWS:
        from training.evaluation.mml_rows import mml_method

        return mml_method(
            name, profile.train_profile, threads=profile.train_threads, overrides=profile.train_overrides
        )
    raise MMLError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")


def chosen_config(info: dict[str, Any]) -> dict[str, Any]:
    """What a later seed reuses from the first seed's selection."""
    return {key: info[key] for key in CHOSEN_KEYS if key in info}


# what a later seed / setting reuses of the first run's selection (per method, see `chosen_config`)
CHOSEN_KEYS = (
    "loss",
    "lr",
    "dropout",
    "d",
    "window",
    "ft_lr",
    "ft_steps",
    "ft_group",
    "meta_lr",
    "meta_loss",
)


# ---- cache ----------------------------------------------------------------------------------------


def run_path(cache: Path, setting: str, method: str, seed: int) -> Path:
    return Path(cache) / setting / method / f"seed{seed}.npz"


def save_run(path: Path, result: RunResult, profile: EvalProfile, name: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"{variant}/{metric}": result.per_user[variant][metric] for variant in VARIANTS for metric in METRICS
    }
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    sidecar = {
        "method": result.method,
        "seed": result.seed,
        "seconds": result.seconds,
        "info": result.info,
        "profile": profile.name,
        "config_hash": config_hash(name or result.method, profile),
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, default=str) + "\n")


def load_run(path: Path, profile: EvalProfile | None = None, name: str | None = None) -> RunResult | None:
    """A cached run, or None when absent or made with other settings for this method (`name`, by
    default the method recorded in the run)."""
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        return None
    meta = json.loads(sidecar.read_text())
    if profile is not None and meta.get("config_hash") != config_hash(name or meta["method"], profile):
        return None
    with np.load(path) as data:
        per_user = {
            variant: {metric: data[f"{variant}/{metric}"] for metric in METRICS} for variant in VARIANTS
        }
    return RunResult(meta["method"], meta["seed"], per_user, meta["seconds"], meta.get("info", {}))


# ---- settings -------------------------------------------------------------------------------------


def cold_items_dir(data_dir: Path) -> Path:
    """Default folder of the cold-users-and-items split, next to the default one."""
    return data_dir.parent / f"{data_dir.name}-cold-items"


def ensure_cold_items_split(data_dir: Path, out: Path, fraction: float = COLD_ITEMS_FRACTION) -> Path:
    """Prepare (or reuse) the `--cold-items fraction` split from the same inputs as `data_dir`,
    with its features. Uses the data and features stages' own caching."""
    from training.data.prepare import prepare_dataset

    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir} has no meta.json: prepare it with `mml data prepare` first")
    meta = json.loads(meta_path.read_text())
    source, options = meta.get("source", {}), meta.get("options", {})
    kind, path = source.get("kind"), source.get("path")
    prepare_dataset(
        out=out,
        source=Path(path) if kind == "source" else None,
        mirror=Path(path) if kind == "mirror" else None,
        T=options.get("T"),
        cold_items=fraction,
        seed=options.get("seed", 2020),
        support=options.get("support", 8),
        verbose=False,
    )
    if (data_dir / "features.npz").is_file():
        from training.features.encode import compute_features

        compute_features(out)
    return out


@dataclass
class Grid:
    settings: dict[str, Path]  # setting -> prepared split folder
    methods: list[str]
    seeds: list[int]
    profile: EvalProfile
    cache: Path
    cached_only: bool = False  # report what the cache holds; train nothing (missing cells are listed)


def run_grid(grid: Grid, log: Callable[[str], None] = print) -> dict[str, dict[str, list[RunResult]]]:
    """Every (setting, method, seed) run, from the cache when present; returns setting -> method -> runs."""
    from training.data import load_split

    results: dict[str, dict[str, list[RunResult]]] = {}
    chosen_by_method: dict[str, dict[str, Any]] = {}
    for setting, folder in grid.settings.items():
        split = load_split(folder)
        features = None
        results[setting] = {}
        for name in grid.methods:
            runs: list[RunResult] = []
            chosen = chosen_by_method.get(name) or chosen_by_method.get(SELECTION_FROM.get(name, ""))
            for seed in grid.seeds:
                path = run_path(grid.cache, setting, name, seed)
                result = load_run(path, grid.profile, name)
                if result is None and grid.cached_only:
                    log(f"{setting} {name} seed {seed}: not in the cache (--cached-only: left out)")
                    continue
                if result is None:
                    if features is None and name not in ("pop", "itemknn", *SEQUENTIAL, *TRAINED_BASELINES):
                        from training.features import load_features

                        features = load_features(folder)
                    method = build_method(name, grid.profile, chosen)
                    method.log = lambda line, prefix=f"{setting} {name} seed {seed}": log(f"{prefix}: {line}")
                    result = evaluate(
                        method,
                        split,
                        features=features,
                        seed=seed,
                        data_dir=str(folder),
                        work_dir=str(Path(grid.cache) / setting / "runs"),
                    )
                    save_run(path, result, grid.profile, name)
                    log(
                        f"{setting} {name} seed {seed}: recall@10 {result.means()['recall@10']:.4f} "
                        f"({result.seconds:.0f} s)"
                    )
                else:
                    log(f"{setting} {name} seed {seed}: cached")
                if chosen is None:
                    chosen = chosen_by_method[name] = chosen_config(result.info)
                runs.append(result)
            if runs:
                results[setting][name] = runs
    return results
