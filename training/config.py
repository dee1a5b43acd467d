"""TrainConfig: the three-stage meta-training of MML (paper Sec. 4.4) and its profiles.

`paper` = the paper's / reference code's settings (docs/model.md lists every deviation);
`quick` = a couple of minutes on 2 CPU cores (used by `make run` and the tests).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.config import ModelConfig

Loss = Literal["bpr", "ce"]


def merge_settings(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, nested dicts merged key by key (profile overrides)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge_settings(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Frozen):
    """How an old user's history becomes a meta-training task (docs/model.md, "tasks")."""

    window: Literal["sampled", "recent"] = Field(
        "sampled",
        description="sampled: each epoch a random contiguous window of the history; recent: the most recent "
        "items (what the reference's max-length truncation does)",
    )
    min_len: int = Field(
        10, ge=3, description="shortest sampled window (items incl. the query); 10 = a new user's length"
    )
    max_len: int | None = Field(None, ge=3, description="longest window; None (or more) = model max_len + 1")
    query_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of a window's targets in the query set (the last ones); 0 = the last item only "
        "(paper, reference). Gamma (item embeddings) learns only from query targets (docs/model.md)",
    )


class PretrainConfig(_Frozen):
    """Stage 1a (deviation, docs/model.md): next-item pre-training of each learner before MAML, CE at
    every position of D_old windows, early stopping on the validation item (training/pretrain.py)."""

    steps: int = Field(
        0, ge=0, description="step budget (Adam steps per learner); 0 = no pre-training (the paper's recipe)"
    )
    batch: int = Field(128, ge=1, description="windows per step")
    lr: float = Field(3e-3, gt=0.0, description="Adam learning rate (the SASRec recipe that works here)")
    window: Literal["sampled", "recent"] = Field(
        "recent",
        description="recent: each sampled user's last max_len+1 items (SASRec's usual windows; measured "
        "better here, docs/model.md); sampled: a window ending at a uniform position of the user's history",
    )
    eval_every: int = Field(100, ge=1, description="steps between validation measurements")
    patience: int = Field(3, ge=1, description="measurements without improvement before a learner stops")
    id_init: Literal["random", "cooc_svd"] = Field(
        "cooc_svd",
        description="start of the ID embeddings: random N(0, init_std), or the truncated SVD of D_old's "
        "positive-PMI co-occurrence matrix (measured: the ID learner leaves popularity level within 50 "
        "steps instead of after hundreds or never, docs/model.md)",
    )
    id_init_window: int = Field(3, ge=1, description="co-occurrence window of the SVD start")
    id_init_std: float = Field(0.06, gt=0.0, description="std of the SVD start's entries (rows 1..N)")


class Stage1Config(_Frozen):
    """MAML for each learner (Sec. 4.4.2, Eq. 18-20)."""

    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    epochs: int = Field(10, ge=0, description="meta epochs (paper 5.1.3: 10); ignored when `steps` is set")
    steps: int | None = Field(
        None,
        ge=0,
        description="budget of meta-updates (global Adam steps per learner) instead of epochs; with "
        "`eval_every`, each learner keeps its best state on the validation item (never worse than its start)",
    )
    eval_every: int | None = Field(
        None, ge=1, description="meta-updates between validation measurements (None: no selection)"
    )
    meta_batch: int = Field(
        256,
        ge=1,
        description="tasks (users) per global update. Paper 5.1.3: batch 2048, i.e. 3 Adam steps per epoch on "
        "ML-1M's 5,365 old users; measured to leave the ID learner at chance (docs/model.md), so 256",
    )
    chunk: int = Field(
        64,
        ge=1,
        description="tasks per vmapped chunk: bounds memory, not the maths; a meta-batch is sorted by length "
        "so each chunk drops its pad columns (64 measured fastest on 2 CPU cores: 120 vs 85 tasks/s for 256)",
    )
    inner_steps: int = Field(5, ge=0, description="local updates per task (paper 5.1.3: 5)")
    inner_lr: float = Field(1e-3, gt=0.0, description="local SGD learning rate alpha (paper 5.1.3: 1e-3)")
    first_order: bool = Field(
        True, description="first-order MAML (the reference); False = exact second order"
    )
    loss: Loss = Field("bpr", description="bpr: one uniform negative per positive (paper); ce: full softmax")
    lr_id: float = Field(1e-3, gt=0.0, description="global Adam lr beta, ID learner (paper: 5e-4..1e-3)")
    lr_text: float = Field(3e-3, gt=0.0, description="global Adam lr, text learner (reference: 3e-3..5e-3)")
    lr_image: float = Field(3e-3, gt=0.0, description="global Adam lr, image learner (reference: 3e-3..5e-3)")


class Stage2Config(_Frozen):
    """The cold-start item embedding generator (Sec. 4.4.2 stage 2)."""

    epochs: int = Field(10, ge=0, description="passes over the old users (reference: 10)")
    batch: int = Field(256, ge=1, description="sequences per step")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    forget_rate: float = Field(
        0.15, gt=0.0, lt=1.0, description="p0: share of old items forgotten per step (reference 0.10-0.15)"
    )


