"""The HTTP layer: FastAPI routes (thin: each parses, calls one RecallService method, serialises),
the body size and content-type guard, and error handlers that turn every bad input into a 4xx
naming the field. POST /recall is timed and recorded by the runner (service/recall.py), not here.

    POST /recall             recommendations for a user            (schemas.RecallRequest)
    POST /events             append to a user's stored history     (schemas.EventIn)
    PUT  /items/{item_id}    register a new item (admin)           (schemas.ItemIn)
    GET  /v1/models          arms, model versions, bundles
    POST /admin/reload       load a new bundle and swap it in (admin)
    GET  /healthz /readyz /metrics

Run with `mml serve` (or `uvicorn --factory service.app:create_app`); settings come from the
environment (service/config.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from service import metrics
from service.config import ServiceSettings, load_settings
from service.errors import ApiError
from service.handlers import RecallService
from service.recall import count_refused
from service.schemas import (
    ErrorResponse,
    EventIn,
    EventOut,
    FieldError,
    ItemIn,
    ItemOut,
    ModelsResponse,
    RecallRequest,
    RecallResponse,
    ReloadRequest,
    ReloadResponse,
)

log = logging.getLogger("mml.service")
JSON_TYPES = ("application/json",)
ARRIVED = "mml.arrived"  # ASGI scope key: perf_counter() when the request reached the app
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 409, 413, 415, 422, 503)}


# --- body guard -----------------------------------------------------------------------------------


def _error_body(error: str, detail: str, field: str) -> bytes:
    errors = [{"field": field, "message": detail}]
    return json.dumps({"error": error, "message": f"{field}: {detail}", "errors": errors}).encode()


class HttpGuard:
    """Pure ASGI middleware in front of every route.

    * Refuses bodies over the size cap with 413 (by Content-Length, or while reading a chunked
      body) and non-JSON bodies with 415; the body is read here and handed on, so a route never
      reads past the cap.
    * Stamps when a request reached the app (`scope[ARRIVED]`): the recall runner times `app` (and
      `mml_recall_request_seconds`) from there, so parsing and validation are included.
    """

    def __init__(self, app, settings: ServiceSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[ARRIVED] = time.perf_counter()
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        s = self.settings
        cap = s.max_item_body_bytes if scope["path"].startswith("/items/") else s.max_body_bytes
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        too_large = f"larger than the limit of {cap} bytes"
        if length is not None and (not length.isdigit() or int(length) > cap):
            return await _refuse(scope, send, 413, "too_large", too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return await _refuse(scope, send, 413, "too_large", too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().decode("latin-1").lower()
        if body and ctype not in JSON_TYPES and not ctype.endswith("+json"):
            detail = f"must be application/json, got '{ctype or '(none)'}'"
            return await _refuse(scope, send, 415, "unsupported_media_type", detail, "Content-Type")

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(scope, send, status: int, error: str, detail: str, field: str = "body") -> None:
    if scope["path"] == "/recall":
        count_refused(status)
    payload = _error_body(error, detail, field)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# --- errors ---------------------------------------------------------------------------------------


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "path", "query", "header"):
        source, parts = parts[0], parts[1:]
        if source == "header" and parts:
            return parts[0]
    return ".".join(parts) or "body"


def _counted(handler):
    """Refused POST /recall requests are counted (arm `none`) where they are answered."""

    def wrapped(request: Request, exc: Exception) -> JSONResponse:
        response = handler(request, exc)
        if request.url.path == "/recall":
            count_refused(response.status_code)
        return response

    return wrapped


def _validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    status = 422
    fields = []
    for e in errors:
        kind = e.get("type", "")
        if kind == "json_invalid":
            status = 400
            fields.append(
                FieldError(field="body", message=f"malformed JSON: {e.get('ctx', {}).get('error', e['msg'])}")
            )
        elif kind == "missing" and tuple(e["loc"]) == ("body",):
            fields.append(FieldError(field="body", message="a JSON object body is required"))
        elif kind in ("model_attributes_type", "dict_type") and tuple(e["loc"]) == ("body",):
            fields.append(FieldError(field="body", message="must be a JSON object"))
        elif kind == "extra_forbidden":
            fields.append(FieldError(field=_field(e["loc"]), message="unknown field"))
        else:
            fields.append(FieldError(field=_field(e["loc"]), message=e["msg"]))
    message = "; ".join(f"{f.field}: {f.message}" for f in fields)
    error = "malformed_json" if status == 400 else "invalid_request"
    return JSONResponse(
        ErrorResponse(error=error, message=message, errors=fields).model_dump(), status_code=status
    )


def _api_error_response(request: Request, exc: ApiError) -> JSONResponse:
    fields = [FieldError(field=exc.field, message=exc.detail)] if exc.field else []
    return JSONResponse(
        ErrorResponse(error=exc.error, message=exc.message, errors=fields).model_dump(),
        status_code=exc.status,
    )


def _http_error_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kinds = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}
    error = kinds.get(exc.status_code, "http_error")
    # FastAPI's own 400 is a body it could not parse (e.g. not UTF-8): the field is the body
    fields = [FieldError(field="body", message=str(exc.detail))] if exc.status_code == 400 else []
    message = f"body: {exc.detail}" if fields else str(exc.detail)
    return JSONResponse(
        ErrorResponse(error=error, message=message, errors=fields).model_dump(),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def _server_error_response(request: Request, exc: Exception) -> JSONResponse:
    # %r: the (percent-decoded) path may hold newlines or escape sequences; it must not forge log lines
    log.error("unhandled error on %s %r", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        ErrorResponse(error="internal", message="internal error (logged on the server)").model_dump(),
        status_code=500,
    )


# --- the app --------------------------------------------------------------------------------------


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or load_settings()
    # One request runs on one core (ONNX Runtime sessions have one intra-op thread too); a
    # multi-threaded BLAS for the catalogue product only adds contention. Scale with workers.
    threadpool_limits(limits=1)
    service = RecallService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # verify, load, warm up: only then accept requests
        await run_in_threadpool(service.lifecycle.load)
        service.lifecycle.start()  # item sync (+ following the other workers' reloads)
        _install_sighup(service)
        yield
        service.close()

    app = FastAPI(
        title="mml-recall",
        summary="Cold-start sequential recall with Multimodal Meta-Learning (MML, CIKM 2022).",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.service = service
    app.add_middleware(HttpGuard, settings=settings)
    app.add_exception_handler(RequestValidationError, _counted(_validation_response))
    app.add_exception_handler(ApiError, _counted(_api_error_response))
    app.add_exception_handler(StarletteHTTPException, _counted(_http_error_response))
    app.add_exception_handler(Exception, _counted(_server_error_response))

    def admin(authorization: str | None = Header(None)) -> None:
        """Bearer token of PUT /items and /admin/*, compared in constant time."""
        expected = settings.admin_token
        if not expected:
            raise ApiError(403, "admin_disabled", "admin endpoints are disabled: set MML_ADMIN_TOKEN")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
            raise ApiError(401, "unauthorized", "a valid 'Bearer <token>' is required", "Authorization")

    @app.post("/recall", response_model=RecallResponse, tags=["recall"])
    async def recall(
        request: Request,
        body: RecallRequest,
        x_mml_arm: str | None = Header(None, description="QA override of the arm assignment"),
        x_request_id: str | None = Header(None, max_length=128),
    ) -> Response:
        """Top-k items for a user. `history` (oldest first) or, when absent, the stored history.

        Runs on the event loop, not in the thread pool: the stages are ~1 ms of CPU and touch no
        lock (the stored-history read is bounded by short timeouts and the circuit breaker), and a
        thread hop per request costs more than it gains with one core per worker."""
        answer = service.recall(body, x_mml_arm, x_request_id, request.scope.get(ARRIVED))
        return Response(answer.body, media_type="application/json", headers=answer.headers)

    @app.post(
        "/events", response_model=EventOut, response_model_exclude_none=True, status_code=202, tags=["state"]
    )
    async def events(body: EventIn) -> EventOut:
        """Append an interaction to the user's stored history (read by /recall without `history`).
        With `event_id`, a retry of an event already stored is answered without appending it again.

        On the event loop like /recall: one Redis round trip (bounded by the store's short timeouts
        and circuit breaker) costs less than a thread-pool hop, which under load waited ~20 ms for
        the loop's CPU-bound /recall work (make loadtest: /events p50 47 ms as a sync route)."""
        return service.add_event(body)

    @app.put(
        "/items/{item_id}",
        response_model=ItemOut,
        tags=["admin"],
        dependencies=[Depends(admin)],
        responses={201: {"model": ItemOut, "description": "Created"}},
    )
    def put_item(body: ItemIn, item_id: str = PathParam(min_length=1, max_length=256)) -> JSONResponse:
        """Register a new item: its text and poster are encoded by the bundle's encoders and stored;
        it is warmed up (generated ID embedding) and becomes a candidate at once."""
        out = service.register_item(item_id, body)
        return JSONResponse(out.model_dump(), status_code=201 if out.created else 200)

    @app.get("/v1/models", response_model=ModelsResponse, tags=["models"])
    def models() -> ModelsResponse:
        return service.models()

    @app.post("/admin/reload", response_model=ReloadResponse, tags=["admin"], dependencies=[Depends(admin)])
    def reload(body: ReloadRequest | None = None) -> ReloadResponse:
        """Load a bundle (new `path`, or the current one again), warm it up, then swap it in."""
        start = time.perf_counter()
        body = body or ReloadRequest()
        served = service.lifecycle.reload(body.path, body.arm)
        group = service.lifecycle.group
        workers = group.workers if group is not None else 1
        return ReloadResponse(reloaded=served, seconds=round(time.perf_counter() - start, 3), workers=workers)

    # probes run on the event loop: they must not queue behind work in the thread pool
    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        deployment = service.deployment
        if deployment is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse(
            {
                "ready": True,
                "pid": os.getpid(),  # which worker answered (several per replica under --workers N)
                "arms": {name: arm.model_version for name, arm in deployment.arms.items()},
                "store": service.store.kind,
                "store_available": service.store.available(),
            }
        )

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def prometheus() -> Response:
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    return app


def _install_sighup(service: RecallService) -> None:
    """SIGHUP reloads the bundle(s) from their current paths (single-process server; under
    `--workers N` uvicorn's supervisor answers SIGHUP by restarting the workers, which load the
    bundle anew)."""
    if threading.current_thread() is not threading.main_thread():
        return  # an embedded server (tests): signals belong to the host program
    loop = asyncio.get_running_loop()

    def reload_logged() -> None:
        try:
            served = service.lifecycle.reload()
            log.info("SIGHUP reload: serving %s", served)
        except ApiError as exc:
            log.error("SIGHUP reload failed: %s", exc.message)

    loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, reload_logged))
