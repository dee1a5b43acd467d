"""Stage 1a: next-item pre-training of every learner (a deviation from the paper, docs/model.md).

Each learner (ID, text, image) first learns next-item prediction the way SASRec does: one causal
pass over a window of an old user's D_old history, full-softmax cross-entropy at EVERY position
(over the old items), Adam. Stage 1b (training.maml) then meta-trains from this starting point.

Why: with the paper's recipe (MAML from scratch, BPR, one query target per user and epoch) the
learners barely leave chance at any budget we can afford (docs/results.md); the same architecture
trained this way is a strong sequential recommender.

Length: a budget of optimisation steps, not epochs (a dataset ten times smaller gets the same number
of updates), with early stopping on the validation item: every `eval_every` steps each learner's
MRR@10 (training.validation) is measured, its best parameters are kept, and a learner whose metric
has not improved for `patience` evaluations stops training. Each learner ends at its best state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from model.losses import sequence_loss
from model.mml import LEARNERS, MML
from training.config import PretrainConfig
from training.maml import learner_parameters
from training.validation import BestPerLearner, Validation


def sample_batch(
    old_seqs: list[np.ndarray], size: int, width: int, mode: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (size, width - 1): windows of up to `width` items of random old users;
    `recent` = the user's last items, `sampled` = a window ending at a uniform position."""
    users = rng.integers(0, len(old_seqs), size=size)
    seq = np.zeros((size, width - 1), dtype=np.int64)
    target = np.zeros((size, width - 1), dtype=np.int64)
    for row, user in enumerate(users):
        history = old_seqs[user]
        n = min(len(history), width)
        end = len(history) if mode == "recent" else int(rng.integers(n, len(history) + 1))
        window = history[end - n : end]
        seq[row, : n - 1] = window[:-1]
        target[row, : n - 1] = window[1:]
    return seq, target


def cooc_svd_embeddings(
    old_seqs: list[np.ndarray], n_items: int, d: int, window: int, std: float
) -> np.ndarray:
    """(N+1, d) item vectors: U sqrt(S) of the rank-d truncated SVD of D_old's positive-PMI matrix of
    co-occurrence within `window` positions, scaled to entry std `std` (items never seen: zeros)."""
    from scipy import sparse
    from scipy.sparse.linalg import svds

    from mml.cooc import counts

    c = counts(old_seqs, n_items, window).astype(np.float64).tocoo()
    total, row = c.data.sum(), np.asarray(c.tocsr().sum(axis=1)).ravel()
    pmi = np.log(c.data * total / (row[c.row] * row[c.col]))
    keep = pmi > 0
    ppmi = sparse.csr_matrix((pmi[keep], (c.row[keep], c.col[keep])), shape=c.shape)
    k = min(d, min(ppmi.shape) - 1)
    u, s, _ = svds(ppmi, k=k, random_state=0)
    out = np.zeros((n_items + 1, d))
    out[:, :k] = u * np.sqrt(s)
    out[row == 0] = 0.0  # pad and items without co-occurrence: exactly zero, not SVD round-off
    spread = out[1:].std()
    return (out * (std / spread if spread > 0 else 0.0)).astype(np.float32)


def init_id_embeddings(model: MML, old_seqs: list[np.ndarray], cfg: PretrainConfig) -> None:
    """The ID table's start (PretrainConfig.id_init); row 0 (pad) stays zero."""
    if cfg.id_init == "random":
        return
    table = cooc_svd_embeddings(old_seqs, model.n_items, model.cfg.d, cfg.id_init_window, cfg.id_init_std)
    with torch.no_grad():
        model.item_emb.weight.copy_(torch.as_tensor(table, device=model.device))
        model.item_emb.weight[0].zero_()


def next_item_loss(model: MML, name: str, seq: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE of learner `name` at every position with a target, over the old items."""
    x, valid, sims = model.learner_inputs(name, seq)
    hidden = model.learner(name)(x, valid, sims)
    table = model.item_rows(name, torch.arange(model.n_old_items + 1, device=seq.device))
    return sequence_loss("ce", hidden, table, target, target, target > 0)


def pretrain(
    model: MML,
    old_seqs: list[np.ndarray],
    cfg: PretrainConfig,
    window: int,
    validation: Validation,
    rng: np.random.Generator,
    report: Callable[[int, str], None] | None = None,
) -> dict:
    """Pre-train the three learners (each its own Adam) for at most cfg.steps steps; the model ends
    at each learner's best state on the validation item. Returns the selection record."""
    usable = [s for s in old_seqs if len(s) >= 2]
    init_id_embeddings(model, old_seqs, cfg)
    optimisers = {name: torch.optim.Adam(learner_parameters(model, name), lr=cfg.lr) for name in LEARNERS}
    selection = BestPerLearner(model, validation, learner_parameters)
    active = set(LEARNERS)
    losses = dict.fromkeys(LEARNERS, float("nan"))
    model.train()
    step = 0
    while step < cfg.steps and active:
        seq, target = sample_batch(usable, cfg.batch, window, cfg.window, rng)
        seq_t = torch.as_tensor(seq, device=model.device)
        target_t = torch.as_tensor(target, device=model.device)
        for name in sorted(active):
            optimisers[name].zero_grad(set_to_none=True)
            loss = next_item_loss(model, name, seq_t, target_t)
            loss.backward()
            optimisers[name].step()
            losses[name] = float(loss.detach())
        step += 1
        if step % cfg.eval_every == 0 or step == cfg.steps:
            selection.measure(step)
            model.train()
            active -= {name for name in active if selection.since_best[name] >= cfg.patience}
        if report:
            info = " ".join(f"{n}={losses[n]:.3f}" for n in LEARNERS)
            report(step, f"step {step}/{cfg.steps} ce {info} active={','.join(sorted(active))}")
    record = selection.restore()
    model.eval()
    return {"steps": step, "train_loss": losses, **record}
