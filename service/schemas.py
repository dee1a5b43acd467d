"""Every request and response body of the service, in one place.

Item and user ids are strings (a JSON number is accepted and turned into its decimal string). Limits
that depend on the deployment (longest history, ...) are checked by the routes against the settings,
with the same error shape as these models' own errors."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# Echoed in the X-Request-ID response header: visible ASCII only (a header cannot carry other
# characters; a newline or a non-Latin-1 character would break the response).
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[!-~]+$")]


class _In(BaseModel):
    # Unknown fields are refused (a typo such as `histroy` would otherwise be silently ignored).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


# --- POST /recall ---------------------------------------------------------------------------------


class RecallRequest(_In):
    request_id: RequestId | None = None  # echoed; generated when absent
    user_id: Id
    history: list[Id] | None = None  # oldest first; absent: the user's stored history (POST /events)
    k: int = Field(100, ge=1, le=1000)
    exclude_history: bool = True  # never recommend what the history already holds
    exclude_ids: list[Id] | None = None  # never recommend these either


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecallResponse(BaseModel):
    request_id: str
    user_id: str
    arm: str
    model_version: str
    items: list[ScoredItem]
    warmed_up: list[str]  # registered new items of the history whose ID embedding came from the generator
    ignored: list[str]  # history ids neither in the catalogue nor registered (or unreadable while degraded)
    fallback: bool  # the popularity ranking answered (empty or all-unknown history)
    degraded: bool  # Redis was unreachable: stored history / new-item state partly unavailable


# --- PUT /items/{item_id} and POST /events --------------------------------------------------------


class ItemIn(_In):
    title: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    year: int | None = Field(None, ge=1800, le=2200)
    genres: list[Annotated[str, StringConstraints(min_length=1, max_length=100)]] | None = Field(
        None, max_length=50
    )
    image_base64: str | None = None  # the poster (JPEG/PNG/...), base64; absent: a text-only item


class ItemOut(BaseModel):
    item_id: str
    created: bool  # false when an earlier registration was replaced
    has_image: bool
    revision: str  # digest of the stored features; cached embeddings of older revisions are dropped


# Idempotency key of an event, chosen by the client (a UUID, a ULID, ...): no ':' (it ends the
# per-user Redis key unambiguously) and nothing outside this URL-safe set.
EventId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._~-]+$")]


class EventIn(_In):
    user_id: Id
    item_id: Id
    ts: int | None = Field(None, ge=0)  # unix seconds; absent: the server's clock
    # a retry with the same event_id (same user, within MML_EVENT_DEDUPE_TTL_S) is not appended again;
    # absent: every request appends (a retry after a timeout or a 503 may duplicate the event)
    event_id: EventId | None = None


class EventOut(BaseModel):
    user_id: str
    history_length: int
    # only with an event_id (absent otherwise, so the answer without one is unchanged):
    accepted: int | None = None  # 1: appended now
    duplicates: int | None = None  # 1: this event_id was already recorded, nothing appended


# --- models and admin -----------------------------------------------------------------------------


class ArmInfo(BaseModel):
    name: str
    kind: str  # "mml", "mml_cooc" or "popularity"
    weight: float
    model_version: str
    bundle: str
    adapt_steps: int
    created: str
    n_items: int


class ModelsResponse(BaseModel):
    salt: str
    arms: list[ArmInfo]
    registered_items: int


class ReloadRequest(_In):
    path: str | None = None  # new bundle directory; absent: reload from the current path
    arm: Id | None = None  # only this arm's bundle; absent: every arm on the default bundle


class ReloadResponse(BaseModel):
    reloaded: dict[str, str]  # arm -> model_version now served
    seconds: float
    # worker processes of this server: with several (mml serve --workers N) this one has swapped the
    # bundle in, the others make the same reload within about a second plus their load time
    workers: int = 1


# --- errors ---------------------------------------------------------------------------------------


class FieldError(BaseModel):
    field: str  # dotted path: "k", "history.3", "body", "Content-Type"
    message: str


class ErrorResponse(BaseModel):
    error: str  # machine-readable kind: invalid_request, malformed_json, too_large, ...
    message: str  # one line for humans, naming the field
    errors: list[FieldError] = Field(default_factory=list)
