"""POST /recall below HTTP: named stages over one serving snapshot, run and recorded by `RecallRunner`.

    assign    the arm: the X-MML-Arm override, or the deterministic split      RecallRunner
    history   the request's history, or the user's stored one (Redis/memory)   ReadHistory
    encode    one pass over the ids: catalogue rows | registered new items |    Encode
              ignored, the exclusions; the most recent max_len as the model's
              right-padded inputs (new items with their generated embeddings)
    model     recall.onnx -> query (3d) + bias of the fused score               Model (adapt.AdaptingModel)
              (mml_cooc arms: recall_cooc.onnx, + the co-occurrence weight)     CoocModel
    cooc      mml_cooc arms: the co-occurrence term of the fused score, sparse   CoocScores
              (a bonus on the history's neighbours) + a shift every item holds
    topk      fused scores (+ the cooc bonus) of catalogue + new items, k best   DenseCandidates (Popular)
    rank      the candidates cut to k (+ the cooc shift)                        Rank
    answer    response body, exposure record, metrics, Server-Timing            RecallRunner

Each stage is an object with a `name` (its `Server-Timing` entry and `mml_recall_stage_seconds`
label) and `__call__(ctx)`, reading and writing the typed fields of one `RecallContext` (each
stage's docstring says which). An arm's chain is a tuple of stages (`mml_chain`,
`mml_cooc_chain`, `popularity_chain`). Another learner with a sparse term of the fused score is a
stage before `topk` that leaves the term in the context for the top-k to add, as `CoocScores` does:
the top-k then stays the one place that selects and applies exclusions.

Stages only compute: the runner alone times them, records the metrics, the exposure and the
`Server-Timing` header, once per request. A request reads one `ServingSnapshot` (service/snapshot.py)
and nothing that changes under it: no store call but the stored history, no lock, no generator.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from mml.cooc import fused_cooc, sparse_scores
from service import metrics
from service.ab import ExposureLog, exposure_record
from service.config import ServiceSettings
from service.errors import invalid
from service.runtime import SequenceInputs
from service.schemas import RecallRequest, RecallResponse
from service.snapshot import ServingSnapshot
from service.store import Store, StoreUnavailable

if TYPE_CHECKING:
    from service.lifecycle import Deployment

Scored = list[tuple[str, float]]  # (item_id, fused score), best first
COOC_EPS = 1e-12  # the fusion's standardisation epsilon (model.config ln_eps), as in check_parity


@dataclass(slots=True)
class RecallContext:
    """What flows through the stages of one request."""

    request: RecallRequest
    snapshot: ServingSnapshot
    history: list[str] = field(default_factory=list)  # history: ids, oldest first
    degraded: bool = False  # history: the stored history could not be read
    known: list[tuple[int, int]] = field(default_factory=list)  # encode: (row, -1) | (-1, new-item position)
    warmed_up: list[str] = field(default_factory=list)  # encode: new items among `known`
    ignored: list[str] = field(default_factory=list)  # encode: ids neither in the catalogue nor registered
    excluded_rows: list[int] = field(default_factory=list)  # encode: catalogue rows never answered
    excluded_new: list[int] = field(default_factory=list)  # encode: new-item positions never answered
    fallback: bool = False  # encode: nothing known, the popularity ranking answers
    inputs: SequenceInputs | None = None  # encode: the model's right-padded inputs
    query: np.ndarray | None = None  # model: (3d,)
    bias: float = 0.0  # model
    cooc_weight: float = 0.0  # model (mml_cooc): the co-occurrence learner's weight A_c * gamma_c >= 0
    cooc: tuple[np.ndarray, np.ndarray] | None = None  # cooc: (catalogue rows, bonus) added by topk
    score_shift: float = 0.0  # cooc: the co-occurrence term every item holds; rank adds it to each score
    candidates: Scored = field(default_factory=list)  # topk: the k best, exclusions applied
    items: Scored = field(default_factory=list)  # rank: the answer


class Stage(Protocol):
    name: str

    def __call__(self, ctx: RecallContext) -> None: ...


# --- stages ---------------------------------------------------------------------------------------


class ReadHistory:
    """request.history, or the user's stored history -> ctx.history (ctx.degraded if unreadable)."""

    name = "history"

    def __init__(self, store: Store) -> None:
        self.store = store

    def __call__(self, ctx: RecallContext) -> None:
        history = ctx.request.history
        if history is None:
            try:
                history = self.store.history(ctx.request.user_id)
            except StoreUnavailable:
                history, ctx.degraded = [], True
        ctx.history = history


