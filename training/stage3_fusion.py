"""Stage 3: train the fusion layer (paper Sec. 4.4.2, stage 3), everything else frozen.

Samples mimic a new user at meta-test: a window of S+1 consecutive items of a sampled old user
(S = the new users' support size): the learners are warmed up on the S items' prefix pairs exactly
as in `training.warmup` (cfg.warmup), then the fused scores of the S-item input must rank the
(S+1)-th item first: cross-entropy over all catalogue items 1..N. New items are simulated as in
stage 2 (each old item forgotten with probability p0 per step: its ID row is generated) and the real
new items carry their generated rows (filled after stage 2). Scores live one batch at a time: memory
is O(batch x N), never O(samples x N) (the reference stores every sample's full score vector).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mml.cooc import CoocTable, build_table
from model.adapt import adapted_hidden
from model.mml import LEARNERS, MML
from model.tasks import TaskBatch, pad_sequences, support_tasks
from training.config import TrainConfig
from training.stage2_generator import forget_mask
from training.tasks import sample_windows
from training.validation import Validation


def fusion_windows(old_seqs: list[np.ndarray], length: int, rng: np.random.Generator) -> np.ndarray:
    """(n, length) windows of `length` consecutive items, one per history long enough."""
    return np.stack(sample_windows([s for s in old_seqs if len(s) >= length], rng, "sampled", length, length))


@torch.no_grad()
def frozen_tables(model: MML) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What stays fixed through stage 3: generated ID rows of every item (N+1, d) and the text and
    image learners' item vectors."""
    generated = model.generate(torch.arange(model.n_items + 1, device=model.device))
    return generated, {name: model.item_table(name) for name in ("text", "image")}


