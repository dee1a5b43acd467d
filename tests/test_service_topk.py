"""The top-k stage (service/topk.py): the Faiss IVF index against the exact path on a synthetic
catalogue, exclusions, registered new items scored beside the index, the exact fallback under
min_items, the config's validation, the settings that switch it on, and the mml chain serving it
over an ML-1M bundle (integration: skipped without MML_DATA_MIRROR)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.config import load_settings
from service.items import ItemRegistry, TableSnapshot, features_revision
from service.store import ItemRecord, MemoryStore
from service.topk import ExactTopK, IvfTopK, TopKConfig, make_topk, top_k

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / ".cache" / "test-artifacts" / "service-bundles"
HISTORY = ["1193", "661", "914", "3408", "2355", "1197", "1287", "2804"]

D = 64
N = 20_000
K = 100


def _catalogue(seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(items_concat with the pad row 0, item ids, queries): rows drawn around 256 topic centres,
    row norms log-normal (like trained item vectors: popular items longer), queries near the topics."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, D)).astype(np.float32)
    rows = centres[rng.integers(0, 256, N)] + 0.5 * rng.standard_normal((N, D)).astype(np.float32)
    rows *= (rng.lognormal(0.0, 0.3, (N, 1)) / np.sqrt(D)).astype(np.float32)
    items = np.vstack([np.zeros((1, D), np.float32), rows]).astype(np.float32)
    queries = (centres[rng.integers(0, 256, 50)] + rng.standard_normal((50, D))).astype(np.float32)
    return items, [f"i{r}" for r in range(N + 1)], queries


def _table(rows: dict[str, np.ndarray], revision: str = "r1") -> TableSnapshot:
    ids = tuple(rows)
    concat = np.stack(list(rows.values())).astype(np.float32) if rows else np.zeros((0, D), np.float32)
    m = len(ids)
    return TableSnapshot(
        ids=ids,
        index={i: n for n, i in enumerate(ids)},
        revisions={i: revision for i in ids},
        unusable={},
        id_emb=np.zeros((m, 8), np.float32),
        text=np.zeros((m, 4), np.float32),
        image=np.zeros((m, 4), np.float32),
        image_mask=np.zeros(m, bool),
        concat=concat,
    )


EMPTY = _table({})


@pytest.fixture(scope="module")
def catalogue():
    return _catalogue()


CODECS = ("pq4fs", "sq8", "fp16", "flat")


@pytest.fixture(scope="module")
def indexes(catalogue):
    """One IVF index per codec over the synthetic catalogue, 256 lists, default nprobe and rerank."""
    import faiss

    faiss.omp_set_num_threads(1)  # as the service runs it
    items, ids, _ = catalogue
    return {c: IvfTopK(items, TopKConfig(kind="ivf", nlist=256, min_items=0, codec=c), ids) for c in CODECS}


@pytest.fixture(scope="module")
def ivf(indexes):
    return indexes[TopKConfig().codec]


def _recall(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> float:
    return len({i for i, _ in got} & {i for i, _ in want}) / len(want)


def _assert_exact_scores(got: list[tuple[str, float]], items: np.ndarray, q: np.ndarray, bias: float) -> None:
    """Every returned item carries its exact fused score (float row . query + bias), best first."""
    rows = np.asarray([int(i[1:]) for i, _ in got])
    np.testing.assert_allclose([s for _, s in got], items[rows] @ q + bias, rtol=1e-5, atol=1e-5)
    scores = [s for _, s in got]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("codec", CODECS)
def test_ivf_recall_against_exact_at_the_default_nprobe(catalogue, indexes, codec):
    items, ids, queries = catalogue
    ivf = indexes[codec]
    exact = ExactTopK(items, ids)
    assert ivf.nprobe == TopKConfig().probes_for(256) == 42 and ivf.nlist == 256 and ivf.ntotal == N
    assert ivf.codec == codec and ivf.index_dim % 8 == 0 and ivf.index_dim > D
    assert TopKConfig().codec == "pq4fs" and TopKConfig().rerank_for() == 16  # the measured winner
    assert ivf.rerank == (0 if codec == "flat" else TopKConfig(codec=codec).rerank_for())
    hits = []
    for q in queries:
        got = ivf(q, 0.5, K, [], [], EMPTY)
        assert len(got) == K and len({i for i, _ in got}) == K
        _assert_exact_scores(got, items, q, 0.5)  # re-ranked (or flat): exact scores, exact order
        hits.append(_recall(got, exact(q, 0.5, K, [], [], EMPTY)))
    print(f"{codec} recall@{K} {np.mean(hits):.4f}")
    assert np.mean(hits) >= 0.9
    assert "i0" not in {i for q in queries[:5] for i, _ in ivf(q, 0.0, K, [], [], EMPTY)}  # never the pad


def test_the_compressed_codes_are_what_re_ranking_repairs(catalogue, indexes):
    """With k candidates only (rerank 1: the index's own choice of k) pq4fs is measurably worse: the
    exact re-scoring of rerank x k candidates is what brings it back to the flat index's recall."""
    items, ids, queries = catalogue
    exact = ExactTopK(items, ids)
    no_rerank = IvfTopK(items, TopKConfig(kind="ivf", nlist=256, min_items=0, codec="pq4fs", rerank=1), ids)
    with_rerank, flat = indexes["pq4fs"], indexes["flat"]
    r1, r8, rf = [], [], []
    for q in queries[:20]:
        want = exact(q, 0.0, K, [], [], EMPTY)
        r1.append(_recall(no_rerank(q, 0.0, K, [], [], EMPTY), want))
        r8.append(_recall(with_rerank(q, 0.0, K, [], [], EMPTY), want))
        rf.append(_recall(flat(q, 0.0, K, [], [], EMPTY), want))
    print(f"pq4fs rerank 1: {np.mean(r1):.4f}, default: {np.mean(r8):.4f}, flat: {np.mean(rf):.4f}")
    assert np.mean(r1) < np.mean(r8) - 0.05
    assert np.mean(r8) >= np.mean(rf) - 0.02


@pytest.mark.parametrize("codec", CODECS)
def test_all_lists_probed_is_the_exact_answer(catalogue, codec):
    items, ids, queries = catalogue
    full = IvfTopK(items, TopKConfig(kind="ivf", nlist=16, nprobe=16, min_items=0, codec=codec), ids)
    exact = ExactTopK(items, ids)
    for q in queries[:5]:
        got, want = full(q, 1.0, K, [], [], EMPTY), exact(q, 1.0, K, [], [], EMPTY)
        _assert_exact_scores(got, items, q, 1.0)
        if codec == "flat":  # the scan itself is exact
            assert [i for i, _ in got[:20]] == [i for i, _ in want[:20]]
            np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)
        else:  # compressed: only the candidate set is approximate, and only at its tail
            assert [i for i, _ in got[:10]] == [i for i, _ in want[:10]]
            assert _recall(got, want) >= 0.97


