"""The recall pipeline of one arm, callable without HTTP:

    history ids -> catalogue rows | registered new items | ignored            (encode)
    registered new items -> generated ID embeddings, projected features       (warmup, cached)
    right-padded sequence -> recall.onnx -> query (3d) + bias                  (model)
    fused scores = [catalogue ; new items] @ query + bias, exclusions, top-k   (topk)

The topk stage is `service.topk`: exact by default, or a Faiss IVF index (`TopKConfig`, settings
`MML_TOPK__*`) for large catalogues.

An empty or all-unknown history gets the popularity ranking, flagged `fallback`. Registered new
items are candidates like catalogue items (their rows come from the generator and item_tower.onnx).
`PopularityPipeline` is the `popularity` arm kind (a control arm): the bundle's popularity ranking.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from service.items import NewItemTable, TableSnapshot
from service.runtime import Runtime
from service.topk import ExactTopK, IvfTopK, TopKConfig, top_k, topk_for

__all__ = ["PopularityPipeline", "RecallPipeline", "RecallResult", "top_k"]


@dataclass
class RecallResult:
    model_version: str
    items: list[tuple[str, float]]
    warmed_up: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    fallback: bool = False
    degraded: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds


class PopularityPipeline:
    """The most popular catalogue items, minus the history and exclude_ids."""

    kind = "popularity"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.model_version = f"popularity@{runtime.model_version}"
        # Scores: popularity normalised to (0, 1] so they read as a ranking signal, not a count.
        top = max(float(runtime.popularity.max()), 1.0)
        self.scores = (runtime.popularity.astype(np.float64) / top).tolist()
        self.order = runtime.popular_rows.tolist()

    def prepare(self) -> None:
        pass

    def ranking(self, k: int, excluded_rows: Iterable[int]) -> list[tuple[str, float]]:
        excluded = set(excluded_rows)
        out = []
        ids = self.runtime.item_id_list
        for row in self.order:
            if row in excluded:
                continue
            out.append((ids[row], self.scores[row]))
            if len(out) == k:
                break
        return out

    def __call__(
        self, history: list[str], k: int, exclude_history: bool = True, exclude_ids: Iterable[str] = ()
    ) -> RecallResult:
        start = time.perf_counter()
        row_of = self.runtime.row_of
        excluded = [row_of[i] for i in exclude_ids if i in row_of]
        if exclude_history:
            excluded += [row_of[i] for i in history if i in row_of]
        items = self.ranking(k, excluded)
        return RecallResult(self.model_version, items, timings={"topk": time.perf_counter() - start})


class RecallPipeline:
    """The MML arm: see the module docstring."""

    kind = "mml"

    def __init__(self, runtime: Runtime, new_items: NewItemTable, topk: TopKConfig | None = None) -> None:
        self.runtime = runtime
        self.new_items = new_items
        self.model_version = runtime.model_version
        self.popularity = PopularityPipeline(runtime)
        # the topk stage (service/topk.py): exact by default; an IVF index is built once per runtime
        self.topk: ExactTopK | IvfTopK = topk_for(runtime, topk or TopKConfig())

    def prepare(self) -> None:
        """Warm up every registered new item before the pipeline serves (startup and reload)."""
        self.new_items.sync()

    def __call__(
        self, history: list[str], k: int, exclude_history: bool = True, exclude_ids: Iterable[str] = ()
    ) -> RecallResult:
        rt = self.runtime
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        # warmup: the registered new items, ready for this bundle (cheap when nothing changed)
        table, degraded, _ = self.new_items.sync()
        t1 = time.perf_counter()
        timings["warmup"] = t1 - t0

        # encode: ids -> catalogue rows / new-item positions / ignored; the most recent max_len kept
        known: list[tuple[int, int]] = []  # (row in catalogue, -1) or (-1, position in the table)
        ignored: list[str] = []
        warmed: list[str] = []
        for item_id in history:
            row = rt.row_of.get(item_id)
            if row is not None:
                known.append((row, -1))
            elif item_id in table.index:
                known.append((-1, table.index[item_id]))
                if item_id not in warmed:
                    warmed.append(item_id)
            else:
                ignored.append(item_id)
        excluded_rows, excluded_new = self._exclusions(history if exclude_history else (), exclude_ids, table)
        if not known:
            items = self.popularity.ranking(k, excluded_rows)
            timings["topk"] = time.perf_counter() - t1
            return RecallResult(
                self.model_version, items, [], ignored, fallback=True, degraded=degraded, timings=timings
            )
        known = known[-rt.dims.max_len :]
        warmed = [i for i in warmed if any(pos == table.index[i] for _, pos in known)]
        model_input = self._encode(known, table)
        t2 = time.perf_counter()
        timings["encode"] = t2 - t1

        # model: the learners + fusion -> query and bias of the fused score
        q, bias = self._query(model_input, table)
        t3 = time.perf_counter()
        timings["model"] = t3 - t2

        # topk: fused scores over catalogue + new items, exclusions, the k best (exact or IVF)
        items = self.topk(q, bias, k, excluded_rows, excluded_new, table)
        timings["topk"] = time.perf_counter() - t3
        return RecallResult(self.model_version, items, warmed, ignored, degraded=degraded, timings=timings)

    def _exclusions(
        self, history: Iterable[str], exclude_ids: Iterable[str], table: TableSnapshot
    ) -> tuple[list[int], list[int]]:
        rows, new = [], []
        for item_id in (*history, *exclude_ids):
            row = self.runtime.row_of.get(item_id)
            if row is not None:
                rows.append(row)
            elif item_id in table.index:
                new.append(table.index[item_id])
        return rows, new

    def _encode(self, known: list[tuple[int, int]], table: TableSnapshot):
        """(catalogue row, -1) / (-1, new-item position) pairs -> the learners' right-padded inputs."""
        rt = self.runtime
        rows = np.asarray([r for r, _ in known])
        pos = np.asarray([p for _, p in known])
        is_new = rows < 0
        emb = rt.id_emb[np.where(is_new, 0, rows)]
        text = rt.text[np.where(is_new, 0, rows)]
        image = rt.image[np.where(is_new, 0, rows)]
        mask = rt.image_mask[np.where(is_new, 0, rows)]
        if is_new.any():
            emb[is_new] = table.id_emb[pos[is_new]]
            text[is_new] = table.text[pos[is_new]]
            image[is_new] = table.image[pos[is_new]]
            mask[is_new] = table.image_mask[pos[is_new]]
        return rt.sequence_inputs(emb, text, image, mask)

    def _query(self, x, table: TableSnapshot) -> tuple[np.ndarray, float]:
        """Model inputs -> (query (3d,), bias) of the fused score, through ONNX Runtime."""
        query, bias = self.runtime.query(x)
        return query[0], float(bias[0])
