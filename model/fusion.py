"""Multimodal prediction fusion (paper Sec. 4.2.3, Eq. 9-13).

    P'_m = LN_items(s_m)           Eq. 9: LayerNorm of learner m's score vector over the catalogue
                                    items 1..N (pad excluded), SCALAR affine (gamma_m, beta_m) per learner
    F_m  = LN(flatten(F^L_m))      Eq. 10: LayerNorm of m's last-layer sequence (pads zeroed, max_len*d)
    A    = softmax_m(ReLU(F_m W + b) W_att + b_att)      Eq. 11-12 (W, b, W_att, b_att shared by m)
    p    = sum_m A_m P'_m          Eq. 13

With the co-occurrence learner (mml/cooc.py; beyond the paper, docs/model.md) a fourth score vector
c joins the sum: its weight A_c comes from the same MLP's hidden layer (a logit of its own, one more
softmax entry), and its Eq. 9 affine is gamma_c = exp(theta_c) > 0 with no bias, so the fused score
is increasing in c: an item without co-occurrence keeps the dense part's ranking, which makes the
service's union of dense top-k and co-occurrence candidates exact.

The reference uses LayerNorm(n_items) (a learned weight per item), which cannot score an item that
was not in the catalogue at training time; scalar affine parameters can.

Closed form (for export): s_m = V_m h_m is linear in the user vector h_m, so with the catalogue
statistics mu_m = mean_i V_m[i] and C_m = Cov_i(V_m[i]) (population, items 1..N):
    mean_i s_m = mu_m . h_m,   var_i s_m = h_m^T C_m h_m,   sigma_m = sqrt(var + eps)
    p = [V_id | V_te | V_im] @ q + c,  q_m = A_m gamma_m / sigma_m h_m,
                                      c = sum_m A_m (beta_m - gamma_m mu_m . h_m / sigma_m)
`catalogue_moments` and `closed_form` compute it; tests check it equals the direct computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import init_weights
from model.config import ModelConfig
from model.norm import LayerNorm

N_LEARNERS = 3  # id, text, image


class Fusion(nn.Module):
    def __init__(self, cfg: ModelConfig, cooc: bool = False):
        super().__init__()
        self.cfg = cfg
        self.cooc = cooc
        self.score_weight = nn.Parameter(torch.ones(N_LEARNERS))  # gamma_m, Eq. 9
        self.score_bias = nn.Parameter(torch.zeros(N_LEARNERS))  # beta_m, Eq. 9
        self.sequence_norm = LayerNorm(cfg.max_len * cfg.d, eps=cfg.ln_eps)  # Eq. 10
        self.project = nn.Linear(cfg.max_len * cfg.d, cfg.fusion_hidden)  # W, b, Eq. 11
        self.attend = nn.Linear(cfg.fusion_hidden, 1)  # W_att, b_att, Eq. 12
        if cooc:
            self.cooc_attend = nn.Linear(cfg.fusion_hidden, 1)  # A_c's logit from the mean hidden layer
            self.cooc_scale = nn.Parameter(torch.zeros(()))  # log gamma_c
        init_weights(self, cfg.init_std)

    def weights(
        self, hidden_id: torch.Tensor, hidden_te: torch.Tensor, hidden_im: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 10-12: three (B, L, d) last-layer sequences, valid (B, L) -> A (B, 3), or (B, 4) with
        the co-occurrence learner last."""
        seqs = torch.stack([hidden_id, hidden_te, hidden_im], dim=1) * valid[:, None, :, None]
        missing = self.cfg.max_len - seqs.shape[2]
        if missing < 0:
            raise ValueError(f"sequence length {seqs.shape[2]} exceeds max_len={self.cfg.max_len}")
        seqs = F.pad(seqs, (0, 0, 0, missing))  # right-pad to max_len (zeros, like pads)
        flat = self.sequence_norm(seqs.flatten(start_dim=2))  # (B, 3, max_len*d)
        hidden = torch.relu(self.project(flat))  # (B, 3, fusion_hidden)
        logits = self.attend(hidden).squeeze(-1)  # (B, 3)
        if self.cooc:
            logits = torch.cat([logits, self.cooc_attend(hidden.mean(dim=1))], dim=-1)
        return torch.softmax(logits, dim=-1)

    def cooc_gamma(self) -> torch.Tensor:
        return torch.exp(self.cooc_scale)

    def _normalise_items(self, scores: torch.Tensor, learner: int) -> torch.Tensor:
        items = scores[:, 1:]
        mean = items.mean(dim=-1, keepdim=True)
        var = items.var(dim=-1, unbiased=False, keepdim=True)
        normed = (items - mean) / torch.sqrt(var + self.cfg.ln_eps)
        return normed * self.score_weight[learner] + self.score_bias[learner]

    def normalise(self, scores: torch.Tensor, learner: int) -> torch.Tensor:
        """Eq. 9 for learner m: (B, N+1) scores -> LayerNorm over columns 1..N; column 0 (pad) = -inf."""
        return F.pad(self._normalise_items(scores, learner), (1, 0), value=float("-inf"))

    def forward(
        self, scores: list[torch.Tensor] | tuple[torch.Tensor, ...], weights: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 13: three (B, N+1) score matrices (id, text, image) and A (B, 3) -> fused (B, N+1);
        with the co-occurrence learner, four matrices (its scores last) and A (B, 4)."""
        expected = N_LEARNERS + int(self.cooc)
        if len(scores) != expected or weights.shape[-1] != expected:
            raise ValueError(f"this fusion needs {expected} score matrices and weights, got {len(scores)}")
        fused = sum(weights[:, m : m + 1] * self._normalise_items(s, m) for m, s in enumerate(scores[:3]))
        if self.cooc:
            items = scores[3][:, 1:]
            mean = items.mean(dim=-1, keepdim=True)
            var = items.var(dim=-1, unbiased=False, keepdim=True)
            normed = (items - mean) / torch.sqrt(var + self.cfg.ln_eps)
            fused = fused + weights[:, 3:4] * self.cooc_gamma() * normed
        return F.pad(fused, (1, 0), value=float("-inf"))


def catalogue_moments(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N+1, d) item vectors (row 0 = pad) -> mean (d,) and population covariance (d, d) of rows 1..N."""
    items = table[1:]
    mean = items.mean(dim=0)
    centred = items - mean
    return mean, centred.T @ centred / items.shape[0]


def closed_form(
    fusion: Fusion,
    users: list[torch.Tensor],
    weights: torch.Tensor,
    moments: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """users: three (B, d) user vectors h_m; weights A (B, 3); moments per learner ->
    q (B, 3d) and c (B,) with fused[:, 1:] = [V_id | V_te | V_im][1:] @ q^T + c."""
    qs, c = [], torch.zeros(weights.shape[0], dtype=weights.dtype, device=weights.device)
    for m, (h, (mean, cov)) in enumerate(zip(users, moments, strict=True)):
        mu = h @ mean  # (B,)
        var = ((h @ cov) * h).sum(dim=-1).clamp(min=0.0)
        sigma = torch.sqrt(var + fusion.cfg.ln_eps)
        scale = weights[:, m] * fusion.score_weight[m] / sigma
        qs.append(scale.unsqueeze(-1) * h)
        c = c + weights[:, m] * fusion.score_bias[m] - scale * mu
    return torch.cat(qs, dim=-1), c
