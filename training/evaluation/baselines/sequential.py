"""Non-transfer sequential baselines: SASRec, GRU4Rec and Full Retrain (paper Sec. 5.1.2).

Each is trained from scratch with next-item prediction on D_old (Full Retrain: D_old plus the new
users' support sequences) and then scores a new user from their history, with no per-user
adaptation. Training sequences are cut into windows of `max_len + 1` items and the model predicts
every next item of a window at once (causal attention / a GRU; positions counted from the window
start). Which windows: `last` = each user's last `max_len + 1` items (one window per user, the
recipe that works best here), `all` = every window from the start of each sequence, or
`one_per_sequence` = one random window per sequence and epoch (as MML's stage 1 samples its tasks).

Losses: full-softmax cross-entropy over the catalogue at every position, or BPR with one uniform
negative per positive (the paper's loss).

Training length is a budget of optimisation STEPS that scales with the data but has a floor, not a
fixed number of epochs: `clip(budget_epochs * steps_per_epoch, min_steps, max_steps)`, so a dataset
ten times smaller still gets `min_steps` updates. Every `eval_every` steps (default: one epoch,
clipped to 20..200 steps) the validation MRR@10 is measured; the best parameters are kept and
training stops after `patience` evaluations without improvement, once `es_after` of the budget is
spent (early stopping on the validation item, the only thing the protocol lets a method look at; the
first epochs often sit at popularity level, dip and then climb, so stopping is not allowed earlier).

Model selection (validation item only): a coordinate search over the grids, in the order loss,
learning rate, dropout, hidden size. It starts from the first value of every grid; for each
hyperparameter in turn it trains every value of its grid with the others at their best so far and
keeps the best (1 + sum(len(grid) - 1) trainings instead of the product). Each training stops early
as above. The chosen values and every tried configuration's validation value are in `info`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from training.evaluation.protocol import Method, TrainData, Validator

Loss = Literal["bpr", "ce"]
Architecture = Literal["sasrec", "gru4rec"]
SEARCH_ORDER: tuple[str, ...] = ("loss", "lr", "dropout", "d")  # coordinate-search order


class SequentialConfig(BaseModel):
    """Training and selection grids of one non-transfer baseline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ds: tuple[int, ...] = Field((64, 128), description="hidden / embedding size grid (paper: 64)")
    layers: int = Field(2, ge=1, description="SASRec blocks (reference: 2); GRU4Rec uses 1 GRU layer")
    heads: int = Field(2, ge=1, description="attention heads (reference: 2)")
    ffn_factor: int = Field(
        4, ge=1, description="SASRec feed-forward size = ffn_factor * d (reference 256 at d=64)"
    )
    dropouts: tuple[float, ...] = Field((0.2, 0.5), description="hidden and attention dropout grid")
    max_len: int = Field(50, ge=2, description="window length (reference: 50)")
    batch_windows: int = Field(64, ge=1, description="windows per batch (~3,200 targets, cf. paper 2048)")
    lrs: tuple[float, ...] = Field(
        (3e-3, 1e-2, 7e-3, 5e-3, 2e-3, 1e-3), description="learning-rate grid (paper Sec. 5.1.3)"
    )
    losses: tuple[Loss, ...] = Field(("ce", "bpr"), description="loss grid; the better on validation wins")
    windows: Literal["last", "all", "one_per_sequence"] = Field(
        "last",
        description="training windows: each user's last max_len+1 items, every window, or one per epoch",
    )
    budget_epochs: float = Field(
        50.0, gt=0, description="step budget = this many passes over the windows ..."
    )
    min_steps: int = Field(2000, ge=1, description="... but at least this many steps ...")
    max_steps: int = Field(20000, ge=1, description="... and at most this many")
    eval_every: int = Field(
        0, ge=0, description="steps between validations (0: one epoch, clipped to 20..200)"
    )
    patience: int = Field(5, ge=1, description="validations without improvement before stopping")
    es_after: float = Field(
        0.3, ge=0.0, le=1.0, description="early stopping may stop only after this share of the budget"
    )
    threads: int = Field(2, ge=1, description="torch CPU threads (speed only)")


