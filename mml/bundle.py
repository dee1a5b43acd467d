"""The serving bundle: the one contract between training and serving (torch-free).

A bundle is a directory written by `mml export` and read by the service:

    manifest.json                 this schema: versions, dataset/split, dims, metrics, sha256 of every file
    graphs/learner_id.onnx        (item_emb, text, image, image_mask, valid) -> hidden       Eq. 1-8
    graphs/learner_text.onnx      (text, valid) -> hidden                                    Sec. 4.2.2
    graphs/learner_image.onnx     (image, image_mask, valid) -> hidden                       Sec. 4.2.2
    graphs/fusion.onnx            (hidden_id, hidden_text, hidden_image, valid) -> weights, query, bias   Eq. 9-13
    graphs/recall.onnx            the three learners + fusion in one graph (the serving fast path)
    graphs/generator.onnx         (z_text, z_image, z_mask, nb_text, nb_image, nb_mask, nb_id) -> id_emb  Eq. 14-17
    graphs/item_tower.onnx        (text, image, image_mask) -> text_vec, image_vec (projected item vectors)
    tables/items.npz              per catalogue row (0 = pad): item_id, is_old, id_emb, text_vec, image_vec,
                                  text, image, image_mask, popularity
    index/neighbours.faiss        inner-product index over old items' [text/sqrt2 ; image/sqrt2] (Eq. 14)
    encoders/                     text.onnx, tokenizer.json, image.onnx, encoders.json (new items at serving time)

Fused ranking: fused score of item i = items_concat[i] . query + bias, with
items_concat = [id_emb | text_vec | image_vec] (N+1, 3d); see docs/model.md for why this is exact.

`verify_bundle` checks the format version and the sha256 of every listed file before anything is
used; a bundle that fails is refused as a whole with a BundleError.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from mml.errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class FileEntry(BaseModel):
    path: str  # relative to the bundle root, forward slashes
    sha256: str
    bytes: int


class Dims(BaseModel):
    d: int  # hidden size of every learner
    max_len: int  # longest history the learners read (most recent items kept)
    text_dim: int  # pretrained text feature size (384 for all-MiniLM-L6-v2)
    image_dim: int  # pretrained image feature size (1280 for EfficientNet-Lite0)
    n_items: int  # catalogue rows, pad excluded
    n_old_items: int  # rows 1..n_old_items have trained ID embeddings
    k_neighbours: int  # K of the generator (Eq. 14)


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    model_version: str
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    dataset: dict = Field(default_factory=dict)  # name, split statistics, options
    dims: Dims
    training: dict = Field(default_factory=dict)  # profile, seed, losses, validation metrics
    graphs: dict[str, str] = Field(default_factory=dict)  # role -> relative path
    files: list[FileEntry] = Field(default_factory=list)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Hash every file under `root` (except the manifest) into `manifest.files` and write it atomically."""
    root = Path(root)
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        entries.append(FileEntry(path=rel, sha256=sha256_file(path), bytes=path.stat().st_size))
    manifest = manifest.model_copy(update={"files": entries})
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".manifest.", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        fh.write(manifest.model_dump_json(indent=2))
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST}: not a bundle")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from exc
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: format_version {version!r} is not supported (this service reads {FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: invalid manifest field '{field}': {first['msg']}") from exc


def verify_bundle(root: Path) -> Manifest:
    """Read the manifest and check every listed file's size and sha256; refuse on the first mismatch."""
    root = Path(root)
    manifest = read_manifest(root)
    listed = set()
    for entry in manifest.files:
        path = (root / entry.path).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(f"{root}: manifest lists a path outside the bundle: {entry.path}")
        if not path.is_file():
            raise BundleError(f"{root}: missing file {entry.path}")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise BundleError(
                f"{root}: checksum mismatch for {entry.path}: the bundle was modified or corrupted"
            )
        listed.add(entry.path)
    for role, rel in manifest.graphs.items():
        if rel not in listed:
            raise BundleError(f"{root}: graph '{role}' ({rel}) is not a checksummed file of the bundle")
    return manifest
