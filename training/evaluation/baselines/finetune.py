"""SASRec + fine-tune: the SASRec baseline, then per-user fine-tuning on each new user's support.

The pre-trained network is SASRec exactly as the `sasrec` row trains it (same selection, same
early stopping; when that run was kept in the work folder it is loaded, not retrained). Each new user
then gets their own copy of one parameter group, fine-tuned with Adam on next-item cross-entropy at
every position of their 8 support items (inputs s1..s7, targets s2..s8; dropout off), and scores
their history with it. The learning rate, the number of steps and the parameter group are chosen on
the validation item (per-user MRR@10 of the 9th item, predicted from the fine-tuned model and the
support items), over every new user, from the grids of `FinetuneConfig`. The steps grid includes 0:
the pre-trained SASRec itself, so the selected row can only fall below SASRec by the difference
between validation and query items.

Parameter groups: `all` (every weight), `items` (the item embedding table, which is also the output
layer), `encoder` (everything but the item table: positions, attention, feed-forward, norms).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from training.evaluation.baselines.sequential import (
    SequentialConfig,
    fit_sequential,
    sequence_scores,
)
from training.evaluation.protocol import Method, TrainData, Validator

Group = Literal["all", "items", "encoder"]


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    lrs: tuple[float, ...] = Field((1e-4, 1e-3, 1e-2), description="Adam learning-rate grid")
    steps: tuple[int, ...] = Field(
        (0, 1, 2, 5, 10), description="fine-tuning steps grid (0 = no fine-tuning)"
    )
    groups: tuple[Group, ...] = Field(("all", "items", "encoder"), description="parameter-group grid")
    threads: int = Field(2, ge=1, description="torch CPU threads (speed only)")


def group_names(net, group: Group) -> list[str]:
    names = [name for name, _ in net.named_parameters()]
    if group == "all":
        return names
    if group == "items":
        return [n for n in names if n.startswith("items.")]
    return [n for n in names if not n.startswith("items.")]


def finetune_user(
    net,
    support: np.ndarray,
    group: Group,
    lr: float,
    steps: int,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a copy of `group` on one user's support sequence for `steps` Adam steps; returns the
    tuned tensors (name -> tensor). `on_step(step, params)` is called after every step."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    base = dict(net.named_parameters())
    tuned = {name: base[name].detach().clone().requires_grad_(True) for name in group_names(net, group)}
    if steps == 0:
        return {name: t.detach() for name, t in tuned.items()}
    seq = torch.as_tensor(np.asarray(support, dtype=np.int64)[None])
    inputs, targets = seq[:, :-1], seq[:, 1:]
    keep = targets[0] > 0
    optimizer = torch.optim.Adam(list(tuned.values()), lr=lr)
    for step in range(1, steps + 1):
        params = {**{k: v.detach() for k, v in base.items()}, **tuned}
        hidden = functional_call(net, params, (inputs,))[0][keep]
        logits = hidden @ params["items.weight"][1:].T
        loss = F.cross_entropy(logits, targets[0][keep] - 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, tuned)
    return {name: t.detach() for name, t in tuned.items()}


def scores_with(net, params: dict[str, Any], history: np.ndarray) -> np.ndarray:
    """(N+1,) scores of the next item after one history with some parameters replaced."""
    import torch
    from torch.func import functional_call

    with torch.no_grad():
        full = {
            **{k: v.detach() for k, v in net.named_parameters()},
            **{k: v.detach() for k, v in params.items()},
        }
        seq = torch.as_tensor(np.asarray(history, dtype=np.int64)[None])
        last = int((seq > 0).sum()) - 1
        hidden = functional_call(net, full, (seq,))[0, last]
        return (hidden @ full["items.weight"].T).numpy()


class SASRecFinetune(Method):
    name = "sasrec_ft"

    def __init__(
        self,
        cfg: SequentialConfig,
        ft: FinetuneConfig,
        chosen: dict[str, Any] | None = None,
        chunk: int = 128,
    ) -> None:
        super().__init__()
        self.cfg, self.ft, self.chunk = cfg, ft, chunk
        self.chosen = {k: v for k, v in (chosen or {}).items() if k.startswith("ft_")}

    def fit(self, data: TrainData, validator: Validator) -> None:
        import torch

        torch.set_num_threads(self.ft.threads)
        self.net, _ = fit_sequential(
            "sasrec", list(data.old_seqs), data, self.cfg, validator, self.info, self.log
        )
        self.net.eval()
        if self.chosen:
            self.choice = (self.chosen["ft_group"], self.chosen["ft_lr"], self.chosen["ft_steps"])
        else:
            self.choice = self.select(data.new_support, validator)
        self.info["ft_group"], self.info["ft_lr"], self.info["ft_steps"] = self.choice

    def select(self, support: np.ndarray, validator: Validator) -> tuple[str, float, int]:
        """Every (group, lr) fine-tuned for max(steps) steps on every user's support; validation MRR@10
        after each step count of the grid (the support predicts the 9th item)."""
        n_users = len(support)
        base_value = validator.mean(sequence_scores(self.net, support))
        table: dict[str, float] = {"steps=0": base_value}
        best = (base_value, ("all", self.ft.lrs[0], 0))
        max_steps = max(self.ft.steps)
        wanted = sorted(s for s in self.ft.steps if s > 0)
        if not wanted:
            return best[1]
        for group in self.ft.groups:
            for lr in self.ft.lrs:
                sums = {s: 0.0 for s in wanted}
                for begin in range(0, n_users, self.chunk):
                    users = np.arange(begin, min(begin + self.chunk, n_users))
                    rows = {s: [] for s in wanted}
                    for user in users:

                        def record(step: int, params: dict, user: int = user, rows: dict = rows) -> None:
                            if step in rows:
                                rows[step].append(scores_with(self.net, params, support[user]))

                        finetune_user(self.net, support[user], group, lr, max_steps, record)
                    for s in wanted:
                        sums[s] += float(validator.per_user(np.stack(rows[s]), users).sum())
                for s in wanted:
                    value = sums[s] / n_users
                    table[f"{group}/lr={lr:g}/steps={s}"] = round(value, 5)
                    self.log(f"sasrec_ft {group} lr={lr:g} steps={s}: validation {value:.4f}")
                    if value > best[0]:
                        best = (value, (group, lr, s))
        self.info["ft_validation"] = table
        self.info["ft_validation_best"] = best[0]
        return best[1]

    def adapt(self, users: np.ndarray, support: np.ndarray, validator: Validator) -> Any:
        group, lr, steps = self.choice
        if steps == 0:
            return None
        return [finetune_user(self.net, row, group, lr, steps) for row in support]

    def score(self, users: np.ndarray, history: np.ndarray, state: Any) -> np.ndarray:
        if state is None:
            return sequence_scores(self.net, history)
        return np.stack(
            [scores_with(self.net, params, row) for params, row in zip(state, history, strict=True)]
        )
