"""A/B arms: configuration, deterministic assignment, exposure records, sample-ratio-mismatch check.

Config file (YAML or JSON; `MML_ARMS_CONFIG` / `mml serve --arms`):

    salt: homepage-recall-2024-06       # change it to reshuffle users between arms
    arms:
      - name: control
        kind: popularity                # most popular items (from the arm's bundle), history excluded
        weight: 0.5
      - name: mml
        kind: mml                       # the MML model (mml_cooc: fused with the co-occurrence
                                        # learner; needs a bundle with recall_cooc + tables/cooc.npz)
        bundle: ../bundles/v7           # relative to this file; absent: the service's default bundle
        weight: 0.5
        adapt_steps: 0                  # meta-test warm-up steps per request (0: ONNX Runtime only;
                                        # kind mml only)

Assignment: bucket = MurmurHash3_x86_32(salt + ":" + user_id, seed 0, unsigned) mod 10,000; arms own
consecutive bucket ranges sized by their normalised weights, in file order. The same user gets the
same arm on every replica and after restarts, as long as salt, order and weights stay the same.
The `X-MML-Arm` request header overrides it (QA); such exposures are marked `override` and left
out of the SRM check.

SRM check (`mml ab srm`): users (deduplicated, first arm seen) per arm against the configured
weights, Pearson chi-square with arms-1 degrees of freedom. The chi-square survival function is
implemented here with `math` (regularised upper incomplete gamma), so the check runs in the serving
environment without scipy.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mmh3
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from mml.errors import MMLError

BUCKETS = 10_000
ARM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SRM_ALPHA = 0.001  # conventional SRM threshold: a p-value below it means the split is broken


class ArmConfig(BaseModel):
    model_config = {"extra": "forbid"}

    name: str
    kind: Literal["mml", "mml_cooc", "popularity"] = "mml"
    weight: float = Field(1.0, ge=0)  # relative share of users; 0 = reachable only by override
    bundle: Path | None = None  # None: the service's default bundle (MML_BUNDLE)
    adapt_steps: int = Field(0, ge=0, le=50)  # meta-test warm-up gradient steps per request

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not ARM_NAME.match(value):
            raise ValueError("arm names are 1-64 characters of letters, digits, '_', '.', '-'")
        return value

    @model_validator(mode="after")
    def _adapt_only_mml(self) -> ArmConfig:
        # meta-test warm-up adapts the three learners of recall.onnx (service/adapt.py); the
        # co-occurrence fusion of mml_cooc has no adapting counterpart
        if self.adapt_steps > 0 and self.kind != "mml":
            raise ValueError(f"arm '{self.name}': adapt_steps > 0 is for kind mml only, not {self.kind}")
        return self


class ArmsConfig(BaseModel):
    model_config = {"extra": "forbid"}

    salt: str = Field("mml", min_length=1)
    arms: list[ArmConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ArmsConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        if sum(a.weight for a in self.arms) <= 0:
            raise ValueError("at least one arm needs a positive weight")
        return self


DEFAULT_ARMS = ArmsConfig(salt="mml", arms=[ArmConfig(name="mml", kind="mml", weight=1.0)])


def load_arms(path: Path | None) -> ArmsConfig:
    """Read and validate an arms file; bundle paths are resolved relative to the file. None: the
    default single `mml` arm."""
    if path is None:
        return DEFAULT_ARMS
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MMLError(f"arms config {path}: unreadable ({exc.strerror})") from exc
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: both mean a syntax error
        raise MMLError(f"arms config {path}: not valid {path.suffix.lstrip('.') or 'YAML'} ({exc})") from exc
    try:
        config = ArmsConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise MMLError(f"arms config {path}: field '{field}': {first['msg']}") from exc
    for arm in config.arms:
        if arm.bundle is not None and not arm.bundle.is_absolute():
            arm.bundle = Path(os.path.abspath(path.parent / arm.bundle))  # normalised, symlinks kept
    return config


def bucket_of(user_id: str, salt: str) -> int:
    return mmh3.hash(f"{salt}:{user_id}", 0, signed=False) % BUCKETS


class Assigner:
    """user id -> arm name, by salted hash bucket and cumulative weights."""

    def __init__(self, config: ArmsConfig) -> None:
        self.salt = config.salt
        total = sum(a.weight for a in config.arms)
        cumulative = 0.0
        self.bounds: list[tuple[int, str]] = []  # (exclusive upper bucket, arm)
        for arm in config.arms:
            cumulative += arm.weight
            self.bounds.append((round(cumulative / total * BUCKETS), arm.name))
        self.weights = {a.name: a.weight / total for a in config.arms}

    def assign(self, user_id: str) -> str:
        bucket = bucket_of(user_id, self.salt)
        for upper, name in self.bounds:
            if bucket < upper:
                return name
        return self.bounds[-1][1]  # unreachable: the last bound is BUCKETS


# --- exposure records -----------------------------------------------------------------------------


class ExposureLog:
    """Exposure records, written off the request path: `write` appends the record to a deque (no
    lock, no thread wake-up: a request pays ~1 us); one thread wakes every `flush_s`, drains it into
    the JSON-lines file (or stdout) with one write() per batch, so several workers may share a
    file, and, when given a store, into its exposure stream in one round trip. `close` flushes what
    is left (graceful shutdown); a crash loses at most the last `flush_s` of records."""

    def __init__(self, path: Path | None, store=None, flush_s: float = 0.1) -> None:
        self.path = path
        self.store = store
        self.flush_s = flush_s
        self._pending: deque[dict] = deque()
        self._closing = threading.Event()
        self._fh = open(path, "a") if path else sys.stdout  # noqa: SIM115 (closed by close())
        self._thread = threading.Thread(target=self._run, name="mml-exposures", daemon=True)
        self._thread.start()

    def write(self, record: dict) -> None:
        self._pending.append(record)  # deque.append is atomic

    def _run(self) -> None:
        while not self._closing.wait(self.flush_s):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        records = []
        while self._pending:
            records.append(self._pending.popleft())
        if not records:
            return
        self._fh.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._fh.flush()
        if self.store is not None:
            from service.store import StoreUnavailable

            try:
                self.store.add_exposures(records)
            except StoreUnavailable:
                pass  # counted in mml_redis_errors_total; the log lines hold the records

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=10)
        if self.path:
            self._fh.close()


EXPOSURE_LISTS = ("items", "new_items")  # list fields: JSON-encoded in the Redis stream


def exposure_record(
    request_id: str,
    user_id: str,
    arm: str,
    model_version: str,
    override: bool,
    items: list[str] | None = None,
    new_items: list[str] | None = None,
    fallback: bool = False,
) -> dict:
    """One exposure: who was shown what, by which arm. `items`: the answer's item ids in rank order
    (rank = position + 1), already cut to `k_logged` by the caller; `new_items`: those of `items`
    that are registered new items (not in the bundle's catalogue); `fallback`: the popularity
    ranking answered. Flat, so a reader can join it with the user's later events."""
    return {
        "ts": round(time.time(), 3),
        "request_id": request_id,
        "user_id": user_id,
        "arm": arm,
        "model_version": model_version,
        "override": override,
        "items": items if items is not None else [],
        "new_items": new_items if new_items is not None else [],
        "fallback": fallback,
    }


def read_exposures(source: str, prefix: str = "mml:") -> Iterator[dict]:
    """Exposure records from a JSON-lines file or a Redis stream (`redis://host:port/db`)."""
    if source.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(source, socket_timeout=5)
        key, start = f"{prefix}exposures", "-"
        try:
            while True:
                batch = client.xrange(key, min=start, max="+", count=10_000)
                if not batch:
                    return
                for _entry_id, fields in batch:
                    record = {k.decode(): v.decode() for k, v in fields.items()}
                    record["override"] = record.get("override") == "true"
                    record["fallback"] = record.get("fallback") == "true"
                    for name in EXPOSURE_LISTS:  # stored as JSON text in the stream
                        record[name] = json.loads(record[name]) if name in record else []
                    yield record
                start = "(" + batch[-1][0].decode()
        except redis.RedisError as exc:
            raise MMLError(f"exposures {source}: {exc}") from exc
    for _number, record in json_lines(source, "exposures"):
        if isinstance(record, dict) and "arm" in record and "user_id" in record:
            yield record  # other log lines in the same file are skipped


def json_lines(source: str, what: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; a clear error naming
    `what`, the file and the line for a missing file or a line that is not JSON."""
    path = Path(source)
    if not path.is_file():
        raise MMLError(f"{what} {source}: no such file (give a JSON-lines file or a redis:// URL)")
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise MMLError(f"{what} {source}:{number}: not a JSON line ({exc.msg})") from exc


# --- sample ratio mismatch ------------------------------------------------------------------------


def _gamma_q(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) (series below a+1, continued fraction above)."""
    if x <= 0:
        return 1.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300  # modified Lentz
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(log_prefix) * h


def chi2_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square(df)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    return _gamma_q(df / 2.0, statistic / 2.0)


@dataclass
class SrmResult:
    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    df: int
    p_value: float
    mismatch: bool  # p_value < SRM_ALPHA
    unknown_arms: dict[str, int]  # users seen in arms the config does not have


def srm_check(observed: dict[str, int], weights: dict[str, float], alpha: float = SRM_ALPHA) -> SrmResult:
    """Pearson chi-square of observed counts against the weights (arms of weight 0 are left out)."""
    total_w = sum(w for w in weights.values() if w > 0)
    arms = [a for a, w in weights.items() if w > 0]
    n = sum(observed.get(a, 0) for a in arms)
    if len(arms) < 2:
        raise MMLError("SRM check needs at least two arms of positive weight")
    if n == 0:
        raise MMLError("SRM check: no exposures of the configured arms")
    expected = {a: n * weights[a] / total_w for a in arms}
    chi2 = sum((observed.get(a, 0) - expected[a]) ** 2 / expected[a] for a in arms)
    p = chi2_sf(chi2, len(arms) - 1)
    return SrmResult(
        observed={a: observed.get(a, 0) for a in arms},
        expected=expected,
        chi2=chi2,
        df=len(arms) - 1,
        p_value=p,
        mismatch=p < alpha,
        unknown_arms={a: c for a, c in observed.items() if a not in weights},
    )


def count_users(records: Iterator[dict]) -> dict[str, int]:
    """Users per arm: each user counted once, in the first arm seen; QA overrides skipped."""
    first_arm: dict[str, str] = {}
    for record in records:
        if record.get("override") in (True, "true"):
            continue
        first_arm.setdefault(str(record["user_id"]), str(record["arm"]))
    counts: dict[str, int] = {}
    for arm in first_arm.values():
        counts[arm] = counts.get(arm, 0) + 1
    return counts
