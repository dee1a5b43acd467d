"""Stage 1: MAML for each learner (paper Sec. 4.4.2, Eq. 18-20), batched over tasks with torch.func.

Per task b (an old user's window, training/tasks.py):
    local:   Theta_b <- Theta_b - alpha * grad_Theta Loss(support_b; Theta_b, Gamma)   (inner_steps times, Eq. 18)
    global:  Theta <- Adam(mean_b grad_Theta Loss(query_b; Theta_b, Gamma))            (Eq. 19)
             Gamma <- Adam(mean_b grad_Gamma Loss(query_b; Theta_b, Gamma))            (Eq. 20)

The meta-gradient is taken at the adapted weights Theta_b and applied to the PRE-adaptation Theta
(the reference applies Adam to the last task's adapted weights instead). First-order (default) treats
d Theta_b / d Theta as the identity; second-order differentiates through the local updates.

The local update runs for a whole chunk of tasks at once: `vmap(grad(loss))` over per-task copies of
Theta (`functional_call`), randomness="different" so each task draws its own dropout masks. The
paper sums the task losses (Eq. 19-20); we average them (the scale is absorbed by Adam) and average
each task's loss over its positions.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from torch.func import vmap

from model.adapt import Sims, adapt, candidates, task_loss_fn, theta
from model.mml import LEARNERS, MML
from model.norm import exact_second_order
from model.tasks import TaskBatch
from training.config import Stage1Config, TrainConfig
from training.tasks import make_tasks, sample_windows
from training.validation import BestPerLearner, Validation


def _detach_inputs(
    inputs: tuple[torch.Tensor, torch.Tensor, Sims],
) -> tuple[torch.Tensor, torch.Tensor, Sims]:
    x, valid, sims = inputs
    return x.detach(), valid, None if sims is None else (sims[0].detach(), sims[1].detach())


def meta_loss(
    model: MML,
    name: str,
    batch: dict[str, torch.Tensor],
    cfg: Stage1Config,
    n_candidates: int,
    backward_weight: float | None = None,
) -> float:
    """Query loss of a chunk of tasks after their local updates (mean over tasks). With
    `backward_weight`, accumulates backward_weight * d(loss)/d(Theta, Gamma) into .grad (the batched
    meta-gradient); without, only evaluates."""
    params = theta(model, name)
    grad_enabled = backward_weight is not None
    second_order = grad_enabled and not cfg.first_order
    # Second order differentiates through the local updates: LayerNorm must then use primitive ops
    # (torch's fused layer_norm has a wrong double backward under vmap, see model/norm.py).
    exact = exact_second_order() if second_order else nullcontext()
    with torch.set_grad_enabled(grad_enabled), exact:
        inputs = model.learner_inputs(name, batch["seq"])
        table, target, negative = candidates(
            model, name, batch["target"], batch["negative"], cfg.loss, n_candidates
        )
        support = (target, negative, batch["support"])
        if second_order:
            adapted = adapt(
                model, name, params, inputs, table, *support, cfg.inner_steps, cfg.inner_lr, cfg.loss
            )
        else:
            # First-order MAML: the local updates are computed outside the graph; the adapted weights
            # re-enter it as Theta + (Theta_b - Theta), so d Theta_b / d Theta = I (explicit, not silent).
            with torch.no_grad():
                fixed = {k: v.detach() for k, v in params.items()}
                adapted = adapt(
                    model, name, fixed, _detach_inputs(inputs), table.detach(), *support,
                    cfg.inner_steps, cfg.inner_lr, cfg.loss,
                )  # fmt: skip
            adapted = {k: params[k] + (adapted[k] - fixed[k]) for k in params}
        x, valid, sims = inputs
        query_loss = task_loss_fn(model, name, cfg.loss, table)
        sims_dim = None if sims is None else 0
        losses = vmap(query_loss, in_dims=(0, 0, 0, sims_dim, 0, 0, 0), randomness="different")(
            adapted, x, valid, sims, target, negative, batch["query"]
        )
        loss = losses.mean()
        if grad_enabled:
            (loss * backward_weight).backward()
    return float(loss.detach())


def meta_loss_looped(
    model: MML,
    name: str,
    batch: dict[str, torch.Tensor],
    cfg: Stage1Config,
    n_candidates: int,
    backward_weight: float,
) -> float:
    """The same meta-gradient as `meta_loss` with a Python loop over tasks and torch.autograd (the
    reference for tests and the speed benchmark): same inputs and maths; the local updates run task
    by task, each at its own length, the query losses are summed and back-propagated once."""
    params = theta(model, name)
    inputs = model.learner_inputs(name, batch["seq"])
    table, target, negative = candidates(
        model, name, batch["target"], batch["negative"], cfg.loss, n_candidates
    )
    loss = task_loss_fn(model, name, cfg.loss, table)
    x, valid, sims = inputs
    n_tasks = x.shape[0]
    queries = []
    for b in range(n_tasks):
        n = max(int(valid[b].sum()), 1)  # each task at its own length (no pad columns)
        task = (x[b, :n], valid[b, :n], None if sims is None else (sims[0][b, :n, :n], sims[1][b, :n, :n]))
        local = dict(params)
        for _ in range(cfg.inner_steps):
            support = loss(local, *task, target[b, :n], negative[b, :n], batch["support"][b, :n])
            grads = torch.autograd.grad(
                support, list(local.values()), create_graph=not cfg.first_order, retain_graph=True
            )
            if cfg.first_order:  # first-order MAML: the local step is a constant shift of Theta
                grads = [g.detach() for g in grads]
            local = {k: v - cfg.inner_lr * g for (k, v), g in zip(local.items(), grads, strict=True)}
        queries.append(loss(local, *task, target[b, :n], negative[b, :n], batch["query"][b, :n]))
    total = torch.stack(queries).mean()
    (total * backward_weight).backward()
    return float(total.detach())


def learner_parameters(model: MML, name: str) -> list[torch.nn.Parameter]:
    """Theta and Gamma of a learner: what its global update (Adam) changes."""
    return list(theta(model, name).values()) + model.gamma_parameters(name)


def learning_rate(cfg: Stage1Config, name: str) -> float:
    return {"id": cfg.lr_id, "text": cfg.lr_text, "image": cfg.lr_image}[name]


def stage1_tasks(
    old_seqs: list[np.ndarray], cfg: TrainConfig, n_candidates: int, rng: np.random.Generator
) -> TaskBatch:
    """One task per old user (shuffled), windows as configured."""
    windows = sample_windows(old_seqs, rng, cfg.tasks.window, cfg.tasks.min_len, cfg.window_max)
    order = rng.permutation(len(windows))
    return make_tasks(
        [windows[i] for i in order], cfg.model.max_len, n_candidates, rng, cfg.tasks.query_share
    )


def evaluate(model: MML, tasks: TaskBatch, cfg: Stage1Config, n_candidates: int) -> dict[str, float]:
    """Mean query loss after local updates, dropout off, per learner (no parameter changes)."""
    was_training = model.training
    model.eval()
    out = {}
    for name in LEARNERS:
        losses = []
        for start in range(0, len(tasks), cfg.chunk):
            part = tasks.rows(slice(start, start + cfg.chunk)).trimmed()
            losses.append(meta_loss(model, name, part.torch(model.device), cfg, n_candidates) * len(part))
        out[name] = sum(losses) / len(tasks)
    model.train(was_training)
    return out


def accumulate_meta_gradient(
    model: MML, name: str, tasks: TaskBatch, meta_batch_size: int, cfg: Stage1Config, n_candidates: int
) -> float:
    """Accumulate into .grad the meta-gradient of `tasks`, part of a meta-batch of `meta_batch_size`
    tasks: chunks (they only bound memory) weighted len(chunk) / meta_batch_size, so the sum over the
    parts of a meta-batch is its mean. Returns the tasks' summed query loss; steps no optimiser."""
    loss_sum = 0.0
    for start in range(0, len(tasks), cfg.chunk):
        part = tasks.rows(slice(start, start + cfg.chunk)).trimmed()
        weight = len(part) / meta_batch_size
        loss_sum += meta_loss(model, name, part.torch(model.device), cfg, n_candidates, weight) * len(part)
    return loss_sum


