"""The `mml_cooc` arm (issue 14): the MML learners fused with the co-occurrence learner, served as
the union of the dense top-k and the history's co-occurrence neighbours (service/recall.py,
CoocScores and the top-k's bonus).

Exactness: the served top-k equals a brute-force fused ranking of the whole catalogue (+ registered
new items), computed here from the bundle's arrays with mml.cooc.dense_scores (the dense (U, N+1)
path, not the service's sparse one) and the standardisation written out, for many histories drawn
as co-occurrence walks (so their neighbours overlap the dense top-k), with exclude_history,
exclude_ids, a registered new item in the history, histories longer than max_len, and the
popularity fallback of empty/unknown histories. Then the arm-kind validation (start-up, reload,
adapt_steps) and POST /recall over HTTP. Real bundles: the synthetic catalogue (no mirror needed)
and ML-1M (M = 100, needs MML_DATA_MIRROR)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from devtools.bundles import synthetic_bundle
from devtools.harness import ThreadedServer
from mml.cooc import dense_scores
from mml.errors import MMLError
from service.ab import ArmConfig, ArmsConfig, load_arms
from service.app import create_app
from service.config import load_settings
from service.handlers import RecallService
from service.items import ItemRecord, ItemRegistry, features_revision
from service.lifecycle import build_deployment
from service.recall import mml_chain, mml_cooc_chain, popularity_chain, run_chain
from service.runtime import Runtime
from service.schemas import RecallRequest
from service.snapshot import BundleState, ServingSnapshot
from service.store import MemoryStore
from service.topk import TopKConfig

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
SYNTHETIC_M = 20  # neighbours per item of the synthetic bundle (200 items)
NEW = "reg-1"  # the registered new item of the snapshots below
EPS = 1e-12
TOKEN = "cooc-token"


@pytest.fixture(scope="module")
def synthetic_cooc() -> Path:
    return synthetic_bundle(BUNDLES / "synthetic-cooc", seed=0, cooc_neighbours=SYNTHETIC_M)


@pytest.fixture(scope="module")
def synthetic_plain() -> Path:
    """The same catalogue without the co-occurrence learner (shared with test_service_synthetic)."""
    return synthetic_bundle(BUNDLES / "synthetic-0", seed=0)


@pytest.fixture(scope="module", params=["synthetic", "ml-1m"])
def snapshot(request) -> ServingSnapshot:
    """A bundle with the co-occurrence learner and one registered new item (the features of a
    catalogue item; beyond the co-occurrence table's rows)."""
    name = "synthetic_cooc" if request.param == "synthetic" else "service_cooc_bundle"
    return _snapshot(request.getfixturevalue(name), TopKConfig())


def _snapshot(bundle: Path, topk: TopKConfig) -> ServingSnapshot:
    runtime = Runtime.load(bundle)
    assert runtime.has_cooc
    registry = ItemRegistry(MemoryStore(), 100)
    row = int(runtime.popular_rows[3])
    text, image = runtime.text[row].copy(), runtime.image[row].copy()
    fp = runtime.encoder_fingerprint
    registry.register(ItemRecord(NEW, text, image, True, features_revision(text, image, True, fp), fp))
    snap = BundleState(runtime, registry, topk).next_snapshot(None)
    assert NEW in snap.new_items.index
    return snap


def brute_force(snap: ServingSnapshot, req: RecallRequest) -> tuple[list[str], np.ndarray]:
    """Every catalogue item's and registered item's fused score (float64), exclusions removed,
    sorted best first: (ids, scores)."""
    rt, table = snap.runtime, snap.runtime.cooc
    n = table.n_items
    positions = []  # the model's history: catalogue rows, a registered item as a row beyond the table
    for item_id in req.history:
        if item_id in rt.row_of:
            positions.append(rt.row_of[item_id])
        elif item_id in snap.new_items.index:
            positions.append(n + 1)
    positions = positions[-rt.dims.max_len :]
    known = [(p, -1) if p <= n else (-1, snap.new_items.index[NEW]) for p in positions]
    x = _inputs(snap, known)
    query, bias, weight = rt.query_cooc(x)
    q, b, w = query[0].astype(np.float64), float(bias[0]), float(weight[0])
    c = dense_scores(table, np.asarray([positions]))[0, 1:].astype(np.float64)  # (N,) catalogue
    term = w * (c - c.mean()) / np.sqrt(c.var() + EPS)  # the fusion's standardisation, written out
    catalogue = rt.items_concat[1:].astype(np.float64) @ q + b + term
    new = snap.new_items.concat.astype(np.float64) @ q + b + w * (0.0 - c.mean()) / np.sqrt(c.var() + EPS)
    ids = rt.item_id_list[1:] + list(snap.new_items.ids)
    scores = np.concatenate([catalogue, new])
    excluded = set(req.exclude_ids or ())
    if req.exclude_history:
        excluded.update(req.history)
    keep = np.asarray([i not in excluded for i in ids])
    ids, scores = [i for i, k in zip(ids, keep, strict=True) if k], scores[keep]
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order], scores[order]