def fusion_loss(
    model: MML,
    windows: np.ndarray,
    forget: torch.Tensor,
    cfg: TrainConfig,
    rng: np.random.Generator,
    frozen: tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> torch.Tensor:
    """Mean cross-entropy of the fused scores of window[:-1] for window[-1] (after the warm-up)."""
    generated, feature_tables = frozen
    with torch.no_grad():
        id_table = model.with_generated(forget, generated)
    tables = {"id": id_table, **feature_tables}
    inputs = windows[:, :-1]
    device = model.device
    support = support_tasks(inputs, cfg.model.max_len, model.n_items, rng).trimmed().torch(device)
    seq = torch.as_tensor(pad_sequences(inputs, inputs.shape[1]), device=device)  # windows hold no padding
    w = cfg.warmup
    hidden = {
        name: adapted_hidden(
            model, name, support, seq, w.steps, w.lr, cfg.stage1.loss, id_table, tables[name], w.params
        )
        for name in LEARNERS
    }
    target = torch.as_tensor(windows[:, -1], dtype=torch.long, device=device)
    fused, _ = model.fuse(hidden, seq > 0, tables=tables)
    loss = F.cross_entropy(fused, target)
    if model.has_cooc:  # the second fusion layer, with the co-occurrence learner, on the same passes
        fused_cooc, _ = model.fuse(hidden, seq > 0, tables=tables, cooc=model.cooc_scores(seq))
        loss = loss + F.cross_entropy(fused_cooc, target)
    return loss


def evaluate(
    model: MML,
    windows: np.ndarray,
    forget: torch.Tensor,
    cfg: TrainConfig,
    batch: int,
    frozen: tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> float:
    total = 0.0
    rng = np.random.default_rng(cfg.seed)
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            part = windows[start : start + batch]
            total += float(fusion_loss(model, part, forget, cfg, rng, frozen)) * len(part)
    return total / len(windows)


def train_stage3(
    model: MML,
    old_seqs: list[np.ndarray],
    support_size: int,
    cfg: TrainConfig,
    eval_tasks: TaskBatch,
    rng: np.random.Generator,
    report: Callable[[int, int, str], None] | None = None,
    cooc: CoocTable | None = None,
    validation: Validation | None = None,
) -> dict:
    """Train the fusion layer(s). `cooc`: the co-occurrence table of all of D_old (models with the
    co-occurrence learner): the fusion trains on a table built WITHOUT the sampled users (else their
    windows' own co-occurrences would inflate the learner's weight), then `cooc` is installed.
    With cfg.stage3.select and a `validation`, the layers start and end at their best validated state
    (`FusionSelection`)."""
    s3 = cfg.stage3
    length = support_size + 1
    selection = None
    if s3.select and validation is not None:
        model.eval()
        selection = FusionSelection(model, cfg, validation, cooc if model.has_cooc else None)
        started_from = selection.candidates_to_beat()  # also the curve's step 0 (uniform)
    users = rng.permutation(len(old_seqs))[: max(1, int(round(s3.user_fraction * len(old_seqs))))]
    sampled = [old_seqs[i] for i in users]
    if model.has_cooc:
        if cooc is None:
            raise ValueError("a model with the co-occurrence learner needs its table in stage 3")
        others = np.setdiff1d(np.arange(len(old_seqs)), users)
        held_out = build_table([old_seqs[i] for i in others], model.n_items, cooc.window, cooc.m)
        model.set_cooc(held_out.items, held_out.weights)
    eval_windows = _eval_windows(eval_tasks, length)
    for p in model.parameters():
        p.requires_grad_(False)
    fusion_params = list(model.fusion.parameters())
    if model.has_cooc:
        fusion_params += list(model.fusion_cooc.parameters())
    for p in fusion_params:
        p.requires_grad_(True)
    torch_rng = torch.Generator().manual_seed(int(rng.integers(2**31)))
    eval_forget = forget_mask(model, s3.forget_rate, torch.Generator().manual_seed(cfg.seed))
    model.eval()  # learners and generator frozen, no dropout; the fusion layer has none
    frozen = frozen_tables(model)
    initial = evaluate(model, eval_windows, eval_forget, cfg, s3.batch, frozen)
    optimiser = torch.optim.Adam(fusion_params, lr=s3.lr)
    history = []
    steps = 0
    for epoch in range(s3.epochs):
        windows = fusion_windows(sampled, length, rng)
        windows = windows[rng.permutation(len(windows))]
        total = 0.0
        for start in range(0, len(windows), s3.batch):
            part = windows[start : start + s3.batch]
            loss = fusion_loss(model, part, forget_mask(model, s3.forget_rate, torch_rng), cfg, rng, frozen)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(part)
            steps += 1
            if selection is not None:
                selection.keep(steps)
            if report:
                done = start + len(part)
                report(epoch, done, f"epoch {epoch + 1}/{s3.epochs} ce={total / done:.4f}")
        history.append(total / max(len(windows), 1))
    selected = None
    if selection is not None:
        selected = {"start": started_from, "best": selection.restore(), "curve": selection.curve}
    final = evaluate(model, eval_windows, eval_forget, cfg, s3.batch, frozen)
    if model.has_cooc:
        model.set_cooc(cooc.items, cooc.weights)
    for p in model.parameters():
        p.requires_grad_(True)
    out = {"initial_loss": initial, "final_loss": final, "epoch_losses": history, "users": len(sampled)}
    if selected is not None:
        out["selection"] = selected
    return out


class FusionSelection:
    """Validation of the fusion layers (stage 3 with `select`): the learners are frozen, so each new
    user's warmed-up sequences (and co-occurrence scores, from the table of all of D_old) are computed
    once; a fusion state is then scored in one cheap pass. Keeps each layer's best state."""

    def __init__(self, model: MML, cfg: TrainConfig, validation: Validation, cooc: CoocTable | None) -> None:
        from mml.cooc import dense_scores
        from training.warmup import warm_hidden

        self.model, self.validation = model, validation
        with torch.no_grad():
            self.tables = model.item_tables()
            self.parts = []
            for rows, seq, hidden in warm_hidden(model, validation.support, validation.support, cfg):
                co = None
                if cooc is not None:
                    co = torch.as_tensor(dense_scores(cooc, seq.cpu().numpy()), device=seq.device)
                self.parts.append((np.arange(rows.start, rows.stop), seq, hidden, co))
        self.layers = {"fusion": model.fusion} | (
            {"fusion_cooc": model.fusion_cooc} if cooc is not None else {}
        )
        self.best: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
        self.curve: list[dict[str, float]] = []

    @torch.no_grad()
    def score(self, layer: str) -> float:
        values = []
        for users, seq, hidden, co in self.parts:
            fused, _ = self.model.fuse(
                hidden, seq > 0, tables=self.tables, cooc=co if layer == "fusion_cooc" else None
            )
            values.append(self.validation.per_user(fused.cpu().numpy(), users))
        return float(np.concatenate(values).mean())

    def keep(self, step: int) -> None:
        point = {"step": step}
        for layer, module in self.layers.items():
            value = point[layer] = self.score(layer)
            if layer not in self.best or value > self.best[layer][0]:
                self.best[layer] = (value, {k: v.detach().clone() for k, v in module.state_dict().items()})
        self.curve.append(point)

    @torch.no_grad()
    def candidates_to_beat(self) -> dict[str, dict[str, float]]:
        """The states each layer must beat: its initial state (uniform) and each learner alone (the
        other learners' Eq. 9 scale gamma set to 0; the co-occurrence scale to ~0). The best of them
        is kept as the layer's best state, so `restore` never returns a layer worse on validation
        than its best learner, but training starts from the initial state: a learner-alone state
        cannot be trained out of (exp(theta_c) at theta_c = -20 has no gradient, so a layer started
        there never brings the co-occurrence learner back)."""
        tried: dict[str, dict[str, float]] = {}
        for layer, module in self.layers.items():
            initial = {k: v.clone() for k, v in module.state_dict().items()}
            names = [*LEARNERS] + (["cooc"] if layer == "fusion_cooc" else [])
            candidates: dict[str, dict[str, torch.Tensor]] = {"uniform": initial}
            for m, name in enumerate(names):
                state = {k: v.clone() for k, v in initial.items()}
                keep = torch.zeros_like(state["score_weight"])
                if name != "cooc":
                    keep[m] = 1.0
                state["score_weight"] = state["score_weight"] * keep
                if "cooc_scale" in state:
                    state["cooc_scale"] = (
                        state["cooc_scale"] if name == "cooc" else torch.full_like(state["cooc_scale"], -20.0)
                    )
                candidates[name] = state
            tried[layer] = {}
            for name, state in candidates.items():
                module.load_state_dict(state)
                tried[layer][name] = self.score(layer)
            best = max(tried[layer], key=tried[layer].get)
            self.best[layer] = (tried[layer][best], candidates[best])
            module.load_state_dict(initial)
        self.curve.append({"step": 0} | {layer: scores["uniform"] for layer, scores in tried.items()})
        return tried

    def restore(self) -> dict[str, float]:
        for layer, module in self.layers.items():
            module.load_state_dict(self.best[layer][1])
        return {layer: value for layer, (value, _) in self.best.items()}


def _eval_windows(tasks: TaskBatch, length: int) -> np.ndarray:
    """Fixed evaluation windows: the last `length` items of each evaluation task that has them."""
    rows = []
    for seq, target, query in zip(tasks.seq, tasks.target, tasks.query, strict=True):
        if not query.any():
            continue
        end = int(np.flatnonzero(query)[-1])  # the window's last target (the query may hold several)
        items = np.concatenate([seq[: end + 1], target[end : end + 1]])
        if len(items) >= length:
            rows.append(items[-length:])
    if not rows:
        raise ValueError(f"no evaluation task holds {length} items")
    return np.stack(rows)