def meta_batch_gradient(
    model: MML, name: str, meta_batch: TaskBatch, cfg: Stage1Config, n_candidates: int
) -> float:
    """The whole meta-batch's meta-gradient into .grad (one process); its summed query loss."""
    return accumulate_meta_gradient(model, name, meta_batch, len(meta_batch), cfg, n_candidates)


def train_stage1(
    model: MML,
    old_seqs: list[np.ndarray],
    cfg: TrainConfig,
    eval_tasks: TaskBatch,
    rng: np.random.Generator,
    report: Callable[[int, int, str], None] | None = None,
    meta_gradient: Callable[[MML, str, TaskBatch, Stage1Config, int], float] = meta_batch_gradient,
    evaluate_tasks: Callable[[MML, TaskBatch, Stage1Config, int], dict[str, float]] = evaluate,
    sum_losses: Callable[[list[float]], list[float]] = list,
    validation: Validation | None = None,
) -> dict:
    """Meta-train the three learners (each with its own Adam) on one task per old user per epoch,
    for `epochs`, or for `steps` meta-updates when set. With `eval_every` and a `validation`, each
    learner's MRR@10 on the validation item is measured every `eval_every` updates and the learner
    ends at its best state, its starting state included (so meta-training never makes it worse).
    `meta_gradient`, `evaluate_tasks` and `sum_losses` (the losses of one meta-batch, per learner)
    are one process's by default; `training.distributed` passes sharded, all-reduced ones."""
    s1 = cfg.stage1
    n_candidates = model.n_old_items  # stage 1 ranks old items only: new items never occur in D_old
    optimisers = {
        name: torch.optim.Adam(learner_parameters(model, name), lr=learning_rate(s1, name))
        for name in LEARNERS
    }
    for p in model.parameters():
        p.requires_grad_(False)
    for name in LEARNERS:
        for p in learner_parameters(model, name):
            p.requires_grad_(True)
    initial = evaluate_tasks(model, eval_tasks, s1, n_candidates)
    history: dict[str, list[float]] = {name: [] for name in LEARNERS}
    select = validation is not None and s1.eval_every is not None
    budget = s1.steps
    selection = BestPerLearner(model, validation, learner_parameters) if select else None
    model.train()
    updates, epoch = 0, 0
    while (budget is None and epoch < s1.epochs) or (budget is not None and updates < budget):
        tasks = stage1_tasks(old_seqs, cfg, n_candidates, rng)  # the same on every rank
        if len(tasks) == 0:
            break
        sums = dict.fromkeys(LEARNERS, 0.0)
        seen = 0
        for start in range(0, len(tasks), s1.meta_batch):
            if budget is not None and updates >= budget:
                break
            meta_batch = tasks.rows(slice(start, start + s1.meta_batch))
            # chunks only bound memory: sorting the meta-batch by length first changes nothing in the
            # meta-gradient (a sum over its tasks) but lets each chunk drop its all-pad columns
            meta_batch = meta_batch.rows(np.argsort(meta_batch.lengths(), kind="stable"))
            losses = []
            for name in LEARNERS:
                optimisers[name].zero_grad(set_to_none=True)
                losses.append(meta_gradient(model, name, meta_batch, s1, n_candidates))
                optimisers[name].step()
            for name, total in zip(LEARNERS, sum_losses(losses), strict=True):
                sums[name] += total
            updates += 1
            seen = start + len(meta_batch)
            if selection is not None and updates % s1.eval_every == 0:
                selection.measure(updates)
                model.train()
            if report:
                info = " ".join(f"{n}={sums[n] / seen:.4f}" for n in LEARNERS)
                label = f"step {updates}/{budget}" if budget is not None else f"epoch {epoch + 1}/{s1.epochs}"
                report(epoch, seen, f"{label} {info}")
        for name in LEARNERS:
            history[name].append(sums[name] / max(seen, 1))
        epoch += 1
    selected = None
    if selection is not None:
        if updates % s1.eval_every:
            selection.measure(updates)
        selected = selection.restore()
    final = evaluate_tasks(model, eval_tasks, s1, n_candidates)
    for p in model.parameters():
        p.requires_grad_(True)
    out = {
        name: {"initial_loss": initial[name], "final_loss": final[name], "epoch_losses": history[name]}
        for name in LEARNERS
    }
    out["meta_updates"] = updates
    if selected is not None:
        out["selection"] = selected
    return out
