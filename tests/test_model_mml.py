"""MML over a catalogue: scores, export-friendly encoders, generated rows for new items."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.learners import last_hidden
from model.mml import LEARNERS, MML
from training.synthetic import synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = ModelConfig(d=16, d_ffn=32, max_len=10, n_neighbours=4)


@pytest.fixture(scope="module")
def model() -> MML:
    torch.manual_seed(0)
    split, feats = synthetic(n_items=40, n_old_items=32, n_old_users=4)
    return MML(CFG, split.n_old_items, feats.text, feats.image, feats.image_mask).eval()


def _seq() -> torch.Tensor:
    seq = torch.zeros(3, CFG.max_len, dtype=torch.long)
    seq[0, :4] = torch.tensor([3, 7, 35, 2])  # 35 is a new item
    seq[1, :] = torch.arange(1, 11)
    return seq  # row 2: all pad


def test_scores_shapes_pad_column_and_no_nan(model: MML):
    fused, per_learner = model.scores(_seq())
    assert fused.shape == (3, model.n_items + 1)
    for scores in (fused, *per_learner.values()):
        assert torch.isneginf(scores[:, 0]).all()
        assert torch.isfinite(scores[:, 1:]).all()


def test_encode_interfaces_equal_the_catalogue_path(model: MML):
    seq = _seq()
    valid = seq > 0
    hidden = model.hidden(seq)
    text, image, mask = model.text[seq], model.image[seq], model.image_mask[seq]
    encoded = {
        "id": model.id_learner.encode(model.item_emb(seq), text, image, mask, valid),
        "text": model.text_learner.encode(text, valid),
        "image": model.image_learner.encode(image, mask, valid),
    }
    _, per_learner = model.scores(seq)
    for name in LEARNERS:
        assert torch.allclose(encoded[name], hidden[name], atol=1e-6), name
        user = last_hidden(encoded[name], valid)
        assert torch.allclose(user @ model.item_table(name)[1:].T, per_learner[name][:, 1:], atol=1e-5), name


def test_item_vectors_score_any_item_with_features(model: MML):
    new = torch.arange(model.n_old_items + 1, model.n_items + 1)
    text_vectors = model.text_learner.item_vectors(model.text[new])
    assert torch.allclose(text_vectors, model.item_table("text")[new])
    missing = ~model.image_mask
    vectors = model.image_learner.item_vectors(model.image, model.image_mask)
    assert torch.allclose(
        vectors[missing], model.image_learner.embedding.missing.expand(int(missing.sum()), -1)
    )


def test_fill_new_items_writes_generated_rows_only(model: MML):
    model = MML(CFG, model.n_old_items, model.text, model.image, model.image_mask, model.neighbours).eval()
    before = model.item_emb.weight.detach().clone()
    model.fill_new_items()
    after = model.item_emb.weight.detach()
    old = slice(0, model.n_old_items + 1)
    assert torch.equal(before[old], after[old])
    new = model.new_items()
    assert torch.allclose(after[new], model.generate(new).detach())
    model.fill_new_items()  # idempotent: neighbours are old items only
    assert torch.allclose(model.item_emb.weight.detach(), after)


def test_with_generated_replaces_rows_and_trains_only_the_generator(model: MML):
    forget = torch.zeros(model.n_items + 1, dtype=torch.bool)
    forget[[2, 5]] = True
    model.zero_grad(set_to_none=True)
    table = model.with_generated(forget)
    assert torch.equal(table[~forget], model.item_emb.weight[~forget])
    assert torch.allclose(table[forget], model.generate(torch.tensor([2, 5])))
    table[forget].sum().backward()
    assert model.generator.text.project.weight.grad is not None
    assert model.item_emb.weight.grad is None or (model.item_emb.weight.grad[forget] == 0).all()


def test_bad_features_are_refused():
    split, feats = synthetic(n_items=20, n_old_items=15, n_old_users=2)
    with pytest.raises(ValueError, match="text features"):
        MML(CFG, 15, feats.text[:, :10], feats.image, feats.image_mask)
    with pytest.raises(ValueError, match="n_old_items"):
        MML(CFG, 21, feats.text, feats.image, feats.image_mask)  # 21 rows = pad + 20 items
