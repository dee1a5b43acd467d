"""The cold-start evaluation protocol: what a method may see, and how it is scored.

Each new user has 8 support items, a validation item (9th) and a query item (10th). A method goes
through three calls, and the protocol decides what each call receives:

1. `fit(data, validator)`: learns from `TrainData` = D_old and the new users' **support** items only.
   The validation items are never handed over: the method may only ask `validator` how good a score
   matrix is (per-user MRR@10 of the 9th item), which is enough for model selection, early stopping
   and the learning-rate sweep. Query items are not reachable at all.
2. `adapt(users, support, validator)`: optional per-user warm-up (PT-FT, MML) on a chunk of new
   users, again from their support items; returns an opaque state for `score` (the adapted weights).
3. `score(users, history, state)`: inference only (run under `torch.inference_mode`, so nothing can
   be trained here): one score per catalogue item for the next item after `history` = support +
   validation item (the 9 interactions that happened before the query). Column 0 (pad) is ignored.

The protocol then ranks the query item (10th) over the full catalogue, twice: as returned
(**unmasked**, the primary variant and what the paper's code does) and with the user's history
(support + validation items) set to -inf (**masked**, what a service returns with exclude_history).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.evaluation.metrics import METRICS, mask_history, mean_metrics, per_user_metrics

VARIANTS: tuple[str, ...] = ("unmasked", "masked")
SELECTION_METRIC = "mrr@10"  # what the reference code's warm-up keeps the best epoch by
DEFAULT_CHUNK = 256  # new users adapted and scored together


@dataclass(frozen=True)
class TrainData:
    """Everything a method may learn from. Never holds a validation or query item."""

    n_items: int  # catalogue size N (pad excluded); item indices 1..N, 0 = pad
    n_old_items: int  # old items are 1..n_old_items
    old_seqs: list[np.ndarray]  # D_old: per old user, item indices in time order
    new_support: np.ndarray  # (U, S) int32: the new users' support items in time order
    features: Any = None  # training.features.ItemFeatures or None (methods that need it check)
    data_dir: str | None = None  # the prepared split folder
    work_dir: str | None = None  # a folder the method may keep its training runs in (per setting)
    seed: int = 0


class Validator:
    """Scores the validation (9th) item of new users without handing the items out.

    `per_user(scores, users)` -> per-user SELECTION_METRIC for score rows computed from those users'
    support items; `mean(...)` its average. Calls are counted (see `calls`)."""

    def __init__(self, valid_items: np.ndarray, metric: str = SELECTION_METRIC) -> None:
        self._valid = np.asarray(valid_items).copy()
        self._valid.setflags(write=False)
        self.metric = metric
        self.calls = 0

    @property
    def n_users(self) -> int:
        return len(self._valid)

    def per_user(self, scores: np.ndarray, users: np.ndarray | None = None) -> np.ndarray:
        users = np.arange(self.n_users) if users is None else np.asarray(users)
        if scores.shape[0] != len(users):
            raise ValueError(f"validator: {scores.shape[0]} score rows for {len(users)} users")
        self.calls += 1
        return per_user_metrics(scores, self._valid[users], (self.metric,))[self.metric]

    def mean(self, scores: np.ndarray, users: np.ndarray | None = None) -> float:
        return float(self.per_user(scores, users).mean())


class Method(ABC):
    """A cold-start recommender under the protocol above. `info` collects what the method chose
    (learning rate, loss variant, epochs, ...) for the report."""

    name: str = "method"

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.log: Callable[[str], None] = lambda line: None  # progress lines (the runner sets it)

    @abstractmethod
    def fit(self, data: TrainData, validator: Validator) -> None: ...

    def adapt(self, users: np.ndarray, support: np.ndarray, validator: Validator) -> Any:
        """Per-user warm-up on `support` (rows = `users`); default: none."""
        return None

    @abstractmethod
    def score(self, users: np.ndarray, history: np.ndarray, state: Any) -> np.ndarray:
        """(len(users), N+1) float scores of the next item after each row of `history`."""


@dataclass
class RunResult:
    """Per-user metric values of one method on one split with one seed."""

    method: str
    seed: int
    per_user: dict[str, dict[str, np.ndarray]]  # variant -> metric -> (U,) values
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def means(self, variant: str = "unmasked") -> dict[str, float]:
        return mean_metrics(self.per_user[variant])


def _inference():
    try:
        import torch
    except ModuleNotFoundError:  # pragma: no cover - torch is a training dependency
        return contextlib.nullcontext()
    return torch.inference_mode()


def train_data(
    split, features=None, seed: int = 0, data_dir: str | None = None, work_dir: str | None = None
) -> TrainData:
    """The part of a `training.data.Split` a method may learn from."""
    return TrainData(
        n_items=int(split.n_items),
        n_old_items=int(split.n_old_items),
        old_seqs=list(split.old_seqs),
        new_support=np.asarray(split.new_support).copy(),
        features=features,
        data_dir=data_dir,
        work_dir=work_dir,
        seed=seed,
    )


def evaluate(
    method: Method,
    split,
    features=None,
    seed: int = 0,
    data_dir: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    work_dir: str | None = None,
) -> RunResult:
    """Fit, adapt and score `method` on a `training.data.Split`; metrics on the query item."""
    start = time.perf_counter()
    support = np.asarray(split.new_support)
    valid = np.asarray(split.new_valid)
    query = np.asarray(split.new_query)
    n_users = len(query)
    if support.shape[0] != n_users or valid.shape != (n_users,):
        raise ValueError("split: new_support, new_valid and new_query disagree on the number of new users")
    validator = Validator(valid)
    method.fit(train_data(split, features, seed, data_dir, work_dir), validator)

    history = np.concatenate([support, valid[:, None]], axis=1)
    rows: dict[str, list[dict[str, np.ndarray]]] = {variant: [] for variant in VARIANTS}
    for begin in range(0, n_users, chunk):
        users = np.arange(begin, min(begin + chunk, n_users))
        state = method.adapt(users, support[users].copy(), validator)
        with _inference():
            scores = np.asarray(method.score(users, history[users].copy(), state), dtype=np.float32)
        if scores.shape != (len(users), split.n_items + 1):
            raise ValueError(
                f"{method.name}: score() returned {scores.shape}, expected {(len(users), split.n_items + 1)}"
            )
        rows["unmasked"].append(per_user_metrics(scores, query[users], METRICS))
        rows["masked"].append(per_user_metrics(mask_history(scores, history[users]), query[users], METRICS))
    per_user = {
        variant: {name: np.concatenate([part[name] for part in parts]) for name in METRICS}
        for variant, parts in rows.items()
    }
    return RunResult(
        method=method.name,
        seed=seed,
        per_user=per_user,
        seconds=time.perf_counter() - start,
        info=dict(method.info),
    )
