"""Catalogue scale: the top-k stage of /recall over 100k and 1M items, exact against approximate.

By default the service scores every catalogue row per request (`service/topk.py`, stage `topk`):

    scores = items_concat @ query + bias        # items_concat: (N+1, 3d) float32 = [id_emb | text_vec | image_vec]
    best   = top_k(scores, k)                    # argpartition, then a sort of the k

which costs O(N * 3d) per request and reads the whole matrix (memory-bound). This module measures
that stage, and approximate indexes that replace it, on synthetic catalogues of the sizes a
deployment may reach. The bias is the same for every item of a request, so the ranking is a maximum
inner product search (MIPS) over the rows of items_concat.

**Data.** Item vectors are drawn to match the real bundle's items_concat (rows 1..N): a Gaussian with
the real mean and full 3d x 3d covariance (the correlations within and across the three 64-d blocks),
then each block rescaled to the block norms of a real item drawn at random, so the per-block norm
distributions are the real ones exactly. Queries are real: the bundle's `recall.onnx` run on
histories of catalogue items drawn by popularity (as in `devtools/bench_service.py`), 1..max_len items long.
Without a bundle (`fit_items` not called): every block N(0, I/d) (block norms about 1), queries
N(0, I/(3d)); the figures then say `scale_data = "gaussian"`.

**Methods** (one query at a time, one thread, k = 100, as one request on one core of a replica; the
timed loops run at a raised scheduling priority where permitted, see `raised_priority`):
* `exact`: the service's default code path above (`service.topk.top_k`, as in `ExactTopK`).
* `ivf`: the service's own IVF top-k stage, `service.topk.IvfTopK` (what `MML_TOPK__KIND=ivf`
  serves) with its default codec (`pq4fs`: 4-bit fast-scan PQ codes, rerank x k candidates re-scored
  exactly against the float rows), over the MIPS-augmented rows below; `ivf_<codec>` the same class
  with another codec (`fp16`, `flat` = IVF-Flat by default: `ScaleConfig.ivf_codecs`). nlist = N /
  `ivf_points_per_list` (power of two), k-means on a sample; nprobe tuned: the smallest value of the
  grid with recall@100 >= target + margin on the tuning queries. Timed: `IvfTopK.search`, the call the
  service's topk stage makes per request (one query, over-fetch, filtering and re-ranking included).
* `hnsw`: Faiss HNSW-Flat (M, efConstruction below); efSearch tuned like nprobe. Built at 100k only
  by default: its build is the slowest step (O(N log N) graph insertions), and on this data it needs
  a large efSearch for the target recall (HNSW straight on the inner product stalls near 0.75).
Both indexes work on the MIPS -> nearest-neighbour reduction (Bachrach et al., 2014): item x becomes
[x, sqrt(R^2 - |x|^2)] with R the largest item norm, query q becomes [q, 0]; then
|q' - x'|^2 = |q|^2 + R^2 - 2 q.x, so the L2 order is exactly the inner-product order (IvfTopK
clusters and probes by L2 on those rows and scans its lists by inner product, q'.x' = q.x).

**Figures** per size and method: p50/p99 latency (ms) on held-out test queries, recall@100 against
the exact top-100 (ground truth: batched matmul of the same matrix), memory (bytes of the matrix or
of the serialised index: IVF-Flat and HNSW hold their own float copy of the vectors, the compressed
IVF codecs only codes, and the service keeps the exact matrix beside any index), build time (2 threads) and
start-up time (exact: assembling the matrix; index: deserialising it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

BLOCKS = 3  # id_emb, text_vec, image_vec


class ScaleConfig(BaseModel):
    sizes: tuple[int, ...] = (100_000, 1_000_000)  # catalogue sizes (the 100k one is a prefix of the 1M)
    k: int = Field(100, ge=1)  # the service default (the recall stage's K)
    tune_queries: int = Field(300, ge=10)  # index parameters are chosen on these ...
    test_queries: int = Field(500, ge=10)  # ... and every figure is measured on these (held out)
    exact_timed_queries: int = Field(100, ge=10)  # exact latency: ~N x 768 bytes read per query
    recall_target: float = Field(0.95, gt=0, le=1)
    tune_margin: float = Field(
        0.01, ge=0, lt=1
    )  # tune to target + margin: the test queries must meet the target
    ivf_points_per_list: int = Field(1000, ge=10)  # nlist ~ N / this: 1024 lists at 1M
    ivf_train_points_per_list: int = Field(40, ge=39)  # k-means sample; Faiss warns below 39 per list
    ivf_kmeans_iterations: int = Field(10, ge=1)  # Faiss default 25; the coarse lists need no more
    ivf_nprobe_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384)
    # IvfTopK codecs measured (service.topk.TopKConfig.codec), each with its default rerank; the
    # service's default codec is method `ivf`, the others `ivf_<codec>`
    ivf_codecs: tuple[Literal["pq4fs", "sq8", "fp16", "flat"], ...] = ("pq4fs", "fp16", "flat")
    hnsw_sizes: tuple[int, ...] = (100_000,)  # HNSW builds in O(N log N) and slowly on 2 cores
    hnsw_m: int = Field(16, ge=4)  # neighbours per node (Faiss default 32; 16 halves build time and links)
    hnsw_ef_construction: int = Field(40, ge=8)  # Faiss default
    hnsw_ef_grid: tuple[int, ...] = (100, 128, 192, 256, 384, 512, 768, 1024, 1536)  # efSearch >= k
    build_threads: int = Field(2, ge=1)  # index builds (k-means, graph): the machine's 2 cores
    timing_nice: int = Field(-10, ge=-20, le=19)  # priority of the timed loops (raised_priority)
    sample_chunk: int = Field(100_000, ge=1000)  # rows drawn at a time (bounds the temporaries)
    seed: int = 0


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemDistribution:
    """What synthetic items are drawn from (see the module docstring)."""

    mean: np.ndarray  # (D,)
    chol: np.ndarray  # (D, D) lower Cholesky factor of the covariance
    block_norms: np.ndarray | None  # (n_real, BLOCKS) real per-block norms; None: no rescaling
    source: str  # "bundle:<model_version>" or "gaussian"

    @property
    def dim(self) -> int:
        return len(self.mean)

    def sample(self, n: int, rng: np.random.Generator, chunk: int) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32)
        block = self.dim // BLOCKS
        chol_t = self.chol.T.astype(np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            x = self.mean.astype(np.float32) + rng.standard_normal((m, self.dim), np.float32) @ chol_t
            if self.block_norms is not None:
                target = self.block_norms[rng.integers(0, len(self.block_norms), m)]
                for b in range(BLOCKS):
                    part = x[:, b * block : (b + 1) * block]
                    part *= (target[:, b] / np.maximum(np.linalg.norm(part, axis=1), 1e-12))[:, None]
            out[start : start + m] = x
        return out


def fit_items(items_concat: np.ndarray, source: str) -> ItemDistribution:
    """Fit the distribution to a real item matrix (rows 1..N of items_concat: row 0 is the pad)."""
    x = np.asarray(items_concat[1:], np.float64)
    if x.shape[1] % BLOCKS:
        raise ValueError(f"items_concat has {x.shape[1]} columns, not {BLOCKS} equal blocks")
    cov = np.cov(x, rowvar=False) + 1e-9 * np.eye(x.shape[1])  # jitter: a zero-variance column stays PD
    block = x.shape[1] // BLOCKS
    norms = np.stack([np.linalg.norm(x[:, b * block : (b + 1) * block], axis=1) for b in range(BLOCKS)], 1)
    return ItemDistribution(x.mean(0), np.linalg.cholesky(cov), norms, source)


def gaussian_items(block: int = 64) -> ItemDistribution:
    """The documented fallback without a bundle: every coordinate N(0, 1/block)."""
    dim = BLOCKS * block
    return ItemDistribution(np.zeros(dim), np.eye(dim) / np.sqrt(block), None, "gaussian")


def bundle_queries(bundle, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3d) real query vectors: recall.onnx on popularity-drawn histories of the bundle's items."""
    popularity = np.asarray(bundle.tables["popularity"][1:], np.float64) + 1.0
    p = popularity / popularity.sum()
    rows = [
        rng.choice(len(p), size=int(rng.integers(1, bundle.dims.max_len + 1)), replace=False, p=p) + 1
        for _ in range(n)
    ]
    from service.runtime import Runtime

    runtime = Runtime(bundle)
    out = [runtime.query(runtime.history_inputs(history))[0] for history in rows]
    return np.ascontiguousarray(np.concatenate(out), np.float32)


