"""CBML (Song et al., CIKM 2021): cluster-based meta-learning for session-based recommendation.

CBML meta-learns a session recommender (MAML: local updates on a task's support, global update on
its query) and, to let dissimilar tasks start from different points, clusters the tasks by their
item attributes and modulates the shared initialisation with the task's cluster:

1. Attribute view of a task: every item's attribute embedding is the mean of its attributes' (here
   ML-1M's genres, as the MML paper uses item categories); the task's is the mean over its support
   items, passed through a small MLP.
2. Soft clustering: K learnable centres; the task's assignment is a softmax over negative squared
   distances, and its cluster-enhanced representation z = task embedding + sum_k p_k * centre_k.
3. Cluster-aware parameter gate: the locally adapted parameters theta_0 are modulated per task,
   theta_task = theta_0 * sigmoid(W_g z + b_g) (element-wise, per output dimension).
4. MAML: `cbml_inner_steps` SGD steps (lr `cbml_inner_lr`) on the support loss from theta_task, the
   query loss after them trains everything (second order through the local steps).

The session recommender: item embeddings, a GRU encoder, and an adapted head (a d x d matrix and a
bias) that maps the GRU state to the query vector scored against every item embedding (full-softmax
cross-entropy over the catalogue). Tasks from D_old: windows of 10 consecutive items of an old user;
the support loss predicts items 2..8 from their prefixes, the query loss items 9 and 10. A new user's
head is adapted on their 8 support items and scores their history.

Deviations, named: the local update is restricted to the head (as in MeLU-style local layers or
ANIL), not the whole network, so that hundreds of tasks can be adapted in one batched step on CPU;
the clustering uses soft assignment to learned centres without the paper's auxiliary clustering
loss; the local learning rate is 1e-2 (the MML paper's 1e-3 leaves the head unchanged in 5 steps);
training length by step budget and early stopping on the validation item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation.baselines.meta_common import (
    SUPPORT,
    MetaBaselineConfig,
    budget,
    sample_tasks,
    select_lr,
    train_with_early_stopping,
    validate_in_chunks,
)
from training.evaluation.protocol import Method, TrainData, Validator


def item_genres(data_dir: str | None, n_items: int) -> tuple[np.ndarray, int]:
    """(N+1, G_max) int64 genre ids per item (0 = none), and the number of genres; read from the
    prepared split's items.parquet (`genres`, `|`-separated). No genres: one dummy attribute."""
    path = Path(data_dir) / "items.parquet" if data_dir else None
    if path is None or not path.is_file():
        return np.zeros((n_items + 1, 1), np.int64), 0
    import pandas as pd

    items = pd.read_parquet(path, columns=["item_idx", "genres"])
    return genre_matrix(
        items["item_idx"].to_numpy(), items["genres"].fillna("").astype(str).tolist(), n_items
    )


def genre_matrix(item_idx: np.ndarray, genres: list[str], n_items: int) -> tuple[np.ndarray, int]:
    vocab: dict[str, int] = {}
    rows = []
    for text in genres:
        names = [g.strip() for g in text.split("|") if g.strip()]
        rows.append([vocab.setdefault(g, len(vocab) + 1) for g in names])
    width = max([len(r) for r in rows] + [1])
    out = np.zeros((n_items + 1, width), np.int64)
    for idx, row in zip(item_idx, rows, strict=True):
        out[int(idx), : len(row)] = row
    return out, len(vocab)


def _net(n_items: int, n_genres: int, cfg: MetaBaselineConfig):
    import torch
    from torch import nn

    d = cfg.d

    class CBMLNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.items = nn.Embedding(n_items + 1, d, padding_idx=0)
            self.genres = nn.Embedding(n_genres + 1, d, padding_idx=0)
            nn.init.normal_(self.items.weight, std=0.02)
            nn.init.normal_(self.genres.weight, std=0.1)
            self.drop = nn.Dropout(cfg.dropout)
            self.gru = nn.GRU(d, d, batch_first=True)
            self.task_mlp = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
            self.centres = nn.Parameter(torch.randn(cfg.cbml_clusters, d) * 0.1)
            self.gate = nn.Linear(d, 2 * d)  # gates of the head's output dimensions (W columns) and bias
            self.head_w = nn.Parameter(torch.eye(d))
            self.head_b = nn.Parameter(torch.zeros(d))

        def encode(self, seqs: torch.Tensor) -> torch.Tensor:
            hidden, _ = self.gru(self.drop(self.items(seqs)))
            return self.drop(hidden)

        def task_embedding(self, support: torch.Tensor, genre_table: torch.Tensor) -> torch.Tensor:
            g = genre_table[support]  # (B, S, G)
            emb = self.genres(g)
            per_item = emb.sum(2) / (g > 0).sum(2, keepdim=True).clamp(min=1)
            valid = (support > 0).float().unsqueeze(-1)
            task = self.task_mlp((per_item * valid).sum(1) / valid.sum(1).clamp(min=1.0))
            dist = ((task[:, None] - self.centres[None]) ** 2).sum(-1)
            assign = torch.softmax(-dist, dim=-1)
            return task + assign @ self.centres

        def initial_head(self, z: torch.Tensor):
            gates = torch.sigmoid(self.gate(z))
            w = self.head_w[None] * gates[:, None, :d]  # (B, d, d)
            b = self.head_b[None] * gates[:, d:] + 0.0
            return w, b

    return CBMLNet()


