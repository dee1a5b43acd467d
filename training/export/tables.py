"""The bundle's item tables, fusion moments and neighbour index, computed from a serving-ready model.

A serving-ready model (`serving_model`) is a copy in eval mode whose new catalogue items carry
generated ID embeddings (Eq. 14-17): exactly what the exported graphs and tables describe, and the
eager reference the tests and the benchmark compare ONNX Runtime against.
"""

from __future__ import annotations

import copy
from pathlib import Path

import faiss
import numpy as np
import torch

from mml.bundle_loader import TABLE_COLUMNS
from mml.neighbours import NeighbourIndex
from model.fusion import catalogue_moments
from model.mml import LEARNERS, MML


def serving_model(model: MML) -> MML:
    """A copy of `model` in eval mode with the new items' ID rows generated (the caller's model is
    left untouched). Idempotent: the generator reads old rows only."""
    served = copy.deepcopy(model).eval()
    served.fill_new_items()
    return served


@torch.no_grad()
def item_vectors(model: MML) -> dict[str, np.ndarray]:
    """learner -> (N+1, d) output-side item vectors (id, text, image), float32."""
    return {name: model.item_table(name).float().numpy().copy() for name in LEARNERS}


def fusion_moments(vectors: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Catalogue mean (3, d) and population covariance (3, d, d) of each learner's item vectors over
    rows 1..N, accumulated in float64 (the graph stores them as float32 constants)."""
    means, covs = [], []
    for name in LEARNERS:
        mean, cov = catalogue_moments(torch.from_numpy(vectors[name]).double())
        means.append(mean)
        covs.append(cov)
    return torch.stack(means), torch.stack(covs)


def item_tables(
    model: MML, item_ids: np.ndarray, popularity: np.ndarray, vectors: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The columns of tables/items.npz (mml.bundle_loader.TABLE_COLUMNS), row = item_idx."""
    rows = model.n_items + 1
    item_ids = np.asarray(item_ids).astype(str)
    popularity = np.asarray(popularity)
    if item_ids.shape != (rows,):
        raise ValueError(f"item_ids must be (N+1={rows},) with '' at row 0, got {item_ids.shape}")
    if item_ids[0] != "" or len(set(item_ids[1:].tolist())) != rows - 1 or (item_ids[1:] == "").any():
        raise ValueError("item_ids must be '' at row 0 (pad) and unique, non-empty ids at rows 1..N")
    if popularity.shape != (rows,) or popularity.dtype.kind not in "iu" or (popularity < 0).any():
        raise ValueError(
            f"popularity must be (N+1={rows},) non-negative integer counts, got {popularity.dtype}{popularity.shape}"
        )
    vectors = item_vectors(model) if vectors is None else vectors
    is_old = np.zeros(rows, dtype=bool)
    is_old[1 : model.n_old_items + 1] = True
    tables = {
        "item_id": item_ids,
        "is_old": is_old,
        "id_emb": vectors["id"],
        "text_vec": vectors["text"],
        "image_vec": vectors["image"],
        "text": model.text.numpy(),
        "image": model.image.numpy(),
        "image_mask": model.image_mask.numpy(),
        "popularity": popularity.astype(np.int64),
    }
    return {name: tables[name] for name in TABLE_COLUMNS}


def write_tables(path: Path, tables: dict[str, np.ndarray]) -> None:
    """Uncompressed npz (the service loads it on every start; features do not compress well)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **tables)


def write_index(path: Path, model: MML) -> None:
    """The Eq. 14 index over old items 1..n_old_items (Faiss row r = item_idx r+1), built by
    mml.neighbours exactly as training built the neighbour table."""
    old = np.arange(1, model.n_old_items + 1)
    text, image, mask = model.text.numpy(), model.image.numpy(), model.image_mask.numpy()
    index = NeighbourIndex(old, text[old], image[old], mask[old])
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index.index, str(path))


def popularity_counts(old_seqs: list[np.ndarray], n_items: int) -> np.ndarray:
    """(N+1,) int64 interactions per item in D_old (new items: 0)."""
    counts = np.zeros(n_items + 1, dtype=np.int64)
    if old_seqs:
        counts += np.bincount(np.concatenate(old_seqs).astype(np.int64), minlength=n_items + 1)[: n_items + 1]
    return counts