class Encode:
    """ctx.history + request exclusions -> ctx.known (most recent max_len), warmed_up, ignored,
    excluded_rows/new, fallback (nothing known) and, with `sequences`, ctx.inputs."""

    name = "encode"

    def __init__(self, sequences: bool = True) -> None:
        self.sequences = sequences  # False: a model stage that reads ctx.known itself (adapt)

    def __call__(self, ctx: RecallContext) -> None:
        snap, req = ctx.snapshot, ctx.request
        row_of, new_index = snap.runtime.row_of, snap.new_items.index
        known: list[tuple[int, int]] = []
        for item_id in ctx.history:
            row = row_of.get(item_id)
            if row is not None:
                known.append((row, -1))
            else:
                pos = new_index.get(item_id)
                if pos is None:
                    ctx.ignored.append(item_id)
                else:
                    known.append((-1, pos))
        if req.exclude_history:
            ctx.excluded_rows = [r for r, _ in known if r >= 0]
            ctx.excluded_new = [p for r, p in known if r < 0]
        for item_id in req.exclude_ids or ():
            row = row_of.get(item_id)
            if row is not None:
                ctx.excluded_rows.append(row)
            elif item_id in new_index:
                ctx.excluded_new.append(new_index[item_id])
        if not known:
            ctx.fallback = True
            return
        known = known[-snap.runtime.dims.max_len :]
        ctx.known = known
        if any(r < 0 for r, _ in known):
            ids = snap.new_items.ids
            ctx.warmed_up = list(dict.fromkeys(ids[p] for r, p in known if r < 0))
        if self.sequences:
            ctx.inputs = _sequence_inputs(snap, known)


def _sequence_inputs(snap: ServingSnapshot, known: list[tuple[int, int]]) -> SequenceInputs:
    """(catalogue row, -1) / (-1, new-item position) pairs -> the recall graph's padded inputs."""
    rt, table = snap.runtime, snap.new_items
    rows = np.asarray([r for r, _ in known])
    is_new = rows < 0
    at = np.where(is_new, 0, rows)
    emb, text, image, mask = rt.id_emb[at], rt.text[at], rt.image[at], rt.image_mask[at]
    if is_new.any():
        pos = np.asarray([p for _, p in known])[is_new]
        emb[is_new], text[is_new] = table.id_emb[pos], table.text[pos]
        image[is_new], mask[is_new] = table.image[pos], table.image_mask[pos]
    return rt.sequence_inputs(emb, text, image, mask)


class Model:
    """ctx.inputs -> ctx.query, ctx.bias through recall.onnx (skipped on fallback)."""

    name = "model"

    def __call__(self, ctx: RecallContext) -> None:
        if ctx.fallback:
            return
        query, bias = ctx.snapshot.runtime.query(ctx.inputs)
        ctx.query, ctx.bias = query[0], float(bias[0])


class CoocModel:
    """The `mml_cooc` arms' model stage: ctx.inputs -> ctx.query, ctx.bias (the dense part of the
    fused score with the co-occurrence learner) and ctx.cooc_weight through recall_cooc.onnx
    (skipped on fallback)."""

    name = "model"

    def __call__(self, ctx: RecallContext) -> None:
        if ctx.fallback:
            return
        query, bias, weight = ctx.snapshot.runtime.query_cooc(ctx.inputs)
        ctx.query, ctx.bias, ctx.cooc_weight = query[0], float(bias[0]), float(weight[0])


class DenseCandidates:
    """ctx.query/bias (+ ctx.cooc's bonus) -> the k best of catalogue + new items by fused score,
    exclusions applied (the snapshot's exact or IVF top-k); on fallback the popularity ranking.
    -> ctx.candidates."""

    name = "topk"

    def __call__(self, ctx: RecallContext) -> None:
        snap, k = ctx.snapshot, ctx.request.k
        if ctx.fallback:
            ctx.candidates = snap.popularity(k, ctx.excluded_rows)
        else:
            ctx.candidates = snap.topk(
                ctx.query, ctx.bias, k, ctx.excluded_rows, ctx.excluded_new, snap.new_items, ctx.cooc
            )


