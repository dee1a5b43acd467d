"""The protocol never lets a method see a new user's validation or query item while it trains or
warms up: the method objects here are the real baselines, instrumented to record their inputs."""

from __future__ import annotations

import numpy as np

from training.data import Split
from training.evaluation.baselines.itemknn import ItemKNN
from training.evaluation.baselines.sequential import SequentialBaseline, SequentialConfig
from training.evaluation.protocol import TrainData, evaluate

VALID_ITEM, QUERY_ITEM = 11, 12  # appear nowhere but in the held-out positions


def _toy_split(query: int | np.ndarray = QUERY_ITEM, n_users: int = 6) -> Split:
    rng = np.random.default_rng(0)
    old = [rng.integers(1, 9, size=int(rng.integers(5, 15))).astype(np.int32) for _ in range(20)]
    return Split(
        n_items=12,
        n_old_items=8,
        old_users=np.array([f"o{i}" for i in range(len(old))]),
        old_seqs=old,
        new_users=np.array([f"n{i}" for i in range(n_users)]),
        new_support=rng.integers(1, 11, size=(n_users, 4)).astype(np.int32),  # 9, 10: new items
        new_valid=np.full(n_users, VALID_ITEM, np.int32),
        new_query=np.broadcast_to(np.asarray(query, np.int32), (n_users,)).copy(),
    )


class Recording:
    """Mixin recording what the protocol hands to fit / adapt / score."""

    def fit(self, data: TrainData, validator) -> None:
        self.seen_fit = data
        super().fit(data, validator)

    def adapt(self, users, support, validator):
        self.seen_adapt = [*getattr(self, "seen_adapt", []), support.copy()]
        return super().adapt(users, support, validator)

    def score(self, users, history, state):
        import torch

        self.seen_score = [*getattr(self, "seen_score", []), history.copy()]
        self.inference_mode = torch.is_inference_mode_enabled()
        scores = super().score(users, history, state)
        self.scores = [*getattr(self, "scores", []), np.array(scores)]
        return scores


class RecordingKNN(Recording, ItemKNN):
    pass


class RecordingSASRec(Recording, SequentialBaseline):
    pass


def _tiny_sasrec() -> RecordingSASRec:
    cfg = SequentialConfig(
        ds=(8,),
        layers=1,
        heads=1,
        ffn_factor=1,
        max_len=6,
        lrs=(1e-2,),
        dropouts=(0.5,),
        losses=("bpr",),
        min_steps=2,
        max_steps=2,
        threads=1,
    )
    return RecordingSASRec("sasrec", cfg, "sasrec", with_new_support=True)


def _train_inputs(data: TrainData) -> np.ndarray:
    return np.concatenate([*data.old_seqs, data.new_support.ravel()])


def test_training_and_warm_up_never_receive_validation_or_query_items() -> None:
    for method in (RecordingKNN(windows=(None, 2)), _tiny_sasrec()):
        evaluate(method, _toy_split(), chunk=4)  # two chunks of users
        seen = _train_inputs(method.seen_fit)
        assert not np.isin([VALID_ITEM, QUERY_ITEM], seen).any(), method.name
        assert len(method.seen_adapt) == 2
        assert not np.isin([VALID_ITEM, QUERY_ITEM], np.concatenate(method.seen_adapt)).any()
        # scoring (inference only) sees the history that precedes the query: support + validation
        history = np.concatenate(method.seen_score)
        assert (history[:, -1] == VALID_ITEM).all() and not np.isin(VALID_ITEM, history[:, :-1]).any()
        assert not np.isin(QUERY_ITEM, history).any()
        assert method.inference_mode


def test_scores_do_not_depend_on_the_query_items() -> None:
    # same seed, different query items: the trained model and its scores must be identical
    first, second = _tiny_sasrec(), _tiny_sasrec()
    evaluate(first, _toy_split(query=QUERY_ITEM))
    evaluate(second, _toy_split(query=np.arange(1, 7)))
    np.testing.assert_array_equal(np.concatenate(first.scores), np.concatenate(second.scores))
    assert _without_timing(first.info) == _without_timing(second.info)


def _without_timing(info):
    """`info` without wall-clock fields (training seconds differ between two identical runs)."""
    if isinstance(info, dict):
        return {k: _without_timing(v) for k, v in info.items() if k not in ("seconds", "train_seconds")}
    return info