def test_exclusions_are_never_returned_and_k_is_still_filled(catalogue, ivf):
    items, ids, queries = catalogue
    q = queries[0]
    first = ivf(q, 0.0, K, [], [], EMPTY)
    # exclude the whole first answer, and some more: over-fetching must still fill k
    excluded = [int(i[1:]) for i, _ in first] + list(range(1, 300))
    second = ivf(q, 0.0, K, excluded, [], EMPTY)
    assert len(second) == K
    assert not {int(i[1:]) for i, _ in second} & set(excluded)
    # new items excluded by their table position
    table = _table({"new-a": 50 * q / np.linalg.norm(q), "new-b": 40 * q / np.linalg.norm(q)})
    got = [i for i, _ in ivf(q, 0.0, K, [], [1], table)]
    assert "new-a" in got and "new-b" not in got


@pytest.mark.parametrize("codec", CODECS)
def test_registered_items_are_scored_exactly_beside_an_index_that_never_changes(catalogue, codec):
    items, ids, queries = catalogue
    index = IvfTopK(items, TopKConfig(kind="ivf", nlist=256, min_items=0, codec=codec), ids)
    q = queries[3]
    unit = q / np.linalg.norm(q)
    # longer than every catalogue row along the query: the exact best item
    table = _table({"new-1": 3.0 * unit * np.linalg.norm(items, axis=1).max()})
    got = index(q, 0.25, K, [], [], table)
    assert got[0][0] == "new-1"
    assert got[0][1] == pytest.approx(float(table.concat[0] @ q) + 0.25, rel=1e-5)
    assert index.ntotal == N and len(got) == K
    # another snapshot (re-registered with another row, one more item): answered from its rows
    moved = _table({"new-1": -unit, "new-2": 2.0 * unit * np.linalg.norm(items, axis=1).max()}, "r2")
    got = index(q, 0.0, K, [], [], moved)
    assert got[0][0] == "new-2" and "new-1" not in [i for i, _ in got] and index.ntotal == N
    assert got[0][1] == pytest.approx(float(moved.concat[1] @ q), rel=1e-5)
    scores = [s for _, s in got]
    assert scores == sorted(scores, reverse=True)
    # a snapshot without them: the catalogue alone
    got = [i for i, _ in index(q, 0.0, K, [], [], EMPTY)]
    assert "new-2" not in got and index.ntotal == N


