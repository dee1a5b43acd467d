"""MML over a catalogue: three learners, the ID embedding table, the generator and the fusion layer,
with the catalogue's features and neighbour table as buffers (paper Fig. 1a).

Item index 0 is the padding id; old items are 1..n_old_items, new items n_old_items+1..N.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mml.neighbours import catalogue_neighbours
from model.blocks import init_weights
from model.config import ModelConfig
from model.fusion import Fusion
from model.generator import Generator
from model.learners import IDLearner, ImageLearner, Learner, TextLearner, last_hidden

LEARNERS = ("id", "text", "image")  # order of the fusion's weights A

Inputs = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]  # (x, valid, sims)


class MML(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        n_old_items: int,
        text: np.ndarray | torch.Tensor,
        image: np.ndarray | torch.Tensor,
        image_mask: np.ndarray | torch.Tensor,
        neighbours: np.ndarray | torch.Tensor | None = None,
    ):
        """text (N+1, Dt), image (N+1, Di), image_mask (N+1,): the catalogue's features (row = item_idx).
        neighbours (N+1, K): Eq. 14 table; searched here (mml.neighbours) when not given."""
        super().__init__()
        text = torch.as_tensor(np.asarray(text, dtype=np.float32))
        image = torch.as_tensor(np.asarray(image, dtype=np.float32))
        image_mask = torch.as_tensor(np.asarray(image_mask, dtype=bool))
        n_rows = text.shape[0]
        for name, dim, got in (("text", cfg.text_dim, text.shape), ("image", cfg.image_dim, image.shape)):
            if len(got) != 2 or got[0] != n_rows or got[1] != dim:
                raise ValueError(f"{name} features must be (N+1={n_rows}, {dim}), got {tuple(got)}")
        if image_mask.shape != (n_rows,):
            raise ValueError(f"image_mask must be ({n_rows},), got {tuple(image_mask.shape)}")
        if not 1 <= n_old_items < n_rows:
            raise ValueError(f"n_old_items={n_old_items} must be in 1..{n_rows - 1}")
        if neighbours is None:
            neighbours = catalogue_neighbours(
                text.numpy(), image.numpy(), image_mask.numpy(), n_old_items, cfg.n_neighbours
            )
        neighbours = torch.as_tensor(np.asarray(neighbours, dtype=np.int64))
        if neighbours.shape != (n_rows, cfg.n_neighbours):
            raise ValueError(
                f"neighbours must be ({n_rows}, {cfg.n_neighbours}), got {tuple(neighbours.shape)}"
            )

        self.cfg = cfg
        self.n_items = n_rows - 1
        self.n_old_items = n_old_items
        self.register_buffer("text", text)
        self.register_buffer("image", image)
        self.register_buffer("image_mask", image_mask)
        self.register_buffer("neighbours", neighbours)

        self.item_emb = nn.Embedding(n_rows, cfg.d)  # M_id (Gamma of the ID learner), row 0 = pad
        init_weights(self.item_emb, cfg.init_std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.id_learner = IDLearner(cfg)
        self.text_learner = TextLearner(cfg)
        self.image_learner = ImageLearner(cfg)
        self.generator = Generator(cfg)
        self.fusion = Fusion(cfg)  # the paper's three learners
        if cfg.cooc_neighbours:
            # the co-occurrence table (mml/cooc.py), filled by training (`set_cooc`), and the fusion
            # layer that weighs it as a fourth learner
            self.register_buffer("cooc_items", torch.zeros(n_rows, cfg.cooc_neighbours, dtype=torch.long))
            self.register_buffer("cooc_weights", torch.zeros(n_rows, cfg.cooc_neighbours))
            self.fusion_cooc = Fusion(cfg, cooc=True)

    @property
    def device(self) -> torch.device:
        """Where the model's tensors live (batches are built there)."""
        return self.item_emb.weight.device

    # --- learners -------------------------------------------------------------------------------
    def learner(self, name: str) -> Learner:
        if name not in LEARNERS:
            raise ValueError(f"learner must be one of {LEARNERS}, got {name!r}")
        return {"id": self.id_learner, "text": self.text_learner, "image": self.image_learner}[name]

    def gamma_parameters(self, name: str) -> list[nn.Parameter]:
        """The embedding layer Gamma of a learner (the ID table belongs to the ID learner's)."""
        learner = self.learner(name)
        params = [p for n, p in learner.named_parameters() if n in set(learner.gamma_names())]
        return ([self.item_emb.weight] if name == "id" else []) + params

    def item_table(self, name: str, id_table: torch.Tensor | None = None) -> torch.Tensor:
        """(N+1, d) output-side item vectors of a learner (tied with its input side)."""
        if name == "id":
            return self.item_emb.weight if id_table is None else id_table
        if name == "text":
            return self.text_learner.item_vectors(self.text)
        return self.image_learner.item_vectors(self.image, self.image_mask)

    def item_rows(self, name: str, items: torch.Tensor, id_table: torch.Tensor | None = None) -> torch.Tensor:
        """item_table(name)[items] without computing the whole catalogue's vectors."""
        if name == "id":
            return (self.item_emb.weight if id_table is None else id_table)[items]
        if name == "text":
            return self.text_learner.item_vectors(self.text[items])
        return self.image_learner.item_vectors(self.image[items], self.image_mask[items])

    def learner_inputs(self, name: str, seq: torch.Tensor, id_table: torch.Tensor | None = None) -> Inputs:
        """Gamma part of a learner for item sequences (B, L): (x, valid, sims) for `learner.forward`.
        `id_table` replaces the ID table (generated rows for "forgotten" items in stages 2-3)."""
        valid = seq > 0
        if name == "id":
            table = self.item_emb.weight if id_table is None else id_table
            x, sims = self.id_learner.embed(
                table[seq], self.text[seq], self.image[seq], self.image_mask[seq], valid
            )
            return x, valid, sims
        if name == "text":
            return self.text_learner.embed(self.text[seq])[0], valid, None
        return self.image_learner.embed(self.image[seq], self.image_mask[seq])[0], valid, None

    def hidden(self, seq: torch.Tensor, id_table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, L) item sequences -> {learner: F^L (B, L, d)} at the global parameters."""
        out = {}
        for name in LEARNERS:
            x, valid, sims = self.learner_inputs(name, seq, id_table)
            out[name] = self.learner(name)(x, valid, sims)
        return out

    def item_tables(self, id_table: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{learner: (N+1, d) item vectors} of the three learners."""
        return {name: self.item_table(name, id_table) for name in LEARNERS}

    def fuse(
        self,
        hidden: dict[str, torch.Tensor],
        valid: torch.Tensor,
        id_table: torch.Tensor | None = None,
        tables: dict[str, torch.Tensor] | None = None,
        cooc: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Learners' last-layer sequences -> (fused (B, N+1), {learner: raw scores (B, N+1)}); column 0
        (pad) is -inf everywhere. `tables` (from `item_tables`) avoids recomputing the item vectors.
        `cooc` (B, N+1) co-occurrence scores: fused by `fusion_cooc` as a fourth learner instead."""
        tables = self.item_tables(id_table) if tables is None else tables
        scores = {}
        for name in LEARNERS:
            user = last_hidden(hidden[name], valid)
            raw = user @ tables[name].T
            scores[name] = torch.cat([torch.full_like(raw[:, :1], float("-inf")), raw[:, 1:]], dim=1)
        fusion = self.fusion if cooc is None else self.fusion_cooc
        weights = fusion.weights(hidden["id"], hidden["text"], hidden["image"], valid)
        parts = [scores[name] for name in LEARNERS] + ([] if cooc is None else [cooc])
        return fusion(parts, weights), scores

    # --- co-occurrence learner ---------------------------------------------------------------------
    @property
    def has_cooc(self) -> bool:
        return self.cfg.cooc_neighbours > 0

    @torch.no_grad()
    def set_cooc(self, items: np.ndarray, weights: np.ndarray) -> None:
        """Install a co-occurrence table ((N+1, M) items and weights, mml.cooc.CoocTable)."""
        if not self.has_cooc:
            raise ValueError("this model has no co-occurrence learner (model.cooc_neighbours = 0)")
        if items.shape != tuple(self.cooc_items.shape) or weights.shape != items.shape:
            raise ValueError(f"cooc table must be {tuple(self.cooc_items.shape)}, got {items.shape}")
        self.cooc_items.copy_(torch.as_tensor(np.asarray(items, dtype=np.int64)))
        self.cooc_weights.copy_(torch.as_tensor(np.asarray(weights, dtype=np.float32)))

    def cooc_scores(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded item sequences -> (B, N+1) co-occurrence scores (mml.cooc.dense_scores
        in torch; rows beyond the table count as no co-occurrence)."""
        valid = seq > 0
        recency = torch.cumsum(valid.float(), dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        weights = self.cooc_weights[seq] * (recency * valid).unsqueeze(-1)  # (B, L, M)
        out = torch.zeros(seq.shape[0], self.n_items + 1, device=seq.device)
        out.scatter_add_(1, self.cooc_items[seq].flatten(1), weights.flatten(1))
        out[:, 0] = 0.0
        return out

    def scores(self, seq: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, L) right-padded item sequences -> fused scores (B, N+1) and per-learner scores."""
        return self.fuse(self.hidden(seq), seq > 0)

    # --- generator --------------------------------------------------------------------------------
    def generate(self, items: torch.Tensor, id_table: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) item indices -> (n, d) generated ID embeddings from their neighbours (Eq. 15-17).
        The catalogue is projected once, then gathered."""
        table = self.item_emb.weight if id_table is None else id_table
        gen = self.generator
        proj_text = gen.text.project(self.text)
        proj_image = gen.image.project(self.image)
        nb = self.neighbours[items]  # (n, K)
        return gen.combine(
            proj_text[items], proj_image[items], self.image_mask[items],
            proj_text[nb], proj_image[nb], self.image_mask[nb], table[nb],
        )  # fmt: skip

    def new_items(self) -> torch.Tensor:
        return torch.arange(self.n_old_items + 1, self.n_items + 1, device=self.neighbours.device)

    @torch.no_grad()
    def fill_new_items(self) -> None:
        """Write generated ID embeddings into the rows of the new items (n_old_items+1..N): an explicit
        in-place write into the table, not a gradient path (done once, before stage 3 / evaluation)."""
        new = self.new_items()
        if len(new):
            self.item_emb.weight[new] = self.generate(new)

    def with_generated(self, forget: torch.Tensor, generated: torch.Tensor | None = None) -> torch.Tensor:
        """(N+1,) bool: a copy of the ID table whose `forget` rows are replaced by generated embeddings
        (differentiable w.r.t. the generator): simulated new items of stages 2-3. `generated` (N+1, d):
        embeddings generated beforehand for every row (a frozen generator)."""
        if generated is not None:
            return torch.where(forget.unsqueeze(-1), generated, self.item_emb.weight)
        items = forget.nonzero().squeeze(-1)
        return self.item_emb.weight.index_put((items,), self.generate(items))
