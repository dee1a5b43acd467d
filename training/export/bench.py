"""Benchmark: fused scoring latency of one request, ONNX Runtime (the bundle) vs eager PyTorch.

One request = one history of realistic length (an old user's most recent max_len items) -> fused
scores of the whole catalogue -> top-100. Both sides include turning item rows into model inputs:

    onnx : bundle tables -> recall.onnx -> items_concat @ query + bias -> argpartition top-100
    eager: MML.scores (learners, per-learner catalogue scores, LayerNorm fusion) -> torch.topk

One thread each (ONNX Runtime intra_op_num_threads=1, torch.set_num_threads(1)): a replica serves
one request per core. The two are timed in alternating rounds in the same process, so load from
other processes hits both alike; the figures are medians (p50) in milliseconds.

The model: `context["run"]` (a trained run) if given or artifacts/runs/quick exists; otherwise a
randomly initialised MML on real ML-1M features (`context["data"]`, artifacts/data/ml-1m or the
test cache); otherwise a synthetic catalogue of ML-1M's size. Latency does not depend on the
weights' values, only on the shapes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

TOP_K = 100
ROUNDS = 10
PER_ROUND = 30
WARMUP = 20
DEFAULT_RUN = Path("artifacts/runs/quick")
DEFAULT_DATA = (Path("artifacts/data/ml-1m"), Path(".cache/test-artifacts/ml-1m"))
ML1M_ITEMS, ML1M_OLD_ITEMS = 3883, 3662  # catalogue of the default ML-1M split


def _history(old_seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """The most recent max_len items of the first old user with at least max_len interactions."""
    for seq in old_seqs:
        if len(seq) >= max_len:
            return np.asarray(seq[-max_len:], dtype=np.int64)
    return np.asarray(max(old_seqs, key=len), dtype=np.int64)


def _source(context: dict):
    """-> (model, item_ids, popularity, old_seqs, description)."""
    from model.config import ModelConfig
    from model.mml import MML
    from training.checkpoint import load_model, run_data_dir, stage_path
    from training.export.tables import popularity_counts

    run = Path(context["run"]) if context.get("run") else DEFAULT_RUN
    if stage_path(run, 3).is_file():
        from training.data import load_split
        from training.features import load_features

        model, _ = load_model(run)
        data = Path(context.get("data") or run_data_dir(run))
        split, features = load_split(data), load_features(data)
        popularity = popularity_counts(split.old_seqs, split.n_items)
        return model, features.item_id, popularity, split.old_seqs, f"trained run {run}"
    candidates = [Path(context["data"])] if context.get("data") else list(DEFAULT_DATA)
    for data in candidates:
        if (data / "features.npz").is_file() and (data / "stats.json").is_file():
            from training.data import load_split
            from training.features import load_features

            split, features = load_split(data), load_features(data)
            model = MML(ModelConfig(), split.n_old_items, features.text, features.image, features.image_mask)
            popularity = popularity_counts(split.old_seqs, split.n_items)
            return (
                model,
                features.item_id,
                popularity,
                split.old_seqs,
                f"untrained MML on the features of {data}",
            )
    from training.synthetic import synthetic

    split, features = synthetic(n_items=ML1M_ITEMS, n_old_items=ML1M_OLD_ITEMS, n_old_users=50, max_len=120)
    model = MML(ModelConfig(), split.n_old_items, features.text, features.image, features.image_mask)
    popularity = popularity_counts(split.old_seqs, split.n_items)
    return (
        model,
        features.item_id,
        popularity,
        split.old_seqs,
        "untrained MML on a synthetic ML-1M-sized catalogue",
    )


def run(context: dict) -> dict:
    import torch
    from threadpoolctl import threadpool_limits

    from mml.bundle_loader import load_bundle
    from model.learners import last_hidden
    from model.mml import LEARNERS
    from service.runtime import Runtime
    from training.export.build import export_model
    from training.export.tables import serving_model

    torch.set_num_threads(1)
    model, item_ids, popularity, old_seqs, description = _source(context)
    served = serving_model(model)
    history = _history(old_seqs, served.cfg.max_len)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_model(served, Path(tmp) / "bundle", item_ids=item_ids, popularity=popularity)
        export_seconds = time.perf_counter() - start
        runtime = Runtime(load_bundle(Path(tmp) / "bundle", intra_op_num_threads=1))

    def onnx_request() -> np.ndarray:  # the service's inference path (service/runtime.py)
        query, bias = runtime.query(runtime.history_inputs(history))
        scores = runtime.catalogue_scores(query[0], bias[0])
        top = np.argpartition(-scores, TOP_K)[:TOP_K]
        return top[np.argsort(-scores[top], kind="stable")]

    seq = torch.zeros(1, served.cfg.max_len, dtype=torch.long)
    with torch.inference_mode():  # item vectors cached once, as a server would
        item_tables = {name: served.item_table(name).clone() for name in LEARNERS}

    def eager_request() -> np.ndarray:
        with torch.inference_mode():
            seq[0, : len(history)] = torch.from_numpy(history)
            valid = seq > 0
            hidden = served.hidden(seq)
            scores = []
            for name in LEARNERS:
                raw = last_hidden(hidden[name], valid) @ item_tables[name].T
                scores.append(torch.cat([torch.full_like(raw[:, :1], float("-inf")), raw[:, 1:]], dim=1))
            weights = served.fusion.weights(hidden["id"], hidden["text"], hidden["image"], valid)
            fused = served.fusion(scores, weights)
            return torch.topk(fused[0], TOP_K).indices.numpy()

    def eager_uncached_request() -> np.ndarray:
        with torch.inference_mode():
            seq[0, : len(history)] = torch.from_numpy(history)
            fused, _ = served.scores(seq)  # recomputes the text and image item vectors every call
            return torch.topk(fused[0], TOP_K).indices.numpy()

    requests = {"onnx": onnx_request, "eager": eager_request, "eager_uncached": eager_uncached_request}
    times: dict[str, list[float]] = {name: [] for name in requests}
    with threadpool_limits(limits=1):  # numpy's BLAS too: one core per request
        same_top = set(onnx_request().tolist()) == set(eager_request().tolist())
        for request in requests.values():
            for _ in range(WARMUP):
                request()
        for _ in range(ROUNDS):
            for name, request in requests.items():
                for _ in range(PER_ROUND):
                    start = time.perf_counter()
                    request()
                    times[name].append((time.perf_counter() - start) * 1e3)
    onnx_p50, eager_p50, uncached_p50 = (float(np.percentile(times[k], 50)) for k in requests)
    return {
        "fused_latency_ms_onnx_p50": round(onnx_p50, 3),
        "fused_latency_ms_eager_p50": round(eager_p50, 3),
        "fused_latency_ms_onnx_p99": round(float(np.percentile(times["onnx"], 99)), 3),
        "fused_latency_ms_eager_p99": round(float(np.percentile(times["eager"], 99)), 3),
        "onnx_vs_eager_latency_ratio": round(onnx_p50 / eager_p50, 3),
        "fused_latency_ms_eager_uncached_p50": round(uncached_p50, 3),
        "fused_bench_model": description,
        "fused_bench_items": int(served.n_items),
        "fused_bench_history_len": int(len(history)),
        "fused_bench_same_top100": bool(same_top),
        "fused_bench_export_seconds": round(export_seconds, 2),
    }
