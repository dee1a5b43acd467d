"""What one bundle version serves, as one immutable object: `ServingSnapshot`.

    runtime     the loaded bundle: ONNX sessions (recall, generator, item_tower), item table, encoders
    new_items   the registered new items ready for this bundle (generated ID embeddings, fused rows)
    topk        the catalogue's top-k stage (exact, or an IVF index built once per runtime)
    popularity  the bundle's popularity ranking (fallback and `popularity` arms)

A request reads one snapshot and never anything that changes under it. `BundleState` (lifecycle
side, one per loaded bundle path) owns what builds snapshots: the runtime, its `NewItemTable` and
top-k stage; `next_snapshot` gives a new snapshot when the registered items changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from service.items import ItemRegistry, NewItemTable, TableSnapshot
from service.runtime import Runtime
from service.topk import ExactTopK, IvfTopK, TopKConfig, make_topk


class PopularityRanking:
    """The bundle's catalogue by popularity (interactions in D_old), scores normalised to (0, 1]."""

    def __init__(self, runtime: Runtime) -> None:
        top = max(float(runtime.popularity.max()), 1.0)
        self.scores = (runtime.popularity.astype(np.float64) / top).tolist()
        self.order = runtime.popular_rows.tolist()
        self.ids = runtime.item_id_list

    def __call__(self, k: int, excluded_rows: Iterable[int]) -> list[tuple[str, float]]:
        """The k most popular catalogue items not in `excluded_rows`, best first."""
        excluded = set(excluded_rows)
        out = []
        for row in self.order:
            if row in excluded:
                continue
            out.append((self.ids[row], self.scores[row]))
            if len(out) == k:
                break
        return out


@dataclass(frozen=True)
class ServingSnapshot:
    runtime: Runtime
    new_items: TableSnapshot
    topk: ExactTopK | IvfTopK
    popularity: PopularityRanking
    items_degraded: bool = False  # the last registry read failed: new items as last known
    registry_version: str | None = field(default=None, compare=False)

    @property
    def model_version(self) -> str:
        return self.runtime.model_version


class BundleState:
    """One loaded bundle and what builds its snapshots (lifecycle side; shared by its arms)."""

    def __init__(self, runtime: Runtime, registry: ItemRegistry, topk: TopKConfig) -> None:
        self.runtime = runtime
        self.table = NewItemTable(runtime, registry)
        self.topk_config = topk
        self.topk = make_topk(topk, runtime.items_concat, runtime.item_id_list)
        self.popularity = PopularityRanking(runtime)

    def next_snapshot(self, current: ServingSnapshot | None) -> ServingSnapshot:
        """The registered items synced (generator + item tower for new ones); `current` itself when
        nothing changed."""
        table, degraded, _ = self.table.sync()
        if current is not None and current.new_items is table and current.items_degraded == degraded:
            return current
        return ServingSnapshot(
            self.runtime, table, self.topk, self.popularity, degraded, self.table.built_version
        )
