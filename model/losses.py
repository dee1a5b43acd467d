"""Recommendation losses over the positions of a causal pass, averaged over the masked positions.

BPR (paper Sec. 4.4.2, Rendle et al. 2009): -log sigmoid(s_pos - s_neg), one uniform negative per
positive. The reference (RecBole) writes -log(1e-10 + sigmoid(.)); logsigmoid is the same function
without the underflow floor. CE: full-softmax cross-entropy over the candidate items 1..C.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.attention import MASK_VALUE


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def bpr(hidden: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden, pos, neg (..., d) user / positive / negative vectors; mask (...) -> mean BPR loss."""
    diff = (hidden * pos).sum(-1) - (hidden * neg).sum(-1)
    return masked_mean(-F.logsigmoid(diff), mask)


def softmax_ce(
    hidden: torch.Tensor, table: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """hidden (..., d); table (C+1, d) candidate vectors (row 0 = pad, never a candidate);
    target (...) in 1..C; mask (...) -> mean cross-entropy over the C candidates."""
    logits = hidden @ table.T
    pad = torch.zeros_like(logits[..., :1]) + MASK_VALUE
    logits = torch.cat([pad, logits[..., 1:]], dim=-1)
    losses = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    return masked_mean(losses, mask)


def sequence_loss(
    kind: str,
    hidden: torch.Tensor,
    table: torch.Tensor,
    target: torch.Tensor,
    negative: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """The loss of one causal pass: hidden (..., L, d); table (C+1, d) candidates (rows 0..C);
    target / negative / mask (..., L)."""
    if kind == "bpr":
        return bpr(hidden, table[target], table[negative], mask)
    if kind == "ce":
        return softmax_ce(hidden, table, target, mask)
    raise ValueError(f"loss must be 'bpr' or 'ce', got {kind!r}")
