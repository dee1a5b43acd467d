"""`mml ab report`: which arm's candidates did users go on to engage with (numpy; scipy for coverage).

Inputs are the service's own sinks (docs/service.md, "A/B arms"):

* **exposures**: one record per answered /recall, `{"ts", "request_id", "user_id", "arm",
  "model_version", "override", "items"}`, from the JSON-lines log (`MML_EXPOSURE_LOG`) or the Redis
  stream `<prefix>exposures`. `items` is the answer's item ids in rank order, capped at `k_logged`
  (rank = index in `items` + 1).
* **events**: `{"user_id", "item_id", "ts"}` (what POST /events takes), from a JSON-lines file or, with
  a `redis://` URL, the stored histories `<prefix>hist:<user>` (`"<ts>\\t<item_id>"`; capped at
  `MML_HISTORY_CAP` per user and expiring after `MML_HISTORY_TTL_S`: read them before either bites).

The join: each exposure is matched with the same user's **next event**, the first event with
`exposure.ts <= event.ts <= exposure.ts + window_s` (default 30 minutes). Event timestamps are whole
seconds (POST /events), so an event posted in the same second as the exposure but stamped with the
server's clock (rounded down) is missed and the user's following event, if any within the window, is
taken instead; a client that stamps its events after the exposure (the replay stamps the next whole
second) has no such loss. An exposure without a next event in the window counts as a miss.

Per arm: users, exposures, the share of exposures with a next event, hit rate@k (share of exposures
whose next event is among the top k logged items), MRR (mean of 1/rank of the next event, 0 when it is
not in the list), coverage (distinct items among all logged candidates / catalogue size) and the
new-item share (share of logged candidate slots holding an item that is not an old item of the bundle:
new catalogue items and registered ones). The last two need the catalogue (`--bundle`).

Against the control arm, each metric gets the difference, a confidence interval clustered by user and
a two-sided p-value:

* ratio metrics (hit rates, MRR, new-item share: sums over a user's exposures divided by sums of
  their denominators) by the delta method over users (default) or a Poisson bootstrap over users;
* coverage (a count of distinct items, not a mean): the standard error of the difference from a Poisson
  bootstrap over users, a normal interval around the estimate (replicates of a distinct count are
  biased down, so their percentiles would miss it); approximate.

Arms are independent samples of users, so the variance of a difference is the sum of the arms'.
The sample-ratio-mismatch check (`service.ab.srm_check`) runs first: when it fails, the report
refuses to compare arms (exit status 1 from the command).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from mml.errors import MMLError
from service.ab import SRM_ALPHA, ArmsConfig, count_users, json_lines, read_exposures, srm_check


class ReportConfig(BaseModel):
    """Settings of one report; every field is a flag of `mml ab report`."""

    model_config = {"extra": "forbid"}

    window_s: float = Field(1800.0, gt=0)  # an event more than this after the exposure is not its next event
    ks: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1)  # hit rate@k cut-offs
    control: str | None = None  # the arm compared against; None: `control` if configured, else the first arm
    ci: Literal["delta", "bootstrap"] = "delta"  # interval of the ratio metrics (coverage: always bootstrap)
    bootstrap: int = Field(1000, ge=50, le=100_000)  # Poisson bootstrap replicates over users
    confidence: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 0  # bootstrap draws
    srm_alpha: float = Field(SRM_ALPHA, gt=0, lt=1)
    include_overrides: bool = False  # QA traffic (X-MML-Arm) is left out of the comparison by default

    @field_validator("ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value):
            raise ValueError("every k must be >= 1")
        return sorted(set(value))


# --- reading ----------------------------------------------------------------------------------------


@dataclass
class Exposures:
    """Exposure records as arrays (one row per record); `items` flattened with `offsets`."""

    user: np.ndarray  # str
    arm: np.ndarray  # str
    ts: np.ndarray  # float64 unix seconds
    override: np.ndarray  # bool
    items: np.ndarray  # str, every record's items one after the other, rank order
    offsets: np.ndarray  # int64 (n + 1,): record i's items are items[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Events:
    user: np.ndarray  # str
    item: np.ndarray  # str
    ts: np.ndarray  # float64 unix seconds


def _field(record: dict, name: str, where: str):
    if name not in record or record[name] is None:
        raise MMLError(f"{where}: field '{name}' is missing")
    return record[name]


def _number(record: dict, name: str, where: str) -> float:
    value = _field(record, name, where)
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise MMLError(f"{where}: field '{name}' is not a number ({value!r})") from exc
    if not math.isfinite(number):
        raise MMLError(f"{where}: field '{name}' is not finite ({value!r})")
    return number


def exposures_from_records(records: Iterable[dict], source: str = "exposures") -> Exposures:
    """Validate and pack exposure records (file lines or stream entries, where every value is a string
    and `items` a JSON list)."""
    users, arms, stamps, overrides, items, lengths = [], [], [], [], [], []
    for number, record in enumerate(records, 1):
        where = f"{source}: record {number}"
        users.append(str(_field(record, "user_id", where)))
        arms.append(str(_field(record, "arm", where)))
        stamps.append(_number(record, "ts", where))
        overrides.append(record.get("override") in (True, "true"))
        listed = _field(record, "items", where)
        if isinstance(listed, str):  # a Redis stream field: the JSON text of the list
            try:
                listed = json.loads(listed)
            except json.JSONDecodeError as exc:
                raise MMLError(f"{where}: field 'items' is not a JSON list ({exc.msg})") from exc
        if not isinstance(listed, list):
            raise MMLError(f"{where}: field 'items' is not a list of item ids")
        for position, item in enumerate(listed):
            if isinstance(item, dict):  # tolerate {"item_id", "score"} entries as well as bare ids
                item = item.get("item_id")
            if not isinstance(item, (str, int)) or isinstance(item, bool):
                raise MMLError(f"{where}: field 'items.{position}' is not an item id ({item!r})")
            items.append(str(item))
        lengths.append(len(listed))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Exposures(
        user=np.asarray(users, dtype=str),
        arm=np.asarray(arms, dtype=str),
        ts=np.asarray(stamps, dtype=np.float64),
        override=np.asarray(overrides, dtype=bool),
        items=np.asarray(items, dtype=str),
        offsets=offsets,
    )


def load_exposures(source: str, prefix: str = "mml:") -> Exposures:
    """From a JSON-lines file or `redis://host:port/db` (the stream `<prefix>exposures`)."""
    return exposures_from_records(read_exposures(source, prefix), f"exposures {source}")


def _redis_events(source: str, prefix: str) -> Iterator[dict]:
    """The stored histories: every `<prefix>hist:<user>` list, entries `"<ts>\\t<item_id>"`."""
    import redis

    client = redis.Redis.from_url(source, socket_timeout=5)
    head = f"{prefix}hist:"
    try:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", head) + "*"  # the prefix taken literally
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.lrange(key, 0, -1)
            for key, entries in zip(chunk, pipe.execute(), strict=True):
                user = key.decode()[len(head) :]
                for entry in entries:
                    ts, _, item = entry.decode().partition("\t")
                    yield {"user_id": user, "item_id": item, "ts": ts}
    except redis.RedisError as exc:
        raise MMLError(f"events {source}: {exc}") from exc


def _file_records(source: str, what: str) -> Iterator[dict]:
    for number, record in json_lines(source, what):
        if not isinstance(record, dict):
            raise MMLError(f"{what} {source}:{number}: not a JSON object")
        yield record


def events_from_records(records: Iterable[dict], source: str = "events") -> Events:
    users, items, stamps = [], [], []
    for number, record in enumerate(records, 1):
        where = f"{source}: record {number}"
        users.append(str(_field(record, "user_id", where)))
        items.append(str(_field(record, "item_id", where)))
        stamps.append(_number(record, "ts", where))
    return Events(
        user=np.asarray(users, dtype=str),
        item=np.asarray(items, dtype=str),
        ts=np.asarray(stamps, dtype=np.float64),
    )


def load_events(source: str, prefix: str = "mml:") -> Events:
    """From a JSON-lines file (`{"user_id", "item_id", "ts"}` per line) or `redis://host:port/db` (the
    service's stored histories)."""
    if source.startswith(("redis://", "rediss://", "unix://")):
        return events_from_records(_redis_events(source, prefix), f"events {source}")
    return events_from_records(_file_records(source, "events"), f"events {source}")


@dataclass
class Catalogue:
    n_items: int  # catalogue rows, pad excluded
    old: frozenset[str]  # ids of the old items (trained ID embeddings); every other id is a new item


def parse_window(text: str) -> float:
    """`1800`, `1800s`, `30m`, `0.5h` -> seconds (the --window flag)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    try:
        seconds = float(value[:-1] if scale else value) * (scale or 1.0)
    except ValueError as exc:
        raise MMLError(f"--window: '{text}' is not a duration (seconds, or a number with s, m or h)") from exc
    if not (seconds > 0 and math.isfinite(seconds)):
        raise MMLError(f"--window: '{text}' must be a positive duration")
    return seconds


def load_catalogue(bundle: Path) -> Catalogue:
    """The bundle's item table (`tables/items.npz`: item_id, is_old; row 0 is the pad)."""
    path = Path(bundle) / "tables" / "items.npz"
    if not path.is_file():
        raise MMLError(f"--bundle {bundle}: no tables/items.npz (give a bundle written by mml export)")
    with np.load(path, allow_pickle=False) as table:
        for name in ("item_id", "is_old"):
            if name not in table.files:
                raise MMLError(f"{path}: field '{name}' is missing")
        ids = table["item_id"][1:].astype(str)
        is_old = table["is_old"][1:].astype(bool)
    return Catalogue(n_items=len(ids), old=frozenset(ids[is_old].tolist()))


# --- the join ---------------------------------------------------------------------------------------


def next_event_rank(exposures: Exposures, events: Events, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Per exposure: whether the user has a next event within the window, and that event's rank in the
    exposure's items (1-based; 0 when the item is not in the list or there is no event).

    Vectorised: exposures and events are sorted together by (user, ts, exposure before event at equal
    ts); the next event of row i is the first event row at or after i, found with a reversed running
    minimum, and it belongs to the exposure when it has the same user and lies within the window."""
    n_exp, n_ev = len(exposures), len(events.user)
    if n_exp == 0 or n_ev == 0:
        return np.zeros(n_exp, bool), np.zeros(n_exp, np.int64)
    _, user_code = np.unique(np.concatenate([exposures.user, events.user]), return_inverse=True)
    ts = np.concatenate([exposures.ts, events.ts])
    is_event = np.r_[np.zeros(n_exp, bool), np.ones(n_ev, bool)]
    order = np.lexsort((is_event, ts, user_code))  # last key first: user, then ts, then exposures first
    pos = np.arange(len(order))
    candidate = np.where(is_event[order], pos, len(order))
    next_pos = np.minimum.accumulate(candidate[::-1])[::-1]  # first event position at or after each row
    exp_pos = np.empty(n_exp, np.int64)
    exp_rows = np.flatnonzero(~is_event[order])
    exp_pos[order[exp_rows]] = exp_rows  # where each exposure landed in the sorted order
    nxt = next_pos[exp_pos]
    found = nxt < len(order)
    event_row = np.where(found, order[np.minimum(nxt, len(order) - 1)], 0)  # row in the concatenation
    matched = (
        found
        & (user_code[event_row] == user_code[:n_exp])
        & (ts[event_row] - exposures.ts <= window_s)
        & is_event[event_row]
    )
    next_item = np.where(matched, events.item[np.clip(event_row - n_exp, 0, n_ev - 1)], "")

    # rank of the next item in the exposure's own list: compare every logged slot with its record's item
    lengths = np.diff(exposures.offsets)
    record_of_slot = np.repeat(np.arange(n_exp), lengths)
    hit_slot = np.flatnonzero((exposures.items == next_item[record_of_slot]) & matched[record_of_slot])
    rank = np.zeros(n_exp, np.int64)
    if len(hit_slot):
        records = record_of_slot[hit_slot]
        first = np.r_[True, records[1:] != records[:-1]]  # an id listed twice: its first (best) rank
        rank[records[first]] = hit_slot[first] - exposures.offsets[records[first]] + 1
    return matched, rank


# --- statistics -------------------------------------------------------------------------------------


def _cluster_sums(cluster: np.ndarray, n_clusters: int, *values: np.ndarray) -> list[np.ndarray]:
    return [np.bincount(cluster, weights=v, minlength=n_clusters) for v in values]


def ratio_delta(y: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ratio sum(y)/sum(d) over clusters (last axis) and its delta-method variance.

    Var(R) ~= Var_u(Y_u - R D_u) / (n mean(D)^2) with n clusters (sample variance, ddof 1). Leading axes
    are independent problems (the tests run 500 simulations in one call)."""
    n = y.shape[-1]
    d_sum = d.sum(axis=-1)
    ratio = y.sum(axis=-1) / d_sum
    if n < 2:
        return ratio, np.full_like(ratio, np.nan)
    residual = y - ratio[..., None] * d
    variance = residual.var(axis=-1, ddof=1) / (n * (d_sum / n) ** 2)
    return ratio, variance


def _normal_p(diff: float, se: float) -> float:
    if not np.isfinite(se):
        return float("nan")
    if se == 0:
        return 1.0 if diff == 0 else 0.0
    return math.erfc(abs(diff) / se / math.sqrt(2))


class Comparison(BaseModel):
    control: float
    value: float
    diff: float  # value - control
    ci_low: float
    ci_high: float
    p_value: float
    method: str  # delta or bootstrap


class ArmSummary(BaseModel):
    users: int
    exposures: int
    matched_share: float  # exposures with a next event within the window
    metrics: dict[str, float | None]  # hit_rate@k, mrr, coverage, new_item_share (None: no catalogue)


class SrmSummary(BaseModel):
    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    df: int
    p_value: float
    mismatch: bool
    unknown_arms: dict[str, int]


class Report(BaseModel):
    config: ReportConfig
    srm: SrmSummary
    refused: str | None = None  # why arms were not compared (SRM failed); None: compared
    control: str
    window_s: float
    exposures_read: int
    overrides_left_out: int
    catalogue_items: int | None
    arms: dict[str, ArmSummary] = Field(default_factory=dict)
    comparisons: dict[str, dict[str, Comparison]] = Field(default_factory=dict)  # arm -> metric -> vs control

    def confidence_label(self) -> str:
        return f"{self.config.confidence * 100:g}%"


@dataclass
class _ArmData:
    cluster: np.ndarray  # per exposure: user index within the arm
    n_users: int
    values: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> per-user (numerator, denominator)
    incidence: object | None  # scipy CSR users x items (coverage), None without a catalogue


def _metric_names(config: ReportConfig, with_catalogue: bool) -> list[str]:
    names = [f"hit_rate@{k}" for k in config.ks] + ["mrr"]
    return names + (["coverage", "new_item_share"] if with_catalogue else [])


def build_report(
    exposures: Exposures,
    events: Events,
    arms: ArmsConfig,
    config: ReportConfig | None = None,
    catalogue: Catalogue | None = None,
) -> Report:
    """The SRM gate, the join, per-arm metrics and every metric against the control arm."""
    config = config or ReportConfig()
    weights = {a.name: a.weight for a in arms.arms}
    configured = [a.name for a in arms.arms if a.weight > 0]
    control = config.control or ("control" if "control" in configured else configured[0])
    if control not in weights:
        raise MMLError(f"control: arm '{control}' is not in the arms config ({', '.join(weights)})")

    records = (
        {"user_id": u, "arm": a, "override": o}
        for u, a, o in zip(exposures.user, exposures.arm, exposures.override, strict=True)
    )
    srm = srm_check(count_users(records), weights, alpha=config.srm_alpha)
    report = Report(
        config=config,
        srm=SrmSummary(**srm.__dict__),
        control=control,
        window_s=config.window_s,
        exposures_read=len(exposures),
        overrides_left_out=0 if config.include_overrides else int(exposures.override.sum()),
        catalogue_items=catalogue.n_items if catalogue else None,
    )
    if srm.mismatch:
        report.refused = (
            f"sample ratio mismatch: p = {srm.p_value:.3g} < {config.srm_alpha} (users per arm "
            f"{srm.observed}, expected { ({a: round(e, 1) for a, e in srm.expected.items()}) }); "
            "the assignment is broken, so arm differences are not comparable"
        )
        return report

    matched, rank = next_event_rank(exposures, events, config.window_s)
    keep = np.ones(len(exposures), bool) if config.include_overrides else ~exposures.override
    lengths = np.diff(exposures.offsets)
    if catalogue is not None:  # new item: not an old item of the bundle (new catalogue rows, registered ids)
        is_new_slot = ~np.isin(exposures.items, np.asarray(sorted(catalogue.old), dtype=str))
        record_of_slot = np.repeat(np.arange(len(exposures)), lengths)
        new_per_record = np.bincount(record_of_slot, weights=is_new_slot, minlength=len(exposures))

    data: dict[str, _ArmData] = {}
    for arm in configured:
        rows = np.flatnonzero(keep & (exposures.arm == arm))
        _, cluster = np.unique(exposures.user[rows], return_inverse=True)
        n_users = int(cluster.max()) + 1 if len(rows) else 0
        one = np.ones(len(rows))
        values = {}
        r = rank[rows]
        for k in config.ks:
            hit = ((r >= 1) & (r <= k)).astype(np.float64)
            values[f"hit_rate@{k}"] = tuple(_cluster_sums(cluster, n_users, hit, one))
        rr = np.where(r > 0, 1.0 / np.maximum(r, 1), 0.0)
        values["mrr"] = tuple(_cluster_sums(cluster, n_users, rr, one))
        values["_matched"] = tuple(_cluster_sums(cluster, n_users, matched[rows].astype(np.float64), one))
        incidence = None
        if catalogue is not None:
            values["new_item_share"] = tuple(
                _cluster_sums(cluster, n_users, new_per_record[rows], lengths[rows].astype(np.float64))
            )
            incidence = _incidence(exposures, rows, cluster, n_users)
        data[arm] = _ArmData(cluster=cluster, n_users=n_users, values=values, incidence=incidence)

    names = _metric_names(config, catalogue is not None)
    rng = np.random.default_rng(config.seed)
    z = NormalDist().inv_cdf(0.5 + config.confidence / 2)
    point: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, np.ndarray | float]] = {}  # delta: variance; bootstrap: replicates
    for arm, arm_data in data.items():
        point[arm], spread[arm] = {}, {}
        weights_b = None
        if config.ci == "bootstrap" or catalogue is not None:
            weights_b = rng.poisson(1.0, size=(config.bootstrap, arm_data.n_users)).astype(np.float64)
        for name in names:
            if name == "coverage":
                point[arm][name] = _coverage(arm_data.incidence, np.ones((1, arm_data.n_users)), catalogue)[0]
                spread[arm][name] = _coverage(arm_data.incidence, weights_b, catalogue)
                continue
            y, d = arm_data.values[name]
            if arm_data.n_users == 0:
                point[arm][name], spread[arm][name] = float("nan"), float("nan")
                continue
            ratio, variance = ratio_delta(y, d)
            point[arm][name] = float(ratio)
            if config.ci == "delta":
                spread[arm][name] = float(variance)
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    spread[arm][name] = (weights_b @ y) / (weights_b @ d)
        y, d = arm_data.values["_matched"]
        report.arms[arm] = ArmSummary(
            users=arm_data.n_users,
            exposures=len(arm_data.cluster),
            matched_share=float(y.sum() / d.sum()) if arm_data.n_users else float("nan"),
            metrics={name: point[arm][name] for name in names},
        )

    for arm in data:
        if arm == control:
            continue
        report.comparisons[arm] = {}
        for name in names:
            diff = point[arm][name] - point[control][name]
            a, c = spread[arm][name], spread[control][name]
            if isinstance(a, np.ndarray) and name == "coverage":
                # A distinct count is biased down in a bootstrap replicate (about 37 % of the users get
                # weight 0, and their items drop out), so a percentile interval misses the estimate;
                # the replicates give the standard error only, around the estimate (approximate).
                replicates = (a - c)[np.isfinite(a - c)]
                se = float(replicates.std(ddof=1)) if len(replicates) > 1 else float("nan")
                low, high = diff - z * se, diff + z * se
                method = "bootstrap-se"
            elif isinstance(a, np.ndarray):  # ratio metrics: percentile interval, normal p from the SE
                replicates = (a - c)[np.isfinite(a - c)]
                alpha = 1 - config.confidence
                low, high = (
                    np.quantile(replicates, [alpha / 2, 1 - alpha / 2]) if len(replicates) else (np.nan,) * 2
                )
                se = float(replicates.std(ddof=1)) if len(replicates) > 1 else float("nan")
                method = "bootstrap"
            else:
                se = math.sqrt(a + c) if np.isfinite(a + c) else float("nan")
                low, high = diff - z * se, diff + z * se
                method = "delta"
            report.comparisons[arm][name] = Comparison(
                control=point[control][name],
                value=point[arm][name],
                diff=diff,
                ci_low=float(low),
                ci_high=float(high),
                p_value=_normal_p(diff, se),
                method=method,
            )
    return report


