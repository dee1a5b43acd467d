"""MetaTL (Wang, Ding & Caverlee, SIGIR 2021): meta transitional learning for cold-start users.

Each user is a few-shot task made of item-to-item transitions. A translation-based model scores a
transition (h -> t) under a user-specific relation r as -||e_h + r - e_t|| (TransRec-style). The
"meta transitional learner" produces r from the support transitions: an MLP over [e_h ; e_t] of
every support pair, averaged over the pairs. One inner gradient step adapts r on the support loss
(r' = r - beta * grad_r, first-order, as in the reference code), and the query transitions are scored
with r'. The loss is the margin ranking loss between a true transition and one with a uniformly
sampled negative tail. The outer step (Adam) trains the item embeddings and the MLP.

Under our protocol: a training task is a window of 10 items of an old user (half of them consecutive,
half an ordered random subset of the user's items, as the reference sampler does): the 7 transitions
inside the first 8 items are the support, the transitions into the 9th and 10th items the query. A
new user's support gives r' from their 7 transitions; the next item after a history is ranked over
the whole catalogue by -||e_last + r' - e_j|| (e_last = the last history item).

Deviations from the reference code, named: embedding size 64 (the paper's setting for every
method here) instead of 100; no BatchNorm in the MLP (the reference normalises over the K support
positions, which ties the model to a fixed K); the inner step uses the per-task mean support loss,
so training and test take the same step (the reference averages over the batch in training and
over one task at test, a ~1000x difference), with beta = `metatl_inner_lr` = 0.01 (about twice the
reference's effective training step, 5 / 1024 batch); full-catalogue ranking
instead of 100 sampled negatives; training length by step budget and early stopping on the
validation item (the reference runs a fixed number of batches); and the loss is chosen on the
validation item between the reference's margin loss (`margin`) and full-softmax cross-entropy with
logits -||e_h + r - e_j|| over every item (`ce`, the loss every other trained baseline here uses):
with one uniform negative per transition, the margin loss learns mostly popularity under
full-catalogue ranking.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.evaluation.baselines.meta_common import (
    SUPPORT,
    MetaBaselineConfig,
    budget,
    select_lr,
    train_with_early_stopping,
    validate_in_chunks,
)
from training.evaluation.protocol import Method, TrainData, Validator


def _net(n_items: int, cfg: MetaBaselineConfig):
    import torch
    from torch import nn

    class MetaTLNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.items = nn.Embedding(n_items + 1, cfg.d, padding_idx=0)
            nn.init.xavier_uniform_(self.items.weight)
            h1, h2 = cfg.metatl_hidden
            self.relation = nn.Sequential(
                nn.Linear(2 * cfg.d, h1), nn.LeakyReLU(), nn.Dropout(cfg.dropout),
                nn.Linear(h1, h2), nn.LeakyReLU(), nn.Dropout(cfg.dropout),
                nn.Linear(h2, cfg.d),
            )  # fmt: skip

        def relation_of(self, support: torch.Tensor) -> torch.Tensor:
            """(B, S) support items -> (B, d) r: MLP over each consecutive pair, averaged."""
            e = self.items(support)
            pairs = torch.cat([e[:, :-1], e[:, 1:]], dim=-1)
            valid = ((support[:, :-1] > 0) & (support[:, 1:] > 0)).float().unsqueeze(-1)
            return (self.relation(pairs) * valid).sum(1) / valid.sum(1).clamp(min=1.0)

    return MetaTLNet()


def _distance(h: Any, r: Any, t: Any) -> Any:
    return (h + r - t).norm(dim=-1)


def margin_loss(net, heads, tails, negatives, r, margin: float):
    """Per-task mean margin ranking loss; heads/tails/negatives (B, P) item ids, r (B, d)."""
    import torch.nn.functional as F

    h, t, n = net.items(heads), net.items(tails), net.items(negatives)
    pos = -_distance(h, r[:, None], t)
    neg = -_distance(h, r[:, None], n)
    return F.relu(margin - (pos - neg)).mean(1)  # (B,)


def softmax_loss(net, heads, tails, r):
    """Per-task mean full-softmax cross-entropy with logits -||e_h + r - e_j|| over every item j."""
    import torch.nn.functional as F

    anchor = net.items(heads) + r[:, None]  # (B, P, d)
    table = net.items.weight[1:]
    dist2 = (anchor**2).sum(-1, keepdim=True) - 2 * anchor @ table.T + (table**2).sum(-1)
    logits = -dist2.clamp(min=1e-8).sqrt()
    losses = F.cross_entropy(logits.transpose(1, 2), tails - 1, reduction="none")
    return losses.mean(1)


def transition_loss(net, heads, tails, negatives, r, cfg: MetaBaselineConfig, loss: str):
    if loss == "ce":
        return softmax_loss(net, heads, tails, r)
    return margin_loss(net, heads, tails, negatives, r, cfg.metatl_margin)


def adapted_relation(
    net, support, negatives, cfg: MetaBaselineConfig, create_graph: bool = False, loss_name: str = "margin"
):
    """r' = r - beta * d(support loss)/dr for each task (first-order like the reference)."""
    import torch

    with torch.enable_grad():
        r = net.relation_of(support)
        loss = transition_loss(net, support[:, :-1], support[:, 1:], negatives, r, cfg, loss_name).sum()
        (grad,) = torch.autograd.grad(loss, r, create_graph=create_graph)
    return r - cfg.metatl_inner_lr * (grad if create_graph else grad.detach())