def training_windows(
    sequences: list[np.ndarray], max_len: int, mode: str = "all"
) -> tuple[np.ndarray, np.ndarray]:
    """(W, max_len + 1) int64 windows, right-padded with 0, and (W,) the sequence each comes from.
    `all`: consecutive windows overlapping by one item, so every next-item pair of every sequence is
    a target exactly once; `last`: only each sequence's last max_len + 1 items."""
    rows, owners = [], []
    for owner, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) < 2:
            continue
        starts = [max(0, len(seq) - max_len - 1)] if mode == "last" else range(0, len(seq) - 1, max_len)
        for start in starts:
            window = seq[start : start + max_len + 1]
            row = np.zeros(max_len + 1, np.int64)
            row[: len(window)] = window
            rows.append(row)
            owners.append(owner)
    if not rows:
        raise ValueError("no sequence with at least two items to train on")
    return np.stack(rows), np.asarray(owners)


def epoch_order(owners: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Window indices of one epoch, shuffled: all windows, or one random window per sequence."""
    if mode != "one_per_sequence":
        return rng.permutation(len(owners))
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    counts = np.diff(np.r_[starts, len(owners)])
    picked = starts + (rng.random(len(starts)) * counts).astype(np.int64)
    return rng.permutation(picked)


def step_budget(n_windows_per_epoch: int, cfg: SequentialConfig) -> tuple[int, int, int]:
    """(steps per epoch, total step budget, steps between validations) for a data size."""
    per_epoch = max(1, -(-n_windows_per_epoch // cfg.batch_windows))
    budget = int(min(cfg.max_steps, max(cfg.min_steps, round(cfg.budget_epochs * per_epoch))))
    every = cfg.eval_every or int(min(200, max(20, per_epoch)))
    return per_epoch, budget, min(every, budget)


def build_net(architecture: Architecture, n_items: int, d: int, dropout: float, cfg: SequentialConfig):
    import torch
    from torch import nn

    class SASRecNet(nn.Module):
        """Plain SASRec (Kang & McAuley 2018): learned positions, post-LN blocks, GELU, tied output."""

        def __init__(self) -> None:
            super().__init__()
            self.items = nn.Embedding(n_items + 1, d, padding_idx=0)
            self.positions = nn.Embedding(cfg.max_len, d)
            self.norm = nn.LayerNorm(d, eps=1e-12)
            self.drop = nn.Dropout(dropout)
            layer = nn.TransformerEncoderLayer(
                d, cfg.heads, cfg.ffn_factor * d, dropout, activation="gelu", batch_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            for module in self.modules():
                if isinstance(module, nn.Embedding | nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)  # reference init std 0.02

        def forward(self, seqs: torch.Tensor) -> torch.Tensor:
            length = seqs.shape[1]
            x = self.items(seqs) + self.positions(torch.arange(length, device=seqs.device))[None]
            x = self.drop(self.norm(x))
            causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seqs.device), 1)
            return self.encoder(x, mask=causal, src_key_padding_mask=seqs == 0)

    class GRU4RecNet(nn.Module):
        """GRU4Rec (Hidasi et al. 2016) with item embeddings instead of one-hot inputs, dropout on the
        embeddings and on the GRU output, tied output."""

        def __init__(self) -> None:
            super().__init__()
            self.items = nn.Embedding(n_items + 1, d, padding_idx=0)
            self.drop = nn.Dropout(dropout)
            self.gru = nn.GRU(d, d, num_layers=1, batch_first=True)
            nn.init.normal_(self.items.weight, std=0.02)

        def forward(self, seqs: torch.Tensor) -> torch.Tensor:
            hidden, _ = self.gru(self.drop(self.items(seqs)))
            return self.drop(hidden)

    return SASRecNet() if architecture == "sasrec" else GRU4RecNet()


def sequence_loss(net, hidden, targets, loss: Loss, generator):
    """Mean loss over the non-pad targets; hidden (B, L, d), targets (B, L)."""
    import torch
    import torch.nn.functional as F

    keep = targets > 0
    h, pos = hidden[keep], targets[keep]
    table = net.items.weight
    if loss == "ce":
        logits = h @ table[1:].T  # pad is not a class
        return F.cross_entropy(logits, pos - 1)
    neg = torch.randint(1, table.shape[0], pos.shape, generator=generator)
    diff = (h * table[pos]).sum(-1) - (h * table[neg]).sum(-1)
    return -F.logsigmoid(diff).mean()


def sequence_scores(net, seqs: np.ndarray, batch: int = 512) -> np.ndarray:
    """(U, N+1) scores for the next item after each (right-padded) sequence in `seqs`."""
    import torch

    net.eval()
    out = []
    with torch.no_grad():
        for begin in range(0, len(seqs), batch):
            chunk = torch.as_tensor(np.asarray(seqs[begin : begin + batch], dtype=np.int64))
            last = (chunk > 0).sum(1).clamp(min=1) - 1
            hidden = net(chunk)[torch.arange(len(chunk)), last]
            out.append((hidden @ net.items.weight.T).numpy())
    return np.concatenate(out).astype(np.float32)


def train_sequential(
    architecture: Architecture,
    sequences: list[np.ndarray],
    n_items: int,
    hp: dict[str, Any],
    cfg: SequentialConfig,
    validator: Validator,
    support: np.ndarray,
    seed: int,
    log: Callable[[str], None] = lambda line: None,
):
    """Train one configuration `hp` = {loss, lr, dropout, d} with early stopping on validation
    MRR@10; returns (best net, best value, {"curve": [(step, value), ...], "best_step", "steps"})."""
    import time

    import torch

    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    windows, owners = training_windows(sequences, cfg.max_len, cfg.windows)
    per_epoch_windows = len(np.unique(owners)) if cfg.windows == "one_per_sequence" else len(owners)
    _, budget, every = step_budget(per_epoch_windows, cfg)
    net = build_net(architecture, n_items, hp["d"], hp["dropout"], cfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=hp["lr"])
    best_value, best_state, best_step, stale, curve = -1.0, None, 0, 0, []
    order, cursor, step = epoch_order(owners, cfg.windows, rng), 0, 0
    while step < budget:
        net.train()
        for _ in range(min(every, budget - step)):
            if cursor >= len(order):
                order, cursor = epoch_order(owners, cfg.windows, rng), 0
            batch = torch.as_tensor(windows[order[cursor : cursor + cfg.batch_windows]])
            cursor += cfg.batch_windows
            value = sequence_loss(net, net(batch[:, :-1]), batch[:, 1:], hp["loss"], generator)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            step += 1
        current = validator.mean(sequence_scores(net, support))
        curve.append((step, round(current, 5)))
        log(f"{architecture} {_label(hp)} step {step}/{budget}: validation {validator.metric} {current:.4f}")
        if current > best_value:
            best_value, best_state, best_step, stale = current, copy.deepcopy(net.state_dict()), step, 0
        else:
            stale += 1
            if stale >= cfg.patience and step >= cfg.es_after * budget:
                break
    net.load_state_dict(best_state)
    seconds = round(time.perf_counter() - start, 1)
    return (
        net,
        best_value,
        {"curve": curve, "best_step": best_step, "steps": step, "budget": budget, "seconds": seconds},
    )


def _label(hp: dict[str, Any]) -> str:
    return f"loss={hp['loss']} lr={hp['lr']:g} dropout={hp['dropout']:g} d={hp['d']}"


def grids(cfg: SequentialConfig) -> dict[str, tuple]:
    return {"loss": cfg.losses, "lr": cfg.lrs, "dropout": cfg.dropouts, "d": cfg.ds}


def coordinate_search(
    train: Callable[[dict[str, Any]], tuple[Any, float, dict[str, Any]]], grid: dict[str, tuple]
) -> tuple[dict[str, Any], Any, float, dict[str, Any]]:
    """Coordinate search (SEARCH_ORDER) over `grid` with `train(hp) -> (model, value, extra)`;
    returns (best hp, its model, its value, {label: {value, ...extra}} of every configuration)."""
    best_hp = {key: values[0] for key, values in grid.items()}
    tried: dict[str, dict[str, Any]] = {}
    best_model, best_value = None, -np.inf
    for key in SEARCH_ORDER:
        for value in grid[key]:
            hp = {**best_hp, key: value}
            label = _label(hp)
            if label in tried:
                continue
            model, score, extra = train(hp)
            tried[label] = {"value": score, **extra}
            if score > best_value:
                best_hp, best_model, best_value = hp, model, score
    return best_hp, best_model, best_value, tried


def model_path(
    work_dir: str | None,
    architecture: str,
    hp: dict[str, Any],
    cfg: SequentialConfig,
    seed: int,
    n_sequences: int,
    n_items: int,
) -> Path | None:
    """Where the trained net of (architecture, hp, training settings, seed, data size) is kept, so
    that SASRec + fine-tune reuses SASRec's run instead of training it again."""
    if not work_dir:
        return None
    key = json.dumps(
        {
            "arch": architecture,
            "hp": hp,
            "cfg": cfg.model_dump(mode="json", exclude={"threads", "lrs", "losses", "dropouts", "ds"}),
            "seed": seed,
            "n": n_sequences,
            "items": n_items,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(work_dir) / "sequential_models" / f"{architecture}-{digest}.pt"


def fit_sequential(
    architecture: Architecture,
    sequences: list[np.ndarray],
    data: TrainData,
    cfg: SequentialConfig,
    validator: Validator,
    info: dict[str, Any],
    log: Callable[[str], None],
):
    """Select and train (or load a kept run of) the network; fills `info`; returns the net."""
    import torch

    def train(hp: dict[str, Any]):
        path = model_path(data.work_dir, architecture, hp, cfg, data.seed, len(sequences), data.n_items)
        if path is not None and path.is_file():
            saved = torch.load(path, weights_only=False)
            net = build_net(architecture, data.n_items, hp["d"], hp["dropout"], cfg)
            net.load_state_dict(saved["state"])
            log(f"{architecture} {_label(hp)}: loaded {path}")
            return net, saved["value"], saved["extra"]
        net, value, extra = train_sequential(
            architecture, sequences, data.n_items, hp, cfg, validator, data.new_support, data.seed, log
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": net.state_dict(), "value": value, "extra": extra}, path)
        return net, value, extra

    hp, net, value, tried = coordinate_search(train, grids(cfg))
    info.update(hp)
    info["validation"] = tried
    info["validation_best"] = value
    info["best_step"] = tried[_label(hp)]["best_step"]
    # training time of every configuration, including runs kept from an earlier invocation (whose
    # own `seconds` then only counts loading and scoring); absent for runs kept before this field
    info["train_seconds"] = round(sum(run.get("seconds", 0.0) for run in tried.values()), 1)
    info["grids"] = {key: list(values) for key, values in grids(cfg).items()}
    return net, hp


class SequentialBaseline(Method):
    """SASRec / GRU4Rec trained on D_old; `with_new_support=True` is Full Retrain."""

    def __init__(
        self, architecture: Architecture, cfg: SequentialConfig, name: str, with_new_support: bool = False
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.cfg = cfg
        self.name = name
        self.with_new_support = with_new_support

    def fit(self, data: TrainData, validator: Validator) -> None:
        sequences = list(data.old_seqs)
        if self.with_new_support:
            sequences += [row for row in data.new_support]
        self.net, self.hp = fit_sequential(
            self.architecture, sequences, data, self.cfg, validator, self.info, self.log
        )

    def score(self, users: np.ndarray, history: np.ndarray, state: object) -> np.ndarray:
        return sequence_scores(self.net, history)
