"""Meta-test warm-up (paper Sec. 3, 4.4): adapt every learner's Theta to each new user's support
items with the local update of stage 1 (`training.maml.adapt`), batched across users with vmap, then
score. steps = 0 scores with the global parameters.

Choices (docs/model.md): the warm-up runs with dropout off (deterministic scores; the update is
the same SGD as the inner loop), updates Theta only (what MAML meta-learned to adapt; the reference
fine-tunes all parameters for up to 50 epochs and picks the best epoch on the validation item per
user), ranks every catalogue item (negatives / softmax over items 1..N, new items included).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.func import functional_call, vmap

from model.mml import LEARNERS, MML
from training.config import TrainConfig
from training.maml import adapt, candidates, theta
from training.tasks import pad_sequences, support_tasks


def adapted_hidden(
    model: MML,
    name: str,
    support: dict[str, torch.Tensor],
    seq: torch.Tensor,
    steps: int,
    lr: float,
    loss: str,
    id_table: torch.Tensor | None = None,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last-layer sequence (B, L, d) of learner `name` for `seq` (B, L), after `steps` local updates
    of each row's own copy of Theta on its support task (TaskBatch.torch() of the same B rows).
    No gradient (the learners are fixed here); `id_table` replaces the ID table; `table` = the
    learner's (N+1, d) item vectors when already computed."""
    learner = model.learner(name)
    with torch.no_grad():
        inputs = model.learner_inputs(name, seq, id_table)
        if steps == 0:
            return learner(*inputs)
        params = {k: v.detach() for k, v in theta(model, name).items()}
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


def warm_scores(
    model: MML,
    support_items: np.ndarray,
    input_items: np.ndarray,
    cfg: TrainConfig,
    steps: int | None = None,
    seed: int = 0,
) -> Iterator[tuple[slice, torch.Tensor, dict[str, torch.Tensor]]]:
    """For users with support items (U, S) and scoring inputs (U, S') (right-padded, 0 = pad), in chunks:
    (rows, fused scores (b, N+1), {learner: raw scores (b, N+1)}) after the warm-up (cfg.warmup;
    `steps` overrides its number of steps). Column 0 (pad) is -inf."""
    steps = cfg.warmup.steps if steps is None else steps
    max_len = cfg.model.max_len
    rng = np.random.default_rng(seed)
    tasks = support_tasks(support_items, max_len, model.n_items, rng)
    seqs = pad_sequences(input_items, max_len)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tables = model.item_tables()
        for start in range(0, len(seqs), cfg.warmup.chunk):
            rows = slice(start, min(start + cfg.warmup.chunk, len(seqs)))
            support = tasks.rows(rows).trimmed().torch(model.device)
            seq = torch.as_tensor(
                seqs[rows][:, : max(int((seqs[rows] > 0).sum(axis=1).max()), 1)], device=model.device
            )  # no pad columns
            hidden = {
                name: adapted_hidden(
                    model, name, support, seq, steps, cfg.warmup.lr, cfg.stage1.loss, table=tables[name]
                )
                for name in LEARNERS
            }
            with torch.no_grad():
                fused, per_learner = model.fuse(hidden, seq > 0, tables=tables)
            yield rows, fused, per_learner
    finally:
        model.train(was_training)


def validation_summary(
    model: MML,
    support_items: np.ndarray,
    valid_items: np.ndarray,
    cfg: TrainConfig,
    steps: int | None = None,
    ks: tuple[int, ...] = (10,),
) -> dict[str, dict[str, float]]:
    """Recall@k / NDCG@k (full ranking over items 1..N, history not masked) of the validation item,
    predicted from the support items after the warm-up: {"fused"|learner: {"recall@10": .., ...}}."""
    from training.evaluation.metrics import mean_metrics, per_user_metrics

    names = tuple(f"{kind}@{k}" for kind in ("recall", "ndcg") for k in ks)
    per_user: dict[str, dict[str, list[np.ndarray]]] = {
        key: {n: [] for n in names} for key in ("fused", *LEARNERS)
    }
    for rows, fused, per_learner in warm_scores(model, support_items, support_items, cfg, steps):
        targets = np.asarray(valid_items[rows])
        for key, scores in (("fused", fused), *per_learner.items()):
            values = per_user_metrics(scores.cpu().numpy(), targets, names)
            for n in names:
                per_user[key][n].append(values[n])
    return {
        key: mean_metrics({n: np.concatenate(v) for n, v in metrics.items()})
        for key, metrics in per_user.items()
    }
