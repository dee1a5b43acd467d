"""The traffic of the load test, built from a prepared split (`mml data prepare`). No locust here: the
locustfile (`loadtest/locustfile.py`) draws every request body from this module, and the tests check
those bodies against the service's own schemas (`service/schemas.py`) without starting locust.

What is replayed:

* **sequences**: every new user of the split (first interaction after the cut-off T, so the model never
  saw them) as a sequence of catalogue item ids, oldest first: the support items, then the valid and
  the query item (10 for ML-1M). All of them are known items of the bundle's catalogue.
* **POST /recall with a history**: a sequence's support items as `history` (what a client sends when it
  keeps the history itself); for a share of the requests the history ends with one of the registered
  new items (a user who just watched a new release).
* **POST /events, then POST /recall without a history**: a sequence replayed event by event (the
  service keeps the history), and recall requests that read that stored history.
* **replay mode** (`Traffic.replay_rounds`): the same sequences, every user in step, a recall before
  each event: the A/B replay of `loadtest/ab_replay.py` (`make ab-replay`).
* **PUT /items**: a few real movies of the split with their real posters, registered under a fresh id
  (`NEW_ITEM_PREFIX` + MovieID) before the load starts, as an operator registers new releases. The
  copies are not in the catalogue, so they go through the service's whole new-item path: encoders,
  generated ID embedding, candidate rows.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

NEW_ITEM_PREFIX = "loadtest-"  # registered new items: this prefix + the source MovieID


class TrafficConfig(BaseModel):
    data_dir: Path  # a prepared split: items.parquet, new_users.parquet, stats.json
    new_items: int = Field(5, ge=0, le=100)  # items registered with PUT /items before the load starts
    new_item_share: float = Field(0.2, ge=0, le=1)  # share of history /recall ending with a new item
    k: int = Field(100, ge=1, le=1000)  # items per answer: the service default (the recall stage's K)
    seed: int = 0  # which movies become new items


@dataclass(frozen=True)
class Sequence:
    user_id: str  # the split's user id
    items: tuple[str, ...]  # catalogue item ids, oldest first: support, then valid and query
    support: int  # the first `support` items are the support set

    @property
    def history(self) -> list[str]:
        return list(self.items[: self.support])


@dataclass(frozen=True)
class NewItem:
    item_id: str  # the id it is registered under (not in the catalogue)
    source_item_id: str  # the catalogue movie whose title, year, genres and poster it carries
    body: dict  # the PUT /items/{item_id} body (service.schemas.ItemIn)


@dataclass
class Traffic:
    sequences: list[Sequence]
    new_items: list[NewItem]
    catalogue: frozenset[str]  # item ids of the split's catalogue
    k: int
    new_item_share: float

    def recall_with_history(self, rng: random.Random) -> tuple[dict, str | None]:
        """A POST /recall body with an explicit history, and the new item it ends with (or None)."""
        sequence = rng.choice(self.sequences)
        history = sequence.history
        new_item = None
        if self.new_items and rng.random() < self.new_item_share:
            new_item = rng.choice(self.new_items).item_id
            history.append(new_item)
        return {"user_id": sequence.user_id, "history": history, "k": self.k}, new_item

    @staticmethod
    def live_user_id(sequence: Sequence, tag: str) -> str:
        """The user id a replay of `sequence` posts its events under (one per replay, so replays of the
        same sequence by several simulated users do not mix their stored histories)."""
        return f"live-{sequence.user_id}-{tag}"

    @staticmethod
    def event(user_id: str, item_id: str, ts: int) -> dict:
        """A POST /events body."""
        return {"user_id": user_id, "item_id": item_id, "ts": ts}

    def recall_stored(self, user_id: str) -> dict:
        """A POST /recall body without a history: the service reads the user's stored events."""
        return {"user_id": user_id, "k": self.k}

    def replay_rounds(self, tag: str) -> list[list[tuple[str, str]]]:
        """Replay mode (the A/B replay, `python -m loadtest.ab_replay`): every sequence replayed in
        time order, all users in step. Round p holds each sequence's p-th item as (live user id, item
        id); for each pair a replay sends `recall_stored(user)` (what the service would show the user
        now, from the events stored so far), then `event(user, item, ts)` (what the user did next)."""
        rounds = max(len(s.items) for s in self.sequences)
        return [
            [(self.live_user_id(s, tag), s.items[p]) for s in self.sequences if p < len(s.items)]
            for p in range(rounds)
        ]


def _new_items(items, catalogue: frozenset[str], count: int, seed: int) -> list[NewItem]:
    """`count` movies with a poster on disk (the split's new items first), as PUT /items bodies."""
    import pandas as pd

    has_poster = items["image_path"].map(lambda p: isinstance(p, str) and Path(p).is_file())
    pools = (  # preferred first; the last ones only when the posters are not on disk
        items[has_poster & ~items["is_old"]],
        items[has_poster & items["is_old"]],
        items[~has_poster],
    )
    pool = next((p for p in pools if len(p) >= count), items)
    chosen = pool.sample(n=min(count, len(pool)), random_state=seed).sort_values("item_idx")
    out = []
    for row in chosen.itertuples(index=False):
        item_id = NEW_ITEM_PREFIX + str(row.item_id)
        if item_id in catalogue:
            raise ValueError(f"new item id {item_id} is already in the catalogue: change NEW_ITEM_PREFIX")
        body: dict = {"title": str(row.title)}
        if not pd.isna(row.year):
            body["year"] = int(row.year)
        if isinstance(row.genres, str) and row.genres:
            body["genres"] = row.genres.split("|")
        if isinstance(row.image_path, str) and Path(row.image_path).is_file():
            body["image_base64"] = base64.b64encode(Path(row.image_path).read_bytes()).decode("ascii")
        out.append(NewItem(item_id=item_id, source_item_id=str(row.item_id), body=body))
    return out


def load_traffic(config: TrafficConfig) -> Traffic:
    """Read the split and build the traffic (a second or two for ML-1M)."""
    from training.data.split import load_items, load_split

    split = load_split(config.data_dir)
    items = load_items(config.data_dir)
    item_id = [""] + [str(i) for i in items["item_id"]]  # row i = item_idx i; 0 = pad
    if len(item_id) != split.n_items + 1:
        raise ValueError(
            f"{config.data_dir}: items.parquet has {len(item_id) - 1} rows, stats say {split.n_items}"
        )
    support = split.new_support.shape[1]
    sequences = [
        Sequence(
            user_id=str(user),
            items=tuple(item_id[i] for i in (*split.new_support[u], split.new_valid[u], split.new_query[u])),
            support=support,
        )
        for u, user in enumerate(split.new_users)
    ]
    if not sequences:
        raise ValueError(f"{config.data_dir}: the split has no new users to replay")
    catalogue = frozenset(item_id[1:])
    return Traffic(
        sequences=sequences,
        new_items=_new_items(items, catalogue, config.new_items, config.seed),
        catalogue=catalogue,
        k=config.k,
        new_item_share=config.new_item_share,
    )
