"""Stage 2: train the cold-start item embedding generator (paper Sec. 4.4.2, stage 2).

All learners are frozen (and run without dropout). Every step, each old item is "forgotten" with
probability p0 (forget_rate): its ID embedding is replaced, for this step and for every sequence of
the batch, by the generated one (from its K old neighbours, itself excluded). The replacement holds
on the input side and on the candidate side, for positives and sampled negatives alike, so a
generated embedding competes with trained ones in both directions. Loss: the stage-1 loss (BPR, the
paper; CE in the recipe that learns) of the main (ID) learner at every position of the windows (tasks as in stage 1, the whole window is training data).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from model.losses import sequence_loss
from model.mml import MML
from model.tasks import TaskBatch
from training.config import TrainConfig
from training.maml import stage1_tasks


def forget_mask(model: MML, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(N+1,) bool: each old item with probability `rate` (pad and new items never). Drawn on the CPU
    (the same masks on every device), then moved to the model's device."""
    mask = torch.zeros(model.n_items + 1, dtype=torch.bool)
    mask[1 : model.n_old_items + 1] = torch.rand(model.n_old_items, generator=generator) < rate
    return mask.to(model.device)


def generator_loss(
    model: MML, batch: dict[str, torch.Tensor], forget: torch.Tensor, kind: str = "bpr"
) -> torch.Tensor:
    """The stage-1 loss (BPR or CE over the old items) of the ID learner over every position, with
    the `forget` rows of the ID table generated."""
    table = model.with_generated(forget)
    x, valid, sims = model.learner_inputs("id", batch["seq"], table)
    hidden = model.id_learner(x, valid, sims)
    mask = batch["support"] | batch["query"]
    if kind == "ce":
        table = table[: model.n_old_items + 1]
    return sequence_loss(kind, hidden, table, batch["target"], batch["negative"], mask)


def evaluate(model: MML, tasks: TaskBatch, forget: torch.Tensor, chunk: int, kind: str = "bpr") -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tasks), chunk):
            part = tasks.rows(slice(start, start + chunk)).trimmed()
            total += float(generator_loss(model, part.torch(model.device), forget, kind)) * len(part)
    return total / len(tasks)


def train_stage2(
    model: MML,
    old_seqs: list[np.ndarray],
    cfg: TrainConfig,
    eval_tasks: TaskBatch,
    rng: np.random.Generator,
    report: Callable[[int, int, str], None] | None = None,
) -> dict:
    s2 = cfg.stage2
    n_candidates = model.n_old_items
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.generator.parameters():
        p.requires_grad_(True)
    torch_rng = torch.Generator().manual_seed(int(rng.integers(2**31)))
    eval_forget = forget_mask(model, s2.forget_rate, torch.Generator().manual_seed(cfg.seed))
    model.eval()  # frozen learners: no dropout (the generator has none)
    initial = evaluate(model, eval_tasks, eval_forget, s2.batch, cfg.stage1.loss)
    optimiser = torch.optim.Adam(model.generator.parameters(), lr=s2.lr)
    history = []
    for epoch in range(s2.epochs):
        tasks = stage1_tasks(old_seqs, cfg, n_candidates, rng)
        total = 0.0
        for start in range(0, len(tasks), s2.batch):
            part = tasks.rows(slice(start, start + s2.batch)).trimmed()
            forget = forget_mask(model, s2.forget_rate, torch_rng)
            loss = generator_loss(model, part.torch(model.device), forget, cfg.stage1.loss)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(part)
            if report:
                done = start + len(part)
                report(epoch, done, f"epoch {epoch + 1}/{s2.epochs} bpr={total / done:.4f}")
        history.append(total / max(len(tasks), 1))
    final = evaluate(model, eval_tasks, eval_forget, s2.batch, cfg.stage1.loss)
    for p in model.parameters():
        p.requires_grad_(True)
    return {"initial_loss": initial, "final_loss": final, "epoch_losses": history}
