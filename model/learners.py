"""The three meta-learners of the multimodal meta-learner group (paper Sec. 4.2.1-4.2.2).

Every learner splits into the two parameter groups of Sec. 4.4.2:
  Gamma = the embedding layer: `self.embedding` (feature projections; for the ID learner the ID
          table M_id lives in `model.mml.MML` and is passed in as per-position vectors);
  Theta = everything in `forward`: position embedding, LayerNorms, attention blocks and, for the
          ID learner, the feature-bias weights W_te, W_im.  MAML's local update touches Theta only.

`embed(...)` runs Gamma, `forward(x, valid, sims)` runs Theta, and `encode(...)` = both. `encode`
takes per-position tensors only (no gather from a catalogue-sized table inside), so an exported
graph scores items it never saw in training. Sequences are right-padded (pad id 0); the user
representation is the hidden state at position len-1 (`last_hidden`).
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import FeatureSimilarity, attention_mask
from model.blocks import Encoder, init_weights
from model.config import ModelConfig

GAMMA_PREFIX = "embedding."  # parameter-name prefix of the embedding layer Gamma in every learner


def last_hidden(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L, d), (B, L) right-padded valid mask -> (B, d) hidden state at position len-1 (position 0
    for an all-pad row, which is finite but meaningless)."""
    last = (valid.sum(dim=-1) - 1).clamp(min=0)
    return hidden.gather(-2, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(-2)


class Learner(nn.Module):
    """Shared Theta part: SASRec encoder over per-position input vectors."""

    def __init__(self, cfg: ModelConfig, feature_bias: bool):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, feature_bias)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, sims: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Theta: x (B, L, d) input vectors, valid (B, L) bool -> F^L (B, L, d)."""
        return self.encoder(x, attention_mask(valid), sims)

    def theta_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if not name.startswith(GAMMA_PREFIX)]

    def gamma_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if name.startswith(GAMMA_PREFIX)]


class IDLearner(Learner):
    """Main meta-learner: SASRec over item-ID embeddings with feature-aware self-attention (Eq. 1-8).
    Prediction (Eq. 7-8): p_i = e_id_i . F^L[len-1], with the tied ID table of `MML`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, feature_bias=cfg.feature_bias)
        self.embedding = FeatureSimilarity(cfg) if cfg.feature_bias else None  # P_te, P_im (Gamma)
        init_weights(self, cfg.init_std)

    def embed(
        self,
        item_emb: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Gamma: (ID vectors, (S_te, S_im)) for `forward`."""
        sims = self.embedding(text, image, image_mask, valid) if self.embedding is not None else None
        return item_emb, sims

    def encode(
        self,
        item_emb: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """item_emb (B,L,d), text (B,L,Dt), image (B,L,Di), image_mask (B,L), valid (B,L) -> (B,L,d)."""
        x, sims = self.embed(item_emb, text, image, image_mask, valid)
        return self(x, valid, sims)


class TextLearner(Learner):
    """Auxiliary text learner: vanilla self-attention over projected text features; items are scored
    against the same projection (tied input/output), so any item with a text is scorable."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, feature_bias=False)
        self.embedding = nn.Linear(cfg.text_dim, cfg.d)  # Gamma of the text learner
        init_weights(self, cfg.init_std)

    def item_vectors(self, text: torch.Tensor) -> torch.Tensor:
        """(..., Dt) text features -> (..., d) item vectors (input and output side)."""
        return self.embedding(text)

    def embed(self, text: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.item_vectors(text), None

    def encode(self, text: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """text (B,L,Dt), valid (B,L) -> (B,L,d)."""
        return self(self.item_vectors(text), valid)


class ImageEmbedding(nn.Module):
    """Projection of image features; an item without a poster gets a learned "missing image" vector
    (never the projection of the zero row)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.project = nn.Linear(cfg.image_dim, cfg.d)
        self.missing = nn.Parameter(torch.zeros(cfg.d))

    def forward(self, image: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        return torch.where(image_mask.unsqueeze(-1), self.project(image), self.missing)


class ImageLearner(Learner):
    """Auxiliary image learner: vanilla self-attention over projected poster features; tied scoring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, feature_bias=False)
        self.embedding = ImageEmbedding(cfg)  # Gamma of the image learner
        init_weights(self, cfg.init_std)
        nn.init.normal_(self.embedding.missing, mean=0.0, std=cfg.init_std)

    def item_vectors(self, image: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """(..., Di) image features, (...) bool has-poster mask -> (..., d) item vectors."""
        return self.embedding(image, image_mask)

    def embed(self, image: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.item_vectors(image, image_mask), None

    def encode(self, image: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """image (B,L,Di), image_mask (B,L) bool, valid (B,L) -> (B,L,d)."""
        return self(self.item_vectors(image, image_mask), valid)
