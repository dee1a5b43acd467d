"""Registered new items: items that arrived after the bundle was built (PUT /items).

`ItemRegistry` (one per process) knows which items are registered and their features. It reads the
store's registration counter (one GET per sync round of service/lifecycle.py's background item
sync, never on the request path) and re-reads the id -> revision map only when it changed, so an
item registered on any replica becomes a candidate on every replica within one sync round. It keeps its own copies (a local cache) so that, while Redis is down, the last known
registrations and their features are still served (in degraded mode).

`NewItemTable` (one per loaded bundle) holds, for every registered item that is not in that bundle's
catalogue, what the model needs: the generated ID embedding (Faiss neighbours + generator.onnx,
cached in the store per model version and item revision), its pretrained features, and its row of the
fused item matrix [id_emb | text_vec | image_vec], so new items are ranked like catalogue items.
Updates are copy-on-write: `sync` (background sync, PUT /items) builds a new `TableSnapshot`, which
goes into the next serving snapshot (service/snapshot.py); requests never call it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.store import Embedding, ItemRecord, LocalCache, Store, StoreUnavailable

log = logging.getLogger("mml.service")


def features_revision(text: np.ndarray, image: np.ndarray, image_mask: bool, encoder: str) -> str:
    digest = hashlib.sha256()
    for part in (
        np.ascontiguousarray(text, np.float32).tobytes(),
        np.ascontiguousarray(image, np.float32).tobytes(),
    ):
        digest.update(part)
    digest.update(b"1" if image_mask else b"0")
    digest.update(encoder.encode())
    return digest.hexdigest()[:16]


class ItemRegistry:
    def __init__(self, store: Store, cache_size: int) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._version: str | None = None
        self._revisions: dict[str, str] = {}
        self._features = LocalCache(cache_size)  # (item_id, revision) -> ItemRecord

    def register(self, record: ItemRecord) -> bool:
        """Store a new item's features (raises StoreUnavailable: registering needs the store)."""
        created = self.store.put_item(record)
        self._features.put((record.item_id, record.revision), record)
        return created

    def snapshot(self) -> tuple[str | None, dict[str, str], bool]:
        """(version, {item_id: revision} of every registered item, degraded). Degraded: the store
        could not be read and the last known registrations are returned. One store round trip."""
        try:
            version = self.store.registered_version()
            if version != self._version:
                version, revisions = self.store.registered()
                with self._lock:
                    self._version, self._revisions = version, revisions
        except StoreUnavailable:
            return self._version, self._revisions, True
        return self._version, self._revisions, False

    def features(self, revisions: dict[str, str]) -> tuple[dict[str, ItemRecord], bool]:
        """Features of these items at these revisions: local cache first, then the store."""
        found, missing = {}, []
        for item_id, revision in revisions.items():
            record = self._features.get((item_id, revision))
            if record is None:
                missing.append(item_id)
            else:
                found[item_id] = record
        if not missing:
            return found, False
        try:
            fetched = self.store.get_items(missing)
        except StoreUnavailable:
            return found, True
        for item_id, record in fetched.items():
            if record.revision == revisions[item_id]:  # else: re-registered meanwhile, next sync takes it
                self._features.put((item_id, record.revision), record)
                found[item_id] = record
        return found, False

    @property
    def count(self) -> int:
        return len(self._revisions)


@dataclass(frozen=True)
class TableSnapshot:
    ids: tuple[str, ...]
    index: dict[str, int]  # item_id -> position in the arrays below
    revisions: dict[str, str]  # what the arrays hold
    unusable: dict[str, str]  # registered, but no features for this bundle's encoders: not served
    id_emb: np.ndarray  # (M, d) generated ID embeddings
    text: np.ndarray  # (M, text_dim)
    image: np.ndarray  # (M, image_dim)
    image_mask: np.ndarray  # (M,)
    concat: np.ndarray  # (M, 3d) rows of the fused item matrix

    def __len__(self) -> int:
        return len(self.ids)

    def covers(self, wanted: dict[str, str]) -> bool:
        return len(wanted) == len(self.revisions) + len(self.unusable) and all(
            self.revisions.get(i, self.unusable.get(i)) == r for i, r in wanted.items()
        )


def _empty(runtime) -> TableSnapshot:
    d = runtime.dims
    return TableSnapshot(
        ids=(),
        index={},
        revisions={},
        unusable={},
        id_emb=np.zeros((0, d.d), np.float32),
        text=np.zeros((0, d.text_dim), np.float32),
        image=np.zeros((0, d.image_dim), np.float32),
        image_mask=np.zeros(0, bool),
        concat=np.zeros((0, 3 * d.d), np.float32),
    )


