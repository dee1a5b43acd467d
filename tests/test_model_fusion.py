"""Fusion (Eq. 9-13): attention weights, scalar LayerNorm over the catalogue, the closed form."""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.fusion import Fusion, catalogue_moments, closed_form

CFG = ModelConfig(d=8, max_len=6, fusion_hidden=5)


def _fusion() -> Fusion:
    torch.manual_seed(0)
    fusion = Fusion(CFG)
    with torch.no_grad():
        fusion.score_weight.copy_(torch.tensor([1.5, 0.7, 2.0]))
        fusion.score_bias.copy_(torch.tensor([0.1, -0.3, 0.2]))
        fusion.attend.weight.normal_(0.0, 1.0)
    return fusion


def _hidden(batch: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, CFG.d, generator=g) for _ in range(3)]


def test_weights_are_a_distribution_and_ignore_padding():
    fusion = _fusion()
    hidden = _hidden(4, 6, 0)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[1, 3:] = False
    weights = fusion.weights(*hidden, valid)
    assert weights.shape == (4, 3)
    assert torch.allclose(weights.sum(-1), torch.ones(4))
    assert not torch.allclose(weights[0], weights[2])  # per user, not a global constant
    changed = [h.clone() for h in hidden]
    for h in changed:
        h[1, 3:] = 9.0
    assert torch.allclose(fusion.weights(*changed, valid), weights)
    short = fusion.weights(*(h[:, :4] for h in hidden), valid[:, :4])  # shorter than max_len: zero-padded
    assert short.shape == (4, 3)


def test_closed_form_equals_layer_norm_over_the_catalogue():
    torch.manual_seed(1)
    fusion = _fusion().double()
    n_items, batch = 50, 4
    tables = [torch.randn(n_items + 1, CFG.d, dtype=torch.float64) for _ in range(3)]
    users = [torch.randn(batch, CFG.d, dtype=torch.float64) for _ in range(3)]
    weights = torch.softmax(torch.randn(batch, 3, dtype=torch.float64), dim=-1)
    scores = [u @ t.T for u, t in zip(users, tables, strict=True)]
    direct = fusion(scores, weights)
    assert torch.isinf(direct[:, 0]).all() and (direct[:, 0] < 0).all()

    q, c = closed_form(fusion, users, weights, [catalogue_moments(t) for t in tables])
    stacked = torch.cat(tables, dim=-1)  # [V_id | V_te | V_im]
    fused = stacked[1:] @ q.T + c
    assert torch.allclose(fused.T, direct[:, 1:], atol=1e-9)

    # the same with torch's own LayerNorm (no affine) as an independent reference
    reference = sum(
        weights[:, m : m + 1]
        * (
            torch.nn.functional.layer_norm(s[:, 1:], (n_items,), eps=CFG.ln_eps) * fusion.score_weight[m]
            + fusion.score_bias[m]
        )
        for m, s in enumerate(scores)
    )
    assert torch.allclose(direct[:, 1:], reference, atol=1e-9)


def test_fusion_parameters_do_not_depend_on_the_catalogue():
    fusion = _fusion()
    shapes = {name: tuple(p.shape) for name, p in fusion.named_parameters()}
    assert shapes["score_weight"] == (3,) and shapes["score_bias"] == (3,)
    weights = torch.full((2, 3), 1 / 3)
    for n_items in (10, 1000):  # the same layer scores catalogues of any size (new items included)
        scores = [torch.randn(2, n_items + 1) for _ in range(3)]
        assert fusion(scores, weights).shape == (2, n_items + 1)
