"""SML (Zhang et al., SIGIR 2020, "How to Retrain Recommender System? A Sequential Meta-Learning
Method"), applied to new users as the MML paper does: train a recommender on the old users, then
retrain it on the new users' data the SML way.

SML retrains period by period. At period t the previous model W_{t-1} is fine-tuned on the new
period's data only, giving W_hat_t; a transfer network f_Theta combines the two into
W_t = f_Theta(W_{t-1}, W_hat_t). Two alternating objectives: W_hat_t minimises the loss of
f_Theta(W_{t-1}, W_hat_t) on period t's data (Theta fixed), and Theta minimises the loss of
f_Theta(W_{t-1}, W_hat_t) on the NEXT period's data (W_hat_t fixed), i.e. the transfer learns to
retrain for the future. The transfer (reference code, `ConvTransfer_com`) treats every parameter
row w (d values) as a 3 x d image [w_prev ; w_hat ; w_prev * w_hat / ||w_prev||], applies a 3 x 1
convolution (10 channels), a 1 x 1 convolution (5 channels), GELUs, and a 512-wide MLP back to d
values; one transfer for item rows, one for the rest (the reference's item and user transfers).

Our periods: the old users ordered by their first interaction (from the split's
old_interactions.parquet; index order when absent); the earliest `sml_base_share` of them train the
base model W_0 (the SASRec baseline's architecture and selected hyperparameters, early stopping on
the validation item), the rest are cut into `sml_periods` periods of joining users (each user's last
50+1 items, as SASRec trains), and the new users' support sequences are the last period. The chain
W_1..W_K runs over the old periods (Theta trained on each next period; for the last old period, the
next period is the new users' supports); at test time W_hat is fine-tuned on the new users' supports
from W_K and the transfer (Theta fixed) gives the model that scores them. `sml_passes` passes over
the chain train Theta further (reference: 10); the pass whose final model is best on the validation
item is kept.

Deviations, named: the base recommender is SASRec with full-softmax CE (the reference uses matrix
factorisation with BCE); the transfer is applied to every parameter tensor viewed as rows of d values
(tensors whose size is not a multiple of d are taken from W_hat); the transfer's output is added to
W_hat with its last layer zero-initialised (so an untrained transfer is plain fine-tuning, instead of
a random model); a fixed number of Adam steps per period (`sml_steps`) instead of one epoch.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluation.baselines.meta_common import MetaBaselineConfig
from training.evaluation.baselines.sequential import (
    SequentialConfig,
    build_net,
    epoch_order,
    fit_sequential,
    sequence_scores,
    training_windows,
)
from training.evaluation.protocol import Method, TrainData, Validator


def join_order(data: TrainData) -> np.ndarray:
    """Old-user indices ordered by first interaction time (index order without timestamps)."""
    path = Path(data.data_dir) / "old_interactions.parquet" if data.data_dir else None
    if path is not None and path.is_file():
        import pandas as pd

        old = pd.read_parquet(path, columns=["user_id", "timestamp"])
        users = old["user_id"].to_numpy(dtype=str)
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([], int)
        if len(starts) == len(data.old_seqs):
            first = old["timestamp"].to_numpy()[starts]
            return np.argsort(first, kind="stable")
    return np.arange(len(data.old_seqs))


def _transfer(d: int):
    import torch
    from torch import nn

    class Transfer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 10, (3, 1))
            self.conv2 = nn.Conv2d(10, 5, (1, 1))
            self.fc1 = nn.Linear(5 * d, 512)
            self.fc2 = nn.Linear(512, d)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

        def forward(self, prev: torch.Tensor, hat: torch.Tensor) -> torch.Tensor:
            gelu = torch.nn.functional.gelu
            com = prev * hat.detach() / prev.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            x = torch.stack([prev, hat, com], dim=1)[:, None]  # (R, 1, 3, d)
            x = gelu(self.conv2(gelu(self.conv1(x))))  # (R, 5, 1, d)
            return hat + self.fc2(gelu(self.fc1(x.reshape(len(x), -1))))

    return Transfer()


class SML(Method):
    name = "sml"

    def __init__(
        self, cfg: MetaBaselineConfig, sasrec_cfg: SequentialConfig, chosen: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.cfg, self.sasrec_cfg = cfg, sasrec_cfg

    # ---- the transfer over a whole parameter set --------------------------------------------------

    def combine(self, prev: dict, hat: dict) -> dict:
        out = {}
        for name, w_hat in hat.items():
            w_prev = prev[name]
            if w_hat.numel() % self.d:
                out[name] = w_hat
                continue
            transfer = self.item_transfer if name == "items.weight" else self.other_transfer
            rows = transfer(w_prev.reshape(-1, self.d), w_hat.reshape(-1, self.d))
            out[name] = rows.reshape(w_hat.shape)
        return out

    def loss(self, params: dict, batch) -> Any:
        import torch.nn.functional as F
        from torch.func import functional_call

        hidden = functional_call(self.net, params, (batch[:, :-1],))
        targets = batch[:, 1:]
        keep = targets > 0
        logits = hidden[keep] @ params["items.weight"][1:].T
        return F.cross_entropy(logits, targets[keep] - 1)

    def fit(self, data: TrainData, validator: Validator) -> None:
        import torch

        torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(data.seed)
        self.rng = np.random.default_rng(data.seed)
        order = join_order(data)
        n_base = max(1, int(round(self.cfg.sml_base_share * len(order))))
        base = [data.old_seqs[i] for i in order[:n_base]]
        periods = [
            [data.old_seqs[i] for i in part] for part in np.array_split(order[n_base:], self.cfg.sml_periods)
        ]
        periods = [p for p in periods if any(len(s) > 1 for s in p)]
        support = [row for row in data.new_support]
        self.log(
            f"sml: base {len(base)} old users, periods {[len(p) for p in periods]}, then {len(support)} new users"
        )

        base_info: dict[str, Any] = {}
        self.net, hp = fit_sequential("sasrec", base, data, self.sasrec_cfg, validator, base_info, self.log)
        self.info.update({key: hp[key] for key in ("loss", "lr", "dropout", "d")})
        self.info["base_validation"] = base_info["validation_best"]
        self.info["base_train_seconds"] = base_info.get("train_seconds")
        # the same random stream whether the base model was trained here or loaded from a kept run
        torch.manual_seed(data.seed + 1)
        start = time.perf_counter()
        self.net.train()
        self.d = hp["d"]
        self.item_transfer, self.other_transfer = _transfer(self.d), _transfer(self.d)
        theta = [*self.item_transfer.parameters(), *self.other_transfer.parameters()]
        self.theta_opt = torch.optim.Adam(theta, lr=self.cfg.sml_lr, weight_decay=self.cfg.sml_l2)
        w0 = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        datasets = [self._windows(p) for p in periods] + [self._windows(support)]

        best = None
        curve = []
        for pass_ in range(self.cfg.sml_passes):
            prev = w0
            for k in range(len(periods)):
                hat = self._train_hat(prev, datasets[k])
                self._train_theta(prev, hat, datasets[k + 1])
                with torch.no_grad():
                    prev = {n: v.detach() for n, v in self.combine(prev, hat).items()}
            final = self._final(prev, datasets[-1])
            value = validator.mean(sequence_scores(self._net_with(final), data.new_support))
            curve.append(round(value, 5))
            self.log(f"sml pass {pass_ + 1}: validation mrr@10 {value:.4f}")
            if best is None or value > best[0]:
                best = (value, final, pass_ + 1, copy.deepcopy(self.item_transfer.state_dict()),
                        copy.deepcopy(self.other_transfer.state_dict()))  # fmt: skip
        assert best is not None
        value, final, self.info["passes"], *_ = best
        self.info["validation_best"], self.info["validation_curve"] = value, curve
        self.info["chain_seconds"] = round(time.perf_counter() - start, 1)
        self.final_net = self._net_with(final)
        self.final_net.eval()

    def _windows(self, sequences: list[np.ndarray]):
        windows, owners = training_windows(sequences, self.sasrec_cfg.max_len, "last")
        return windows, owners

    def _batches(self, dataset, steps: int):
        import torch

        windows, owners = dataset
        order, cursor = epoch_order(owners, "last", self.rng), 0
        size = self.sasrec_cfg.batch_windows
        for _ in range(steps):
            if cursor >= len(order):
                order, cursor = epoch_order(owners, "last", self.rng), 0
            yield torch.as_tensor(windows[order[cursor : cursor + size]])
            cursor += size

    def _train_hat(self, prev: dict, dataset, lr: float | None = None) -> dict:
        """W_hat from W_prev on one period, through the transfer (Theta fixed)."""
        import torch

        hat = {k: v.clone().requires_grad_(True) for k, v in prev.items()}
        opt = torch.optim.Adam(list(hat.values()), lr=lr or self.cfg.sml_lr)
        for batch in self._batches(dataset, self.cfg.sml_steps):
            loss = self.loss(self.combine(prev, hat), batch)
            opt.zero_grad()
            self.theta_opt.zero_grad()
            loss.backward()
            opt.step()
        return {k: v.detach() for k, v in hat.items()}

    def _train_theta(self, prev: dict, hat: dict, next_dataset) -> None:
        """Theta on the next period's data (W_prev, W_hat fixed)."""
        for batch in self._batches(next_dataset, self.cfg.sml_steps):
            loss = self.loss(self.combine(prev, hat), batch)
            self.theta_opt.zero_grad()
            loss.backward()
            self.theta_opt.step()

    def _final(self, prev: dict, support_dataset) -> dict:
        import torch

        hat = self._train_hat(prev, support_dataset)
        with torch.no_grad():
            return {n: v.detach().clone() for n, v in self.combine(prev, hat).items()}

    def _net_with(self, params: dict):
        net = build_net("sasrec", self.net.items.num_embeddings - 1, self.d, 0.0, self.sasrec_cfg)
        net.load_state_dict(params, strict=False)
        net.eval()
        return net

    def score(self, users: np.ndarray, history: np.ndarray, state: Any) -> np.ndarray:
        return sequence_scores(self.final_net, history)
