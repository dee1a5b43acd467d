"""Feature-aware multi-head self-attention (paper Eq. 1-4) and the masks every learner uses.

Our reading of Eq. 2-3 (the paper's dimensions do not compose; see docs/model.md):

    S_te = cos(P_te x_te_i, P_te x_te_j)          (n x n)  learned projection P_te, then cosine
    S_im = cos(P_im x_im_i, P_im x_im_j)          (n x n)  0 for a pair that involves a missing poster
    B^{l,h} = S_te * W_te^{l,h} + S_im * W_im^{l,h}        W^{l,h}: learned position-pair weights (n x n)
    head_h  = softmax((Q_h K_h^T + B^{l,h}) / sqrt(d/h) + mask) V_h

P_te, P_im belong to the embedding layer Gamma (not updated in MAML's local step); W_te, W_im belong
to Theta. Nothing here is detached: the bias is trained end to end (the reference code detaches it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.dropout import Dropout
from model.norm import LayerNorm

# Additive attention mask value. A large finite negative instead of -inf: a fully masked row (an
# all-pad sequence) then gives a uniform softmax instead of NaN, in PyTorch and in ONNX Runtime.
MASK_VALUE = -1e9


def attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, L) bool valid positions -> (B, 1, L, L) additive mask: query i may see key j iff j <= i and
    j is valid (causal + key padding, as RecBole's SASRec)."""
    length = valid.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    allowed = causal.unsqueeze(0) & valid.unsqueeze(1)  # (B, L_query, L_key)
    zero = torch.zeros((), dtype=torch.float32, device=valid.device)
    return torch.where(allowed, zero, torch.full_like(zero, MASK_VALUE)).unsqueeze(1)


class FeatureSimilarity(nn.Module):
    """S_te, S_im of Eq. 3: cosine similarity of every pair of items in the sequence, computed from
    learned projections of their (L2-normalised) text and image features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.text = nn.Linear(cfg.text_dim, cfg.feature_sim_dim, bias=False)  # P_te
        self.image = nn.Linear(cfg.image_dim, cfg.feature_sim_dim, bias=False)  # P_im

    def forward(
        self, text: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B,L,Dt), image (B,L,Di), image_mask (B,L) bool, valid (B,L) bool -> S_te, S_im (B,L,L)."""
        te = F.normalize(self.text(text), dim=-1) * valid.unsqueeze(-1)  # pads -> 0 rows
        im = F.normalize(self.image(image), dim=-1) * (image_mask & valid).unsqueeze(-1)  # no poster -> 0
        return te @ te.transpose(-1, -2), im @ im.transpose(-1, -2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an optional feature-aware bias (Eq. 1, 2, 4), followed, as in
    SASRec/RecBole, by output dropout, a residual connection and LayerNorm."""

    def __init__(self, cfg: ModelConfig, feature_bias: bool):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d // cfg.n_heads
        self.query = nn.Linear(cfg.d, cfg.d)  # W^Q_i of all heads
        self.key = nn.Linear(cfg.d, cfg.d)  # W^K_i
        self.value = nn.Linear(cfg.d, cfg.d)  # W^V_i
        self.out = nn.Linear(cfg.d, cfg.d)  # W^O, Eq. 1
        self.attn_dropout = Dropout(cfg.dropout_attn)
        self.out_dropout = Dropout(cfg.dropout_hidden)
        self.norm = LayerNorm(cfg.d, eps=cfg.ln_eps)
        self.feature_bias = feature_bias
        if feature_bias:  # W_te^h, W_im^h of Eq. 3: one position-pair weight matrix per head
            shape = (cfg.n_heads, cfg.max_len, cfg.max_len)
            self.w_text = nn.Parameter(torch.full(shape, cfg.feature_bias_init))
            self.w_image = nn.Parameter(torch.full(shape, cfg.feature_bias_init))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d/h)

    def attention_probs(
        self, x: torch.Tensor, mask: torch.Tensor, sims: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """(B, h, L, L) attention probabilities before dropout (Eq. 4)."""
        q, k = self._heads(self.query(x)), self._heads(self.key(x))
        logits = q @ k.transpose(-1, -2)  # Q K^T
        if self.feature_bias:
            if sims is None:
                raise ValueError("feature-aware attention needs the similarity matrices (S_te, S_im)")
            length = x.shape[1]
            s_text, s_image = sims
            bias = s_text.unsqueeze(1) * self.w_text[:, :length, :length]  # Eq. 3
            bias = bias + s_image.unsqueeze(1) * self.w_image[:, :length, :length]
            logits = logits + bias
        return torch.softmax(logits / math.sqrt(self.head_dim) + mask, dim=-1)  # Eq. 4

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, sims: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        probs = self.attn_dropout(self.attention_probs(x, mask, sims))
        heads = probs @ self._heads(self.value(x))  # head_i, Eq. 2
        batch, _, length, _ = heads.shape
        merged = heads.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.norm(self.out_dropout(self.out(merged)) + x)  # Eq. 1 (+ residual, LayerNorm)
