"""Integration: export an MML built on the real ML-1M split and features, load the bundle as the
service does, and compare ONNX Runtime's fused scores with eager PyTorch on real histories.

The model is the quick-trained run cached under .cache/test-artifacts/runs/ when there is one,
otherwise a randomly initialised MML on the real features (the sequences are real either way)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.bundles import batch_feeds
from mml.bundle_loader import load_bundle
from service.runtime import Runtime

pytestmark = pytest.mark.slow

ATOL = 1e-4  # max abs difference of fused scores, ONNX Runtime vs eager
TOP = 100
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "test-artifacts"
QUICK_RUN = CACHE / "runs" / "ml-1m-quick"  # written by the training tests' fixture, when it has run


def _model(data: Path):
    """-> (MML, description): the cached quick-trained run if present, else a random init."""
    from model.config import ModelConfig
    from model.mml import MML
    from training.checkpoint import load_model, stage_path
    from training.features import load_features

    if stage_path(QUICK_RUN, 3).is_file():  # a finished run (a run in progress has no stage3.pt yet)
        model, _ = load_model(QUICK_RUN)
        return model, f"quick-trained run {QUICK_RUN}"
    torch.manual_seed(0)
    features = load_features(data)
    split_stats = json.loads((data / "stats.json").read_text())
    model = MML(
        ModelConfig(), int(split_stats["n_old_items"]), features.text, features.image, features.image_mask
    )
    return model, "randomly initialised MML"


@pytest.fixture(scope="module")
def exported(ml1m_features_dir: Path, tmp_path_factory):
    from training.data import load_split
    from training.export import export_model
    from training.export.tables import popularity_counts, serving_model
    from training.features import load_features

    torch.set_num_threads(2)
    split = load_split(ml1m_features_dir)
    features = load_features(ml1m_features_dir)
    model, description = _model(ml1m_features_dir)
    out = tmp_path_factory.mktemp("ml1m") / "bundle"
    manifest = export_model(
        model,
        out,
        item_ids=features.item_id,
        popularity=popularity_counts(split.old_seqs, split.n_items),
        encoders_dir=ml1m_features_dir / "encoders",
        dataset={"name": "ml-1m", "split": split.stats},
    )
    return serving_model(model), load_bundle(out), split, manifest, description


def _histories(model, split) -> dict[str, list[np.ndarray]]:
    max_len = model.cfg.max_len
    lengths = np.array([len(s) for s in split.old_seqs])
    long_users = np.flatnonzero(lengths > 3 * max_len)[:4]
    exact_users = np.flatnonzero(lengths == max_len)[:2]
    new_items = np.arange(model.n_old_items + 1, model.n_items + 1)
    no_poster = np.flatnonzero(~model.image_mask.numpy())[1:]  # row 0 is the pad
    assert len(long_users) and len(exact_users) and len(new_items) >= 20 and len(no_poster)
    support = split.new_support
    return {
        "length 1": [support[u, :1] for u in range(4)],
        "new users' support (8)": [support[u] for u in range(6)],
        "length 50": [split.old_seqs[u] for u in exact_users],
        "longer than 50, most recent kept": [split.old_seqs[u] for u in long_users],
        "padding, mixed lengths": [support[0, :3], split.old_seqs[long_users[0]], support[1, :1], support[2]],
        "only new items": [new_items[:5], new_items[-1:], new_items[5:5 + max_len], new_items],
        "items without posters": [no_poster, np.concatenate([support[3], no_poster[:2]])],
    }  # fmt: skip


def _eager_scores(model, histories: list[np.ndarray]) -> np.ndarray:
    seq = torch.zeros(len(histories), model.cfg.max_len, dtype=torch.long)
    for b, history in enumerate(histories):
        recent = torch.as_tensor(np.asarray(history[-model.cfg.max_len :], dtype=np.int64))
        seq[b, : len(recent)] = recent
    with torch.no_grad():
        fused, _ = model.scores(seq)
    return fused.numpy()


def _assert_same_top(got: np.ndarray, expected: np.ndarray, k: int = TOP) -> int:
    """Identical top-k apart from ties: where the rankings differ, the items' scores tie within ATOL
    (and an item in only one top-k ties with the k-th score). Returns the number of differing ranks."""
    top_got = np.argsort(-got, kind="stable")[:k]
    top_exp = np.argsort(-expected, kind="stable")[:k]
    differ = top_got != top_exp
    np.testing.assert_allclose(expected[top_got[differ]], expected[top_exp[differ]], atol=ATOL, rtol=0)
    kth = expected[top_exp[-1]]
    for item in set(top_got.tolist()) ^ set(top_exp.tolist()):
        assert abs(expected[item] - kth) <= ATOL, f"item {item} is in one top-{k} only and does not tie"
    return int(differ.sum())


@pytest.mark.parametrize(
    "case",
    ["length 1", "new users' support (8)", "length 50", "longer than 50, most recent kept",
     "padding, mixed lengths", "only new items", "items without posters"],
)  # fmt: skip
def test_fused_scores_onnx_vs_eager(exported, case: str) -> None:
    model, bundle, split, _, description = exported
    histories = _histories(model, split)[case]
    out = bundle.run("recall", **batch_feeds(bundle, histories))
    query, bias, runtime = out["query"], out["bias"], Runtime(bundle)
    assert np.isfinite(query).all() and np.isfinite(bias).all()
    expected = _eager_scores(model, histories)
    assert np.isfinite(expected[:, 1:]).all()
    for b in range(len(histories)):
        got = runtime.catalogue_scores(query[b], bias[b])
        assert np.isfinite(got[1:]).all()
        error = np.abs(got[1:] - expected[b, 1:]).max()
        assert error <= ATOL, f"{case} [{b}] ({description}): max abs difference {error:.2e}"
        _assert_same_top(got[1:], expected[b, 1:])


def test_all_pad_history_is_finite(exported) -> None:
    model, bundle, _, _, _ = exported
    out = bundle.run("recall", **batch_feeds(bundle, [[]]))
    assert all(np.isfinite(v).all() for v in out.values())
    hidden = bundle.run("learner_id", **batch_feeds(bundle, [[]]))["hidden"]
    assert np.isfinite(hidden).all()


def test_bundle_ships_the_encoders_and_the_split(exported) -> None:
    model, bundle, split, manifest, _ = exported
    assert bundle.encoders_dir is not None and (bundle.encoders_dir / "text.onnx").is_file()
    assert manifest.dims.n_items == split.n_items == model.n_items
    assert manifest.dataset["split"]["n_old_items"] == split.n_old_items
    # popularity fallback: counts of D_old, the most popular old item first
    popularity = bundle.tables["popularity"]
    assert popularity.sum() == sum(len(s) for s in split.old_seqs)
    assert popularity[split.n_old_items + 1 :].sum() == 0


def test_new_item_path_matches_the_tables(exported) -> None:
    """Faiss (from the bundle) + generator.onnx reproduce the generated ID embeddings of ML-1M's new items."""
    model, bundle, _, _, _ = exported
    t = bundle.tables
    new = np.arange(model.n_old_items + 1, model.n_items + 1)
    nb, _ = bundle.neighbours.search(
        t["text"][new], t["image"][new], t["image_mask"][new], bundle.dims.k_neighbours
    )
    assert (nb == model.neighbours[new].numpy()).mean() > 0.99  # exact search; ties may order differently
    out = bundle.run(
        "generator", z_text=t["text"][new], z_image=t["image"][new], z_mask=t["image_mask"][new],
        nb_text=t["text"][nb], nb_image=t["image"][nb], nb_mask=t["image_mask"][nb], nb_id=t["id_emb"][nb],
    )  # fmt: skip
    same = (nb == model.neighbours[new].numpy()).all(axis=1)
    np.testing.assert_allclose(out["id_emb"][same], t["id_emb"][new][same], atol=1e-5, rtol=0)


