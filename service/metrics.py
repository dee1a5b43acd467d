"""Prometheus metrics. No user or item ids in labels (unbounded cardinality, and personal data).

With several uvicorn workers, set PROMETHEUS_MULTIPROC_DIR (an empty directory) before the workers
start (`mml serve --workers N` does it): every worker then writes its samples to memory-mapped files
there and GET /metrics, answered by any worker, aggregates all of them. Gauges say how they
aggregate over workers (`multiprocess_mode`).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no `*_created` series: they double the output and nobody reads them

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

# 0.5 ms .. 1 s: the latency target is p50 <= 3 ms, p99 <= 10 ms.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
STAGES = ("history", "encode", "warmup", "model", "topk")

REQUEST_SECONDS = Histogram(
    "mml_recall_request_seconds",
    "Server-side time of POST /recall answered 200, from the first byte of the request to the "
    "start of the response (parsing, validation, pipeline, serialisation).",
    ["arm"],
    buckets=LATENCY_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "mml_recall_stage_seconds",
    "Time per pipeline stage: history (stored history read), encode (ids -> model inputs), "
    "warmup (new items' ID embeddings: Faiss neighbours + generator), model (ONNX graphs), "
    "topk (scoring the catalogue and selecting k).",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "mml_recall_requests",
    "POST /recall requests by arm and HTTP status (arm 'none' when the request was refused "
    "before an arm was assigned).",
    ["arm", "status"],
)
FALLBACKS = Counter(
    "mml_recall_fallbacks", "Answers from the popularity fallback (empty or all-unknown history).", ["arm"]
)
DEGRADED = Counter("mml_recall_degraded", "Answers given while Redis was unreachable.", ["arm"])
WARMUPS = Counter("mml_warmups", "New-item ID embeddings generated (Faiss neighbours + generator.onnx).")
REDIS_ERRORS = Counter("mml_redis_errors", "Redis calls that failed (connection, timeout, protocol).")
REDIS_UP = Gauge(
    "mml_redis_up",
    "1 while the Redis circuit breaker is closed (minimum over workers).",
    multiprocess_mode="livemin",
)
BUNDLE_INFO = Gauge(
    "mml_bundle_info",
    "1 for the model version each arm serves (0 after it was replaced).",
    ["arm", "model_version"],
    multiprocess_mode="livemax",
)
RELOADS = Counter("mml_bundle_reloads", "Bundle reloads by result.", ["result"])


def set_bundle(arm: str, model_version: str, previous: str | None = None) -> None:
    if previous is not None and previous != model_version:
        BUNDLE_INFO.labels(arm=arm, model_version=previous).set(0)
    BUNDLE_INFO.labels(arm=arm, model_version=model_version).set(1)


def observe_stages(timings: dict[str, float]) -> None:
    for stage, seconds in timings.items():
        STAGE_SECONDS.labels(stage=stage).observe(seconds)


def reap_dead_workers() -> None:
    """Multiprocess mode: drop the live-gauge files of worker processes that no longer exist (a
    worker restarted by uvicorn's supervisor, e.g. on SIGHUP), so `mml_bundle_info` and
    `mml_redis_up` describe the live workers only. Called on every scrape (a glob and a kill(pid, 0)
    per worker file)."""
    if not MULTIPROCESS:
        return
    from pathlib import Path

    from prometheus_client import multiprocess

    for path in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid)
        except PermissionError:  # alive, another user's
            pass


def exposition() -> tuple[bytes, str]:
    """The text exposition format: this process's metrics, or every worker's in multiprocess mode."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        reap_dead_workers()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