class NewItemTable:
    """The registered new items, ready for one bundle (see the module docstring)."""

    def __init__(self, runtime, registry: ItemRegistry) -> None:
        self.runtime = runtime
        self.registry = registry
        self.snapshot = _empty(runtime)
        self._built_version: str | None = None  # registry version the snapshot fully reflects
        self._sync_lock = threading.Lock()

    @property
    def built_version(self) -> str | None:
        """The registry version the current snapshot fully reflects (None: not yet, or incomplete)."""
        return self._built_version

    def sync(self) -> tuple[TableSnapshot, bool, float]:
        """Bring the table up to date with the registry. Returns (snapshot, degraded, seconds spent
        warming up items): one store round trip and O(1) work when the registrations did not change
        since the last complete build. Called by the background item sync and PUT /items, never by
        a request."""
        version, revisions, degraded = self.registry.snapshot()
        if version is not None and version == self._built_version:
            return self.snapshot, degraded, 0.0
        # A catalogue item of this bundle is served from the catalogue, never as a new item.
        wanted = {i: r for i, r in revisions.items() if i not in self.runtime.row_of}
        with self._sync_lock:  # the sync thread and PUT /items: one builds, the other reuses it
            if self.snapshot.covers(wanted):
                self._built_version = None if degraded else version
                return self.snapshot, degraded, 0.0
            start = time.perf_counter()
            snapshot, incomplete = self._rebuild(self.snapshot, wanted)
            self.snapshot = snapshot
            # complete builds are keyed by the registry version; an incomplete one is retried
            self._built_version = None if (degraded or incomplete) else version
            return snapshot, degraded or incomplete, time.perf_counter() - start

    def _rebuild(self, current: TableSnapshot, wanted: dict[str, str]) -> tuple[TableSnapshot, bool]:
        """A new snapshot holding `wanted`; items whose features cannot be read now (store down) are
        left out and retried by the next request; degraded tells whether that happened."""
        runtime = self.runtime
        keep = [i for i in wanted if current.revisions.get(i) == wanted[i]]
        todo = {i: r for i, r in wanted.items() if current.revisions.get(i) != r}
        fetched, degraded = self.registry.features(todo)
        records = {i: rec for i, rec in fetched.items() if rec.encoder == runtime.encoder_fingerprint}
        unusable = {} if degraded else {i: todo[i] for i in todo if i not in records}
        if unusable:
            log.warning(
                "%d registered item(s) have no features from bundle %s's encoders: not served "
                "(register them again after changing encoders)",
                len(unusable),
                runtime.model_version,
            )
        new_ids = list(records)
        d = runtime.dims.d
        if new_ids:
            text = np.stack([records[i].text for i in new_ids]).astype(np.float32)
            image = np.stack([records[i].image for i in new_ids]).astype(np.float32)
            mask = np.asarray([records[i].image_mask for i in new_ids], bool)
            emb = self._embeddings(new_ids, records)
            concat = np.concatenate([emb, runtime.project(text, image, mask)], axis=1)
        else:
            text, image, mask = current.text[:0], current.image[:0], current.image_mask[:0]
            emb, concat = np.zeros((0, d), np.float32), np.zeros((0, 3 * d), np.float32)
        ids = keep + new_ids
        pos = [current.index[i] for i in keep]

        def stack(old: np.ndarray, new: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.concatenate([old[pos], new], axis=0))

        snapshot = TableSnapshot(
            ids=tuple(ids),
            index={i: n for n, i in enumerate(ids)},
            revisions={i: wanted[i] for i in ids},
            unusable=unusable,
            id_emb=stack(current.id_emb, emb),
            text=stack(current.text, text),
            image=stack(current.image, image),
            image_mask=stack(current.image_mask, mask),
            concat=stack(current.concat, concat.astype(np.float32)),
        )
        return snapshot, degraded

    def _embeddings(self, ids: list[str], records: dict[str, ItemRecord]) -> np.ndarray:
        """Generated ID embeddings: the store's cache (same model version and revision) or the
        generator (then written back to the cache)."""
        runtime = self.runtime
        try:
            cached = self.registry.store.get_embeddings(runtime.model_version, ids)
            store_up = True
        except StoreUnavailable:
            cached, store_up = {}, False
        out = np.zeros((len(ids), runtime.dims.d), np.float32)
        todo = []
        for n, item_id in enumerate(ids):
            hit = cached.get(item_id)
            if (
                hit is not None
                and hit.revision == records[item_id].revision
                and hit.vector.shape == (runtime.dims.d,)
            ):
                out[n] = hit.vector
            else:
                todo.append(n)
        if todo:
            recs = [records[ids[n]] for n in todo]
            generated = runtime.generate(
                np.stack([r.text for r in recs]),
                np.stack([r.image for r in recs]),
                np.asarray([r.image_mask for r in recs], bool),
            )
            out[todo] = generated
            metrics.WARMUPS.inc(len(todo))
            if store_up:
                try:
                    self.registry.store.put_embeddings(
                        runtime.model_version,
                        {ids[n]: Embedding(recs[j].revision, generated[j]) for j, n in enumerate(todo)},
                    )
                except StoreUnavailable:
                    pass  # generated again by the next replica that needs it
        return out
