"""Per-request meta-test warm-up (`adapt_steps > 0`): the torch path of the service.

With 0 steps it must give the ONNX path's answer (same closed-form fusion, same catalogue moments);
with steps it must change the user's scores, include registered new items, and be refused with a
clear message for a bundle that ships no torch weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from devtools.bundles import sources_digest, untrained_bundle
from devtools.harness import ThreadedServer
from mml.bundle import read_manifest, write_manifest
from mml.errors import MMLError
from service.app import create_app
from service.config import load_settings
from service.items import ItemRegistry, features_revision
from service.recall import mml_chain, run_chain
from service.runtime import Runtime
from service.schemas import RecallRequest
from service.snapshot import BundleState, ServingSnapshot
from service.store import ItemRecord, MemoryStore
from service.topk import TopKConfig

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


def _snapshot_with_new_item(runtime: Runtime) -> ServingSnapshot:
    """A new item registered with the features of catalogue item 2355 (A Bug's Life)."""
    registry = ItemRegistry(MemoryStore(), 100)
    row = runtime.row_of["2355"]
    text, image = runtime.text[row].copy(), runtime.image[row].copy()
    fingerprint = runtime.encoder_fingerprint
    registry.register(
        ItemRecord("bug-2", text, image, True, features_revision(text, image, True, fingerprint), fingerprint)
    )
    return BundleState(runtime, registry, TopKConfig()).next_snapshot(None)


def test_zero_steps_equal_the_onnx_path_and_steps_change_the_scores(runtime):
    from service.adapt import AdaptingModel

    snapshot = _snapshot_with_new_item(runtime)
    store = MemoryStore()
    request = RecallRequest(user_id="u", history=[*HISTORY, "bug-2"], k=200)
    onnx = run_chain(mml_chain(store), snapshot, request)
    same = run_chain(mml_chain(store, AdaptingModel(runtime, steps=0)), snapshot, request)
    assert [i for i, _ in same.items] == [i for i, _ in onnx.items]
    np.testing.assert_allclose([s for _, s in same.items], [s for _, s in onnx.items], atol=1e-4)
    adapting = AdaptingModel(runtime, steps=3)
    adapted = mml_chain(store, adapting)
    first = run_chain(adapted, snapshot, request)
    assert adapting.model_version == f"{runtime.model_version}+adapt3" and first.warmed_up == ["bug-2"]
    scores = dict(first.items)
    common = [i for i, _ in onnx.items if i in scores]
    assert common and max(abs(scores[i] - dict(onnx.items)[i]) for i in common) > 1e-5
    assert run_chain(adapted, snapshot, request).items == first.items  # deterministic (fixed negatives seed)
    one = RecallRequest(user_id="u", history=["1193"], k=10)  # nothing to adapt on: the ONNX answer
    expected = run_chain(mml_chain(store), snapshot, one).items
    assert [i for i, _ in run_chain(adapted, snapshot, one).items] == [i for i, _ in expected]


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
            service.lifecycle.load()
    finally:
        shutil.rmtree(bare)


def test_the_adapt_path_runs_without_the_training_package(bundle):
    """The local update lives in model/ (model.adapt), shared with training's warm-up: the service's
    torch path answers with `training` unimportable."""
    code = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "training":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
from service.adapt import AdaptingModel
from service.items import ItemRegistry
from service.recall import mml_chain, run_chain
from service.runtime import Runtime
from service.schemas import RecallRequest
from service.snapshot import BundleState
from service.store import MemoryStore
from service.topk import TopKConfig
runtime = Runtime.load({str(bundle)!r})
snapshot = BundleState(runtime, ItemRegistry(MemoryStore(), 10), TopKConfig()).next_snapshot(None)
chain = mml_chain(MemoryStore(), AdaptingModel(runtime, steps=2))
answer = run_chain(chain, snapshot, RecallRequest(user_id="u", history={HISTORY!r}, k=5))
assert len(answer.items) == 5 and "training" not in sys.modules
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
