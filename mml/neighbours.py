"""Neighbour search of the cold-start generator, paper Eq. 14 (numpy + faiss, no torch: the service
reuses it).

    q_{z,o} = (cos(text_z, text_o) + cos(image_z, image_o)) / |M|

Features are L2-normalised (docs/architecture.md section 3), so the cosine is a dot product. Each old
item o is stored once in an exact inner-product index as [text_o / sqrt2 ; image_o / sqrt2]; a query
z with a poster is [text_z / sqrt2 ; image_z / sqrt2] and its inner product is exactly q_{z,o}.

Missing posters:
  * a query without a poster searches by text only (|M| = 1): its vector is [text_z ; 0], the
    inner product is cos_text / sqrt2, which ranks like cos_text; returned scores are cos_text.
  * an old item without a poster is stored as [text_o / sqrt2 ; 0]: against a query with a poster
    its image cosine counts as 0, i.e. q = cos_text / 2. Real posters' features come out of a
    ReLU/swish CNN and their cosines are mostly positive, so such items rank lower unless their
    text is very close: a missing poster is treated as "no evidence of similarity", not as a match.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

HALF = 1.0 / math.sqrt(2.0)  # weight of each modality in the stored vectors (|M| = 2)


def _vectors(
    text: np.ndarray, image: np.ndarray, image_mask: np.ndarray, text_only_scale: float
) -> np.ndarray:
    text = np.asarray(text, dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(image_mask, dtype=bool)
    if text.ndim != 2 or image.ndim != 2 or mask.shape != (text.shape[0],) or image.shape[0] != text.shape[0]:
        raise ValueError(
            f"text (n, Dt), image (n, Di) and image_mask (n,) must agree; got {text.shape}, {image.shape}, {mask.shape}"
        )
    text_weight = np.where(mask, HALF, text_only_scale).astype(np.float32)[:, None]
    image_part = image * (HALF * mask.astype(np.float32))[:, None]
    return np.ascontiguousarray(np.concatenate([text * text_weight, image_part], axis=1))


class NeighbourIndex:
    """Exact top-K search over old items by Eq. 14."""

    def __init__(self, item_idx: np.ndarray, text: np.ndarray, image: np.ndarray, image_mask: np.ndarray):
        """item_idx (n,) ids of the old items; text (n, Dt), image (n, Di), image_mask (n,) their features."""
        self.item_idx = np.asarray(item_idx, dtype=np.int64)
        if self.item_idx.shape != (np.asarray(text).shape[0],):
            raise ValueError(f"item_idx must be (n,) with n = {np.asarray(text).shape[0]} rows of text")
        if len(self.item_idx) == 0:
            raise ValueError("the neighbour index needs at least one old item")
        self.text_dim = np.asarray(text).shape[1]
        vectors = _vectors(text, image, image_mask, text_only_scale=HALF)  # stored old items: never scaled up
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def __len__(self) -> int:
        return len(self.item_idx)

    def search(
        self,
        text: np.ndarray,
        image: np.ndarray,
        image_mask: np.ndarray,
        k: int,
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries text (q, Dt), image (q, Di), image_mask (q,) -> (item_idx (q, k) int64, q_{z,o} (q, k)
        float32), best first. `exclude` (q,) item indices: drop that item from its row's result (an old
        item searching for its own neighbours in training)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        extra = 0 if exclude is None else 1
        if k + extra > len(self):
            raise ValueError(f"k={k} neighbours requested but the index holds {len(self)} old items")
        queries = _vectors(text, image, image_mask, text_only_scale=1.0)
        scores, rows = self.index.search(queries, k + extra)
        ids = self.item_idx[rows]
        if exclude is not None:
            exclude = np.asarray(exclude, dtype=np.int64).reshape(-1, 1)
            if exclude.shape[0] != ids.shape[0]:
                raise ValueError(
                    f"exclude must have one entry per query ({ids.shape[0]}), got {exclude.shape[0]}"
                )
            is_self = ids == exclude
            # keep the first k entries that are not the excluded item (drop the last if it is absent)
            drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
            keep = np.arange(k + 1)[None, :] != drop[:, None]
            ids = ids[keep].reshape(-1, k)
            scores = scores[keep].reshape(-1, k)
        with_image = np.asarray(image_mask, dtype=bool)[:, None]
        scores = np.where(with_image, scores, scores * math.sqrt(2.0))  # text-only: report cos_text
        return ids, scores.astype(np.float32)


def catalogue_neighbours(
    text: np.ndarray, image: np.ndarray, image_mask: np.ndarray, n_old_items: int, k: int
) -> np.ndarray:
    """Neighbour table of a whole catalogue (row = item_idx, row 0 = pad): (N+1, k) int64 old-item
    indices. Old items 1..n_old_items exclude themselves; new items search all old items."""
    n_rows = np.asarray(text).shape[0]
    if not 1 <= n_old_items < n_rows:
        raise ValueError(
            f"n_old_items={n_old_items} must be in 1..{n_rows - 1} (N+1 = {n_rows} feature rows)"
        )
    old = np.arange(1, n_old_items + 1)
    index = NeighbourIndex(old, text[old], image[old], image_mask[old])
    table = np.zeros((n_rows, k), dtype=np.int64)
    table[old], _ = index.search(text[old], image[old], image_mask[old], k, exclude=old)
    new = np.arange(n_old_items + 1, n_rows)
    if len(new):
        table[new], _ = index.search(text[new], image[new], image_mask[new], k)
    return table
