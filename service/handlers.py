"""What every route does below HTTP: `RecallService` holds the store, the item registry, the
exposure log, the lifecycle (what is served: service/lifecycle.py) and the recall runner (the
stages of POST /recall: service/recall.py). Routes parse, call one method here, serialise."""

from __future__ import annotations

import base64
import binascii
import time

import numpy as np

from mml.errors import MMLError
from service.ab import ExposureLog
from service.config import ServiceSettings
from service.errors import ApiError, invalid
from service.items import ItemRegistry, features_revision
from service.lifecycle import Deployment, Lifecycle
from service.recall import Answered, RecallRunner
from service.schemas import ArmInfo, EventIn, EventOut, ItemIn, ItemOut, ModelsResponse, RecallRequest
from service.store import ItemRecord, StoreUnavailable, make_store


class RecallService:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.store = make_store(settings)
        self.registry = ItemRegistry(self.store, settings.local_cache_items)
        # exposure records: the log, plus the Redis stream when there is one
        self.exposures = ExposureLog(
            settings.exposure_log, self.store if self.store.kind == "redis" else None
        )
        self.lifecycle = Lifecycle(settings, self.store, self.registry)
        self.runner = RecallRunner(settings, self.exposures)

    @property
    def deployment(self) -> Deployment | None:
        return self.lifecycle.deployment

    @property
    def ready(self) -> bool:
        return self.lifecycle.deployment is not None

    def close(self) -> None:
        self.lifecycle.close()
        self.exposures.close()
        self.store.close()

    def _deployment(self) -> Deployment:
        deployment = self.lifecycle.deployment
        if deployment is None:
            raise ApiError(503, "not_ready", "the service has not loaded its bundle yet")
        return deployment

    # --- POST /recall -----------------------------------------------------------------------------

    def recall(
        self,
        req: RecallRequest,
        override: str | None,
        request_id: str | None = None,
        arrived: float | None = None,
    ) -> Answered:
        return self.runner.run(self._deployment(), req, override, request_id, arrived)

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
        for snapshot in deployment.snapshots.values():
            if item_id in snapshot.runtime.row_of:
                raise ApiError(
                    409,
                    "item_in_catalogue",
                    f"'{item_id}' is already in the catalogue of bundle {snapshot.model_version}",
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
        runtime = deployment.runtime(self._encoding_arm(deployment))
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
        self.lifecycle.sync_items()  # a candidate here at once; other workers within one sync round
        return ItemOut(
            item_id=item_id, created=created, has_image=record.image_mask, revision=record.revision
        )

    @staticmethod
    def _encoding_arm(deployment: Deployment) -> str:
        """New items are encoded with the encoders of the first model arm's bundle (`mml` or
        `mml_cooc`; the default arm)."""
        for name, arm in deployment.arms.items():
            if arm.kind in ("mml", "mml_cooc"):
                return name
        return next(iter(deployment.arms))

    # --- GET /v1/models ---------------------------------------------------------------------------

    def models(self) -> ModelsResponse:
        deployment = self._deployment()
        arms = []
        for name, arm in deployment.arms.items():
            rt = deployment.runtime(name)
            arms.append(
                ArmInfo(
                    name=name,
                    kind=arm.kind,
                    weight=deployment.assigner.weights[name],
                    model_version=arm.model_version,
                    bundle=str(arm.bundle),
                    adapt_steps=arm.adapt_steps,
                    created=rt.manifest.created,
                    n_items=rt.dims.n_items,
                )
            )
        return ModelsResponse(salt=deployment.config.salt, arms=arms, registered_items=self.registry.count)