def _inputs(snap, known):
    from service.recall import _sequence_inputs

    return _sequence_inputs(snap, known)


def assert_exact(served: list[tuple[str, float]], ids: list[str], scores: np.ndarray, k: int) -> None:
    """Same scores in the same order as the brute force's first k; the same items up to ties."""
    tol = 1e-4 * max(1.0, float(np.abs(scores[:k]).max()))
    assert len(served) == min(k, len(ids))
    got = np.asarray([s for _, s in served])
    np.testing.assert_allclose(got, scores[: len(served)], rtol=0, atol=tol)
    score_of = dict(zip(ids, scores.tolist(), strict=True))
    for item_id, score in served:  # each served score is that item's fused score
        assert abs(score_of[item_id] - score) <= tol, item_id
    kth = scores[len(served) - 1]
    must = {i for i, s in zip(ids, scores.tolist(), strict=True) if s > kth + tol}
    assert must <= {i for i, _ in served}  # every item clearly above the k-th is served


def _walk(rt: Runtime, rng: np.random.Generator, length: int) -> list[str]:
    """A history that follows the co-occurrence table (items rated together, as ML-1M sessions)."""
    table = rt.cooc
    has = np.flatnonzero(table.weights[:, 0] > 0)
    row = int(rng.choice(has))
    rows = [row]
    while len(rows) < length:
        nb = table.items[row][table.weights[row] > 0]
        row = int(rng.choice(nb)) if len(nb) and rng.random() < 0.8 else int(rng.choice(has))
        rows.append(row)
    return [rt.item_id_list[r] for r in rows]


def test_served_topk_equals_the_brute_force_fused_ranking(snapshot):
    rt, store = snapshot.runtime, MemoryStore()
    chain, dense_chain = mml_cooc_chain(store), mml_chain(store)
    rng = np.random.default_rng(0)
    overlaps = changed = 0
    for case in range(80):
        history = _walk(rt, rng, int(rng.integers(1, rt.dims.max_len + 12)))  # some beyond max_len
        if case % 4 == 1:
            history.insert(int(rng.integers(0, len(history) + 1)), NEW)
        if case % 7 == 3:
            history.append("not-an-item")
        k = int(rng.choice([1, 5, 20, 100]))
        exclude_ids = None
        if case % 3 == 0:  # some of the neighbours of the last item, the new item, an unknown id
            nb = rt.cooc.items[rt.row_of[history[-1]]] if history[-1] in rt.row_of else []
            exclude_ids = [rt.item_id_list[r] for r in list(nb[:3]) if r > 0] + [NEW, "nope"]
        req = RecallRequest(
            user_id=f"u{case}", history=history, k=k, exclude_history=bool(case % 5), exclude_ids=exclude_ids
        )
        ctx = run_chain(chain, snapshot, req)
        assert not ctx.fallback
        ids, scores = brute_force(snapshot, req)
        assert_exact(ctx.items, ids, scores, k)
        if ctx.cooc is not None:  # the history's neighbours overlap the dense part's own top-k
            dense = snapshot.topk(
                ctx.query, ctx.bias, k, ctx.excluded_rows, ctx.excluded_new, snapshot.new_items
            )
            neighbours = {rt.item_id_list[r] for r in ctx.cooc[0].tolist()}
            overlaps += bool({i for i, _ in dense} & neighbours)
        plain = run_chain(dense_chain, snapshot, req)  # the paper's fusion, without co-occurrence
        changed += [i for i, _ in plain.items] != [i for i, _ in ctx.items]
        if exclude_ids:
            assert not set(exclude_ids) & {i for i, _ in ctx.items}
        if req.exclude_history:
            assert not set(history) & {i for i, _ in ctx.items}
    assert overlaps >= 10, overlaps  # the union's exactness was exercised where it matters
    assert changed >= 10, changed  # the co-occurrence learner changes answers