def test_min_items_falls_back_to_exact(catalogue):
    items, ids, queries = catalogue
    small = make_topk(TopKConfig(kind="ivf", min_items=N + 1), items, ids)
    assert isinstance(small, ExactTopK)
    exact = make_topk(TopKConfig(), items, ids)
    table = _table({"new-1": queries[0]})
    for q in queries[:3]:
        assert small(q, 0.5, K, [1, 2], [0], table) == exact(q, 0.5, K, [1, 2], [0], table)
    assert isinstance(make_topk(TopKConfig(kind="ivf", min_items=N, nlist=8, nprobe=8), items, ids), IvfTopK)


def test_top_k_is_the_exact_selection():
    scores = np.array([-np.inf, 0.5, 2.0, 1.0, -np.inf, 2.0], np.float32)
    assert top_k(scores, 3).tolist() == [2, 5, 3]
    assert top_k(scores, 10).tolist() == [2, 5, 3, 1]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"kind": "annoy"}, "kind"),
        ({"nprobe": 0}, "nprobe"),
        ({"nlist": 0}, "nlist"),
        ({"min_items": -1}, "min_items"),
        ({"nlist": 16, "nprobe": 32}, "nprobe"),
        ({"nprobes": 4}, "nprobes"),
        ({"codec": "pq8"}, "codec"),
        ({"rerank": 0}, "rerank"),
    ],
)
def test_config_errors_name_the_field(value, field):
    with pytest.raises(ValidationError) as err:
        TopKConfig(**value)
    assert field in str(err.value)


def test_settings_switch_it_on(monkeypatch):
    assert load_settings().topk == TopKConfig()  # exact by default
    monkeypatch.setenv("MML_TOPK__KIND", "ivf")
    monkeypatch.setenv("MML_TOPK__NPROBE", "48")
    topk = load_settings().topk
    assert (topk.kind, topk.nprobe, topk.min_items) == ("ivf", 48, 50_000)
    monkeypatch.setenv("MML_TOPK__NPROBE", "0")
    with pytest.raises(ValidationError, match="nprobe"):
        load_settings()


@pytest.fixture(scope="module")
def runtime(ml1m_features_dir: Path):
    from devtools.bundles import sources_digest, untrained_bundle
    from service.runtime import Runtime

    bundle = untrained_bundle(
        ml1m_features_dir, BUNDLES / "a", seed=0, model_version=f"untrained-a-{sources_digest(REPO)}"
    )
    return Runtime.load(bundle)


def test_the_chain_serves_the_ivf_stage_with_new_items(runtime):
    from service.recall import mml_chain, run_chain
    from service.schemas import RecallRequest
    from service.snapshot import BundleState

    store = MemoryStore()
    registry = ItemRegistry(store, 100)
    exact_state = BundleState(runtime, registry, TopKConfig())
    assert isinstance(exact_state.topk, ExactTopK)
    # ML-1M (3,883 items) is under the default min_items: kind ivf stays exact
    assert isinstance(BundleState(runtime, registry, TopKConfig(kind="ivf")).topk, ExactTopK)
    ivf_state = BundleState(runtime, registry, TopKConfig(kind="ivf", min_items=0, nlist=16, nprobe=16))
    assert isinstance(ivf_state.topk, IvfTopK) and ivf_state.topk.ntotal == runtime.dims.n_items
    chain = mml_chain(store)

    def both(history, k, **kw):
        fields = {"user_id": "u", "history": history, "k": k, "exclude_history": True, "exclude_ids": None}
        request = RecallRequest.model_construct(**{**fields, **kw})  # k above the API's 1000: every item
        a = run_chain(chain, exact_state.next_snapshot(None), request)
        b = run_chain(chain, ivf_state.next_snapshot(None), request)
        return a, b

    # every list probed: the exact answer, items and scores
    a, b = both(HISTORY, 50)
    assert [i for i, _ in b.items] == [i for i, _ in a.items]
    np.testing.assert_allclose([s for _, s in b.items], [s for _, s in a.items], rtol=1e-4, atol=1e-4)
    assert not set(HISTORY) & {i for i, _ in b.items}

    # registered after the index was built: a candidate of the IVF stage too
    row = runtime.row_of["2355"]
    text, image = runtime.text[row].copy(), runtime.image[row].copy()
    fp = runtime.encoder_fingerprint
    registry.register(ItemRecord("bug-2", text, image, True, features_revision(text, image, True, fp), fp))
    everything = runtime.dims.n_items + 1
    a, b = both(HISTORY[:3], everything)
    assert "bug-2" in {i for i, _ in b.items}
    assert [i for i, _ in b.items[:100]] == [i for i, _ in a.items[:100]]
    assert ivf_state.topk.ntotal == runtime.dims.n_items  # the index itself never changes
    _, c = both(HISTORY[:3], everything, exclude_ids=["bug-2"])
    assert "bug-2" not in {i for i, _ in c.items} and len(c.items) == len(b.items) - 1
