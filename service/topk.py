"""The `topk` stage of /recall: the k best items by fused score, exact or through a Faiss IVF index.

    score(item) = items_concat[item] . query + bias (+ bonus[item])

bias is one constant per request; bonus an optional sparse term on some catalogue rows (>= 0; the
co-occurrence learner's, service/recall.py CoocScores), 0 on every other item.

`ExactTopK` scores every row (the catalogue, then the registered new items) and selects with
`top_k`: O(items x 3d) per request, exact. `IvfTopK` answers the same question from a Faiss IVF
index with `METRIC_INNER_PRODUCT`: the query is compared with `nlist` list centroids and only the
rows of the `nprobe` nearest lists are scored. `make_topk` picks one from a `TopKConfig`
(`MML_TOPK__*` settings, docs/service.md); below `min_items` catalogue items it is always exact.

**The index.** Rows 1..N of the runtime's item matrix (row 0 is the pad), index id = row. Each row x
is stored MIPS-augmented as [x, sqrt(R^2 - |x|^2), 0, ...], R the largest catalogue row norm, zero
padded to a multiple of 8 columns, and a query q as [q, 0, ...] (Bachrach et al., 2014): the inner
product is unchanged, while every catalogue row lies on one sphere of radius R, where L2 k-means
lists are also inner-product neighbourhoods. The coarse quantizer is therefore L2 (k-means on a
random sample of `train_points_per_list` x nlist rows, assignment of rows and probing of queries by
L2 to the centroids); the lists are scanned by inner product. On these vectors this probes better
than an inner-product quantizer (loadtest/scale.py measures recall@100).

**Codecs and re-ranking** (`TopKConfig.codec`). `flat` stores the augmented rows in float32: the
scan is exact within the probed lists and returns exact scores. The compressed codecs (`pq4fs`, the
default: 4-bit product quantisation of 2-dimension sub-vectors scanned with Faiss' SIMD fast-scan
kernels; `sq8`; `fp16`) store codes of the rows themselves (not residuals: Faiss' residual inner
product assumes an inner-product quantizer); a search takes `rerank` x k candidates from the probed
lists by approximate score, then re-scores them exactly against the float rows (the runtime's
`items_concat`, referenced, not copied; new items' rows kept beside the index) and keeps the k best.
Answers therefore carry exact scores in exact order; only which items reach the candidate set is
approximate, as with `flat` only which lists are probed is.

**Registered new items** (service/items.py) are not put in the index: the index holds the
catalogue only and never changes after its build, so concurrent searches need no lock (Faiss
searches a constant index from several threads safely). A request scores the new items of its
serving snapshot exactly (`table.concat @ q`, a few thousand rows at most in practice) and merges
them with the index's k best. A search is one query on one thread (`faiss.omp_set_num_threads(1)`
on the request's thread: OpenMP keeps that count per thread, and `Runtime.load` sets it only on the
thread that loads). The build runs with the loading thread's count: one in the service.

**The bonus.** `ExactTopK` adds it to the score vector before selecting. `IvfTopK` searches the
index by dense score alone, then re-scores the bonus rows exactly and keeps the k best of the union
(`with_bonus`): every other item has bonus 0, so it scores at most the k-th hit of the index.

**Exclusions** (history, exclude_ids, the pad) are over-fetched: the index is asked for
k' + |excluded| hits (k' = k for `flat`, rerank x k otherwise), excluded ones are dropped; if that leaves fewer than k, the search is repeated
with twice as many hits, or twice as many lists when the probed lists ran out (up to all of them);
the first k' that remain are re-scored.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mml.cooc import merge_topk

AUTO_PROBE_DIVISOR, AUTO_MIN_PROBES = 6, 32  # automatic nprobe: nlist / 6, at least 32 (see nprobe)
POINTS_PER_LIST = 1000  # automatic nlist: catalogue items / this, as loadtest/scale.py measured it
RERANK = {"pq4fs": 16, "sq8": 2, "fp16": 2}  # default candidates per item kept, re-scored exactly
MIN_TRAIN_POINTS = 4096  # compressed codecs: their codebooks (16 centroids per PQ sub-space) need rows


class TopKConfig(BaseModel):
    """How the `topk` stage selects the k best items (environment: `MML_TOPK__<FIELD>`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["exact", "ivf"] = "exact"
    """`exact`: score every item (numpy matmul + argpartition). `ivf`: a Faiss IVF index (`codec`),
    approximate (recall@100 0.96-0.97 against exact at 1M items with nprobe tuned per bundle)."""
    nlist: int | None = Field(None, ge=1)
    """Lists (k-means cells) of the IVF index. Unset: catalogue items / 1000 rounded to a power of
    two (1024 at 1M items, the setting loadtest/scale.py measured); never more than the items."""
    nprobe: int | None = Field(None, ge=1)
    """Lists scanned per query: recall against latency. Unset: nlist / 6, at least 32 (of 1024 lists
    at 1M items: 170; the quick bundle measured recall@100 0.964 at 160 with `pq4fs`, 0.969 at 128
    with `flat`; loadtest/scale.py). The right value depends on the model and the codec: tune it per
    bundle (docs/operations.md section 2)."""
    codec: Literal["pq4fs", "sq8", "fp16", "flat"] = "pq4fs"
    """How the index stores the rows it scans. `flat`: float32 (IVF-Flat; its scores are exact, no
    re-ranking). `pq4fs`: product quantisation, 4 bits per 2 dimensions (50 bytes a row), scanned by
    Faiss' SIMD fast-scan kernels; `sq8`: 8 bits per dimension; `fp16`: float16. The compressed codecs
    fetch `rerank` x k candidates and re-score them exactly against the float rows the runtime keeps
    anyway, so answers carry exact scores in exact order. At 1M items on the quick bundle, at
    recall@100 0.96-0.97, `pq4fs` costs about a third of `flat`'s CPU per query (nprobe 160 of 1024
    against 128) and its index takes 58 bytes per item instead of 808 (docs/operations.md section 2)."""
    rerank: int | None = Field(None, ge=1, le=64)
    """Candidates fetched from a compressed index per item asked for (k' = rerank x k), re-scored
    exactly. Unset: 16 for `pq4fs` (its codes order candidates coarsely), 2 for `sq8` and `fp16`;
    ignored by `flat`. Keep rerank x k under about 2,000: above, Faiss' fast scan takes a slower path
    (about 4 ms per query at 1M items)."""
    min_items: int = Field(50_000, ge=0)
    """Catalogues smaller than this stay exact even with kind `ivf` (exact costs about 0.07 ms of CPU
    per 1,000 items per request: ML-1M's 3,883 items are cheaper exact than probed)."""
    train_points_per_list: int = Field(40, ge=39)
    """k-means sample of the index build: nlist x this many catalogue rows, drawn at random (Faiss
    warns below 39 per list)."""
    kmeans_iterations: int = Field(10, ge=1)
    """k-means iterations of the build (Faiss' default is 25; the coarse lists need no more)."""
    seed: int = 0
    """Seed of the training sample and of k-means: the same bundle builds the same index."""

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> TopKConfig:
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must be <= nlist ({self.nlist})")
        return self

    def rerank_for(self) -> int:
        """Candidates per item asked for that the index returns for exact re-scoring; 0: none (flat)."""
        if self.codec == "flat":
            return 0
        return self.rerank if self.rerank is not None else RERANK[self.codec]

    def probes_for(self, nlist: int) -> int:
        """nprobe for an index of nlist lists."""
        wanted = self.nprobe if self.nprobe is not None else max(AUTO_MIN_PROBES, nlist // AUTO_PROBE_DIVISOR)
        return min(wanted, nlist)

    def lists_for(self, n_items: int) -> int:
        """nlist for a catalogue of n_items."""
        if self.nlist is not None:
            return max(1, min(self.nlist, n_items))
        auto = int(2 ** max(0, round(np.log2(max(n_items / POINTS_PER_LIST, 1.0)))))
        return max(1, min(auto, n_items))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest finite scores, best first (argpartition, then a sort of k)."""
    finite = int(np.isfinite(scores).sum())
    k = min(k, finite)
    if k == 0:
        return np.zeros(0, np.int64)
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
    else:
        part = np.arange(len(scores))
    order = np.argsort(-scores[part], kind="stable")
    return part[order][:k]


Bonus = tuple[np.ndarray, np.ndarray]  # (catalogue rows, values >= 0): a sparse term of the score


def with_bonus(
    ids: np.ndarray,
    scores: np.ndarray,
    items: np.ndarray,
    q: np.ndarray,
    bonus: Bonus,
    k: int,
    excluded_rows: list[int] | np.ndarray = (),
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of (items[row] . q + bonus) given the k best rows by items[row] . q alone (`ids`,
    `scores`, exclusions applied) and the bonus rows, `excluded_rows` dropped from them: every other
    row has bonus 0 and scores at most the k-th of `ids`, so the union's k best are the k best
    (mml.cooc.merge_topk)."""
    rows, values = bonus
    if len(excluded_rows):
        keep = ~np.isin(rows, excluded_rows)
        rows, values = rows[keep], values[keep]
    return merge_topk(ids, scores, rows, values, np.take(items, rows, axis=0) @ q, k)


class ExactTopK:
    """Every catalogue row and new item scored, exclusions set to -inf, `top_k`."""

    kind = "exact"

    def __init__(self, items_concat: np.ndarray, item_ids: Sequence[str]) -> None:
        self.items = items_concat
        self.ids = item_ids

    def __call__(
        self,
        q: np.ndarray,
        bias: float,
        k: int,
        excluded_rows: list[int],
        excluded_new: list[int],
        table,
        bonus: Bonus | None = None,
    ) -> list[tuple[str, float]]:
        """(item_id, fused score) of the k best, best first. `excluded_rows`: catalogue rows;
        `excluded_new`: positions in `table` (a service.items.TableSnapshot); `bonus`: (catalogue
        rows, values) added to those rows' scores (the co-occurrence term, service/recall.py) before
        the exclusions."""
        items = self.items
        scores = np.empty(len(items) + len(table), np.float32)
        np.matmul(items, q, out=scores[: len(items)])
        if len(table):
            np.matmul(table.concat, q, out=scores[len(items) :])
        scores += bias
        if bonus is not None:
            scores[bonus[0]] += bonus[1]
        scores[0] = -np.inf  # padding row
        scores[excluded_rows] = -np.inf
        scores[[len(items) + p for p in excluded_new]] = -np.inf
        best = top_k(scores, k)
        n_cat = len(items)
        ids = self.ids
        return [
            (ids[i] if i < n_cat else table.ids[i - n_cat], s)
            for i, s in zip(best.tolist(), scores[best].tolist(), strict=True)
        ]


class IvfTopK:
    """A Faiss IVF index over the catalogue and the registered new items (module docstring)."""

    kind = "ivf"

    def __init__(
        self,
        items: np.ndarray,
        config: TopKConfig,
        item_ids: Sequence[str] | None = None,
        first_row: int = 1,
    ) -> None:
        """Index rows first_row.. of `items` (the runtime's items_concat: row 0 is the pad), index
        id = row. `item_ids[row]` names a row in answers; compressed codecs re-score against `items`
        (kept by reference, not copied). Builds with Faiss' current thread count."""
        import faiss

        self.faiss = faiss
        self.config = config
        self.ids = item_ids
        self.items = items
        rows = items[first_row:]
        n = len(rows)
        if n == 0:
            raise ValueError("an IVF index needs at least one item")
        self.dim = items.shape[1]
        # [x, extra, 0...]: a multiple of 8 wide (Faiss' SIMD scalar-quantizer kernels need it; the
        # fast-scan PQ codes 2 dimensions each); the zero columns change no inner product
        self.index_dim = -(-(self.dim + 1) // 8) * 8
        self.radius2 = float(np.einsum("ij,ij->i", rows, rows).max())  # R^2
        self.nlist = config.lists_for(n)
        self.codec = config.codec
        self._quantizer, self.index = self._empty_index()  # the quantizer must outlive the index
        index = self.index
        index.cp.seed = config.seed
        index.cp.niter = config.kmeans_iterations
        rng = np.random.default_rng(config.seed)
        size = self.nlist * config.train_points_per_list
        size = min(n, size if self.codec == "flat" else max(size, MIN_TRAIN_POINTS))
        sample = np.sort(rng.choice(n, size, replace=False))
        index.train(self._augment(rows[sample]))
        chunk = 100_000  # bounds the augmented copy held at once
        for start in range(0, n, chunk):
            part = rows[start : start + chunk]
            index.add_with_ids(
                self._augment(part), np.arange(start, start + len(part), dtype=np.int64) + first_row
            )
        self.nprobe = config.probes_for(self.nlist)
        self.rerank = config.rerank_for()  # 0: the index's scores are exact (flat)
        self.catalogue_end = first_row + n  # index ids are catalogue rows, below this

    def _empty_index(self):
        faiss, d = self.faiss, self.index_dim
        quantizer = faiss.IndexFlatL2(d)
        ip = faiss.METRIC_INNER_PRODUCT
        if self.codec == "flat":
            index = faiss.IndexIVFFlat(quantizer, d, self.nlist, ip)
        elif self.codec == "pq4fs":
            index = faiss.IndexIVFPQFastScan(quantizer, d, self.nlist, d // 2, 4, ip)
        else:
            qtype = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}[self.codec]
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, self.nlist, qtype, ip)
        # codes of the rows themselves, not of their residuals to the list centroid: Faiss' residual
        # inner product assumes an inner-product quantizer, and this one is L2 (module docstring)
        index.by_residual = False
        return quantizer, index

    def _augment(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        out = np.zeros((len(x), self.index_dim), np.float32)
        out[:, : self.dim] = x
        out[:, self.dim] = np.sqrt(np.maximum(self.radius2 - np.einsum("ij,ij->i", x, x), 0.0))
        return out

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # --- search ---------------------------------------------------------------------------------

    def search(self, q: np.ndarray, k: int, excluded: Collection[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(index ids, exact inner products) of the k best not in `excluded`, best first: the index
        search of one request (over-fetch, filter, re-rank; see the module docstring)."""
        return self._search(np.asarray(q, np.float32), k, excluded)

    def _exact(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Inner products of q with the float rows of these index ids."""
        return self.items[ids] @ q

    def _search(self, q: np.ndarray, k: int, excluded: Collection[int]) -> tuple[np.ndarray, np.ndarray]:
        query = np.zeros((1, self.index_dim), np.float32)
        query[0, : self.dim] = q
        total = self.ntotal
        wanted = k * max(self.rerank, 1)  # candidates worth re-scoring
        fetch, nprobe = min(wanted + len(excluded), total), self.nprobe
        excluded = excluded if isinstance(excluded, set | frozenset) else set(excluded)
        while True:
            params = self.faiss.SearchParametersIVF(nprobe=nprobe)
            scores, ids = self.index.search(query, max(fetch, 1), params=params)
            scores, ids = scores[0], ids[0]
            keep = ids >= 0
            exhausted = not keep.all()  # the probed lists held fewer than `fetch` items
            if excluded:
                keep &= np.fromiter((i not in excluded for i in ids.tolist()), bool, len(ids))
            if keep.sum() >= k or (exhausted and nprobe >= self.nlist) or (not exhausted and fetch >= total):
                break
            if exhausted:
                nprobe = min(2 * nprobe, self.nlist)
            else:
                fetch = min(2 * fetch, total)
        ids = ids[keep]
        if not self.rerank:
            return ids[:k], scores[keep][:k]
        ids = ids[:wanted]
        exact = self._exact(q, ids)
        best = top_k(exact, k)
        return ids[best], exact[best]

    def __call__(
        self,
        q: np.ndarray,
        bias: float,
        k: int,
        excluded_rows: list[int],
        excluded_new: list[int],
        table,
        bonus: Bonus | None = None,
    ) -> list[tuple[str, float]]:
        """What `ExactTopK.__call__` answers, approximately: same arguments, same shape. The
        catalogue comes from the index; the table's new items are scored exactly and merged. A
        `bonus` is exact on top of the index: its rows that are not excluded are re-scored exactly
        and merged with the index's k best (`with_bonus`)."""
        self.faiss.omp_set_num_threads(1)  # OpenMP's count is per calling thread: pin this one to 1
        excluded = set(excluded_rows)
        excluded.discard(0)  # the pad is not in the index
        q = np.asarray(q, np.float32)
        ids, scores = self._search(q, k, excluded)
        if bonus is not None:
            ids, scores = with_bonus(ids, scores, self.items, q, bonus, k, excluded_rows)
        names = self.ids
        found = [
            (names[i], s) for i, s in zip(ids.tolist(), (scores + np.float32(bias)).tolist(), strict=True)
        ]
        if not len(table):
            return found
        new = table.concat @ q + np.float32(bias)
        new[excluded_new] = -np.inf
        best = top_k(new, k)
        merged = found + [(table.ids[i], s) for i, s in zip(best.tolist(), new[best].tolist(), strict=True)]
        merged.sort(key=lambda pair: -pair[1])  # stable: catalogue items first on equal scores
        return merged[:k]


def make_topk(config: TopKConfig, items_concat: np.ndarray, item_ids: Sequence[str]) -> ExactTopK | IvfTopK:
    """The top-k stage `config` asks for over this item matrix (row 0: the pad): exact for kind
    `exact` or a catalogue under `min_items`, else a freshly built IVF index."""
    if config.kind == "exact" or len(items_concat) - 1 < config.min_items:
        return ExactTopK(items_concat, item_ids)
    return IvfTopK(items_concat, config, item_ids)
