"""Per-request meta-test warm-up (`adapt_steps > 0`): the torch path of the service.

With 0 steps it must give the ONNX path's answer (same closed-form fusion, same catalogue moments);
with steps it must change the user's scores, include registered new items, and be refused with a
clear message for a bundle that ships no torch weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from mml.bundle import read_manifest, write_manifest
from mml.errors import MMLError
from service.app import create_app
from service.config import load_settings
from service.items import ItemRegistry, NewItemTable, features_revision
from service.pipeline import RecallPipeline
from service.runtime import Runtime
from service.store import ItemRecord, MemoryStore
from service.testing import ThreadedServer, sources_digest, untrained_bundle

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
HISTORY = ["1193", "661", "914", "3408", "2355", "1197", "1287", "2804"]


@pytest.fixture(scope="module")
def bundle(ml1m_features_dir: Path) -> Path:
    return untrained_bundle(
        ml1m_features_dir, BUNDLES / "a", seed=0, model_version=f"untrained-a-{sources_digest(REPO)}"
    )


@pytest.fixture(scope="module")
def runtime(bundle: Path) -> Runtime:
    return Runtime.load(bundle)


def _table_with_new_item(runtime: Runtime) -> NewItemTable:
    """A new item registered with the features of catalogue item 2355 (A Bug's Life)."""
    registry = ItemRegistry(MemoryStore(), 100)
    row = runtime.row_of["2355"]
    text, image = runtime.text[row].copy(), runtime.image[row].copy()
    fingerprint = runtime.encoder_fingerprint
    registry.register(
        ItemRecord("bug-2", text, image, True, features_revision(text, image, True, fingerprint), fingerprint)
    )
    table = NewItemTable(runtime, registry)
    table.sync()
    return table


def test_zero_steps_equal_the_onnx_path_and_steps_change_the_scores(runtime):
    from service.adapt import AdaptingPipeline

    table = _table_with_new_item(runtime)
    history = [*HISTORY, "bug-2"]
    onnx = RecallPipeline(runtime, table)(history, 200)
    same = AdaptingPipeline(runtime, table, steps=0)(history, 200)
    assert [i for i, _ in same.items] == [i for i, _ in onnx.items]
    np.testing.assert_allclose([s for _, s in same.items], [s for _, s in onnx.items], atol=1e-4)
    adapted = AdaptingPipeline(runtime, table, steps=3)
    first = adapted(history, 200)
    assert first.model_version == f"{runtime.model_version}+adapt3" and first.warmed_up == ["bug-2"]
    scores = dict(first.items)
    common = [i for i, _ in onnx.items if i in scores]
    assert common and max(abs(scores[i] - dict(onnx.items)[i]) for i in common) > 1e-5
    assert adapted(history, 200).items == first.items  # deterministic (fixed negatives seed)
    one = adapted(["1193"], 10)  # a single item: nothing to adapt on, the ONNX answer
    assert [i for i, _ in one.items] == [i for i, _ in RecallPipeline(runtime, table)(["1193"], 10).items]


def test_adapt_arm_over_http(bundle, tmp_path):
    arms = tmp_path / "arms.json"
    arms.write_text(
        json.dumps({"arms": [{"name": "mml", "weight": 1}, {"name": "warm", "weight": 0, "adapt_steps": 2}]})
    )
    app = create_app(load_settings(bundle=bundle, arms_config=arms, exposure_log=tmp_path / "x.jsonl"))
    with ThreadedServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post(
            "/recall", json={"user_id": "u", "history": HISTORY, "k": 10}, headers={"X-MML-Arm": "warm"}
        )
        assert r.status_code == 200 and r.json()["model_version"].endswith("+adapt2")
        assert "model;dur=" in r.headers["Server-Timing"]
        models = {m["name"]: m for m in c.get("/v1/models").json()["arms"]}
        assert models["warm"]["adapt_steps"] == 2


def test_adapt_steps_need_torch_weights_in_the_bundle(bundle, tmp_path):
    bare = BUNDLES / f"no-torch-{os.getpid()}"
    shutil.rmtree(bare, ignore_errors=True)
    shutil.copytree(
        bundle, bare, copy_function=os.link, ignore=shutil.ignore_patterns("torch", "manifest.json")
    )
    try:
        write_manifest(bare, read_manifest(bundle))
        arms = tmp_path / "arms.json"
        arms.write_text(json.dumps({"arms": [{"name": "warm", "adapt_steps": 2}]}))
        service = create_app(load_settings(bundle=bare, arms_config=arms)).state.service
        with pytest.raises(MMLError, match="ships no torch/ weights"):
            service.load()
    finally:
        shutil.rmtree(bare)
