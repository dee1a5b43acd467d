"""The service's state: users' recent histories, registered new items (features), generated ID
embeddings of new items, exposure records.

Two implementations of one interface:

* `MemoryStore`: in-process dictionaries (REDIS_URL unset: one replica, state lost on restart);
* `RedisStore`: a real Redis connection with short socket timeouts and no client-side retries,
  behind a circuit breaker. Any Redis error is counted (`mml_redis_errors_total`), opens the
  breaker and surfaces as `StoreUnavailable`; while the breaker is open calls fail at once without
  touching the network; after a pause (doubling per consecutive failure, capped) the next call
  probes Redis and a success closes the breaker. Callers (the pipeline) answer in degraded mode
  meanwhile and recover by themselves.

Redis layout (every key starts with the configured prefix, default `mml:`):

    hist:<user_id>          list of "<ts>\\t<item_id>", capped (LTRIM), TTL refreshed per event
    events:seen:<user_id>:<event_id>
                            "1": the event was appended (idempotent POST /events), TTL = dedupe window
    items                   hash item_id -> revision of every registered new item
    items:version           counter, incremented by every registration (replicas poll it)
    item:<item_id>          hash: text, image (float32 bytes), image_mask, revision, encoder, meta (JSON)
    emb:<model_version>     hash item_id -> "<revision>:" + float32 bytes of the generated ID embedding
    exposures               stream of exposure records (XADD MAXLEN ~)
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from service import metrics


class StoreUnavailable(Exception):
    """The store cannot be reached now (Redis down or the circuit breaker open)."""


@dataclass
class ItemRecord:
    """A registered new item: its pretrained features, as the bundle's encoders produced them."""

    item_id: str
    text: np.ndarray  # (text_dim,) float32, L2-normalised
    image: np.ndarray  # (image_dim,) float32, L2-normalised, zeros when image_mask is False
    image_mask: bool
    revision: str  # digest of the features (changes when the item is registered again)
    encoder: str  # fingerprint of the encoders that produced the features
    meta: dict = field(default_factory=dict)  # title, year, genres, registered_at


@dataclass(frozen=True)
class EventAppend:
    """What `Store.add_event` did."""

    length: int  # the user's history length after the call
    duplicate: bool  # the event_id was already recorded (within the dedupe window): nothing appended


@dataclass
class Embedding:
    revision: str  # revision of the item features it was generated from
    vector: np.ndarray  # (d,) float32