class Stage3Config(_Frozen):
    """The fusion layer (Sec. 4.4.2 stage 3): simulated new items, cross-entropy over all items."""

    epochs: int = Field(10, ge=0, description="passes over the sampled old users")
    batch: int = Field(256, ge=1, description="sequences per step")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate (reference: 1e-5..5e-4, 100 epochs)")
    forget_rate: float = Field(0.15, gt=0.0, lt=1.0, description="p0 of stage 2, for the simulated new items")
    user_fraction: float = Field(
        0.25, gt=0.0, le=1.0, description="share of old users sampled (reference 0.10-0.25)"
    )
    select: bool = Field(
        False,
        description="validation selection (deviation, docs/model.md): each fusion layer trains from its "
        "initial (uniform) state and ends at its best state on the validation item, measured after every "
        "batch, among those and {uniform, each learner alone}, so it is never worse there than its best learner",
    )


class WarmupConfig(_Frozen):
    """Meta-test warm-up: local updates on each new user's support items (batched across users)."""

    steps: int = Field(
        5, ge=0, description="local SGD steps (0 = use the global parameters); = the inner loop's 5"
    )
    lr: float = Field(1e-3, gt=0.0, description="local SGD learning rate (= alpha)")
    params: Literal["theta", "head"] = Field(
        "theta",
        description="what the local update changes: theta = all of Theta (the paper); head = the last "
        "block's feed-forward layer only (a small per-user head)",
    )
    chunk: int = Field(256, ge=1, description="users per vmapped chunk")
    select: bool = Field(
        False,
        description="choose (params, steps, lr) from the grids below on the validation item after stage 2 "
        "(deviation, docs/model.md); the choice replaces steps / lr / params in the trained run",
    )
    grid_steps: tuple[int, ...] = Field((0, 1, 3), description="steps tried (0 = no warm-up) when `select`")
    grid_lrs: tuple[float, ...] = Field((1e-3, 1e-2), description="learning rates tried when `select`")
    grid_params: tuple[Literal["theta", "head"], ...] = Field(
        ("theta", "head"), description="parameter groups tried when `select`"
    )


class CoocConfig(_Frozen):
    """The co-occurrence learner (beyond the paper; mml/cooc.py). On when model.cooc_neighbours > 0."""

    windows: tuple[int, ...] = Field(
        (1, 2, 3, 5, 10),
        description="co-occurrence windows tried; the one best on the validation item is kept",
    )


class TrainConfig(_Frozen):
    profile: str = Field("paper", description="name of the profile these settings came from")
    seed: int = Field(2020, description="seed of every random draw (reference: 2020)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    stage3: Stage3Config = Field(default_factory=Stage3Config)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    cooc: CoocConfig = Field(default_factory=CoocConfig)
    max_old_users: int | None = Field(None, ge=1, description="train on the first N old users only (tests)")
    max_new_users: int | None = Field(
        None, ge=1, description="validate on the first N new users only (tests)"
    )
    eval_tasks: int = Field(
        256, ge=1, description="fixed tasks on which each stage's loss is measured before/after"
    )
    threads: int = Field(2, ge=1, description="torch CPU threads")
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="where training runs: cpu, cuda or cuda:N (checkpoints are written as CPU tensors; "
        "not part of a stage's key, so a run resumes across devices). Results on a GPU are not bit-equal "
        "to the CPU's",
    )

    @property
    def window_max(self) -> int:
        """Longest task window: tasks.max_len, capped at what the model reads (max_len inputs + 1 target)."""
        return min(self.tasks.max_len or self.model.max_len + 1, self.model.max_len + 1)


# The recipe that learns (docs/model.md, "Deviations: the training recipe"): next-item pre-training
# (CE, every position) with early stopping, then MAML with CE and 80 % of each window's targets in
# the query, each learner kept at its best state on the validation item; the warm-up chosen on the
# validation item; the co-occurrence learner in a second fusion layer. Budgets are steps, not epochs.
RECIPE: dict[str, Any] = {
    "model": {"dropout_hidden": 0.2, "dropout_attn": 0.2, "cooc_neighbours": 100},
    "tasks": {"query_share": 0.8},
    "stage1": {
        "loss": "ce",
        "inner_steps": 1,
        "meta_batch": 64,
        "pretrain": {"steps": 3000, "window": "recent", "eval_every": 100, "patience": 4},
        "steps": 200,
        "eval_every": 25,
    },
    "stage3": {"select": True},
    "warmup": {"select": True},
}

PROFILES: dict[str, dict[str, Any]] = {
    # the paper's settings and recipe (MAML from scratch, BPR, last item as the query)
    "paper": {},
    # the paper's recipe at a couple of minutes on 2 CPU cores (the earlier `quick`; docs/results.md's
    # paper rows)
    "paper-quick": {
        "tasks": {"max_len": 21},
        "stage1": {"epochs": 2, "meta_batch": 64, "inner_steps": 1},  # 168 Adam steps on ML-1M
        "stage2": {"epochs": 1},
        "stage3": {"epochs": 1},
        "warmup": {"steps": 1},
    },
    # the recipe that learns, at its full budget (the report's profile)
    "full": RECIPE,
    # the same recipe within about 10 minutes on 2 CPU cores (`make run`, the tests): shorter windows
    # and budgets
    "quick": merge_settings(
        RECIPE,
        {
            "tasks": {"max_len": 21},
            "stage1": {
                "pretrain": {"steps": 500, "eval_every": 50, "patience": 4},
                "steps": 40,
                "eval_every": 10,
            },
            "stage2": {"epochs": 1},
            "stage3": {"epochs": 1},
        },
    ),
}


def profile(name: str, **overrides: Any) -> TrainConfig:
    """A named profile with nested overrides, e.g. profile("quick", seed=1, stage1={"loss": "ce"})."""
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {name!r}")
    return TrainConfig.model_validate(merge_settings({"profile": name, **PROFILES[name]}, overrides))
