"""On the real ML-1M cold-start split (needs MML_DATA_MIRROR): the popularity baseline reaches the
expected hit rate, a check that split, protocol and metrics agree end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data import load_split
from training.evaluation.baselines.pop import Pop
from training.evaluation.protocol import evaluate


@pytest.mark.slow
def test_pop_hit_at_10_on_the_default_split(ml1m_dir: Path) -> None:
    split = load_split(ml1m_dir)
    result = evaluate(Pop(), split)
    assert len(result.per_user["unmasked"]["recall@10"]) == split.stats["n_new_users"]
    # 67 of the 675 new users' query items are among D_old's 10 most popular movies
    assert result.means()["recall@10"] == pytest.approx(0.099, abs=0.002)
    # masking the history can only move the query up (it is never in the history on ML-1M)
    assert result.means("masked")["recall@10"] >= result.means()["recall@10"]