class Store:
    """Interface. Every method may raise StoreUnavailable (only RedisStore does)."""

    kind = "abstract"

    def available(self) -> bool:
        """False while the store is known to be unreachable (no network call)."""
        return True

    def ping(self) -> bool:
        raise NotImplementedError

    def append_event(self, user_id: str, item_id: str, ts: int) -> int:
        """Append to the user's history (capped); returns its length."""
        return self.add_event(user_id, item_id, ts).length

    def add_event(self, user_id: str, item_id: str, ts: int, event_id: str | None = None) -> EventAppend:
        """Append to the user's history (capped). With an `event_id` already recorded for this user
        within the dedupe window nothing is appended (a retry); otherwise the event_id is recorded
        atomically with the append: both happen or neither. Without an event_id every call appends."""
        raise NotImplementedError

    def history(self, user_id: str) -> list[str]:
        """The user's stored item ids, oldest first (ordered by timestamp, ties by arrival)."""
        raise NotImplementedError

    def put_item(self, record: ItemRecord) -> bool:
        """Register (or replace) a new item; returns True when it was not registered before."""
        raise NotImplementedError

    def registered(self) -> tuple[str, dict[str, str]]:
        """(version, {item_id: revision}) of every registered item."""
        raise NotImplementedError

    def registered_version(self) -> str:
        raise NotImplementedError

    def get_items(self, item_ids: list[str]) -> dict[str, ItemRecord]:
        raise NotImplementedError

    def get_embeddings(self, model_version: str, item_ids: list[str]) -> dict[str, Embedding]:
        raise NotImplementedError

    def put_embeddings(self, model_version: str, embeddings: dict[str, Embedding]) -> None:
        raise NotImplementedError

    def add_exposures(self, records: list[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _sorted_history(entries: list[tuple[int, str]]) -> list[str]:
    # Python's sort is stable: equal timestamps keep arrival order.
    return [item for _, item in sorted(entries, key=lambda e: e[0])]


class MemoryStore(Store):
    kind = "memory"

    def __init__(
        self, history_cap: int = 200, event_dedupe_ttl_s: float = 86_400, event_dedupe_max: int = 100_000
    ) -> None:
        self.history_cap = history_cap
        self.event_dedupe_ttl_s = event_dedupe_ttl_s
        self.event_dedupe_max = event_dedupe_max
        self._lock = threading.Lock()
        self._histories: dict[str, list[tuple[int, str]]] = {}
        # (user_id, event_id) -> expiry (monotonic seconds), oldest first: one TTL for all, so the
        # insertion order is the expiry order; bounded (the oldest ids are forgotten beyond the cap)
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._items: dict[str, ItemRecord] = {}
        self._version = 0
        self._embeddings: dict[tuple[str, str], Embedding] = {}
        self.exposures: list[dict] = []

    def ping(self) -> bool:
        return True

    def add_event(self, user_id: str, item_id: str, ts: int, event_id: str | None = None) -> EventAppend:
        with self._lock:
            now = time.monotonic()
            while self._seen and next(iter(self._seen.values())) <= now:
                self._seen.popitem(last=False)
            if event_id is not None and (user_id, event_id) in self._seen:
                return EventAppend(len(self._histories.get(user_id, ())), duplicate=True)
            entries = self._histories.setdefault(user_id, [])
            entries.append((ts, item_id))
            del entries[: max(0, len(entries) - self.history_cap)]
            if event_id is not None:
                self._seen[(user_id, event_id)] = now + self.event_dedupe_ttl_s
                while len(self._seen) > self.event_dedupe_max:
                    self._seen.popitem(last=False)
            return EventAppend(len(entries), duplicate=False)

    def history(self, user_id: str) -> list[str]:
        with self._lock:
            return _sorted_history(list(self._histories.get(user_id, [])))

    def put_item(self, record: ItemRecord) -> bool:
        with self._lock:
            created = record.item_id not in self._items
            self._items[record.item_id] = record
            self._version += 1
            return created

    def registered(self) -> tuple[str, dict[str, str]]:
        with self._lock:
            return str(self._version), {k: r.revision for k, r in self._items.items()}

    def registered_version(self) -> str:
        return str(self._version)

    def get_items(self, item_ids: list[str]) -> dict[str, ItemRecord]:
        with self._lock:
            return {i: self._items[i] for i in item_ids if i in self._items}

    def get_embeddings(self, model_version: str, item_ids: list[str]) -> dict[str, Embedding]:
        with self._lock:
            found = {i: self._embeddings.get((model_version, i)) for i in item_ids}
        return {i: e for i, e in found.items() if e is not None}

    def put_embeddings(self, model_version: str, embeddings: dict[str, Embedding]) -> None:
        with self._lock:
            for item_id, emb in embeddings.items():
                self._embeddings[(model_version, item_id)] = emb

    def add_exposures(self, records: list[dict]) -> None:
        with self._lock:
            self.exposures.extend(records)
            del self.exposures[: max(0, len(self.exposures) - 100_000)]


class CircuitBreaker:
    """Closed -> (failure) open for `backoff` seconds -> one probe call -> closed or open again with
    the pause doubled (up to `backoff_max`)."""

    def __init__(self, backoff: float, backoff_max: float) -> None:
        self.base = backoff
        self.max = backoff_max
        self._pause = backoff
        self._open_until = 0.0
        self._failures = 0
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._failures == 0

    def allow(self) -> bool:
        with self._lock:
            return self._failures == 0 or time.monotonic() >= self._open_until

    def success(self) -> None:
        with self._lock:
            if self._failures:
                self._failures = 0
                self._pause = self.base
                metrics.REDIS_UP.set(1)

    def failure(self) -> None:
        with self._lock:
            self._pause = self.base if self._failures == 0 else min(self._pause * 2, self.max)
            self._failures += 1
            self._open_until = time.monotonic() + self._pause
            metrics.REDIS_UP.set(0)


# One atomic step (a script runs alone on the server): dedupe check, append, cap, TTL, and only then
# the dedupe key, after every command that could fail, so an error leaves neither. `#!lua` (Redis 7):
# the out-of-memory check happens once before the script starts, not between its writes.
# KEYS[1] history, KEYS[2] (only with an event_id) dedupe key;
# ARGV: entry, history cap, history TTL (0: none), dedupe TTL. Returns {appended 0/1, history length}.
_APPEND_EVENT = """#!lua
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  return {0, redis.call('LLEN', KEYS[1])}
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
if tonumber(ARGV[3]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if KEYS[2] then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[4])
end
return {1, redis.call('LLEN', KEYS[1])}
"""


def _f32(buf: bytes | None, dim_hint: int | None = None) -> np.ndarray:
    if buf is None:
        return np.zeros(dim_hint or 0, np.float32)
    return np.frombuffer(buf, dtype=np.float32).copy()


class RedisStore(Store):
    kind = "redis"

    def __init__(
        self,
        url: str,
        prefix: str = "mml:",
        socket_timeout: float = 0.05,
        backoff: float = 0.25,
        backoff_max: float = 5.0,
        history_cap: int = 200,
        history_ttl_s: int = 0,
        exposure_maxlen: int = 1_000_000,
        event_dedupe_ttl_s: int = 86_400,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis_errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: the breaker decides when to try again
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.url = url
        self.p = prefix
        self.history_cap = history_cap
        self.history_ttl_s = history_ttl_s
        self.exposure_maxlen = exposure_maxlen
        self.event_dedupe_ttl_s = event_dedupe_ttl_s
        self._append_event = self.client.register_script(_APPEND_EVENT)  # EVALSHA, loaded on NOSCRIPT
        self.breaker = CircuitBreaker(backoff, backoff_max)
        metrics.REDIS_UP.set(1)  # optimistic until the first failure

    def _call(self, fn):
        if not self.breaker.allow():
            raise StoreUnavailable("redis circuit open")
        try:
            result = fn(self.client)
        except self._redis_errors as exc:
            metrics.REDIS_ERRORS.inc()
            self.breaker.failure()
            raise StoreUnavailable(f"redis: {exc}") from exc
        self.breaker.success()
        return result

    def available(self) -> bool:
        return self.breaker.allow()

    def ping(self) -> bool:
        try:
            return bool(self._call(lambda r: r.ping()))
        except StoreUnavailable:
            return False

    def add_event(self, user_id: str, item_id: str, ts: int, event_id: str | None = None) -> EventAppend:
        keys = [f"{self.p}hist:{user_id}"]
        if event_id is not None:
            # unambiguous per user: event ids cannot contain ':' (schemas.EventId)
            keys.append(f"{self.p}events:seen:{user_id}:{event_id}")
        args = [f"{ts}\t{item_id}", self.history_cap, self.history_ttl_s, self.event_dedupe_ttl_s]
        appended, length = self._call(lambda r: self._append_event(keys=keys, args=args, client=r))
        return EventAppend(int(length), duplicate=not appended)

    def history(self, user_id: str) -> list[str]:
        raw = self._call(lambda r: r.lrange(f"{self.p}hist:{user_id}", 0, -1))
        entries = []
        for value in raw:
            ts, _, item = value.decode().partition("\t")
            entries.append((int(ts), item))
        return _sorted_history(entries)

    def put_item(self, record: ItemRecord) -> bool:
        def op(r):
            pipe = r.pipeline(transaction=True)
            pipe.hset(
                f"{self.p}item:{record.item_id}",
                mapping={
                    "text": np.ascontiguousarray(record.text, np.float32).tobytes(),
                    "image": np.ascontiguousarray(record.image, np.float32).tobytes(),
                    "image_mask": b"1" if record.image_mask else b"0",
                    "revision": record.revision,
                    "encoder": record.encoder,
                    "meta": json.dumps(record.meta),
                },
            )
            pipe.hset(f"{self.p}items", record.item_id, record.revision)
            pipe.incr(f"{self.p}items:version")
            return pipe.execute()[1]

        return bool(self._call(op))

    def registered(self) -> tuple[str, dict[str, str]]:
        def op(r):
            pipe = r.pipeline(transaction=True)
            pipe.get(f"{self.p}items:version")
            pipe.hgetall(f"{self.p}items")
            return pipe.execute()

        version, items = self._call(op)
        return (version or b"0").decode(), {k.decode(): v.decode() for k, v in items.items()}

    def registered_version(self) -> str:
        return (self._call(lambda r: r.get(f"{self.p}items:version")) or b"0").decode()

    def get_items(self, item_ids: list[str]) -> dict[str, ItemRecord]:
        if not item_ids:
            return {}

        def op(r):
            pipe = r.pipeline(transaction=False)
            for item_id in item_ids:
                pipe.hgetall(f"{self.p}item:{item_id}")
            return pipe.execute()

        found = {}
        for item_id, raw in zip(item_ids, self._call(op), strict=True):
            if not raw:
                continue
            found[item_id] = ItemRecord(
                item_id=item_id,
                text=_f32(raw.get(b"text")),
                image=_f32(raw.get(b"image")),
                image_mask=raw.get(b"image_mask") == b"1",
                revision=raw[b"revision"].decode(),
                encoder=raw.get(b"encoder", b"").decode(),
                meta=json.loads(raw.get(b"meta", b"{}")),
            )
        return found

    def get_embeddings(self, model_version: str, item_ids: list[str]) -> dict[str, Embedding]:
        if not item_ids:
            return {}
        values = self._call(lambda r: r.hmget(f"{self.p}emb:{model_version}", item_ids))
        found = {}
        for item_id, value in zip(item_ids, values, strict=True):
            if value is None:
                continue
            revision, _, vec = value.partition(b":")
            found[item_id] = Embedding(revision.decode(), _f32(vec))
        return found

    def put_embeddings(self, model_version: str, embeddings: dict[str, Embedding]) -> None:
        if not embeddings:
            return
        mapping = {
            item_id: e.revision.encode() + b":" + np.ascontiguousarray(e.vector, np.float32).tobytes()
            for item_id, e in embeddings.items()
        }
        self._call(lambda r: r.hset(f"{self.p}emb:{model_version}", mapping=mapping))

    def add_exposures(self, records: list[dict]) -> None:
        def op(r):
            pipe = r.pipeline(transaction=False)
            for record in records:
                fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
                pipe.xadd(f"{self.p}exposures", fields, maxlen=self.exposure_maxlen, approximate=True)
            return pipe.execute()

        self._call(op)

    def close(self) -> None:
        self.client.close()


class LocalCache:
    """A small thread-safe LRU map: the process's own copy of store values (serves them while the
    store is down, and saves round trips when it is up)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key, value) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def make_store(settings) -> Store:
    if settings.redis_url:
        return RedisStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            socket_timeout=settings.redis_socket_timeout_s,
            backoff=settings.redis_backoff_s,
            backoff_max=settings.redis_backoff_max_s,
            history_cap=settings.history_cap,
            history_ttl_s=settings.history_ttl_s,
            exposure_maxlen=settings.exposure_stream_maxlen,
            event_dedupe_ttl_s=settings.event_dedupe_ttl_s,
        )
    return MemoryStore(history_cap=settings.history_cap, event_dedupe_ttl_s=settings.event_dedupe_ttl_s)
