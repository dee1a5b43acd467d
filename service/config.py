"""Service settings, read from the environment (pydantic-settings). Every default is documented next
to its field; docs/service.md lists them as a table.

`mml serve` turns its flags into these variables, so several uvicorn workers read the same
settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.topk import TopKConfig


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_nested_delimiter="__")

    # --- what is served -------------------------------------------------------------------------
    bundle: Path | None = Field(None, alias="MML_BUNDLE")
    """Default bundle directory: serves the default arm and every arm whose config names no bundle."""
    arms_config: Path | None = Field(None, alias="MML_ARMS_CONFIG")
    """A/B arms (YAML or JSON, see service/ab.py). Unset: one arm `mml`, weight 1, the default bundle."""

    # --- several workers (set by `mml serve --workers N`, service/workers.py) ----------------------
    control_dir: Path | None = Field(None, alias="MML_CONTROL_DIR")
    """Folder naming what the workers of one replica serve; a reload one worker makes is published
    there and the others make it too. Unset (one process): a reload concerns this process only."""
    workers: int = Field(1, alias="MML_WORKERS", ge=1)
    """Worker processes of this replica (reported by POST /admin/reload)."""

    # --- top-k stage -----------------------------------------------------------------------------
    topk: TopKConfig = Field(default_factory=TopKConfig, alias="MML_TOPK")
    """How /recall selects the k best items (service/topk.py, fields documented there): exact by
    default; `MML_TOPK__KIND=ivf` serves catalogues of at least `MML_TOPK__MIN_ITEMS` (50000) items
    from a Faiss IVF index (`MML_TOPK__NPROBE`, `MML_TOPK__NLIST`, ...), or `MML_TOPK` as JSON."""

    # --- state ----------------------------------------------------------------------------------
    redis_url: str | None = Field(None, alias="REDIS_URL")
    """redis://host:port/db. Unset: an in-process store (one replica, state lost on restart)."""
    redis_prefix: str = Field("mml:", alias="MML_REDIS_PREFIX")
    """Prefix of every Redis key, so several deployments can share one database."""
    redis_socket_timeout_s: float = Field(0.05, alias="MML_REDIS_TIMEOUT_S", gt=0)
    """Socket connect/read timeout of each Redis call (loopback round trips are ~0.1 ms)."""
    redis_backoff_s: float = Field(0.25, alias="MML_REDIS_BACKOFF_S", gt=0)
    """Circuit breaker: after a Redis error, calls are skipped for this long, doubling per failure..."""
    redis_backoff_max_s: float = Field(5.0, alias="MML_REDIS_BACKOFF_MAX_S", gt=0)
    """... up to this long; the first call after the pause probes Redis again."""
    history_cap: int = Field(200, alias="MML_HISTORY_CAP", ge=1, le=100_000)
    """Events kept per user by POST /events (the model reads only the most recent max_len)."""
    history_ttl_s: int = Field(30 * 24 * 3600, alias="MML_HISTORY_TTL_S", ge=0)
    """A user's history expires this long after their last event (0 = never)."""
    event_dedupe_ttl_s: int = Field(24 * 3600, alias="MML_EVENT_DEDUPE_TTL_S", ge=1)
    """POST /events: how long an `event_id` is remembered per user (a retry within it is not appended)."""
    item_sync_s: float = Field(0.2, alias="MML_ITEM_SYNC_S", gt=0, le=60)
    """How often each worker's background sync reads the registry version (one Redis GET) and, when
    it changed, builds the next serving snapshot: an item registered on any worker is a candidate
    on every worker within this plus the build (generator + item tower, ~ms per item)."""
    local_cache_items: int = Field(100_000, alias="MML_LOCAL_CACHE_ITEMS", ge=0)
    """New-item features and generated embeddings kept in process memory (serves them while Redis is down)."""

    # --- security and limits --------------------------------------------------------------------
    admin_token: str | None = Field(None, alias="MML_ADMIN_TOKEN")
    """Bearer token of PUT /items and /admin/*. Unset: those endpoints answer 403."""
    max_body_bytes: int = Field(256 * 1024, alias="MML_MAX_BODY_BYTES", ge=1024)
    """Body size cap of every JSON request except PUT /items (413 above it)."""
    max_item_body_bytes: int = Field(8 * 1024 * 1024, alias="MML_MAX_ITEM_BODY_BYTES", ge=1024)
    """Body size cap of PUT /items (the poster travels base64-encoded inside)."""
    max_image_bytes: int = Field(5 * 1024 * 1024, alias="MML_MAX_IMAGE_BYTES", ge=1024)
    """Largest decoded poster accepted by PUT /items (413 above it)."""
    max_history: int = Field(1000, alias="MML_MAX_HISTORY", ge=1)
    """Longest `history` a request may send (the model keeps the most recent max_len of them)."""
    max_exclude_ids: int = Field(10_000, alias="MML_MAX_EXCLUDE_IDS", ge=0)
    """Longest `exclude_ids` a request may send."""

    # --- observability --------------------------------------------------------------------------
    exposure_log: Path | None = Field(None, alias="MML_EXPOSURE_LOG")
    """File the exposure records are appended to, one JSON line each. Unset: stdout."""
    exposure_k_logged: int = Field(100, alias="MML_EXPOSURE_K_LOGGED", ge=0, le=1000)
    """Item ids an exposure record carries: the answer's first `k_logged`, in rank order (0: none)."""
    exposure_stream_maxlen: int = Field(1_000_000, alias="MML_EXPOSURE_STREAM_MAXLEN", ge=1)
    """Approximate length cap of the Redis exposure stream (`<prefix>exposures`)."""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("REDIS_URL must start with redis://, rediss:// or unix://")
        return value


def load_settings(**overrides) -> ServiceSettings:
    """Settings from the environment; keyword overrides (field names) win."""
    return ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
