"""Meta-test warm-up (paper Sec. 3, 4.4): adapt every learner's Theta to each new user's support
items with the local update of stage 1 (`model.adapt.adapt`), batched across users with vmap, then
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

from model.adapt import adapted_hidden
from model.mml import LEARNERS, MML
from model.tasks import pad_sequences, support_tasks
from training.config import TrainConfig


def warm_hidden(
    model: MML,
    support_items: np.ndarray,
    input_items: np.ndarray,
    cfg: TrainConfig,
    steps: int | None = None,
    seed: int = 0,
) -> Iterator[tuple[slice, torch.Tensor, dict[str, torch.Tensor]]]:
    """For users with support items (U, S) and scoring inputs (U, S') (right-padded, 0 = pad), in
    chunks: (rows, the chunk's sequences (b, L), {learner: last-layer sequence (b, L, d)}) after the
    warm-up (cfg.warmup; `steps` overrides its number of steps), dropout off."""
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
                    model,
                    name,
                    support,
                    seq,
                    steps,
                    cfg.warmup.lr,
                    cfg.stage1.loss,
                    table=tables[name],
                    group=cfg.warmup.params,
                )  # fmt: skip
                for name in LEARNERS
            }
            yield rows, seq, hidden
    finally:
        model.train(was_training)


def warm_scores(
    model: MML,
    support_items: np.ndarray,
    input_items: np.ndarray,
    cfg: TrainConfig,
    steps: int | None = None,
    seed: int = 0,
    cooc: bool = False,
) -> Iterator[tuple[slice, torch.Tensor, dict[str, torch.Tensor]]]:
    """For users with support items (U, S) and scoring inputs (U, S') (right-padded, 0 = pad), in chunks:
    (rows, fused scores (b, N+1), {learner: raw scores (b, N+1)}) after the warm-up (cfg.warmup;
    `steps` overrides its number of steps). Column 0 (pad) is -inf. `cooc`: fuse with the
    co-occurrence learner (`fusion_cooc`; its scores are returned as per-learner "cooc")."""
    with torch.no_grad():
        tables = model.item_tables()
    for rows, seq, hidden in warm_hidden(model, support_items, input_items, cfg, steps, seed):
        with torch.no_grad():
            co = model.cooc_scores(seq) if cooc else None
            fused, per_learner = model.fuse(hidden, seq > 0, tables=tables, cooc=co)
            if co is not None:
                per_learner = {**per_learner, "cooc": co}
        yield rows, fused, per_learner


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
    keys = ("fused", *LEARNERS) + (("fused_cooc", "cooc") if model.has_cooc else ())
    per_user: dict[str, dict[str, list[np.ndarray]]] = {key: {n: [] for n in names} for key in keys}
    passes = [False, True] if model.has_cooc else [False]
    for cooc in passes:
        for rows, fused, per_learner in warm_scores(
            model, support_items, support_items, cfg, steps, cooc=cooc
        ):
            targets = np.asarray(valid_items[rows])
            found = (
                {"fused_cooc": fused, "cooc": per_learner["cooc"]}
                if cooc
                else {"fused": fused, **per_learner}
            )
            for key, scores in found.items():
                values = per_user_metrics(scores.cpu().numpy(), targets, names)
                for n in names:
                    per_user[key][n].append(values[n])
    return {
        key: mean_metrics({n: np.concatenate(v) for n, v in metrics.items()})
        for key, metrics in per_user.items()
    }


def average_scores(per_learner: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the learners' scores standardised over the items 1..N (Eq. 9 with gamma = 1, beta = 0,
    A uniform): the fusion before it is trained, and the No-Fusion ablation. Column 0 = -inf."""
    parts = []
    for scores in per_learner.values():
        items = scores[:, 1:]
        std = items.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-12)
        parts.append((items - items.mean(dim=1, keepdim=True)) / std)
    mean = torch.stack(parts).mean(dim=0)
    return torch.cat([torch.full_like(mean[:, :1], float("-inf")), mean], dim=1)


def choose_warmup(model: MML, cfg: TrainConfig, validation) -> tuple[TrainConfig, list[dict]]:
    """The warm-up (params, steps, lr) from cfg.warmup's grids that is best on the validation item,
    scored with the learners' average (the fusion is trained afterwards, with the chosen warm-up).
    Returns cfg with the choice in cfg.warmup (select off) and every candidate's value."""
    w = cfg.warmup
    candidates = [(w.grid_params[0], 0, w.grid_lrs[0])] if 0 in w.grid_steps else []
    candidates += [(g, s, lr) for g in w.grid_params for s in w.grid_steps if s > 0 for lr in w.grid_lrs]
    users = np.arange(len(validation))
    tried, best = [], None
    for group, steps, lr in candidates:
        trial = cfg.model_copy(
            update={"warmup": w.model_copy(update={"params": group, "steps": steps, "lr": lr})}
        )
        parts = [
            average_scores(per_learner).numpy()
            for _, _, per_learner in warm_scores(model, validation.support, validation.support, trial)
        ]
        value = float(validation.per_user(np.concatenate(parts), users).mean())
        tried.append({"params": group, "steps": steps, "lr": lr, "mrr@10": value})
        if best is None or value > best[0]:
            best = (value, trial)
    if best is None:
        raise ValueError("warm-up selection: the grids name no candidate")
    chosen = best[1]
    return chosen.model_copy(update={"warmup": chosen.warmup.model_copy(update={"select": False})}), tried


def confirm_warmup(model: MML, cfg: TrainConfig, validation) -> tuple[TrainConfig, dict[str, float]]:
    """After the fusion is trained: keep the chosen warm-up only if it beats 0 steps on the validation
    item with the served fusion (the one with the co-occurrence learner when the model has it); the
    grid chose it with the learners' average, before the fusion existed."""
    users = np.arange(len(validation))
    values = {}
    for steps in sorted({0, cfg.warmup.steps}):
        parts = [
            fused.numpy()
            for _, fused, _ in warm_scores(
                model, validation.support, validation.support, cfg, steps, cooc=model.has_cooc
            )
        ]
        values[str(steps)] = float(validation.per_user(np.concatenate(parts), users).mean())
    if values["0"] >= values[str(cfg.warmup.steps)]:
        cfg = cfg.model_copy(update={"warmup": cfg.warmup.model_copy(update={"steps": 0})})
    return cfg, values