def test_an_ivf_topk_adds_the_bonus_exactly(synthetic_cooc):
    """The IVF top-k merges the bonus rows, re-scored exactly, with the index's k best: with every
    list probed over float rows the index is exact, and so is the fused answer."""
    lists = 4
    snap = _snapshot(
        synthetic_cooc, TopKConfig(kind="ivf", min_items=0, codec="flat", nlist=lists, nprobe=lists)
    )
    assert snap.topk.kind == "ivf"
    rng = np.random.default_rng(3)
    chain = mml_cooc_chain(MemoryStore())
    bonus_used = 0
    for case in range(30):
        history = _walk(snap.runtime, rng, int(rng.integers(1, 15)))
        if case % 3 == 0:
            history.append(NEW)
        req = RecallRequest(user_id=f"u{case}", history=history, k=int(rng.choice([5, 20])),
                            exclude_history=bool(case % 2))  # fmt: skip
        ctx = run_chain(chain, snap, req)
        bonus_used += ctx.cooc is not None
        ids, scores = brute_force(snap, req)
        assert_exact(ctx.items, ids, scores, req.k)
    assert bonus_used >= 20, bonus_used


def test_registered_new_item_competes_through_the_dense_part(snapshot):
    """Only a registered item in the history: no co-occurrence (beyond the table), the dense answer
    holds; a registered item is a candidate with shift added, like every catalogue item."""
    store = MemoryStore()
    req = everything(snapshot, history=[NEW], exclude_history=False)
    ctx = run_chain(mml_cooc_chain(store), snapshot, req)
    assert not ctx.fallback and ctx.warmed_up == [NEW] and ctx.cooc is None
    ids, scores = brute_force(snapshot, req)
    assert_exact(ctx.items, ids, scores, req.k)
    assert NEW in {i for i, _ in ctx.items}
    # with co-occurrence: the new item is still ranked by its dense score plus the shift
    history = _walk(snapshot.runtime, np.random.default_rng(1), 6)
    req = everything(snapshot, history=history)
    ctx = run_chain(mml_cooc_chain(store), snapshot, req)
    ids, scores = brute_force(snapshot, req)
    assert_exact(ctx.items, ids, scores, req.k)
    assert NEW in {i for i, _ in ctx.items}


def everything(snap: ServingSnapshot, **fields) -> RecallRequest:
    """A request whose k covers every candidate (above the API's 1000: constructed, not validated)."""
    k = snap.runtime.dims.n_items + len(snap.new_items)
    return RecallRequest.model_construct(**{"user_id": "u", "k": k, "exclude_history": True, **fields})


@pytest.mark.parametrize("history", [[], ["not-an-item"], ["nope", "never"]])
def test_empty_or_unknown_history_falls_back_to_popularity(snapshot, history):
    store = MemoryStore()
    req = RecallRequest(user_id="u", history=history, k=20, exclude_ids=[snapshot.runtime.item_id_list[
        int(snapshot.runtime.popular_rows[0])]])  # fmt: skip
    ctx = run_chain(mml_cooc_chain(store), snapshot, req)
    popular = run_chain(popularity_chain(store), snapshot, req)
    assert ctx.fallback and ctx.score_shift == 0.0
    assert ctx.items == popular.items and len(ctx.items) == 20


# --- the arm kind -----------------------------------------------------------------------------------


