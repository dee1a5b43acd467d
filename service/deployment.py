"""What the service serves and everything a route does below HTTP.

A `Deployment` is an immutable snapshot: the arms config, the assigner, one loaded Runtime per
distinct bundle (each arm's bundle loaded once) and one pipeline per arm. `RecallService` holds the
current deployment and swaps it atomically on reload: a request reads `self.deployment` once and
finishes on that snapshot, so requests in flight during a reload complete on the old bundle and
none is dropped. A reload builds and warms the whole new deployment first; if anything fails
(checksums, graphs, tables), the old one stays and the caller gets the reason.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mml.errors import MMLError
from service import metrics
from service.ab import ArmConfig, ArmsConfig, Assigner, ExposureLog, exposure_record, load_arms
from service.config import ServiceSettings
from service.errors import ApiError, invalid
from service.items import ItemRegistry, NewItemTable, features_revision
from service.pipeline import PopularityPipeline, RecallPipeline, RecallResult
from service.runtime import Runtime
from service.schemas import (
    ArmInfo,
    EventIn,
    EventOut,
    ItemIn,
    ItemOut,
    ModelsResponse,
    RecallRequest,
    RecallResponse,
)
from service.store import ItemRecord, StoreUnavailable, make_store
from service.topk import TopKConfig
from service.workers import worker_group

log = logging.getLogger("mml.service")


@dataclass(frozen=True)
class Arm:
    config: ArmConfig
    bundle: Path
    runtime: Runtime
    pipeline: RecallPipeline | PopularityPipeline


@dataclass(frozen=True)
class Deployment:
    config: ArmsConfig
    default_bundle: Path
    assigner: Assigner
    arms: dict[str, Arm]
    tables: dict[Path, NewItemTable]  # bundle path -> its runtime's new-item table (shared by its arms)


def _abs(path: str | Path) -> Path:
    """Absolute and normalised, symlinks NOT resolved: a reload re-reads what a symlink points to now."""
    return Path(os.path.abspath(path))


def build_deployment(
    config: ArmsConfig,
    default_bundle: Path,
    registry: ItemRegistry,
    reuse: dict[Path, NewItemTable] | None = None,
    topk: TopKConfig | None = None,
) -> Deployment:
    """Load (or reuse) each distinct bundle once, build every arm's pipeline, warm up new items."""
    reuse = reuse or {}
    tables: dict[Path, NewItemTable] = {}
    arms: dict[str, Arm] = {}
    for arm in config.arms:
        path = _abs(arm.bundle or default_bundle)  # not resolved: a symlink is followed on reload
        if path not in tables:
            tables[path] = reuse.get(path) or NewItemTable(Runtime.load(path), registry)
        table = tables[path]
        if arm.kind == "popularity":
            pipeline = PopularityPipeline(table.runtime)
        elif arm.adapt_steps > 0:
            try:
                from service.adapt import AdaptingPipeline  # torch: only for arms that ask for it
            except ModuleNotFoundError as exc:
                raise MMLError(
                    f"arm '{arm.name}': adapt_steps > 0 needs torch and the training code "
                    f"(pip install 'mml-recall[training]'): {exc}"
                ) from exc
            pipeline = AdaptingPipeline(table.runtime, table, arm.adapt_steps)
        else:
            pipeline = RecallPipeline(table.runtime, table, topk)
        pipeline.prepare()
        arms[arm.name] = Arm(arm, path, table.runtime, pipeline)
    return Deployment(config, _abs(default_bundle), Assigner(config), arms, tables)


@dataclass
class Answer:
    response: RecallResponse
    arm: str
    timings: dict[str, float]
    exposure: dict