def test_mml_export_cli(exported, ml1m_features_dir: Path, tmp_path: Path) -> None:
    """`mml export --run RUN --out DIR` on a run folder: the trained run when cached, otherwise a
    run folder holding the fixture's model as its stage-3 checkpoint."""
    from training.checkpoint import save_stage, stage_path, write_run_info
    from training.config import TrainConfig

    model, _, split, _, _ = exported
    run = QUICK_RUN
    if not stage_path(run, 3).is_file():
        run = tmp_path / "run"
        run.mkdir()
        save_stage(run, 3, "untrained", model, TrainConfig(model=model.cfg), {})
        write_run_info(run, ml1m_features_dir, "untrained")
    out = tmp_path / "bundles" / "cli"
    command = [sys.executable, "-m", "mml.cli", "export", "--run", str(run), "--out", str(out)]
    done = subprocess.run([*command, "--model-version", "cli-1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"bundle: {out} (model version cli-1" in done.stdout
    bundle = load_bundle(out)
    assert bundle.model_version == "cli-1" and bundle.encoders_dir is not None
    assert bundle.manifest.dataset["split"] == split.stats
    assert bundle.manifest.dataset["data_dir"] == str(ml1m_features_dir.resolve())
    metrics = run / "metrics.json"
    assert bundle.manifest.training["metrics"] == (
        json.loads(metrics.read_text()) if metrics.is_file() else {}
    )
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