def _incidence(exposures: Exposures, rows: np.ndarray, cluster: np.ndarray, n_users: int):
    """users x items 0/1 matrix (scipy CSR) of the items each user of the arm was shown."""
    from scipy import sparse

    all_lengths = np.diff(exposures.offsets)
    in_arm = np.zeros(len(all_lengths), bool)
    in_arm[rows] = True
    slots = np.repeat(in_arm, all_lengths)  # the arm's logged slots, in record order like `rows`
    _, item_code = np.unique(exposures.items[slots], return_inverse=True)
    users = np.repeat(cluster, all_lengths[rows])
    n_items = int(item_code.max()) + 1 if len(item_code) else 0
    matrix = sparse.csr_matrix(
        (np.ones(len(users)), (users, item_code)), shape=(n_users, n_items), dtype=np.float64
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def _coverage(incidence, weights: np.ndarray, catalogue: Catalogue) -> np.ndarray:
    """Distinct items shown / catalogue size, per row of user weights (bootstrap replicates): an item is
    covered in a replicate when a user who was shown it has a positive weight."""
    if incidence is None or incidence.shape[0] == 0:
        return np.full(len(weights), np.nan)
    shown = np.asarray(incidence.T @ weights.T)  # items x replicates
    return (shown > 0).sum(axis=0) / catalogue.n_items


# --- output -----------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def _fmt_p(p: float) -> str:
    if not np.isfinite(p):
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def table_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the report table (terminal and markdown): one row per metric, the control's
    value, then per other arm its value, the difference with its interval and the p-value."""
    others = list(report.comparisons)
    header = ["metric", report.control] + [
        c for arm in others for c in (arm, f"{arm} - {report.control} [95% CI]", "p")
    ]
    if report.confidence_label() != "95%":
        header = [h.replace("95% CI", f"{report.confidence_label()} CI") for h in header]
    rows = [
        ["users", str(report.arms[report.control].users)]
        + [c for arm in others for c in (str(report.arms[arm].users), "", "")],
        ["exposures", str(report.arms[report.control].exposures)]
        + [c for arm in others for c in (str(report.arms[arm].exposures), "", "")],
        ["with a next event", _fmt(report.arms[report.control].matched_share, 3)]
        + [c for arm in others for c in (_fmt(report.arms[arm].matched_share, 3), "", "")],
    ]
    for name in report.arms[report.control].metrics:
        row = [name, _fmt(report.arms[report.control].metrics[name])]
        for arm in others:
            c = report.comparisons[arm][name]
            row += [_fmt(c.value), f"{c.diff:+.4f} [{c.ci_low:+.4f}, {c.ci_high:+.4f}]", _fmt_p(c.p_value)]
        rows.append(row)
    return header, rows


def srm_line(report: Report) -> str:
    observed = ", ".join(f"{a} {n}" for a, n in report.srm.observed.items())
    return f"SRM: users {observed}; chi2 = {report.srm.chi2:.3f}, df = {report.srm.df}, p = {report.srm.p_value:.3g}"


def to_markdown(report: Report) -> str:
    if report.refused:
        return f"{srm_line(report)}\n\nRefused: {report.refused}\n"
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_report(report: Report) -> None:
    """The terminal table (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(srm_line(report))
    if report.refused:
        console.print(f"[red]Refused to compare arms:[/red] {report.refused}")
        return
    header, rows = table_rows(report)
    table = Table(
        title=f"A/B report: next event within {report.window_s:g} s, control '{report.control}', "
        f"{report.config.ci} intervals clustered by user"
    )
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if report.overrides_left_out:
        console.print(f"{report.overrides_left_out} override (QA) exposures left out")
