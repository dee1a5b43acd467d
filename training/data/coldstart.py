"""The cold-start split (paper Sec. 3 and 5.1) of a dataset in the generic format.

Given a reference time T:
  old users  = users whose first interaction is at or before T; D_old = all interactions <= T
               (only old users have any).
  new users  = users whose first interaction is after T and who have at least support + 2
               interactions; each one's sequence is cut to its first support + 2 items:
               support (first `support`), validation (next one), query (the one after).
  old items  = items that appear in D_old; every other catalogue item is new (never rated too).
  cold_items = a seeded random fraction of would-be old items are treated as launched after T:
               their interactions leave D_old (old users left with nothing are dropped), so they
               are new items. New users' sequences are unchanged.

Every sequence is in time order, ties kept in file order. Item index: old items 1..n_old, then the
new items, each group ordered by item id (numerically when every id is an integer); 0 = padding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from mml.encoders import item_text as encoder_text
from mml.errors import DataError
from training.data.generic import DataWarning, SourceTables

ML1M_T = 975628800  # 2000-12-01T00:00:00Z: the reference time used for MovieLens-1M
N_HELD_OUT = 2  # per new user after the support items: one validation item, one query item
ROLES = ("support", "valid", "query")


class SplitOptions(BaseModel):
    """How a dataset is split; every field enters the cache key of a prepared folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    T: int = Field(ML1M_T, description="reference time, unix seconds UTC (ML-1M default 2000-12-01T00:00Z)")
    support: int = Field(8, ge=1, description="support items per new user (default 8; +1 valid +1 query)")
    cold_items: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of old items made new (default 0)")
    seed: int = Field(2020, description="seed of the cold-item draw (default 2020, as the reference code)")

    @property
    def sequence_length(self) -> int:
        return self.support + N_HELD_OUT


