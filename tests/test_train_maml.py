"""Stage 1: the batched (vmap) meta-gradient equals a plain per-task loop, first and second order."""

from __future__ import annotations

import pytest
import torch

from model.adapt import adapt, theta
from model.mml import LEARNERS, MML
from training.config import Stage1Config
from training.maml import learner_parameters, meta_loss, meta_loss_looped
from training.synthetic import tiny_meta_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    return tiny_meta_setup()


def _grads(
    model: MML, name: str, fn, tasks, cfg: Stage1Config, n_old: int
) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn(model, name, tasks, cfg, n_old, backward_weight=1.0)
    return loss, [p.grad.clone() for p in learner_parameters(model, name)]


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
@pytest.mark.parametrize("loss", ["bpr", "ce"])
def test_batched_meta_gradient_equals_per_task_loop(setup, first_order: bool, loss: str):
    model, tasks, n_old = setup
    # a large local learning rate so that the adaptation (and the second-order term) matters
    cfg = Stage1Config(first_order=first_order, inner_steps=2, inner_lr=0.5, loss=loss)
    names = LEARNERS if loss == "bpr" else ("id",)
    for name in names:
        loss_b, batched = _grads(model, name, meta_loss, tasks, cfg, n_old)
        loss_l, looped = _grads(model, name, meta_loss_looped, tasks, cfg, n_old)
        assert loss_b == pytest.approx(loss_l, rel=1e-10)
        for a, b in zip(batched, looped, strict=True):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12), name
        assert any(g.abs().sum() > 0 for g in batched)


def test_second_order_differs_from_first_order(setup):
    model, tasks, n_old = setup
    first = _grads(
        model, "text", meta_loss, tasks, Stage1Config(first_order=True, inner_steps=2, inner_lr=0.5), n_old
    )[1]
    second = _grads(
        model, "text", meta_loss, tasks, Stage1Config(first_order=False, inner_steps=2, inner_lr=0.5), n_old
    )[1]
    assert any(not torch.allclose(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_batched_equals_loop_with_several_query_targets(setup, first_order: bool):
    """TaskConfig.query_share > 0: each task's query holds its last targets (mean over them)."""
    model, _, n_old = setup
    _, tasks, _ = tiny_meta_setup(min_len=6, query_share=0.5, seed=1)
    assert (tasks["query"].sum(1) > 1).all()
    cfg = Stage1Config(first_order=first_order, inner_steps=2, inner_lr=0.5)
    loss_b, batched = _grads(model, "id", meta_loss, tasks, cfg, n_old)
    loss_l, looped = _grads(model, "id", meta_loss_looped, tasks, cfg, n_old)
    assert loss_b == pytest.approx(loss_l, rel=1e-10)
    for a, b in zip(batched, looped, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_meta_gradient_is_taken_at_the_adapted_weights(setup):
    """With zero local steps the meta-gradient is the plain query gradient; with steps it differs."""
    model, tasks, n_old = setup
    plain = _grads(model, "image", meta_loss, tasks, Stage1Config(inner_steps=0), n_old)[1]
    adapted = _grads(model, "image", meta_loss, tasks, Stage1Config(inner_steps=2, inner_lr=0.5), n_old)[1]
    assert any(not torch.allclose(a, b) for a, b in zip(plain, adapted, strict=True))


def test_global_weights_stay_the_pre_adaptation_weights(setup):
    model, tasks, n_old = setup
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta_loss(model, "id", tasks, Stage1Config(inner_steps=3, inner_lr=0.5), n_old, backward_weight=1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_each_task_draws_its_own_dropout(setup):
    model, tasks, n_old = setup
    one = {k: v[:1].expand(2, *v.shape[1:]) for k, v in tasks.items()}  # the same task twice
    params = {k: v.detach() for k, v in theta(model, "text").items()}

    def adapted(train: bool) -> dict[str, torch.Tensor]:
        model.train(train)
        with torch.no_grad():
            inputs = model.learner_inputs("text", one["seq"])
            out = adapt(model, "text", params, inputs, model.item_table("text"), one["target"], one["negative"],
                        one["support"], 1, 0.5, "bpr")  # fmt: skip
        model.eval()
        return out

    same = adapted(train=False)
    assert all(torch.allclose(v[0], v[1]) for v in same.values())
    different = adapted(train=True)
    assert any(not torch.allclose(v[0], v[1]) for v in different.values())
