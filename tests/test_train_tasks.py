"""Tasks from histories (paper Sec. 4.4.1), negatives, losses, profiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.losses import bpr, softmax_ce
from model.tasks import sample_negatives, support_tasks
from training.config import profile
from training.tasks import make_tasks, sample_windows


def test_task_support_is_every_prefix_and_query_is_the_last_item():
    rng = np.random.default_rng(0)
    tasks = make_tasks([np.array([5, 6, 7, 8])], max_len=6, n_candidates=20, rng=rng)
    assert tasks.seq[0].tolist() == [5, 6, 7, 0, 0, 0]
    assert tasks.target[0].tolist() == [6, 7, 8, 0, 0, 0]
    assert tasks.support[0].tolist() == [True, True, False, False, False, False]
    assert tasks.query[0].tolist() == [False, False, True, False, False, False]
    trimmed = tasks.trimmed()
    assert trimmed.seq.shape == (1, 3)


@pytest.mark.parametrize(
    ("share", "support", "query"),
    [
        (0.0, [1, 1, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1]),  # the paper: the last item
        (0.5, [1, 1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 1, 1]),  # round(0.5 * 9) = 4 targets
        (0.99, [1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1]),  # one support pair stays
    ],
)
def test_query_share_moves_the_last_targets_from_support_to_query(share, support, query):
    tasks = make_tasks(
        [np.arange(1, 11)], max_len=10, n_candidates=20, rng=np.random.default_rng(0), query_share=share
    )
    assert tasks.seq[0].tolist() == [*range(1, 10), 0]
    assert tasks.support[0, :9].astype(int).tolist() == support
    assert tasks.query[0, :9].astype(int).tolist() == query
    assert not (tasks.support & tasks.query).any() and not tasks.query[0, 9] and not tasks.support[0, 9]


def test_query_share_keeps_one_query_and_one_support_pair_in_short_windows():
    tasks = make_tasks(
        [np.array([4, 5, 6])], max_len=4, n_candidates=9, rng=np.random.default_rng(0), query_share=0.9
    )
    assert tasks.support[0].tolist() == [True, False, False, False]
    assert tasks.query[0].tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="query share"):
        make_tasks(
            [np.array([4, 5, 6])], max_len=4, n_candidates=9, rng=np.random.default_rng(0), query_share=1.0
        )


def test_negatives_are_uniform_candidates_never_the_target():
    rng = np.random.default_rng(0)
    target = rng.integers(1, 6, size=(200, 30))
    target[:, -3:] = 0
    neg = sample_negatives(target, 5, rng)
    assert ((neg >= 1) & (neg <= 5))[:, :-3].all()
    assert (neg != target)[:, :-3].all()
    assert (neg[:, -3:] == 0).all()
    assert set(np.unique(neg[:, :-3])) == {1, 2, 3, 4, 5}


def test_windows_sampled_and_recent():
    rng = np.random.default_rng(0)
    history = np.arange(1, 101)
    for window in sample_windows([history] * 50, rng, "sampled", 10, 21):
        assert 10 <= len(window) <= 21
        assert (np.diff(window) == 1).all()  # contiguous
    assert sample_windows([history], rng, "recent", 10, 21)[0].tolist() == list(range(80, 101))
    assert sample_windows([np.array([1, 2])], rng, "sampled", 10, 21) == []  # too short for a task
    assert len(sample_windows([np.array([1, 2, 3, 4])], rng, "sampled", 10, 21)[0]) == 4


def test_support_tasks_of_new_users():
    rng = np.random.default_rng(0)
    tasks = support_tasks(np.array([[1, 2, 3, 4]]), max_len=6, n_candidates=9, rng=rng)
    assert tasks.seq[0].tolist() == [1, 2, 3, 0, 0, 0]
    assert tasks.target[0].tolist() == [2, 3, 4, 0, 0, 0]
    assert tasks.support[0].sum() == 3 and not tasks.query.any()


def test_losses_ignore_masked_positions():
    hidden = torch.randn(2, 3, 4)
    pos, neg = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    changed = hidden.clone()
    changed[0, 1] = 100.0
    assert torch.allclose(bpr(hidden, pos, neg, mask), bpr(changed, pos, neg, mask))
    table = torch.randn(6, 4)
    target = torch.tensor([[1, 0, 5], [0, 0, 2]])
    expected = torch.nn.functional.cross_entropy((hidden[mask] @ table[1:].T), target[mask] - 1)
    assert torch.allclose(softmax_ce(hidden, table, target, mask), expected, atol=1e-5)


def test_profiles_and_overrides():
    quick, paper = profile("paper-quick"), profile("paper")
    assert paper.stage1.epochs == 10 and paper.stage1.inner_steps == 5 and paper.stage1.inner_lr == 1e-3
    assert (
        paper.stage1.pretrain.steps == 0 and paper.stage1.loss == "bpr" and paper.model.cooc_neighbours == 0
    )
    assert quick.stage1.epochs < paper.stage1.epochs
    recipe, full = profile("quick"), profile("full")
    assert recipe.stage1.pretrain.steps < full.stage1.pretrain.steps and recipe.stage1.loss == "ce"
    assert recipe.warmup.select and 0 in recipe.warmup.grid_steps and recipe.model.cooc_neighbours > 0
    assert profile("quick", stage1={"loss": "ce"}).stage1.loss == "ce"
    with pytest.raises(ValueError, match="profile"):
        profile("fast")
    with pytest.raises(ValueError, match="loss"):
        profile("quick", stage1={"loss": "mse"})
