"""Cold-start item embedding generator (paper Sec. 4.3, Eq. 15-17). The K neighbours of Eq. 14 are
searched outside (mml/neighbours.py) and passed in.

Our reading (docs/model.md): Eq. 16 sums projected neighbour *side information*, which transfers
nothing learned from the old items' IDs. The issue asks that the generator carry the neighbours'
trained ID embeddings, so the attention of Eq. 15 keys on side information and its values are the
neighbours' ID embeddings:

    a^m_o = softmax_o( W_1^m [Y^m e^m_z || Y^m e^m_o] )                        (Eq. 15)
    g^m_z = ReLU( Y^m e^m_z + sum_o a^m_o e^id_o )                              (Eq. 16, values = IDs)
    e^id_z = mean over the modalities z has of g^m_z                            (Eq. 17)

Missing poster: for z, the image modality drops out of the mean; a neighbour without a poster gets
no image attention (if no neighbour has one, the image modality's neighbour sum is empty).
Note: W_1 [u_z || u_o] = w_a.u_z + w_b.u_o and the u_z term is the same for every o, so it cancels in
the softmax: as written in the paper the weights depend on z only through which neighbours it has.
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import MASK_VALUE
from model.blocks import init_weights
from model.config import ModelConfig


class ModalityAttention(nn.Module):
    """One modality m: Y^m, W_1^m and Eq. 15-16."""

    def __init__(self, cfg: ModelConfig, feature_dim: int):
        super().__init__()
        self.project = nn.Linear(feature_dim, cfg.d)  # Y^m
        self.score = nn.Linear(2 * cfg.d, 1)  # W_1^m
        self.relu = cfg.generator_activation == "relu"

    def combine(
        self, z: torch.Tensor, neighbours: torch.Tensor, nb_mask: torch.Tensor, nb_id: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 15-16 on projected features: z (B,d) = Y e_z, neighbours (B,K,d) = Y e_o, nb_mask (B,K),
        nb_id (B,K,d) -> g_z (B,d)."""
        keys = torch.cat([z.unsqueeze(1).expand_as(neighbours), neighbours], dim=-1)
        logits = self.score(keys).squeeze(-1)  # (B, K)
        logits = torch.where(nb_mask, logits, torch.full_like(logits, MASK_VALUE))
        weights = torch.softmax(logits, dim=-1) * nb_mask  # exact zeros for masked neighbours
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        out = z + (weights.unsqueeze(-1) * nb_id).sum(dim=1)
        return torch.relu(out) if self.relu else out


class Generator(nn.Module):
    """e^id_z from z's text/image features and its K old neighbours (features + ID embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.text = ModalityAttention(cfg, cfg.text_dim)
        self.image = ModalityAttention(cfg, cfg.image_dim)
        init_weights(self, cfg.init_std)

    def combine(
        self,
        z_text: torch.Tensor,
        z_image: torch.Tensor,
        z_mask: torch.Tensor,
        nb_text: torch.Tensor,
        nb_image: torch.Tensor,
        nb_mask: torch.Tensor,
        nb_id: torch.Tensor,
    ) -> torch.Tensor:
        """Eq. 15-17 on *projected* features (B,d)/(B,K,d): lets training project a catalogue once."""
        all_neighbours = torch.ones_like(nb_mask)
        g_text = self.text.combine(z_text, nb_text, all_neighbours, nb_id)
        g_image = self.image.combine(z_image, nb_image, nb_mask, nb_id)
        has_image = z_mask.unsqueeze(-1).to(g_text.dtype)
        return (g_text + has_image * g_image) / (1.0 + has_image)  # Eq. 17

    def forward(
        self,
        z_text: torch.Tensor,
        z_image: torch.Tensor,
        z_mask: torch.Tensor,
        nb_text: torch.Tensor,
        nb_image: torch.Tensor,
        nb_mask: torch.Tensor,
        nb_id: torch.Tensor,
    ) -> torch.Tensor:
        """z_text (B,Dt), z_image (B,Di), z_mask (B,) bool has-poster, nb_text (B,K,Dt),
        nb_image (B,K,Di), nb_mask (B,K) bool neighbour-has-poster, nb_id (B,K,d) -> e^id_z (B,d)."""
        return self.combine(
            self.text.project(z_text),
            self.image.project(z_image),
            z_mask,
            self.text.project(nb_text),
            self.image.project(nb_image),
            nb_mask,
            nb_id,
        )
