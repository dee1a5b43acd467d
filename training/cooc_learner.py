"""The co-occurrence learner's table (beyond the paper; mml/cooc.py): the window is chosen on the
validation item, like ItemKNN's in the evaluation, and the table of all of D_old is kept."""

from __future__ import annotations

import numpy as np

from mml.cooc import CoocTable, build_table, dense_scores
from training.config import CoocConfig
from training.validation import Validation


def choose_table(
    old_seqs: list[np.ndarray], n_items: int, m: int, cfg: CoocConfig, validation: Validation
) -> tuple[CoocTable, dict[str, float]]:
    """The top-m table whose co-occurrence scores alone are best on the validation item; returns it
    and the validation MRR@10 of every window tried."""
    users = np.arange(len(validation))
    tried, best = {}, None
    for window in cfg.windows:
        table = build_table(old_seqs, n_items, window, m)
        value = float(validation.per_user(dense_scores(table, validation.support), users).mean())
        tried[str(window)] = value
        if best is None or value > best[0]:
            best = (value, table)
    if best is None:
        raise ValueError("cooc.windows names no window")
    return best[1], tried