def test_mml_cooc_arm_on_a_bundle_without_the_learner_is_refused(synthetic_plain, synthetic_cooc, tmp_path):
    store = MemoryStore()
    registry = ItemRegistry(store, 0)
    config = ArmsConfig(arms=[ArmConfig(name="mml"), ArmConfig(name="cooc-arm", kind="mml_cooc")])
    with pytest.raises(
        MMLError, match=r"arm 'cooc-arm': kind mml_cooc needs a bundle with the co-occurrence"
    ):
        build_deployment(config, synthetic_plain, registry, store)
    deployment = build_deployment(config, synthetic_cooc, registry, store)
    assert deployment.arms["cooc-arm"].kind == "mml_cooc"
    assert [s.name for s in deployment.arms["cooc-arm"].chain] == [
        "history", "encode", "model", "cooc", "topk", "rank"
    ]  # fmt: skip

    # adapt_steps is for kind mml only: the arms file is refused naming the arm
    arms = tmp_path / "arms.yaml"
    arms.write_text(yaml.safe_dump({"arms": [{"name": "c", "kind": "mml_cooc", "adapt_steps": 2}]}))
    with pytest.raises(MMLError, match=r"arm 'c': adapt_steps > 0 is for kind mml only"):
        load_arms(arms)

    # start-up: the service does not start, the error names the arm
    arms.write_text(yaml.safe_dump({"arms": [{"name": "cooc-arm", "kind": "mml_cooc"}]}))
    service = RecallService(
        load_settings(bundle=synthetic_plain, arms_config=arms, exposure_log=tmp_path / "e")
    )
    try:
        with pytest.raises(MMLError, match="arm 'cooc-arm': kind mml_cooc needs"):
            service.lifecycle.load()
    finally:
        service.close()


# --- HTTP -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(synthetic_cooc, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cooc")
    arms = folder / "arms.yaml"
    arms.write_text(
        yaml.safe_dump(
            {
                "salt": "cooc-test",
                "arms": [
                    {"name": "control", "kind": "popularity", "weight": 0.3},
                    {"name": "mml", "kind": "mml", "weight": 0.3},
                    {"name": "cooc", "kind": "mml_cooc", "weight": 0.4},
                ],
            }
        )
    )
    settings = load_settings(
        bundle=synthetic_cooc, arms_config=arms, admin_token=TOKEN, exposure_log=folder / "exposures.jsonl"
    )
    with ThreadedServer(create_app(settings)) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        srv.client = client
        yield srv


def test_recall_over_http_on_an_mml_cooc_arm(server, synthetic_cooc, synthetic_plain):
    c = server.client
    models = {a["name"]: a for a in c.get("/v1/models").json()["arms"]}
    assert models["cooc"]["kind"] == "mml_cooc"
    history = ["1", "2", "3", "4"]
    body = {"user_id": "h1", "history": history, "k": 30, "exclude_ids": ["5"]}
    r = c.post("/recall", json=body, headers={"X-MML-Arm": "cooc"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["arm"] == "cooc" and not got["fallback"] and len(got["items"]) == 30
    assert "cooc;dur=" in r.headers["Server-Timing"]
    snap = BundleState(
        Runtime.load(synthetic_cooc), ItemRegistry(MemoryStore(), 0), TopKConfig()
    ).next_snapshot(None)
    ids, scores = brute_force(snap, RecallRequest(**body))
    assert_exact([(i["item_id"], i["score"]) for i in got["items"]], ids, scores, 30)
    mml = c.post("/recall", json=body, headers={"X-MML-Arm": "mml"}).json()
    assert [i["item_id"] for i in mml["items"]] != [i["item_id"] for i in got["items"]]
    assert (
        "cooc;dur=" not in c.post("/recall", json=body, headers={"X-MML-Arm": "mml"}).headers["Server-Timing"]
    )

    # empty history: the popularity fallback, as on the other arms
    r = c.post("/recall", json={"user_id": "h2", "history": [], "k": 5}, headers={"X-MML-Arm": "cooc"})
    assert r.status_code == 200 and r.json()["fallback"]
    # bad input: a 4xx naming the field, never a 500
    r = c.post("/recall", json={"user_id": "h3", "history": ["1"], "k": 0}, headers={"X-MML-Arm": "cooc"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "k"

    # a reload that points the mml_cooc arm at a bundle without the learner is refused (409, the arm
    # named), and the arm keeps serving its bundle
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = c.post("/admin/reload", json={"path": str(synthetic_plain), "arm": "cooc"}, headers=auth)
    assert r.status_code == 409 and "arm 'cooc'" in r.json()["message"], r.text
    again = c.post("/recall", json=body, headers={"X-MML-Arm": "cooc"}).json()
    assert again["items"] == got["items"]


def test_the_cooc_arm_loads_without_scipy_or_torch(synthetic_cooc):
    """The serving image has neither: the table is read and scored with numpy alone (mml.cooc imports
    scipy only where training builds a table)."""
    import subprocess
    import sys

    code = (
        "import sys; from service.runtime import Runtime; from service.recall import mml_cooc_chain; "
        f"rt = Runtime.load({str(synthetic_cooc)!r}); assert rt.has_cooc; "
        "print(sorted(m for m in ('scipy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
