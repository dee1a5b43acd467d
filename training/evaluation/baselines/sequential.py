"""Non-transfer sequential baselines: SASRec, GRU4Rec and Full Retrain (paper Sec. 5.1.2).

Each is trained from scratch with next-item prediction on D_old (Full Retrain: D_old plus the new
users' support sequences) and then scores a new user from their history, with no per-user
adaptation. Sequences are cut into windows of `max_len + 1` items from the start of each user's
sequence; the model predicts every next item of a window at once (causal attention / a GRU), with
positions counted from the window start, so a new user's 8-9 items sit at the same positions as the
beginning of an old user's sequence. An epoch is either every window (`windows="all"`) or, as MML's
stage 1 samples its tasks, one random window per sequence (`windows="one_per_sequence"`, 4x cheaper
on ML-1M, used by the quick profile).

Losses: BPR with one uniform negative per positive (the paper's loss) and full-softmax cross-entropy
over the catalogue. Model selection, as for every method, uses only the validation item: for each
loss and each learning rate of the sweep, training stops early on validation MRR@10 (best epoch
kept), and the (loss, learning rate) pair with the best validation MRR@10 is the one scored.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from training.evaluation.protocol import Method, TrainData, Validator

Loss = Literal["bpr", "ce"]
Architecture = Literal["sasrec", "gru4rec"]


class SequentialConfig(BaseModel):
    """Training of one non-transfer baseline. Defaults follow the paper / reference code."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    d: int = Field(64, ge=1, description="embedding size (paper: 64 for all methods)")
    layers: int = Field(2, ge=1, description="SASRec blocks (reference: 2); GRU4Rec uses 1 GRU layer")
    heads: int = Field(2, ge=1, description="attention heads (reference: 2)")
    ffn: int = Field(256, ge=1, description="feed-forward size (reference: 256)")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="hidden and attention dropout (reference: 0.5)")
    max_len: int = Field(50, ge=2, description="window length (reference: 50)")
    batch_windows: int = Field(64, ge=1, description="windows per batch (~3,200 targets, cf. paper 2048)")
    lrs: tuple[float, ...] = Field(
        (1e-2, 7e-3, 5e-3, 3e-3, 2e-3, 1e-3), description="learning-rate sweep (paper Sec. 5.1.3)"
    )
    losses: tuple[Loss, ...] = Field(
        ("bpr", "ce"), description="loss variants; the better on validation wins"
    )
    windows: Literal["all", "one_per_sequence"] = Field(
        "all", description="an epoch = every window, or one random window per sequence (as MML's tasks)"
    )
    max_epochs: int = Field(30, ge=1, description="epochs per training run (early stopping usually ends it)")
    patience: int = Field(3, ge=1, description="epochs without validation improvement before stopping")
    threads: int = Field(2, ge=1, description="torch CPU threads (the machine has 2 cores)")


def training_windows(sequences: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, max_len + 1) int64 windows, right-padded with 0, and (W,) the sequence each comes from.
    Each window overlaps the next by one item, so every next-item pair of every sequence is a
    target exactly once."""
    rows, owners = [], []
    for owner, seq in enumerate(sequences):
        seq = np.asarray(seq, dtype=np.int64)
        for start in range(0, len(seq) - 1, max_len):
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
    if mode == "all":
        return rng.permutation(len(owners))
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    counts = np.diff(np.r_[starts, len(owners)])
    picked = starts + (rng.random(len(starts)) * counts).astype(np.int64)
    return rng.permutation(picked)


def _build(architecture: Architecture, n_items: int, cfg: SequentialConfig):
    import torch
    from torch import nn

    class SASRecNet(nn.Module):
        """Plain SASRec (Kang & McAuley 2018): learned positions, post-LN blocks, GELU, tied output."""

        def __init__(self) -> None:
            super().__init__()
            self.items = nn.Embedding(n_items + 1, cfg.d, padding_idx=0)
            self.positions = nn.Embedding(cfg.max_len, cfg.d)
            self.norm = nn.LayerNorm(cfg.d, eps=1e-12)
            self.drop = nn.Dropout(cfg.dropout)
            layer = nn.TransformerEncoderLayer(
                cfg.d, cfg.heads, cfg.ffn, cfg.dropout, activation="gelu", batch_first=True
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
        """GRU4Rec (Hidasi et al. 2016) with item embeddings instead of one-hot inputs, tied output."""

        def __init__(self) -> None:
            super().__init__()
            self.items = nn.Embedding(n_items + 1, cfg.d, padding_idx=0)
            self.drop = nn.Dropout(cfg.dropout)
            self.gru = nn.GRU(cfg.d, cfg.d, num_layers=1, batch_first=True)
            nn.init.normal_(self.items.weight, std=0.02)

        def forward(self, seqs: torch.Tensor) -> torch.Tensor:
            hidden, _ = self.gru(self.drop(self.items(seqs)))
            return hidden

    return SASRecNet() if architecture == "sasrec" else GRU4RecNet()


def _loss(net, hidden, targets, loss: Loss, generator):
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
    loss: Loss,
    lr: float,
    cfg: SequentialConfig,
    validator: Validator,
    support: np.ndarray,
    seed: int,
    log: Callable[[str], None] = lambda line: None,
):
    """Train with early stopping on validation MRR@10; returns (best net, best value, the validation
    value after each epoch)."""
    import torch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    windows, owners = training_windows(sequences, cfg.max_len)
    net = _build(architecture, n_items, cfg)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    best_value, best_state, stale, curve = -1.0, None, 0, []
    for _epoch in range(cfg.max_epochs):
        net.train()
        order = epoch_order(owners, cfg.windows, rng)
        for begin in range(0, len(order), cfg.batch_windows):
            batch = torch.as_tensor(windows[order[begin : begin + cfg.batch_windows]])
            hidden = net(batch[:, :-1])
            value = _loss(net, hidden, batch[:, 1:], loss, generator)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        current = validator.mean(sequence_scores(net, support))
        curve.append(round(current, 5))
        log(
            f"{architecture} {loss} lr={lr:g} epoch {len(curve)}: validation {validator.metric} {current:.4f}"
        )
        if current > best_value:
            best_value, best_state, stale = current, copy.deepcopy(net.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    net.load_state_dict(best_state)
    return net, best_value, curve


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
        best = None
        for loss in self.cfg.losses:
            for lr in self.cfg.lrs:
                net, value, curve = train_sequential(
                    self.architecture,
                    sequences,
                    data.n_items,
                    loss,
                    lr,
                    self.cfg,
                    validator,
                    data.new_support,
                    data.seed,
                    self.log,
                )
                self.info.setdefault("validation", {})[f"{loss}/lr={lr:g}"] = {"value": value, "curve": curve}
                if best is None or value > best[0]:
                    best = (value, loss, lr, net)
        assert best is not None
        value, self.info["loss"], self.info["lr"], self.net = best
        self.info["validation_best"] = value

    def score(self, users: np.ndarray, history: np.ndarray, state: object) -> np.ndarray:
        return sequence_scores(self.net, history)
