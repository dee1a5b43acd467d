"""The local update (paper Eq. 18) and what it yields at meta-test time, in one place for training
(stage-1 inner loop, training/maml.py; meta-test warm-up, training/warmup.py) and serving (arms
with adapt_steps > 0, service/adapt.py).

    Theta_b <- Theta_b - alpha * grad_Theta Loss(support_b; Theta_b, Gamma)     Eq. 18, `steps` times

Theta = a learner's transformer (never its embedding layer Gamma); each task b gets its own copy,
and all tasks of a batch are updated at once with vmap over torch.func.grad.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.func import functional_call, grad, vmap

from model.losses import sequence_loss
from model.mml import MML

Params = dict[str, torch.Tensor]
Sims = tuple[torch.Tensor, torch.Tensor] | None


def theta(model: MML, name: str) -> Params:
    """Theta of a learner: the parameters its local update changes (never the embedding layer)."""
    learner = model.learner(name)
    names = set(learner.theta_names())
    return {n: p for n, p in learner.named_parameters() if n in names}


def task_loss_fn(model: MML, name: str, kind: str, table: torch.Tensor) -> Callable[..., torch.Tensor]:
    """loss(theta, x, valid, sims, target, negative, mask) of ONE task (unbatched tensors): one causal
    pass of the learner with parameters theta, the loss over the masked positions."""
    learner = model.learner(name)

    def loss(theta: Params, x, valid, sims: Sims, target, negative, mask) -> torch.Tensor:
        batched_sims = None if sims is None else (sims[0].unsqueeze(0), sims[1].unsqueeze(0))
        hidden = functional_call(learner, theta, (x.unsqueeze(0), valid.unsqueeze(0), batched_sims))
        return sequence_loss(
            kind, hidden, table, target.unsqueeze(0), negative.unsqueeze(0), mask.unsqueeze(0)
        )

    return loss


def candidates(
    model: MML,
    name: str,
    target: torch.Tensor,
    negative: torch.Tensor,
    kind: str,
    n_candidates: int,
    id_table: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidate table, target, negative) for `sequence_loss`. CE needs items 0..n_candidates; BPR
    only the rows of the items in the batch (targets and negatives re-indexed into them), which saves
    projecting the whole catalogue for the feature learners. `table`: the full table, if computed."""
    if kind == "ce":
        full = model.item_table(name, id_table) if table is None else table
        return full[: n_candidates + 1], target, negative
    items, inverse = torch.unique(torch.stack([target, negative]), return_inverse=True)
    rows = model.item_rows(name, items, id_table) if table is None else table[items]
    return rows, inverse[0], inverse[1]


def adapt(
    model: MML,
    name: str,
    params: Params,
    inputs: tuple[torch.Tensor, torch.Tensor, Sims],
    table: torch.Tensor,
    target: torch.Tensor,
    negative: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    lr: float,
    kind: str,
) -> Params:
    """Local update (Eq. 18) of every task of a chunk at once -> per-task Theta, each (B, *shape).
    Differentiable w.r.t. `params` and the inputs unless called under torch.no_grad()."""
    x, valid, sims = inputs
    loss = task_loss_fn(model, name, kind, table)
    loss_grad = grad(loss)

    def one_task(theta: Params, x, valid, sims, target, negative, mask) -> Params:
        for _ in range(steps):
            grads = loss_grad(theta, x, valid, sims, target, negative, mask)
            theta = {k: torch.add(theta[k], grads[k], alpha=-lr) for k in theta}  # theta - lr * grad, one op
        return theta

    if steps == 0:
        return {k: v.unsqueeze(0).expand(x.shape[0], *v.shape) for k, v in params.items()}
    sims_dim = None if sims is None else 0
    return vmap(one_task, in_dims=(None, 0, 0, sims_dim, 0, 0, 0), randomness="different")(
        params, x, valid, sims, target, negative, mask
    )


def local_params(model: MML, name: str, group: str = "theta") -> dict[str, torch.Tensor]:
    """What the warm-up adapts: all of Theta, or the `head` = the last block's feed-forward layer."""
    params = theta(model, name)
    if group == "theta":
        return params
    if group == "head":
        prefix = f"encoder.blocks.{model.cfg.n_layers - 1}.ffn."
        return {k: v for k, v in params.items() if k.startswith(prefix)}
    raise ValueError(f"warm-up params must be 'theta' or 'head', got {group!r}")


def adapted_hidden(
    model: MML,
    name: str,
    support: dict[str, torch.Tensor] | None,
    seq: torch.Tensor,
    steps: int,
    lr: float,
    loss: str,
    id_table: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
    group: str = "theta",
) -> torch.Tensor:
    """Last-layer sequence (B, L, d) of learner `name` for `seq` (B, L), after `steps` local updates
    of each row's own copy of Theta on its support task (TaskBatch.torch() of the same B rows).
    No gradient (the learners are fixed here); `id_table` replaces the ID table; `table` = the
    learner's (N+1, d) item vectors when already computed; `group`: what the update changes
    (`local_params`), the rest of the learner stays at the global parameters."""
    learner = model.learner(name)
    with torch.no_grad():
        inputs = model.learner_inputs(name, seq, id_table)
        if steps == 0:
            return learner(*inputs)
        params = {k: v.detach() for k, v in local_params(model, name, group).items()}
        rows, target, negative = candidates(
            model, name, support["target"], support["negative"], loss, model.n_items, id_table, table
        )
        local = adapt(
            model, name, params, model.learner_inputs(name, support["seq"], id_table), rows,
            target, negative, support["support"], steps, lr, loss,
        )  # fmt: skip

        def encode(th, x, valid, sims):
            batched_sims = None if sims is None else (sims[0].unsqueeze(0), sims[1].unsqueeze(0))
            return functional_call(learner, th, (x.unsqueeze(0), valid.unsqueeze(0), batched_sims)).squeeze(0)

        x, valid, sims = inputs
        return vmap(encode, in_dims=(0, 0, 0, None if sims is None else 0), randomness="different")(
            local, x, valid, sims
        )


def with_items(model: MML, text: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor) -> MML:
    """The model over its catalogue plus extra rows N+1.. (items registered after training, with
    their features), sharing every parameter; the extra rows' ID embeddings come in as `id_table`
    (`adapted_hidden`, `MML.item_tables`). An empty extension returns the model itself."""
    if len(text) == 0:
        return model
    extended = copy.copy(model)  # shallow: parameters and submodules are shared, not copied
    extended._buffers = dict(model._buffers)
    extended.text = torch.cat([model.text, text])
    extended.image = torch.cat([model.image, image])
    extended.image_mask = torch.cat([model.image_mask, image_mask])
    extended.n_items = model.n_items + len(text)
    return extended