class CoocScores:
    """The co-occurrence learner's term of the fused score (mml_cooc arms), before DenseCandidates:
    ctx.known -> the history's non-zero co-occurrence scores (mml.cooc.sparse_scores over the
    bundle's top-M neighbour table) -> (bonus, shift) = mml.cooc.fused_cooc -> ctx.cooc = (rows
    ascending, bonus), ctx.score_shift = shift (skipped on fallback). Exclusions are the top-k's.

    The fused score of an item is dense + bonus + shift: bonus >= 0 on the history's neighbours and
    0 everywhere else, the shift the same for every item (catalogue and registered). The `topk`
    stage adds the bonus to the dense scores it selects from (service/topk.py), so its k best are
    the fused top-k; Rank adds the shift, which keeps the order and makes the answer's scores the
    fused scores. Cost O(history x M) (M = the table's width), never O(catalogue)."""

    name = "cooc"

    def __call__(self, ctx: RecallContext) -> None:
        if ctx.fallback:
            return
        table = ctx.snapshot.runtime.cooc
        # the model's positions, oldest first: a registered new item is a row beyond the table (a
        # position of the recency weights, no co-occurrence: none until retraining puts it in D_old)
        beyond = table.n_items + 1
        history = np.fromiter((r if r >= 0 else beyond for r, _ in ctx.known), np.int64, len(ctx.known))
        rows, scores = sparse_scores(table, history)
        bonus, shift = fused_cooc(scores, ctx.cooc_weight, table.n_items, COOC_EPS)
        ctx.score_shift = float(shift)
        if len(rows):
            ctx.cooc = (rows, bonus.astype(np.float32, copy=False))


class Popular:
    """The `popularity` arm: the bundle's popularity ranking minus history and exclude_ids."""

    name = "topk"

    def __call__(self, ctx: RecallContext) -> None:
        req, row_of = ctx.request, ctx.snapshot.runtime.row_of
        excluded = [row_of[i] for i in req.exclude_ids or () if i in row_of]
        if req.exclude_history:
            excluded += [row_of[i] for i in ctx.history if i in row_of]
        ctx.candidates = ctx.snapshot.popularity(req.k, excluded)


class Rank:
    """ctx.candidates (already excluded and sorted) -> ctx.items, cut to k. A ctx.score_shift
    (mml_cooc) is added to every score: the same for all, it keeps the order."""

    name = "rank"

    def __call__(self, ctx: RecallContext) -> None:
        ctx.items = ctx.candidates[: ctx.request.k]
        if ctx.score_shift:
            shift = ctx.score_shift
            ctx.items = [(item_id, score + shift) for item_id, score in ctx.items]


def mml_chain(store: Store, model: Stage | None = None) -> tuple[Stage, ...]:
    """The `mml` arm; `model`: another model stage (adapt.AdaptingModel, which reads ctx.known)."""
    if model is None:
        return (ReadHistory(store), Encode(), Model(), DenseCandidates(), Rank())
    return (ReadHistory(store), Encode(sequences=False), model, DenseCandidates(), Rank())


def mml_cooc_chain(store: Store) -> tuple[Stage, ...]:
    """The `mml_cooc` arm: the MML learners fused with the co-occurrence learner (a bundle with
    recall_cooc and tables/cooc.npz)."""
    return (ReadHistory(store), Encode(), CoocModel(), CoocScores(), DenseCandidates(), Rank())


def popularity_chain(store: Store) -> tuple[Stage, ...]:
    return (ReadHistory(store), Popular(), Rank())


def run_chain(chain: tuple[Stage, ...], snapshot: ServingSnapshot, request: RecallRequest) -> RecallContext:
    """The stages alone, nothing timed or recorded (tests, benchmarks)."""
    ctx = RecallContext(request, snapshot)
    for stage in chain:
        stage(ctx)
    return ctx


# --- the runner -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmRoute:
    """One arm as requests see it: its chain over the snapshot of its bundle."""

    name: str
    kind: str  # "mml", "mml_cooc" or "popularity"
    bundle: Path  # key of the deployment's snapshots
    model_version: str
    adapt_steps: int
    chain: tuple[Stage, ...]