def sample_metatl_tasks(old_seqs: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Windows of SUPPORT + 2 items: consecutive, or (half of them) an ordered random subset."""
    length = SUPPORT + 2
    eligible = [s for s in old_seqs if len(s) >= length]
    out = np.empty((size, length), np.int64)
    for row, user in enumerate(rng.integers(0, len(eligible), size=size)):
        seq = eligible[user]
        if rng.random() < 0.5:
            start = int(rng.integers(0, len(seq) - length + 1))
            out[row] = seq[start : start + length]
        else:
            out[row] = seq[np.sort(rng.choice(len(seq), size=length, replace=False))]
    return out


class MetaTL(Method):
    name = "metatl"

    def __init__(self, cfg: MetaBaselineConfig, chosen: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.lrs = (chosen["meta_lr"],) if chosen and "meta_lr" in chosen else cfg.lrs
        self.losses = (chosen["meta_loss"],) if chosen and "meta_loss" in chosen else cfg.metatl_losses

    def fit(self, data: TrainData, validator: Validator) -> None:
        import torch

        torch.set_num_threads(self.cfg.threads)
        self.n_items, self.seed = data.n_items, data.seed
        best = None
        for loss in self.losses:
            self.loss = loss
            model = select_lr(lambda lr: self._train(data, validator, lr), self.lrs, found := {})
            for key, value in found["validation"].items():
                self.info.setdefault("validation", {})[f"loss={loss}/{key}"] = value
            if best is None or found["validation_best"] > best[0]:
                best = (found["validation_best"], loss, found, model)
        assert best is not None
        _, self.loss, found, self.net = best
        self.info.update({k: found[k] for k in ("validation_best", "meta_lr", "best_step")})
        self.info["meta_loss"] = self.loss
        self.net.eval()

    def _train(self, data: TrainData, validator: Validator, lr: float):
        import torch

        torch.manual_seed(data.seed)
        rng = np.random.default_rng(data.seed)
        net = _net(data.n_items, self.cfg)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        high = max(data.n_old_items, 1) + 1

        def step(_: int) -> float:
            net.train()
            tasks = torch.as_tensor(sample_metatl_tasks(data.old_seqs, self.cfg.batch_tasks, rng))
            support, query = tasks[:, :SUPPORT], tasks[:, SUPPORT - 1 :]
            negatives = torch.as_tensor(rng.integers(1, high, size=(len(tasks), SUPPORT - 1)))
            r = adapted_relation(net, support, negatives, self.cfg, loss_name=self.loss)
            q_neg = torch.as_tensor(rng.integers(1, high, size=(len(tasks), query.shape[1] - 1)))
            loss = transition_loss(net, query[:, :-1], query[:, 1:], q_neg, r, self.cfg, self.loss).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        def validate() -> float:
            net.eval()
            support = data.new_support
            return validate_in_chunks(
                lambda users: self._scores(net, support[users], support[users], data.seed),
                len(support),
                validator,
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
            label=f"metatl lr={lr:g}",
        )
        return net, value, extra

    def _relations(self, net, support: np.ndarray, seed: int):
        import torch

        rng = np.random.default_rng(seed + 7)  # fixed support negatives: scores are deterministic
        negatives = torch.as_tensor(
            rng.integers(1, self.n_items + 1, size=(len(support), support.shape[1] - 1))
        )
        return adapted_relation(
            net, torch.as_tensor(np.asarray(support, np.int64)), negatives, self.cfg, loss_name=self.loss
        ).detach()

    def _scores(self, net, support: np.ndarray, history: np.ndarray, seed: int, r=None) -> np.ndarray:
        import torch

        with torch.no_grad():
            if r is None:
                r = self._relations(net, support, seed)
            last = torch.as_tensor(np.asarray(history, np.int64)[:, -1])
            anchor = net.items(last) + r  # (U, d)
            table = net.items.weight
            dist2 = (anchor**2).sum(1, keepdim=True) - 2 * anchor @ table.T + (table**2).sum(1)[None]
            return (-dist2.clamp(min=0.0).sqrt()).numpy()

    def adapt(self, users: np.ndarray, support: np.ndarray, validator: Validator) -> Any:
        return self._relations(self.net, support, self.seed)

    def score(self, users: np.ndarray, history: np.ndarray, state: Any) -> np.ndarray:
        return self._scores(self.net, history, history, self.seed, r=state)
