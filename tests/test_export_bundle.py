"""The bundle an export writes and what `load_bundle` accepts: layout and manifest, atomic writes,
refusal of tampered / wrong-version / inconsistent bundles without half-loading, the torch/ copy."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from devtools.bundles import batch_feeds
from mml.bundle import FORMAT_VERSION, MANIFEST, read_manifest, verify_bundle, write_manifest
from mml.bundle_loader import (
    GRAPH_FILES,
    INDEX_FILE,
    OPTIONAL_ROLES,
    TABLE_COLUMNS,
    TABLES_FILE,
    TORCH_CONFIG,
    TORCH_STATE,
    load_bundle,
)
from mml.errors import BundleError, DataError, MMLError
from model.config import ModelConfig
from model.from_bundle import load_torch_model
from model.mml import MML
from training.export import build, export_model
from training.export.tables import popularity_counts, serving_model
from training.synthetic import synthetic

SMALL = ModelConfig(
    d=8,
    n_heads=2,
    d_ffn=16,
    max_len=10,
    text_dim=12,
    image_dim=20,
    n_neighbours=3,
    feature_sim_dim=4,
    fusion_hidden=8,
)


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    split, features = synthetic(
        n_items=40, n_old_items=32, text_dim=12, image_dim=20, n_old_users=10, seed=seed
    )
    model = MML(SMALL, split.n_old_items, features.text, features.image, features.image_mask)
    return model, features.item_id, popularity_counts(split.old_seqs, split.n_items)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    model, item_ids, popularity = _model_and_data()
    out = tmp_path_factory.mktemp("bundles") / "v1"
    export_model(
        model, out, item_ids=item_ids, popularity=popularity,
        dataset={"name": "synthetic"}, training={"metrics": {"recall@10": 0.1}}, warmup={"steps": 2, "lr": 1e-3},
    )  # fmt: skip
    return out


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(bundle_dir, out)
    return out


def test_layout_and_manifest(bundle_dir: Path) -> None:
    manifest = verify_bundle(bundle_dir)
    listed = {f.path for f in manifest.files}
    graphs = {
        role: path for role, path in GRAPH_FILES.items() if role not in OPTIONAL_ROLES
    }  # no cooc learner
    assert set(graphs.values()) | {TABLES_FILE, INDEX_FILE, TORCH_STATE, TORCH_CONFIG} == listed
    assert manifest.graphs == graphs
    assert manifest.format_version == FORMAT_VERSION
    assert re.fullmatch(r"\d{8}-[0-9a-f]{8}", manifest.model_version)
    assert (
        manifest.dims.n_items,
        manifest.dims.n_old_items,
        manifest.dims.d,
        manifest.dims.k_neighbours,
    ) == (40, 32, 8, 3)
    assert manifest.dataset == {"name": "synthetic"} and manifest.training["metrics"] == {"recall@10": 0.1}
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_tables_describe_the_served_model(bundle_dir: Path) -> None:
    model, item_ids, popularity = _model_and_data()
    served = serving_model(model)
    bundle = load_bundle(bundle_dir)
    t = bundle.tables
    assert tuple(t) == TABLE_COLUMNS
    assert list(t["item_id"]) == list(item_ids) and bundle.row_of[str(item_ids[7])] == 7
    # new items have no interactions in D_old
    assert np.array_equal(t["popularity"], popularity) and popularity[33:].sum() == 0
    assert t["is_old"][1:33].all() and not t["is_old"][33:].any() and not t["is_old"][0]
    np.testing.assert_array_equal(t["id_emb"], served.item_emb.weight.detach().numpy())
    # new items' rows are generated, not the init
    assert not np.allclose(t["id_emb"][33:], model.item_emb.weight.detach().numpy()[33:])
    with torch.no_grad():
        np.testing.assert_allclose(t["text_vec"], served.item_table("text").numpy(), atol=1e-6)
        np.testing.assert_allclose(t["image_vec"], served.item_table("image").numpy(), atol=1e-6)
    assert bundle.items_concat.shape == (41, 24)
    np.testing.assert_array_equal(bundle.items_concat[:, 8:16], t["text_vec"])
    assert not bundle.items_concat.flags.writeable and not t["id_emb"].flags.writeable


def test_torch_copy_rebuilds_the_served_model(bundle_dir: Path) -> None:
    model, _, _ = _model_and_data()
    served = serving_model(model)
    restored = load_torch_model(bundle_dir)
    assert json.loads((bundle_dir / TORCH_CONFIG).read_text())["warmup"] == {"steps": 2, "lr": 1e-3}
    seq = torch.tensor([[1, 5, 35, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        assert torch.equal(restored.scores(seq)[0], served.scores(seq)[0])
    assert torch.equal(restored.neighbours, served.neighbours)


def test_existing_bundle_is_not_overwritten_unless_asked(bundle_dir: Path, copy: Path) -> None:
    model, item_ids, popularity = _model_and_data(seed=1)
    before = (copy / MANIFEST).read_bytes()
    with pytest.raises(MMLError, match="exists"):
        export_model(model, copy, item_ids=item_ids, popularity=popularity)
    assert (copy / MANIFEST).read_bytes() == before
    manifest = export_model(model, copy, item_ids=item_ids, popularity=popularity, overwrite=True)
    assert (
        load_bundle(copy).model_version == manifest.model_version != verify_bundle(bundle_dir).model_version
    )
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy"]  # the replaced bundle is gone


def test_failed_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, item_ids, popularity = _model_and_data()

    def broken_index(path: Path, model: MML) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(build, "write_index", broken_index)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tmp_path / "b", item_ids=item_ids, popularity=popularity)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model_version": "../evil"}, MMLError, "model version"),
        ({"encoders_dir": "/nonexistent"}, DataError, "text.onnx"),
        ({"item_ids": np.array([""] + ["a"] * 40)}, ValueError, "unique"),
        ({"popularity": np.zeros(40, np.int64)}, ValueError, "popularity"),
    ],
)
def test_bad_export_arguments_are_refused_before_writing(tmp_path: Path, kwargs, error, match) -> None:
    model, item_ids, popularity = _model_and_data()
    args = {"item_ids": item_ids, "popularity": popularity, **kwargs}
    with pytest.raises(error, match=match):
        export_model(model, tmp_path / "b", **args)
    assert list(tmp_path.iterdir()) == []


def test_tampered_file_is_refused(copy: Path) -> None:
    path = copy / GRAPH_FILES["recall"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for graphs/recall.onnx"):
        load_bundle(copy)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None])
def test_wrong_format_version_is_refused(copy: Path, version) -> None:
    raw = json.loads((copy / MANIFEST).read_text())
    raw["format_version"] = version
    (copy / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="format_version"):
        load_bundle(copy)


def _rewrite(root: Path, rel: str, data: bytes) -> None:
    """Replace a file AND re-sign the manifest: passes verify_bundle, so the loader itself must refuse."""
    (root / rel).write_bytes(data)
    write_manifest(root, read_manifest(root))


@pytest.mark.parametrize(
    ("rel", "match"),
    [
        (GRAPH_FILES["generator"], "ONNX Runtime cannot load graph 'generator'"),
        (INDEX_FILE, "Faiss cannot read"),
        (TABLES_FILE, "unreadable"),
    ],
)
def test_a_failed_load_leaves_the_current_bundle_in_service(
    bundle_dir: Path, copy: Path, rel: str, match: str
) -> None:
    """Every part is built before the LoadedBundle exists: a bad part refuses the whole bundle, and
    the bundle a caller already holds keeps answering."""
    current = load_bundle(bundle_dir)
    feeds = batch_feeds(current, [[1, 2, 3]])
    query, bias = (current.run("recall", **feeds)[k] for k in ("query", "bias"))
    _rewrite(copy, rel, b"not what it claims to be")
    verify_bundle(copy)  # checksums agree: only loading can tell
    with pytest.raises(BundleError, match=match):
        load_bundle(copy)
    again, again_bias = (current.run("recall", **feeds)[k] for k in ("query", "bias"))
    np.testing.assert_array_equal(again, query)
    np.testing.assert_array_equal(again_bias, bias)


def test_inconsistent_tables_are_refused(copy: Path) -> None:
    with np.load(copy / TABLES_FILE) as npz:
        tables = {k: npz[k] for k in npz.files}
    tables["id_emb"] = tables["id_emb"][:, :-1]  # d no longer matches the manifest
    with open(copy / TABLES_FILE, "wb") as fh:
        np.savez(fh, **tables)
    write_manifest(copy, read_manifest(copy))
    with pytest.raises(BundleError, match="column 'id_emb'"):
        load_bundle(copy)


def test_graph_with_the_wrong_interface_is_refused(copy: Path) -> None:
    shutil.copyfile(copy / GRAPH_FILES["learner_text"], copy / GRAPH_FILES["generator"])
    write_manifest(copy, read_manifest(copy))
    with pytest.raises(BundleError, match="graph 'generator' has inputs"):
        load_bundle(copy)


def test_load_opens_only_the_graphs_asked_for(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir, roles=("recall", "generator"))
    assert set(bundle.sessions) == {"recall", "generator"}
    with pytest.raises(MMLError, match="no graph 'fusion'"):
        bundle.run("fusion")
    with pytest.raises(BundleError, match="no graph"):
        load_bundle(bundle_dir, roles=("nonexistent",))


def test_parity_check_catches_a_graph_that_is_not_the_model(bundle_dir: Path) -> None:
    model, _, _ = _model_and_data()
    errors = build.check_parity(serving_model(model), bundle_dir)
    assert max(errors.values()) <= build.PARITY_RTOL and "fused_scores" in errors
    other, _, _ = _model_and_data(seed=1)
    with pytest.raises(MMLError, match="export parity"):
        build.check_parity(serving_model(other), bundle_dir)
