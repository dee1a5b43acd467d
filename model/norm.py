"""LayerNorm (used by every block, Eq. 1-6, and the fusion layer, Eq. 10)."""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension from primitive ops. Same parameters and maths as
    nn.LayerNorm, but torch's fused layer_norm has a wrong second-order gradient under vmap with
    per-task (batched) weights (functorch issue #534, still wrong in torch 2.13: measured 40% error),
    which second-order MAML needs; tests/test_train_maml.py checks it against a per-task loop."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