def _ce(net, hidden, targets, w, b):
    """Per-task mean CE; hidden (B, P, d), targets (B, P) (0 = none), head w (B, d, d), b (B, d)."""
    import torch.nn.functional as F

    query = hidden @ w + b[:, None]
    logits = query @ net.items.weight[1:].T
    keep = (targets > 0).float()
    losses = F.cross_entropy(logits.transpose(1, 2), (targets - 1).clamp(min=0), reduction="none")
    return (losses * keep).sum(1) / keep.sum(1).clamp(min=1.0)


def adapt_heads(net, support, genre_table, cfg: MetaBaselineConfig, create_graph: bool):
    """(w, b) per task after the local steps on the support (next item of each support prefix)."""
    import torch

    with torch.enable_grad():
        z = net.task_embedding(support, genre_table)
        w, b = net.initial_head(z)
        hidden = net.encode(support[:, :-1])
        if not create_graph:
            hidden = hidden.detach()
            w, b = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
        for _ in range(cfg.cbml_inner_steps):
            loss = _ce(net, hidden, support[:, 1:], w, b).sum()
            gw, gb = torch.autograd.grad(loss, (w, b), create_graph=create_graph)
            w, b = w - cfg.cbml_inner_lr * gw, b - cfg.cbml_inner_lr * gb
    return w, b


class CBML(Method):
    name = "cbml"

    def __init__(self, cfg: MetaBaselineConfig, chosen: dict[str, Any] | None = None, genres=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.lrs = (chosen["meta_lr"],) if chosen and "meta_lr" in chosen else cfg.lrs
        self.genres = genres  # (N+1, G) genre ids per item, or None: read from the split folder

    def fit(self, data: TrainData, validator: Validator) -> None:
        import torch

        torch.set_num_threads(self.cfg.threads)
        if self.genres is None:
            self.genres, n_genres = item_genres(data.data_dir, data.n_items)
        else:
            n_genres = int(np.max(self.genres))
        self.info["n_genres"] = n_genres
        self.genre_table = torch.as_tensor(self.genres)
        self.n_genres = n_genres
        self.net = select_lr(lambda lr: self._train(data, validator, lr), self.lrs, self.info)
        self.net.eval()

    def _train(self, data: TrainData, validator: Validator, lr: float):
        import torch

        torch.manual_seed(data.seed)
        rng = np.random.default_rng(data.seed)
        net = _net(data.n_items, self.n_genres, self.cfg)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)

        def step(_: int) -> float:
            net.train()
            tasks = torch.as_tensor(sample_tasks(data.old_seqs, self.cfg.batch_tasks, rng))
            support = tasks[:, :SUPPORT]
            w, b = adapt_heads(net, support, self.genre_table, self.cfg, create_graph=True)
            hidden = net.encode(tasks[:, :-1])[:, SUPPORT - 1 :]  # states after items 8 and 9
            loss = _ce(net, hidden, tasks[:, SUPPORT:], w, b).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        def validate() -> float:
            net.eval()
            support = data.new_support
            return validate_in_chunks(
                lambda users: self._scores(net, support[users], support[users]), len(support), validator
            )

        n_tasks = sum(len(s) >= SUPPORT + 2 for s in data.old_seqs)
        total, every = budget(n_tasks, self.cfg)
        value, extra = train_with_early_stopping(
            net,
            step,
            validate,
            total,
            every,
            self.cfg.patience,
            self.log,
            es_after=self.cfg.es_after,
            label=f"cbml lr={lr:g}",
        )
        return net, value, extra

    def _heads(self, net, support: np.ndarray):
        w, b = adapt_heads(net, self._t(support), self.genre_table, self.cfg, create_graph=False)
        return w.detach(), b.detach()

    @staticmethod
    def _t(x: np.ndarray):
        import torch

        return torch.as_tensor(np.asarray(x, np.int64))

    def _scores(self, net, support: np.ndarray, history: np.ndarray, heads=None) -> np.ndarray:
        import torch

        w, b = heads if heads is not None else self._heads(net, support)
        with torch.no_grad():
            seqs = self._t(history)
            last = (seqs > 0).sum(1).clamp(min=1) - 1
            hidden = net.encode(seqs)[torch.arange(len(seqs)), last]
            query = (hidden[:, None] @ w)[:, 0] + b
            return (query @ net.items.weight.T).numpy()

    def adapt(self, users: np.ndarray, support: np.ndarray, validator: Validator) -> Any:
        return self._heads(self.net, support)

    def score(self, users: np.ndarray, history: np.ndarray, state: Any) -> np.ndarray:
        return self._scores(self.net, history, history, heads=state)
