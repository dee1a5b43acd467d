"""Idempotent POST /events: an `event_id` retried by a client is stored once.

The store contract on the in-process store and on a real Redis (db 12 of the local server: this
file's own database, only its own key prefix is deleted), then the route over real HTTP (the app
under uvicorn with its lifespan off: /events needs the store only, not a loaded bundle)."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from devtools.harness import ThreadedServer, free_port
from service.app import create_app
from service.config import load_settings
from service.store import MemoryStore, RedisStore, StoreUnavailable, make_store

REDIS_URL = "redis://127.0.0.1:6379/12"
PREFIX = "test-events-idem:"


def _clear(client: redis.Redis) -> None:
    keys = list(client.scan_iter(match=f"{PREFIX}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis server at 127.0.0.1:6379")
    _clear(client)
    yield client
    _clear(client)
    client.close()


def _settings(kind: str, **overrides):
    redis_url = REDIS_URL if kind == "redis" else None
    return load_settings(redis_url=redis_url, redis_prefix=PREFIX, history_ttl_s=60, **overrides)


@pytest.fixture(params=["memory", "redis"])
def kind(request) -> str:
    if request.param == "redis":
        request.getfixturevalue("redis_client")
    return request.param


@pytest.fixture
def store(kind):
    s = make_store(_settings(kind))
    yield s
    s.close()


# --- the store ------------------------------------------------------------------------------------


def test_same_event_id_is_appended_once(store):
    first = store.add_event("u1", "a", 10, "ev-1")
    again = store.add_event("u1", "a", 10, "ev-1")
    assert (first.duplicate, first.length) == (False, 1)
    assert (again.duplicate, again.length) == (True, 1)
    assert store.history("u1") == ["a"]

    other = store.add_event("u1", "b", 11, "ev-2")  # another id: appended
    assert (other.duplicate, other.length) == (False, 2)
    assert store.add_event("u2", "a", 10, "ev-1").duplicate is False  # ids are per user
    assert store.history("u1") == ["a", "b"] and store.history("u2") == ["a"]


def test_without_event_id_every_call_appends(store):
    assert store.add_event("u", "a", 1).duplicate is False
    assert store.add_event("u", "a", 1).duplicate is False
    assert store.append_event("u", "a", 1) == 3  # the older int-returning method is unchanged
    assert store.history("u") == ["a", "a", "a"]


def test_first_timestamp_wins_on_a_retry(store):
    store.add_event("u", "a", 20, "ev-a")
    store.add_event("u", "b", 10, "ev-b")
    store.add_event("u", "a", 5, "ev-a")  # a retry with another ts: not stored, order unchanged
    assert store.history("u") == ["b", "a"]  # ordered by the stored timestamps


def test_the_dedupe_key_expires(kind):
    s = make_store(_settings(kind, event_dedupe_ttl_s=1))
    try:
        assert s.add_event("u", "a", 1, "ev").duplicate is False
        assert s.add_event("u", "a", 1, "ev").duplicate is True
        time.sleep(1.1)
        assert s.add_event("u", "a", 1, "ev").duplicate is False  # outside the window: a new event
        assert s.history("u") == ["a", "a"]
    finally:
        s.close()


def test_redis_dedupe_key_is_namespaced_and_has_a_ttl(redis_client):
    s = RedisStore(REDIS_URL, prefix=PREFIX, event_dedupe_ttl_s=3600)
    s.add_event("user:7", "a", 1, "ev-1")
    key = f"{PREFIX}events:seen:user:7:ev-1"
    assert redis_client.get(key) == b"1"
    assert 3590 <= redis_client.ttl(key) <= 3600
    s.close()


def test_redis_failed_append_leaves_no_dedupe_key(redis_client):
    """Both or neither: an append that fails inside the script does not record the event_id, so
    the client's retry is appended."""
    s = RedisStore(REDIS_URL, prefix=PREFIX, backoff=0.01, backoff_max=0.01)
    hist = f"{PREFIX}hist:u"
    redis_client.set(hist, "not a list")  # RPUSH fails with WRONGTYPE
    with pytest.raises(StoreUnavailable):
        s.add_event("u", "a", 1, "ev-1")
    assert redis_client.exists(f"{PREFIX}events:seen:u:ev-1") == 0
    assert redis_client.get(hist) == b"not a list"
    redis_client.delete(hist)
    time.sleep(0.05)  # the breaker's pause
    assert s.add_event("u", "a", 1, "ev-1").duplicate is False
    assert s.history("u") == ["a"]
    s.close()


def test_memory_dedupe_is_bounded():
    s = MemoryStore(event_dedupe_max=2)
    for n in range(3):
        s.add_event("u", f"i{n}", n, f"ev-{n}")
    assert s.add_event("u", "i2", 2, "ev-2").duplicate is True
    assert s.add_event("u", "i0", 0, "ev-0").duplicate is False  # the oldest id was forgotten


# --- POST /events over HTTP -----------------------------------------------------------------------


def _serve(settings):
    app = create_app(settings)
    server = ThreadedServer(app)
    server.server.config.lifespan = "off"  # no bundle: /events needs only the store
    return app, server


@pytest.fixture
def http(kind):
    app, server = _serve(_settings(kind))
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.store = app.state.service.store
        yield client
    app.state.service.store.close()


def test_http_retry_with_the_same_event_id_is_a_duplicate(http):
    body = {
        "user_id": "u-http",
        "item_id": "1193",
        "ts": 100,
        "event_id": "3f2c9a1e-0b7d-4c55-9e2a-1d1f0c9b8a77",
    }
    first = http.post("/events", json=body)
    assert first.status_code == 202
    assert first.json() == {"user_id": "u-http", "history_length": 1, "accepted": 1, "duplicates": 0}
    again = http.post("/events", json=body)
    assert again.status_code == 202
    assert again.json() == {"user_id": "u-http", "history_length": 1, "accepted": 0, "duplicates": 1}

    other = http.post("/events", json={**body, "item_id": "661", "event_id": "ev-2"})
    assert other.json()["accepted"] == 1 and other.json()["history_length"] == 2
    assert http.store.history("u-http") == ["1193", "661"]


def test_http_without_event_id_answers_as_before(http):
    for event_id in ({}, {"event_id": None}):  # null is the same as absent
        r = http.post("/events", json={"user_id": "u-plain", "item_id": "1", **event_id})
        assert r.status_code == 202
    assert r.json() == {"user_id": "u-plain", "history_length": 2}  # no new fields, both appended


@pytest.mark.parametrize(
    "event_id",
    ["", "x" * 129, "a:b", "has space", "caf\u00e9", ["ev"]],
    ids=["empty", "too-long", "colon", "space", "non-ascii", "list"],
)
def test_http_bad_event_id_is_a_422_naming_it(http, event_id):
    r = http.post("/events", json={"user_id": "u-bad", "item_id": "1", "event_id": event_id})
    assert r.status_code == 422, r.text
    assert [e["field"] for e in r.json()["errors"]] == ["event_id"]
    assert http.store.history("u-bad") == []


def test_http_event_id_while_redis_is_down_is_a_503():
    settings = load_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_prefix=PREFIX)
    app, server = _serve(settings)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post("/events", json={"user_id": "u", "item_id": "1", "event_id": "ev-1"})
    assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
    app.state.service.store.close()
