"""Feature-aware self-attention (Eq. 1-4) and the learners' masking: bias trains, masks never leak,
no NaN on an all-pad row."""

from __future__ import annotations

import pytest
import torch

from model.attention import MASK_VALUE, attention_mask
from model.config import ModelConfig
from model.learners import IDLearner, ImageLearner, TextLearner, last_hidden

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = ModelConfig(d=16, n_heads=2, d_ffn=32, max_len=8, text_dim=12, image_dim=10, feature_sim_dim=8)


def _inputs(batch: int = 3, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, CFG.d, generator=g)
    text = torch.nn.functional.normalize(torch.randn(batch, length, CFG.text_dim, generator=g), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(batch, length, CFG.image_dim, generator=g), dim=-1)
    image_mask = torch.ones(batch, length, dtype=torch.bool)
    image_mask[0, 2] = False
    image[0, 2] = 0.0
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, 5:] = False  # right-padded row
    return emb, text, image, image_mask, valid


def test_attention_mask_is_causal_and_hides_padding():
    valid = torch.tensor([[True, True, False]])
    mask = attention_mask(valid)[0, 0]
    assert mask.shape == (3, 3)
    allowed = mask == 0
    assert allowed.tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    assert (mask[~allowed] == MASK_VALUE).all()


def test_feature_bias_receives_gradient_and_changes_attention():
    torch.manual_seed(0)
    learner = IDLearner(CFG).eval()
    emb, text, image, image_mask, valid = _inputs()
    hidden = learner.encode(emb, text, image, image_mask, valid)
    hidden.square().sum().backward()
    attention = learner.encoder.blocks[0].attention
    for param in (
        attention.w_text,
        attention.w_image,
        learner.embedding.text.weight,
        learner.embedding.image.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0, (
            "the feature-aware bias must be trainable"
        )

    x, sims = learner.embed(emb, text, image, image_mask, valid)
    mask = attention_mask(valid)
    with_bias = attention.attention_probs(x, mask, sims)
    with torch.no_grad():
        attention.w_text.mul_(3.0)
    changed = attention.attention_probs(x, mask, sims)
    assert not torch.allclose(with_bias, changed, atol=1e-6)


def test_missing_poster_contributes_no_image_similarity():
    learner = IDLearner(CFG)
    emb, text, image, image_mask, valid = _inputs()
    _, (s_text, s_image) = learner.embed(emb, text, image, image_mask, valid)
    assert (s_image[0, 2, :] == 0).all() and (s_image[0, :, 2] == 0).all()
    assert s_text[0, 2, 2] > 0.99  # cosine with itself
    assert (s_image[1, 5:, :] == 0).all() and (s_text[1, :, 5:] == 0).all()  # pads


def _encoders():
    torch.manual_seed(0)
    id_learner, text_learner, image_learner = (
        IDLearner(CFG).eval(),
        TextLearner(CFG).eval(),
        ImageLearner(CFG).eval(),
    )
    return {
        "id": lambda e, t, i, m, v: id_learner.encode(e, t, i, m, v),
        "text": lambda e, t, i, m, v: text_learner.encode(t, v),
        "image": lambda e, t, i, m, v: image_learner.encode(i, m, v),
    }


def test_a_future_item_never_changes_an_earlier_position():
    for name, encode in _encoders().items():
        emb, text, image, image_mask, valid = _inputs()
        before = encode(emb, text, image, image_mask, valid)
        emb2, text2, image2 = emb.clone(), text.clone(), image.clone()
        emb2[:, 4] += 1.0
        text2[:, 4] = text2[:, 6]
        image2[:, 4] = image2[:, 6]
        after = encode(emb2, text2, image2, image_mask, valid)
        assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6), name
        assert not torch.allclose(before[:, 4:], after[:, 4:], atol=1e-6), name


def test_padding_content_never_changes_valid_positions():
    for name, encode in _encoders().items():
        emb, text, image, image_mask, valid = _inputs()
        before = encode(emb, text, image, image_mask, valid)
        emb[1, 5:] = 7.0
        text[1, 5:] = 0.3
        after = encode(emb, text, image, image_mask, valid)
        assert torch.allclose(before[1, :5], after[1, :5], atol=1e-6), name


def test_no_nan_on_an_all_pad_row():
    for name, encode in _encoders().items():
        emb, text, image, image_mask, valid = _inputs()
        valid[2] = False
        emb[2], text[2], image[2], image_mask[2] = 0.0, 0.0, 0.0, False
        hidden = encode(emb, text, image, image_mask, valid)
        assert torch.isfinite(hidden).all(), name
        assert torch.isfinite(last_hidden(hidden, valid)).all(), name


def test_last_hidden_reads_position_len_minus_one():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    valid = torch.tensor([[True, True, True, False], [False, False, False, False]])
    assert last_hidden(hidden, valid).squeeze(-1).tolist() == [2.0, 4.0]