# --- exact top-k and recall -------------------------------------------------------------------------


def ground_truth(items: np.ndarray, queries: np.ndarray, k: int, batch: int = 64) -> np.ndarray:
    """(Q, k) exact top-k row ids by inner product, best first (batched matmul, all BLAS threads)."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch):
        scores = queries[start : start + batch] @ items.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
        out[start : start + batch] = np.take_along_axis(part, order, 1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i & truth_i| / |truth_i|: the share of the exact top-k an approximate
    method returned (order ignored; ids < 0, Faiss' "no result", never count)."""
    found, truth = np.asarray(found), np.asarray(truth)
    if found.ndim != 2 or truth.ndim != 2 or len(found) != len(truth) or truth.shape[1] == 0:
        raise ValueError(f"found {found.shape} and truth {truth.shape} must be (Q, k) with the same Q")
    hits = [
        len(set(f[f >= 0].tolist()) & set(t.tolist())) / len(t) for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits))


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)


@contextlib.contextmanager
def raised_priority(nice: int):
    """Run the timed loop at a higher scheduling priority when permitted (root), as a replica's query
    would run on a core of its own: on a shared machine other processes' time slices would otherwise
    fill the wall-clock tail. Linux: applies to the calling thread, the one that runs the queries."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        raised = True
    except PermissionError:
        raised = False
    try:
        yield raised
    finally:
        if raised:
            os.setpriority(os.PRIO_PROCESS, 0, before)


class Timer:
    """Per-query wall-clock and CPU time of the calling thread. Wall time is the latency; CPU time is
    what the query costs a core of its own (on a shared machine the wall-clock tail also holds the
    time other processes had the core)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.thread_time() - self._cpu)


