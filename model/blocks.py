"""Transformer blocks: self-attention (Eq. 1-4) + point-wise feed-forward network (Eq. 5-6), post-LN
as SASRec / RecBole, stacked L times."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import SelfAttention
from model.config import ModelConfig
from model.dropout import Dropout
from model.norm import LayerNorm


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2 applied at every position (Eq. 5-6), then dropout, residual and
    LayerNorm. Eq. 6 writes ReLU and W1 in d x d; we follow the reference: GELU, inner size d_ffn."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner = nn.Linear(cfg.d, cfg.d_ffn)  # W1, b1
        self.outer = nn.Linear(cfg.d_ffn, cfg.d)  # W2, b2
        self.activation = F.gelu if cfg.activation == "gelu" else F.relu
        self.dropout = Dropout(cfg.dropout_hidden)
        self.norm = LayerNorm(cfg.d, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.outer(self.activation(self.inner(x)))) + x)


class Block(nn.Module):
    """One self-attention block: F^{l+1} = FFN(SelfAttention(F^l))."""

    def __init__(self, cfg: ModelConfig, feature_bias: bool):
        super().__init__()
        self.attention = SelfAttention(cfg, feature_bias)
        self.ffn = FeedForward(cfg)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, sims: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        return self.ffn(self.attention(x, mask, sims))


class Encoder(nn.Module):
    """Position embedding + LayerNorm + dropout on the input embeddings, then L blocks (F^0 .. F^L)."""

    def __init__(self, cfg: ModelConfig, feature_bias: bool):
        super().__init__()
        self.position = nn.Embedding(cfg.max_len, cfg.d)
        self.norm = LayerNorm(cfg.d, eps=cfg.ln_eps)
        self.dropout = Dropout(cfg.dropout_hidden)
        self.blocks = nn.ModuleList(Block(cfg, feature_bias) for _ in range(cfg.n_layers))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        sims: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, L, d) input embeddings; mask (B, 1, L, L) additive -> F^L (B, L, d)."""
        x = self.dropout(self.norm(x + self.position.weight[: x.shape[-2]]))
        for block in self.blocks:
            x = block(x, mask, sims)
        return x


def init_weights(module: nn.Module, std: float) -> None:
    """The reference (RecBole) init: Linear/Embedding ~ N(0, std), biases 0, LayerNorm (1, 0)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
        elif isinstance(sub, LayerNorm | nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