class RecallService:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.store = make_store(settings)
        self.registry = ItemRegistry(self.store, settings.local_cache_items)
        # exposure records: the log, plus the Redis stream when there is one
        self.exposures = ExposureLog(
            settings.exposure_log, self.store if self.store.kind == "redis" else None
        )
        self.deployment: Deployment | None = None
        self._reload_lock = threading.Lock()
        self.group = worker_group(settings.control_dir, settings.workers)
        self._followed = 0  # generation of the last reload published by the group and made here

    # --- lifecycle --------------------------------------------------------------------------------

    def load(self) -> None:
        if self.settings.bundle is None:
            raise MMLError("no bundle to serve: set MML_BUNDLE or pass --bundle")
        arms_file = None
        if self.group is not None:  # what the group serves now (a worker may start after reloads)
            arms_file = self.group.arms_override()
            last = self.group.last()
            self._followed = last.generation if last else 0
        config = load_arms(arms_file or self.settings.arms_config)
        self._swap(build_deployment(config, self.settings.bundle, self.registry, topk=self.settings.topk))

    @property
    def ready(self) -> bool:
        return self.deployment is not None

    def _swap(self, new: Deployment) -> None:
        old = self.deployment
        self.deployment = new  # one reference assignment: atomic for every reader
        for name, arm in new.arms.items():
            previous = old.arms[name].pipeline.model_version if old and name in old.arms else None
            metrics.set_bundle(name, arm.pipeline.model_version, previous)

    def reload(self, path: str | None = None, arm: str | None = None, publish: bool = True) -> dict[str, str]:
        """Build a new deployment (new bundle for the default arms, or for `arm`), then swap it in;
        with several workers, publish it for the others (`publish=False`: following one of theirs).
        Raises ApiError 409 when a reload is already running or the new bundle is refused."""
        if not self._reload_lock.acquire(blocking=False):
            raise ApiError(409, "reload_in_progress", "another reload is in progress")
        try:
            current = self.deployment
            if current is None:
                raise ApiError(503, "not_ready", "the service has not loaded its bundle yet")
            config = current.config.model_copy(deep=True)
            default = current.default_bundle
            if arm is not None:
                if arm not in current.arms:
                    raise invalid("arm", f"unknown arm '{arm}' (arms: {', '.join(current.arms)})")
                target = next(a for a in config.arms if a.name == arm)
                target.bundle = _abs(path) if path else current.arms[arm].bundle
                rebuilt = {target.bundle}
            else:
                default = _abs(path) if path else default
                rebuilt = {default}
            # Bundles not named by this reload keep their loaded runtime; the named one is rebuilt.
            reuse = {p: t for p, t in current.tables.items() if p not in rebuilt}
            try:
                new = build_deployment(config, default, self.registry, reuse, self.settings.topk)
            except MMLError as exc:
                metrics.RELOADS.labels(result="refused").inc()
                raise ApiError(
                    409, "bundle_refused", f"bundle refused, still serving the old one: {exc}"
                ) from exc
            self._swap(new)
            metrics.RELOADS.labels(result="ok").inc()
            log.info("reloaded: %s", {n: a.pipeline.model_version for n, a in new.arms.items()})
            if self.group is not None and publish:  # the other workers follow (service/workers.py)
                try:
                    record = self.group.publish(
                        new.default_bundle,
                        new.config if arm is not None else None,
                        str(_abs(path)) if path else None,
                        arm,
                    )
                except OSError as exc:
                    log.error("reload not published to the other workers: %s", exc)
                    raise ApiError(
                        503, "reload_not_published",
                        f"this worker serves the new bundle, the other workers could not be told ({exc}); retry",
                    ) from exc  # fmt: skip
                self._followed = record.generation
                log.info("reload published in %s for the other workers", self.group.control_dir)
            return {name: a.pipeline.model_version for name, a in new.arms.items()}
        finally:
            self._reload_lock.release()

    def follow_published(self) -> bool:
        """Make the last reload another worker published, if not made here yet. True when there was
        one to make (done, or refused by this worker: it keeps its bundle and logs why); False when
        there was none, or a reload of this worker is running (retried at the next poll)."""
        last = self.group.last() if self.group is not None else None
        if last is None or last.generation <= self._followed:
            return False
        if last.origin != os.getpid():
            try:
                served = self.reload(last.path, last.arm, publish=False)
                log.info("followed the reload of worker %d: %s", last.origin, served)
            except ApiError as exc:
                if exc.error == "reload_in_progress":
                    return False
                log.error("could not follow the reload of worker %d: %s", last.origin, exc.message)
        self._followed = last.generation
        return True

    def pending_publication(self) -> bool:
        """A reload published by the group and not made here yet (cheap: one small file read)."""
        last = self.group.last() if self.group is not None else None
        return last is not None and last.generation > self._followed

    def close(self) -> None:
        self.exposures.close()
        self.store.close()

    # --- POST /recall -----------------------------------------------------------------------------

    def _deployment(self) -> Deployment:
        deployment = self.deployment
        if deployment is None:
            raise ApiError(503, "not_ready", "the service has not loaded its bundle yet")
        return deployment

    def recall(self, req: RecallRequest, override: str | None, request_id: str | None = None) -> Answer:
        start = time.perf_counter()
        deployment = self._deployment()
        s = self.settings
        if req.history is not None and len(req.history) > s.max_history:
            raise invalid("history", f"at most {s.max_history} items, got {len(req.history)}")
        if req.exclude_ids is not None and len(req.exclude_ids) > s.max_exclude_ids:
            raise invalid("exclude_ids", f"at most {s.max_exclude_ids} ids, got {len(req.exclude_ids)}")
        if override is not None:
            if override not in deployment.arms:
                raise invalid(
                    "X-MML-Arm", f"unknown arm '{override}' (arms: {', '.join(deployment.arms)})", status=400
                )
            arm_name = override
        else:
            arm_name = deployment.assigner.assign(req.user_id)
        arm = deployment.arms[arm_name]

        degraded = False
        history = req.history
        timings: dict[str, float] = {}
        if history is None:
            t = time.perf_counter()
            try:
                history = self.store.history(req.user_id)
            except StoreUnavailable:
                history, degraded = [], True
            timings["history"] = time.perf_counter() - t

        result: RecallResult = arm.pipeline(history, req.k, req.exclude_history, req.exclude_ids or ())
        timings.update(result.timings)
        rid = req.request_id or request_id or uuid.uuid4().hex
        # validated construction from plain dicts: faster in pydantic 2 than model_construct of
        # 100 nested models, which then serialise through a slower path
        response = RecallResponse(
            request_id=rid,
            user_id=req.user_id,
            arm=arm_name,
            model_version=result.model_version,
            items=[{"item_id": i, "score": s} for i, s in result.items],
            warmed_up=result.warmed_up,
            ignored=result.ignored,
            fallback=result.fallback,
            degraded=degraded or result.degraded,
        )
        timings["total"] = time.perf_counter() - start
        logged = [i for i, _ in result.items[: s.exposure_k_logged]]
        row_of = arm.runtime.row_of
        exposure = exposure_record(
            rid, req.user_id, arm_name, result.model_version, override is not None,
            logged, [i for i in logged if i not in row_of], result.fallback,
        )  # fmt: skip
        return Answer(response, arm_name, timings, exposure)

    def record_exposure(self, record: dict) -> None:
        """Queued; written off the request path (ab.ExposureLog)."""
        self.exposures.write(record)

    # --- POST /events -----------------------------------------------------------------------------

    def add_event(self, event: EventIn) -> EventOut:
        ts = event.ts if event.ts is not None else int(time.time())
        try:
            done = self.store.add_event(event.user_id, event.item_id, ts, event.event_id)
        except StoreUnavailable as exc:
            raise ApiError(503, "store_unavailable", "the event store is unreachable; retry later") from exc
        if event.event_id is None:  # no idempotency key: the answer of the earlier API, unchanged
            return EventOut(user_id=event.user_id, history_length=done.length)
        dup = int(done.duplicate)
        return EventOut(user_id=event.user_id, history_length=done.length, accepted=1 - dup, duplicates=dup)

    # --- PUT /items/{item_id} ---------------------------------------------------------------------

    def register_item(self, item_id: str, item: ItemIn) -> ItemOut:
        from mml.encoders import item_text

        deployment = self._deployment()
        for arm in deployment.arms.values():
            if item_id in arm.runtime.row_of:
                raise ApiError(
                    409,
                    "item_in_catalogue",
                    f"'{item_id}' is already in the catalogue of bundle {arm.runtime.model_version}",
                    "item_id",
                )
        image_bytes = None
        if item.image_base64 is not None:
            try:
                image_bytes = base64.b64decode(item.image_base64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise invalid("image_base64", f"not valid base64 ({exc})") from exc
            if len(image_bytes) > self.settings.max_image_bytes:
                raise invalid(
                    "image_base64",
                    f"the image is {len(image_bytes)} bytes, more than the limit of {self.settings.max_image_bytes}",
                    status=413,
                )
        runtime = deployment.arms[self._encoding_arm(deployment)].runtime
        try:
            text_encoder, image_encoder = runtime.encoders(self.settings.max_image_bytes)
        except MMLError as exc:
            raise ApiError(409, "no_encoders", str(exc)) from exc
        try:
            text = text_encoder.encode([item_text(item.title, item.year, item.genres)])[0]
        except ValueError as exc:
            raise invalid("title", str(exc)) from exc
        if image_bytes is not None:
            try:
                image = image_encoder.encode([image_bytes])[0]
            except ValueError as exc:  # mml.encoders.InvalidImageError: not an image, corrupt, a bomb
                raise invalid("image_base64", str(exc).removeprefix("image 0: ")) from exc
        else:
            image = np.zeros(runtime.dims.image_dim, np.float32)
        fingerprint = runtime.encoder_fingerprint
        record = ItemRecord(
            item_id=item_id,
            text=text,
            image=image,
            image_mask=image_bytes is not None,
            revision=features_revision(text, image, image_bytes is not None, fingerprint),
            encoder=fingerprint,
            meta={
                "title": item.title,
                "year": item.year,
                "genres": item.genres,
                "registered_at": int(time.time()),
            },
        )
        try:
            created = self.registry.register(record)
        except StoreUnavailable as exc:
            raise ApiError(503, "store_unavailable", "the item store is unreachable; retry later") from exc
        for table in deployment.tables.values():  # this replica warms it up now; others on their next request
            table.sync()
        return ItemOut(
            item_id=item_id, created=created, has_image=record.image_mask, revision=record.revision
        )

    @staticmethod
    def _encoding_arm(deployment: Deployment) -> str:
        """New items are encoded with the encoders of the first `mml` arm's bundle (the default arm)."""
        for name, arm in deployment.arms.items():
            if arm.config.kind == "mml":
                return name
        return next(iter(deployment.arms))

    # --- GET /v1/models ---------------------------------------------------------------------------

    def models(self) -> ModelsResponse:
        deployment = self._deployment()
        arms = []
        for name, arm in deployment.arms.items():
            rt = arm.runtime
            arms.append(
                ArmInfo(
                    name=name,
                    kind=arm.config.kind,
                    weight=deployment.assigner.weights[name],
                    model_version=arm.pipeline.model_version,
                    bundle=str(arm.bundle),
                    adapt_steps=arm.config.adapt_steps,
                    created=rt.manifest.created,
                    n_items=rt.dims.n_items,
                )
            )
        return ModelsResponse(salt=deployment.config.salt, arms=arms, registered_items=self.registry.count)