def measure_exact(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[Timer, np.ndarray]:
    """The service's top-k stage, one query at a time: per-query times and (Q, k) results."""
    from service.topk import top_k

    scores = np.empty(len(items), np.float32)
    bias = np.float32(0.5)  # any constant: added like the model's bias, cannot change the ranking
    timer, found = Timer(), np.empty((len(queries), k), np.int64)
    for i, q in enumerate(queries):
        with timer:
            np.matmul(items, q, out=scores)
            scores += bias
            best = top_k(scores, k)
        found[i] = best
    return timer, found


# --- approximate indexes ----------------------------------------------------------------------------


def mips_items(items: np.ndarray) -> np.ndarray:
    """[x, sqrt(R^2 - |x|^2)]: inner-product order of the items = L2 order after this (module docstring)."""
    sq = np.einsum("ij,ij->i", items, items)
    extra = np.sqrt(np.maximum(sq.max() - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([items, extra[:, None]]))


def mips_queries(queries: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.hstack([queries, np.zeros((len(queries), 1), np.float32)]))


def _pow2(x: float) -> int:
    return int(2 ** max(0, round(np.log2(max(x, 1.0)))))


def ivf_method(codec: str) -> str:
    """The method name of an IvfTopK codec: `ivf` for the service's default codec."""
    from service.topk import TopKConfig

    return "ivf" if codec == TopKConfig().codec else f"ivf_{codec}"


def build_ivf(items: np.ndarray, config: ScaleConfig, codec: str | None = None):
    """The service's own IVF top-k stage (`service.topk.IvfTopK`, what `MML_TOPK__KIND=ivf` serves)
    over these rows (index id = row), nlist = N / ivf_points_per_list (a power of two); `codec`
    unset: the service's default, with its default rerank."""
    from service.topk import IvfTopK, TopKConfig

    topk_config = TopKConfig(
        kind="ivf",
        codec=codec or TopKConfig().codec,
        nlist=_pow2(len(items) / config.ivf_points_per_list),
        nprobe=1,  # tuned by measure_index
        min_items=0,
        train_points_per_list=config.ivf_train_points_per_list,
        kmeans_iterations=config.ivf_kmeans_iterations,
        seed=config.seed,
    )
    topk = IvfTopK(items, topk_config, first_row=0)
    return topk, f"service.topk.IvfTopK,codec={topk.codec},rerank={topk.rerank},nlist={topk.nlist}"


def build_hnsw(items_aug: np.ndarray, config: ScaleConfig):
    import faiss

    index = faiss.IndexHNSWFlat(items_aug.shape[1], config.hnsw_m, faiss.METRIC_L2)
    index.hnsw.efConstruction = config.hnsw_ef_construction
    index.add(items_aug)
    return index, f"M={config.hnsw_m},efConstruction={config.hnsw_ef_construction}"


class _Searcher:
    """One method's search, as measure_index drives it: `one(q)` answers one query (the timed call),
    `many(Q)` a batch (tuning), `set(value)` the search parameter, `index` the Faiss index."""

    def __init__(self, method: str, index, k: int) -> None:
        self.method, self.index, self.k = method, index, k

    def set(self, value: int) -> None:
        if self.method.startswith("ivf"):
            self.index.nprobe = value  # IvfTopK: the nprobe of every later search
        else:
            self.index.hnsw.efSearch = value

    def one(self, q: np.ndarray) -> np.ndarray:
        if self.method.startswith("ivf"):  # the service's call: raw query, over-fetch and filter included
            ids, _ = self.index.search(q, self.k)
            out = np.full(self.k, -1, np.int64)
            out[: len(ids)] = ids
            return out
        return self.index.search(q[None, :], self.k)[1][0]

    def many(self, queries: np.ndarray) -> np.ndarray:
        if self.method.startswith("ivf"):
            return np.stack([self.one(q) for q in queries])
        return self.index.search(queries, self.k)[1]

    def faiss_index(self):
        return self.index.index if self.method.startswith("ivf") else self.index


@dataclass
class MethodResult:
    method: str
    params: str
    p50_ms: float  # wall clock
    p99_ms: float
    cpu_p50_ms: float  # CPU time of the querying thread
    cpu_p99_ms: float
    recall: float
    bytes: int
    build_s: float
    load_s: float


def measure_index(
    method: str,
    index,
    params: str,
    param_name: str,
    grid: tuple[int, ...],
    tune: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    config: ScaleConfig,
    build_s: float,
) -> MethodResult:
    """Tune the search parameter on the tuning queries, then measure on the test queries one at a
    time on one thread. `ivf*`: `index` is the service's IvfTopK, queries raw (memory: its Faiss
    index, beside the float matrix it re-ranks against); `hnsw`: a Faiss index, queries MIPS-augmented."""
    import faiss

    searcher = _Searcher(method, index, config.k)
    tune_q, tune_truth = tune
    chosen = grid[-1]
    faiss.omp_set_num_threads(config.build_threads)
    for value in grid:
        if param_name == "efSearch" and value < config.k:
            continue
        searcher.set(value)
        if recall_at_k(searcher.many(tune_q), tune_truth) >= min(
            config.recall_target + config.tune_margin, 1.0
        ):
            chosen = value
            break
    searcher.set(chosen)
    data = faiss.serialize_index(searcher.faiss_index())
    start = time.perf_counter()
    faiss.deserialize_index(data)
    load_s = time.perf_counter() - start

    faiss.omp_set_num_threads(1)  # as the service runs it
    test_q, test_truth = test
    timer, found = Timer(), np.empty((len(test_q), config.k), np.int64)
    with raised_priority(config.timing_nice):
        for i in range(len(test_q)):
            with timer:
                ids = searcher.one(test_q[i])
            found[i] = ids
    return MethodResult(
        method,
        f"{params},{param_name}={chosen}",
        *_percentiles(timer.wall),
        *_percentiles(timer.cpu),
        recall_at_k(found, test_truth),
        len(data),
        build_s,
        load_s,
    )


# --- the benchmark ----------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"  scale: {message}", file=sys.stderr, flush=True)


def _tag(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def run_scale(config: ScaleConfig, bundle_path: Path | None) -> dict[str, float | str]:
    """Every size and method; figures named scale_<size>_<method>_<figure> plus the headline
    scale_<size>_p99_ms / _cpu_p99_ms / _recall_at_100 / _method: the method with the lowest wall-clock
    p99 among those with recall >= target."""
    import faiss
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(config.seed)
    n_queries = config.tune_queries + config.test_queries
    if bundle_path is not None:
        from mml.bundle_loader import load_bundle

        bundle = load_bundle(bundle_path, roles=("recall",))
        distribution = fit_items(bundle.items_concat, f"bundle:{bundle.model_version}")
        queries = bundle_queries(bundle, n_queries, rng)
        del bundle
    else:
        distribution = gaussian_items()
        queries = (rng.standard_normal((n_queries, distribution.dim)) / np.sqrt(distribution.dim)).astype(
            np.float32
        )
    start = time.perf_counter()
    catalogue = distribution.sample(max(config.sizes), rng, config.sample_chunk)
    _log(f"{len(catalogue):,} items drawn ({distribution.source}) in {time.perf_counter() - start:.1f} s")

    figures: dict[str, float | str] = {
        "scale_data": distribution.source,
        "scale_k": float(config.k),
        "scale_load_average": round(os.getloadavg()[0], 2),  # other work on the machine
    }
    with raised_priority(config.timing_nice) as raised:
        figures["scale_timing_raised_priority"] = float(raised)
    for n in sorted(config.sizes):
        tag = _tag(n)
        start = time.perf_counter()
        items = np.ascontiguousarray(catalogue[:n])  # start-up of the exact method: the matrix in memory
        exact_load_s = time.perf_counter() - start
        truth = ground_truth(items, queries, config.k)
        tune = (queries[: config.tune_queries], truth[: config.tune_queries])
        test_q, test_truth = queries[config.tune_queries :], truth[config.tune_queries :]
        results: list[MethodResult] = []

        with threadpool_limits(limits=1), raised_priority(config.timing_nice):
            timed = test_q[: config.exact_timed_queries]
            timer, found = measure_exact(items, timed, config.k)
        results.append(
            MethodResult(
                "exact", "numpy matmul + argpartition", *_percentiles(timer.wall), *_percentiles(timer.cpu),
                recall_at_k(found, test_truth[: len(timed)]), items.nbytes, 0.0, exact_load_s,
            )
        )  # fmt: skip

        builders = [(ivf_method(c), c, "nprobe", config.ivf_nprobe_grid) for c in config.ivf_codecs]
        if n in config.hnsw_sizes:
            builders.append(("hnsw", "", "efSearch", config.hnsw_ef_grid))
        for method, codec, param_name, grid in builders:
            faiss.omp_set_num_threads(config.build_threads)
            start = time.perf_counter()
            if method.startswith("ivf"):  # the service's class: raw rows and queries
                index, params = build_ivf(items, config, codec)
                tune_m, test_m = tune, (test_q, test_truth)
            else:  # a Faiss index over the MIPS-augmented rows
                items_aug = mips_items(items)
                index, params = build_hnsw(items_aug, config)
                del items_aug
                tune_m = (mips_queries(tune[0]), tune[1])
                test_m = (mips_queries(test_q), test_truth)
            build_s = time.perf_counter() - start
            _log(f"{tag} {method}: built in {build_s:.1f} s ({params})")
            results.append(
                measure_index(method, index, params, param_name, grid, tune_m, test_m, config, build_s)
            )
            del index
        del items

        for r in results:
            prefix = f"scale_{tag}_{r.method}"
            figures.update(
                {
                    f"{prefix}_p50_ms": r.p50_ms,
                    f"{prefix}_p99_ms": r.p99_ms,
                    f"{prefix}_cpu_p50_ms": r.cpu_p50_ms,
                    f"{prefix}_cpu_p99_ms": r.cpu_p99_ms,
                    f"{prefix}_recall_at_{config.k}": round(r.recall, 4),
                    f"{prefix}_mib": round(r.bytes / 2**20, 1),
                    f"{prefix}_build_s": round(r.build_s, 2),
                    f"{prefix}_load_s": round(r.load_s, 3),
                    f"{prefix}_params": r.params,
                }
            )
            _log(
                f"{tag} {r.method:9s} p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms  (cpu {r.cpu_p50_ms:.3f} / "
                f"{r.cpu_p99_ms:.3f})  recall@{config.k} "
                f"{r.recall:.4f}  {r.bytes / 2**20:7.1f} MiB  build {r.build_s:6.1f} s  load {r.load_s:.3f} s  ({r.params})"
            )
        good = [r for r in results if r.recall >= config.recall_target]
        if good:
            best = min(good, key=lambda r: r.p99_ms)
            figures[f"scale_{tag}_p99_ms"] = best.p99_ms
            figures[f"scale_{tag}_cpu_p99_ms"] = best.cpu_p99_ms
            figures[f"scale_{tag}_recall_at_{config.k}"] = round(best.recall, 4)
            figures[f"scale_{tag}_method"] = best.method
    return figures