@dataclass(frozen=True)
class Answered:
    body: str  # the RecallResponse as JSON
    headers: dict[str, str]


class RecallRunner:
    """Assigns the arm, runs its chain, builds the answer, and records the request once: stage
    timings (Server-Timing + mml_recall_stage_seconds), request counters and latency, fallback and
    degraded counters, the exposure record."""

    def __init__(self, settings: ServiceSettings, exposures: ExposureLog) -> None:
        self.settings = settings
        self.exposures = exposures

    def run(
        self,
        deployment: Deployment,
        req: RecallRequest,
        override: str | None,
        request_id: str | None,
        arrived: float | None = None,
    ) -> Answered:
        """`arrived`: perf_counter() when the request reached the app (service.app.HttpGuard), the
        start of the `app` timing; else now."""
        start = time.perf_counter()
        s = self.settings
        if req.history is not None and len(req.history) > s.max_history:
            raise invalid("history", f"at most {s.max_history} items, got {len(req.history)}")
        if req.exclude_ids is not None and len(req.exclude_ids) > s.max_exclude_ids:
            raise invalid("exclude_ids", f"at most {s.max_exclude_ids} ids, got {len(req.exclude_ids)}")
        if override is not None:
            if override not in deployment.arms:
                arms = ", ".join(deployment.arms)
                raise invalid("X-MML-Arm", f"unknown arm '{override}' (arms: {arms})", status=400)
            arm = deployment.arms[override]
        else:
            arm = deployment.arms[deployment.assigner.assign(req.user_id)]

        ctx = RecallContext(req, deployment.snapshots[arm.bundle])
        timings: dict[str, float] = {}  # stage names are unique within a chain
        t = time.perf_counter()
        for stage in arm.chain:
            stage(ctx)
            now = time.perf_counter()
            timings[stage.name] = now - t
            t = now

        rid = req.request_id or request_id or uuid.uuid4().hex
        degraded = ctx.degraded or ctx.snapshot.items_degraded
        # validated construction from plain dicts: faster in pydantic 2 than model_construct of
        # 100 nested models, which then serialise through a slower path
        body = RecallResponse(
            request_id=rid,
            user_id=req.user_id,
            arm=arm.name,
            model_version=arm.model_version,
            items=[{"item_id": i, "score": score} for i, score in ctx.items],
            warmed_up=ctx.warmed_up,
            ignored=ctx.ignored,
            fallback=ctx.fallback,
            degraded=degraded,
        ).model_dump_json()
        end = time.perf_counter()
        timings["total"] = end - start
        app_seconds = end - (arrived if arrived is not None else start)

        for name, seconds in timings.items():
            if name != "total":
                metrics.STAGE_SECONDS.labels(stage=name).observe(seconds)
        metrics.REQUESTS.labels(arm=arm.name, status="200").inc()
        metrics.REQUEST_SECONDS.labels(arm=arm.name).observe(app_seconds)
        if ctx.fallback:
            metrics.FALLBACKS.labels(arm=arm.name).inc()
        if degraded:
            metrics.DEGRADED.labels(arm=arm.name).inc()
        logged = [i for i, _ in ctx.items[: s.exposure_k_logged]]
        new = (
            [i for i in logged if i not in ctx.snapshot.runtime.row_of] if len(ctx.snapshot.new_items) else []
        )
        self.exposures.write(
            exposure_record(
                rid, req.user_id, arm.name, arm.model_version, override is not None, logged, new, ctx.fallback
            )
        )
        timing = ", ".join(f"{k};dur={v * 1000:.3f}" for k, v in timings.items())
        headers = {
            "X-MML-Arm": arm.name,
            "X-Request-ID": rid,
            "Server-Timing": f"{timing}, app;dur={app_seconds * 1000:.3f}",
        }
        return Answered(body, headers)


def count_refused(status: int) -> None:
    """A /recall refused before an arm was chosen (schema, size, content type, not ready)."""
    metrics.REQUESTS.labels(arm="none", status=str(status)).inc()


__all__ = [
    "RecallContext",
    "RecallRunner",
    "Stage",
    "mml_chain",
    "mml_cooc_chain",
    "popularity_chain",
    "run_chain",
]
