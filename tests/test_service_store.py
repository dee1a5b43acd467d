"""The service store: the same contract for the in-process store and a real Redis (a redis-server of
this module's own, emptied before each test; the shared server on 6379 is never touched), and the
Redis circuit breaker against a server that stops and returns."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import redis

from devtools.harness import redis_server
from service import metrics
from service.store import Embedding, ItemRecord, MemoryStore, RedisStore, StoreUnavailable


@pytest.fixture(scope="module")
def own_redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with redis_server() as server:
        yield server.url


@pytest.fixture
def redis_db(own_redis):
    client = redis.Redis.from_url(own_redis, socket_timeout=1)
    client.flushdb()  # this module's own server
    client.close()
    return own_redis


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryStore(history_cap=5)
    else:
        url = request.getfixturevalue("redis_db")
        s = RedisStore(url, prefix="t:", history_cap=5, history_ttl_s=60)
        yield s
        s.close()


def _record(item_id: str, seed: int, with_image: bool = True) -> ItemRecord:
    rng = np.random.default_rng(seed)
    return ItemRecord(
        item_id=item_id,
        text=rng.standard_normal(8).astype(np.float32),
        image=rng.standard_normal(16).astype(np.float32) if with_image else np.zeros(16, np.float32),
        image_mask=with_image,
        revision=f"rev{seed}",
        encoder="enc",
        meta={"title": item_id},
    )


def test_history_is_capped_and_ordered_by_timestamp(store):
    for ts, item in [(10, "a"), (30, "c"), (20, "b"), (20, "b2"), (40, "d"), (50, "e")]:
        length = store.append_event("u1", item, ts)
    assert length == 5  # capped: the first event ("a") dropped
    assert store.history("u1") == ["b", "b2", "c", "d", "e"]  # time order, ties by arrival
    assert store.history("nobody") == []


def test_items_and_embeddings_round_trip(store):
    version0, registered0 = store.registered()
    assert registered0 == {}
    assert store.put_item(_record("n1", 1)) is True
    assert store.put_item(_record("n2", 2, with_image=False)) is True
    assert store.put_item(_record("n1", 3)) is False  # re-registration replaces
    version, registered = store.registered()
    assert version != version0 and version == store.registered_version()
    assert registered == {"n1": "rev3", "n2": "rev2"}
    got = store.get_items(["n1", "n2", "missing"])
    assert set(got) == {"n1", "n2"}
    np.testing.assert_array_equal(got["n1"].text, _record("n1", 3).text)
    assert got["n2"].image_mask is False and got["n1"].meta == {"title": "n1"}

    vec = np.arange(4, dtype=np.float32)
    store.put_embeddings("v1", {"n1": Embedding("rev3", vec)})
    assert store.get_embeddings("v2", ["n1"]) == {}  # keyed by model version
    emb = store.get_embeddings("v1", ["n1", "n2"])
    assert list(emb) == ["n1"] and emb["n1"].revision == "rev3"
    np.testing.assert_array_equal(emb["n1"].vector, vec)


def test_redis_exposures_go_to_a_stream(redis_db):
    from service.ab import count_users, exposure_record, read_exposures

    s = RedisStore(redis_db, prefix="t:")
    s.add_exposures(
        [
            exposure_record("r1", "u1", "mml", "v", False, ["10", "7", "new-1"], ["new-1"]),
            exposure_record("r2", "u2", "mml", "v", True, fallback=True),
        ]
    )
    records = list(read_exposures(redis_db, prefix="t:"))
    assert [r["request_id"] for r in records] == ["r1", "r2"]
    assert records[0]["items"] == ["10", "7", "new-1"] and records[0]["new_items"] == ["new-1"]
    assert records[1]["items"] == [] and records[1]["fallback"] is True and records[1]["override"] is True
    assert count_users(iter(records)) == {"mml": 1}
    s.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_breaker_fails_fast_while_down_and_recovers(tmp_path):
    with redis_server(tmp_path) as server:
        s = RedisStore(server.url, socket_timeout=0.05, backoff=0.2, backoff_max=0.4)
        s.append_event("u", "a", 1)
        server.stop()
        errors_before = metrics.REDIS_ERRORS._value.get()
        with pytest.raises(StoreUnavailable):
            s.history("u")
        assert metrics.REDIS_ERRORS._value.get() == errors_before + 1
        assert not s.available()
        # while the breaker is open, calls fail without touching the network (no new error counted)
        with pytest.raises(StoreUnavailable, match="circuit open"):
            s.history("u")
        assert metrics.REDIS_ERRORS._value.get() == errors_before + 1
        server.start()  # same port, same data directory: the data comes back
        deadline = time.monotonic() + 10
        while True:
            try:
                assert s.history("u") == ["a"]
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not recover"
                time.sleep(0.05)
        assert s.available() and metrics.REDIS_UP._value.get() == 1
        s.close()
