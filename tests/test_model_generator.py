"""Cold-start generator (Eq. 15-17): uses its neighbours' IDs and features, ignores a missing modality."""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.generator import Generator

CFG = ModelConfig(d=8, text_dim=6, image_dim=5, n_neighbours=3, generator_activation="none")


def _inputs(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = CFG.n_neighbours
    return {
        "z_text": torch.randn(batch, CFG.text_dim, generator=g),
        "z_image": torch.randn(batch, CFG.image_dim, generator=g),
        "z_mask": torch.ones(batch, dtype=torch.bool),
        "nb_text": torch.randn(batch, k, CFG.text_dim, generator=g),
        "nb_image": torch.randn(batch, k, CFG.image_dim, generator=g),
        "nb_mask": torch.ones(batch, k, dtype=torch.bool),
        "nb_id": torch.randn(batch, k, CFG.d, generator=g),
    }


def _generator(activation: str = "none") -> Generator:
    torch.manual_seed(0)
    gen = Generator(CFG.model_copy(update={"generator_activation": activation}))
    with torch.no_grad():  # larger attention weights than the 0.02 init, so neighbours differ clearly
        for module in (gen.text.score, gen.image.score):
            module.weight.normal_(0.0, 1.0)
    return gen


def test_output_depends_on_the_neighbours_ids_and_features():
    gen = _generator()
    x = _inputs()
    base = gen(**x)
    assert base.shape == (4, CFG.d)
    for key in ("nb_id", "nb_text", "nb_image"):
        changed = dict(x)
        changed[key] = x[key].clone()
        changed[key][:, 0] += 1.0  # one neighbour (a shift of all of them cancels in the softmax)
        assert not torch.allclose(gen(**changed), base, atol=1e-6), key


def test_gradient_reaches_every_generator_parameter():
    gen = _generator("relu")
    gen(**_inputs()).sum().backward()
    for name, param in gen.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_a_missing_poster_drops_the_image_modality():
    gen = _generator()
    x = _inputs()
    x["z_mask"][1] = False
    base = gen(**x)
    changed = dict(x)
    changed["z_image"] = x["z_image"].clone()
    changed["z_image"][:2] += 5.0
    out = gen(**changed)
    assert torch.allclose(out[1], base[1], atol=1e-6)  # the item without a poster ignores its image row
    assert not torch.allclose(out[0], base[0], atol=1e-6)
    # without a poster, e_z is the text modality alone (Eq. 17 averages over the modalities z has)
    text_only = gen.text.combine(
        gen.text.project(x["z_text"]),
        gen.text.project(x["nb_text"]),
        torch.ones_like(x["nb_mask"]),
        x["nb_id"],
    )
    assert torch.allclose(base[1], text_only[1], atol=1e-6)


def test_a_neighbour_without_a_poster_gets_no_image_attention():
    gen = _generator()
    x = _inputs()
    x["nb_mask"][0, 2] = False
    base = gen(**x)
    changed = dict(x)
    changed["nb_image"] = x["nb_image"].clone()
    changed["nb_image"][0, 2] += 5.0
    assert torch.allclose(gen(**changed), base, atol=1e-6)


def test_no_neighbour_with_a_poster_is_finite():
    gen = _generator()
    x = _inputs()
    x["nb_mask"][:] = False
    out = gen(**x)
    assert torch.isfinite(out).all()


def test_relu_reading_is_non_negative():
    gen = _generator("relu")
    assert (gen(**_inputs()) >= 0).all()
