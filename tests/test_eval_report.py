"""`mml evaluate` end to end on a tiny dataset in the generic format (real data stage, real Pop and
ItemKNN): the JSON layout, the cache, the generated report, and the aggregation it relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from training.data import Split
from training.evaluation.baselines.itemknn import ItemKNN
from training.evaluation.baselines.pop import Pop
from training.evaluation.metrics import METRICS
from training.evaluation.protocol import evaluate
from training.evaluation.report import aggregate, best_baseline, render_markdown

T = 1_000_000


def _generic_source(folder: Path) -> Path:
    """20 old users before T, 8 new users after T with 10 interactions each, 30 items."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(20):
        for step, item in enumerate(rng.choice(30, size=12, replace=False)):
            rows.append((f"old{user}", f"i{item}", T - 1000 + step))
    for user in range(8):
        for step, item in enumerate(rng.choice(30, size=10, replace=False)):
            rows.append((f"new{user}", f"i{item}", T + 10 + step))
    folder.mkdir()
    lines = ["user_id,item_id,timestamp", *[f"{u},{i},{t}" for u, i, t in rows]]
    (folder / "interactions.csv").write_text("\n".join(lines) + "\n")
    (folder / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},Item {i}\n" for i in range(30)))
    return folder


def test_evaluate_command_writes_json_report_and_reuses_its_cache(tmp_path: Path) -> None:
    from mml.cli import app
    from training.data.prepare import prepare_dataset

    data = tmp_path / "toy"
    prepare_dataset(out=data, source=_generic_source(tmp_path / "src"), T=T, verbose=False)
    out, report, cache = tmp_path / "results", tmp_path / "results.md", tmp_path / "cache"
    args = ["evaluate", "--data", str(data), "--out", str(out), "--report", str(report), "--seeds", "2"]
    args += ["--methods", "pop,itemknn", "--cache", str(cache), "--no-rq4"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output

    dataset = json.loads((data / "stats.json").read_text())["dataset"]  # the source folder's name
    doc = json.loads((out / f"{dataset}.json").read_text())
    for key in ("cold_users", "cold_users_items"):
        assert set(doc[key]) == {"pop", "itemknn"} and set(doc["masked"][key]) == {"pop", "itemknn"}
        assert list(doc[key]["pop"]) == list(METRICS)
        entry = doc[key]["itemknn"]["recall@10"]
        assert entry["n_seeds"] == 2 and entry["std"] == 0.0 and 0.0 <= entry["mean"] <= 1.0
    # the second setting was prepared next to the first with --cold-items 0.1
    assert json.loads((tmp_path / "toy-cold-items" / "stats.json").read_text())["cold_items"] == 0.1
    text = report.read_text()
    assert "Quick-profile result" in text and "| recall@10 |" in text and "mml evaluate --data" in text
    assert text.startswith(f"# Cold-start evaluation on {dataset}\n")  # not titled MovieLens-1M

    # a rerun trains nothing: every run comes from the cache
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and second.output.count(": cached") == 8, second.output


def test_unknown_method_is_a_one_line_error(tmp_path: Path) -> None:
    from mml.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path), "--methods", "pop,svd"])
    assert result.exit_code != 0 and "svd" in str(result.exception)


def _toy_split() -> Split:
    rng = np.random.default_rng(1)
    old = [rng.integers(1, 21, size=15).astype(np.int32) for _ in range(30)]
    return Split(
        n_items=20,
        n_old_items=20,
        old_users=np.arange(30).astype(str),
        old_seqs=old,
        new_users=np.arange(40).astype(str),
        new_support=rng.integers(1, 21, size=(40, 8)).astype(np.int32),
        new_valid=rng.integers(1, 21, size=40).astype(np.int32),
        new_query=rng.integers(1, 21, size=40).astype(np.int32),
    )


def test_aggregate_picks_the_best_baseline_per_metric_and_tests_against_it() -> None:
    split = _toy_split()
    pop = [evaluate(Pop(), split, seed=s) for s in (0, 1)]
    knn = [evaluate(ItemKNN(windows=(None,)), split, seed=s) for s in (0, 1)]
    close = [evaluate(ItemKNN(windows=(1,)), split, seed=s) for s in (0, 1)]
    # "mml" here is a third real method, so that the significance plumbing has something to compare
    results = {"cold_users": {"pop": pop, "itemknn": knn, "mml": close}}
    doc = aggregate(
        results,
        {"seeds": [0, 1], "profile": "quick", "command": "x", "seconds": 1.0, "machine": "m", "data": {}},
    )
    for metric in METRICS:
        expected = "pop" if pop[0].means()[metric] >= knn[0].means()[metric] else "itemknn"
        assert best_baseline(doc["cold_users"], metric) == expected
        row = doc["significance"]["unmasked"]["cold_users"][metric]
        assert row["baseline"] == expected and row["n_users"] == 40
        assert row["mean_a"] == pytest.approx(close[0].means()[metric])
        assert row["wilcoxon_pvalue_holm"] >= row["wilcoxon_pvalue"]
    assert "### cold users (unmasked)" in render_markdown(doc, "measured discussion", {})


def test_rq4_subsample_keeps_a_seeded_fraction_of_old_users_and_every_new_user() -> None:
    from training.evaluation.rq4 import subsample_old_users

    split = _toy_split()
    fifth = subsample_old_users(split, 0.2)
    assert len(fifth.old_seqs) == 6 and len(fifth.old_users) == 6
    kept = {tuple(s) for s in fifth.old_seqs}
    assert kept <= {tuple(s) for s in split.old_seqs}
    assert [tuple(s) for s in subsample_old_users(split, 0.2).old_seqs] == [tuple(s) for s in fifth.old_seqs]
    np.testing.assert_array_equal(fifth.new_query, split.new_query)
    everyone = subsample_old_users(split, 1.0)
    assert [tuple(s) for s in everyone.old_seqs] == [tuple(s) for s in split.old_seqs]  # same order
    with pytest.raises(ValueError, match="fraction"):
        subsample_old_users(split, 0.0)


def test_a_generic_dataset_runs_end_to_end_with_mml(tmp_path: Path) -> None:
    """Bring-your-own-data path with no code change: a generic-format source -> prepare -> features
    (the real encoders; items without images) -> MML with the co-occurrence learner trained and
    evaluated on the quick profile -> the report titled with the dataset's name."""
    from mml.cli import app
    from training.data.prepare import prepare_dataset

    data = tmp_path / "toy"
    prepare_dataset(out=data, source=_generic_source(tmp_path / "src"), T=T, verbose=False)
    features = CliRunner().invoke(app, ["data", "features", "--data", str(data)])
    assert features.exit_code == 0, features.output
    out, report = tmp_path / "results", tmp_path / "results.md"
    args = ["evaluate", "--data", str(data), "--out", str(out), "--report", str(report), "--seeds", "1"]
    args += ["--methods", "pop,mml,mml_cooc", "--settings", "cold_users", "--no-rq4"]
    args += ["--cache", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    dataset = json.loads((data / "stats.json").read_text())["dataset"]
    doc = json.loads((out / f"{dataset}.json").read_text())
    for method in ("pop", "mml", "mml_cooc"):
        ndcg = doc["cold_users"][method]["ndcg@10"]
        assert ndcg["n_seeds"] == 1 and 0.0 <= ndcg["mean"] <= 1.0
    assert report.read_text().startswith(f"# Cold-start evaluation on {dataset}\n")