def iso_time(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | int) -> int:
    """Unix seconds or an ISO-8601 date/time ('2000-12-01', '2000-12-01T00:00:00Z'); naive = UTC."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise DataError(f"T: {value!r} is neither unix seconds nor an ISO-8601 time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def id_order(ids: np.ndarray) -> np.ndarray:
    """Ranks (0..n-1) that sort ids numerically when all are non-negative integers, else as text."""
    ids = np.asarray(ids, dtype=str)
    numeric = bool(len(ids)) and bool(pd.Series(ids).str.fullmatch(r"\d{1,18}").all())
    keys = ids.astype(np.int64) if numeric else ids
    order = np.argsort(keys, kind="stable")
    ranks = np.empty(len(ids), dtype=np.int64)
    ranks[order] = np.arange(len(ids))
    return ranks


def item_texts(items: pd.DataFrame) -> list[str]:
    """Encoder input per item, built by the one function the service uses too (mml.encoders.item_text)."""
    return [
        encoder_text(title, None if pd.isna(year) else int(year), genres, description or None)
        for title, year, genres, description in zip(
            items["title"], items["year"], items["genres"], items["description"], strict=True
        )
    ]


@dataclass
class ColdStartSplit:
    """The three tables of a prepared folder (docs/architecture.md section 2) and their counts."""

    items: pd.DataFrame
    old_interactions: pd.DataFrame
    new_users: pd.DataFrame
    stats: dict


def make_split(tables: SourceTables, options: SplitOptions) -> ColdStartSplit:
    interactions, items = tables.interactions, tables.items
    if interactions.empty:
        raise DataError("no interactions")
    length = options.sequence_length

    # Sort by (user, time, file row): the file row breaks timestamp ties in file order.
    user_codes, user_ids = pd.factorize(interactions["user_id"])
    user_rank = id_order(np.asarray(user_ids, dtype=str))[user_codes]
    timestamps = interactions["timestamp"].to_numpy(dtype=np.int64)
    catalogue_ids = items["item_id"].to_numpy(dtype=str)
    item_pos = pd.Index(catalogue_ids).get_indexer(interactions["item_id"])  # row in the items table
    if (item_pos < 0).any():
        raise DataError(
            f"unknown item {interactions['item_id'].iloc[int(np.flatnonzero(item_pos < 0)[0])]!r}"
        )
    order = np.lexsort((np.arange(len(interactions)), timestamps, user_rank))
    rank, time, item = user_rank[order], timestamps[order], item_pos[order]
    user = np.asarray(user_ids, dtype=object)[user_codes[order]]  # gathers references, not strings

    # One group per user (contiguous after the sort).
    starts = np.flatnonzero(np.r_[True, rank[1:] != rank[:-1]])
    counts = np.diff(np.r_[starts, len(rank)])
    first_time = time[starts]
    is_old_user = first_time <= options.T
    row_user = np.repeat(np.arange(len(starts)), counts)
    old_row = is_old_user[row_user] & (time <= options.T)
    if not old_row.any():
        raise DataError(
            f"T={options.T} ({iso_time(options.T)}): no interaction at or before T "
            f"(the data spans {iso_time(int(time.min()))} .. {iso_time(int(time.max()))})"
        )

    too_short = ~is_old_user & (counts < length)
    kept_new = ~is_old_user & ~too_short
    if too_short.any():
        warnings.warn(
            f"{int(too_short.sum())} new user(s) with fewer than {length} interactions after T dropped",
            DataWarning,
            stacklevel=2,
        )
    if not kept_new.any():
        raise DataError(
            f"T={options.T} ({iso_time(options.T)}): no new user (first interaction after T) "
            f"with at least {length} interactions"
        )
    new_rows = (starts[kept_new][:, None] + np.arange(length)[None, :]).ravel()

    # --cold-items: a seeded draw of would-be old items leaves D_old.
    candidates = np.unique(item[old_row])  # item-table rows, sorted
    candidates = candidates[np.argsort(id_order(catalogue_ids)[candidates], kind="stable")]
    n_cold = int(round(options.cold_items * len(candidates)))
    rng = np.random.default_rng(options.seed)
    cold = np.sort(rng.choice(candidates, size=n_cold, replace=False)) if n_cold else np.array([], np.int64)
    old_users_before = len(np.unique(rank[old_row]))
    old_row &= ~np.isin(item, cold)
    if not old_row.any():
        raise DataError(f"cold_items={options.cold_items} leaves no interaction in D_old")

    # Item index: old items first (1..n_old), then new, each by id order; 0 = pad.
    is_old_item = np.zeros(len(items), dtype=bool)
    is_old_item[item[old_row]] = True
    catalogue_order = np.lexsort((id_order(catalogue_ids), ~is_old_item))
    item_idx = np.empty(len(items), dtype=np.int32)
    item_idx[catalogue_order] = np.arange(1, len(items) + 1, dtype=np.int32)

    ordered = items.iloc[catalogue_order].reset_index(drop=True)
    items_out = pd.DataFrame(
        {
            "item_idx": np.arange(1, len(items) + 1, dtype=np.int32),
            "item_id": ordered["item_id"].astype(str),
            "title": ordered["title"].astype(str),
            "year": ordered["year"].astype("Int32"),
            "genres": ordered["genres"].astype(str),
            "text": item_texts(ordered),
            "image_path": pd.Series(list(ordered["image"]), dtype=object),
            "is_old": is_old_item[catalogue_order],
        }
    )
    old_out = pd.DataFrame(
        {
            "user_id": pd.Series(user[old_row], dtype=str),
            "item_idx": item_idx[item[old_row]],
            "timestamp": time[old_row],
        }
    )
    n_new = int(kept_new.sum())
    new_out = pd.DataFrame(
        {
            "user_id": pd.Series(user[new_rows], dtype=str),
            "pos": np.tile(np.arange(length, dtype=np.int8), n_new),
            "item_idx": item_idx[item[new_rows]],
            "timestamp": time[new_rows],
            "role": np.tile(np.array(["support"] * options.support + list(ROLES[1:]), dtype=object), n_new),
        }
    )

    n_old_users = int(old_out["user_id"].nunique())
    n_old_items = int(is_old_item.sum())
    stats = {
        "T": int(options.T),
        "T_iso": iso_time(options.T),
        "support": options.support,
        "cold_items": options.cold_items,
        "seed": options.seed,
        "n_old_users": n_old_users,
        "n_new_users": n_new,
        "n_old_items": n_old_items,
        "n_new_items": len(items) - n_old_items,
        "n_items": len(items),
        "n_old_interactions": len(old_out),
        "n_new_interactions": len(new_out),
        "n_new_user_items": int(new_out["item_idx"].nunique()),
        "n_new_interactions_on_new_items": int((new_out["item_idx"] > n_old_items).sum()),
        "n_items_with_image": int(items_out["image_path"].notna().sum()),
        "n_cold_items": n_cold,
        "n_old_users_emptied_by_cold_items": old_users_before - n_old_users,
        "n_new_users_dropped": int(too_short.sum()),
        "n_raw_interactions": len(interactions),
    }
    return ColdStartSplit(items=items_out, old_interactions=old_out, new_users=new_out, stats=stats)
