"""One loaded bundle as the service uses it. Torch-free.

`Runtime.load(path)` goes through `mml.bundle_loader.load_bundle` (verify_bundle, sha256 of every
file it reads, tables, the fused item matrix, the Faiss neighbour index, ONNX Runtime sessions with
one intra-op thread and sequential execution, checked against the graph contract), adds what serving
needs on top (popularity order, the encoders' fingerprint), then runs one warm-up inference through
every graph it will use, so a Runtime that exists is ready to answer. Runtimes are read-only once
loaded and shared by every request (ONNX Runtime sessions are thread-safe); a reload builds a new
one and swaps it in.

Sequence length: bundles exported with a dynamic length axis (mml.bundle_loader.LENGTH_AXIS) take
any length 1..max_len and pad to max_len inside the graph, with the same outputs; a history of n
items is padded to the smallest bucket >= n (LENGTH_BUCKET: multiples of 8, and max_len), so a
new user's few clicks cost a few positions, not max_len. Each bucket is run once in `warm_up`
(ONNX Runtime plans memory per input shape on first use). Older bundles (axis 1 fixed at max_len)
are padded to max_len as before.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mml.bundle_loader import ENCODERS_DIR, LoadedBundle, load_bundle
from mml.errors import BundleError

SERVING_GRAPHS = ("recall", "generator", "item_tower")  # what serving opens (the split graphs stay unread)
COOC_GRAPH = "recall_cooc"  # opened too when the bundle has the co-occurrence learner (`mml_cooc` arms)
LENGTH_BUCKET = 8  # dynamic-length graphs: histories are padded to a multiple of this (or max_len)


def length_buckets(max_len: int, dynamic: bool, step: int = LENGTH_BUCKET) -> tuple[int, ...]:
    """The padded lengths a Runtime feeds: multiples of `step` below max_len, then max_len; only
    max_len for a fixed-length graph."""
    if not dynamic:
        return (max_len,)
    return (*range(step, max_len, step), max_len)


@dataclass(frozen=True)
class SequenceInputs:
    """A right-padded batch of histories: what the learner graphs read (shapes: GRAPH_IO)."""

    item_emb: np.ndarray  # (B, L, d) float32: trained rows, or generated ones for new items
    text: np.ndarray  # (B, L, text_dim) float32
    image: np.ndarray  # (B, L, image_dim) float32
    image_mask: np.ndarray  # (B, L) bool
    valid: np.ndarray  # (B, L) bool: True on real positions, a prefix of each row

    def feeds(self) -> dict[str, np.ndarray]:
        return {
            "item_emb": self.item_emb,
            "text": self.text,
            "image": self.image,
            "image_mask": self.image_mask,
            "valid": self.valid,
        }


class Runtime:
    def __init__(self, bundle: LoadedBundle) -> None:
        self.bundle = bundle
        self.path = Path(os.path.abspath(bundle.root))
        self.manifest = bundle.manifest
        self.model_version = bundle.model_version
        self.dims = bundle.dims
        t = bundle.tables
        self.item_ids = t["item_id"]
        self.item_id_list: list[str] = [str(i) for i in self.item_ids]  # fast per-row lookups in answers
        self.id_emb = t["id_emb"]
        self.text = t["text"]
        self.image = t["image"]
        self.image_mask = t["image_mask"]
        self.popularity = t["popularity"]
        self.items_concat = bundle.items_concat  # score = items_concat[i] . query + bias
        self.cooc = bundle.cooc  # mml.cooc.CoocTable, None without the co-occurrence learner
        self.row_of = bundle.row_of
        self.popular_rows = (np.argsort(-self.popularity[1:], kind="stable") + 1).astype(np.int64)
        dynamic = bundle.sequence_length("recall") is None
        self.length_buckets = length_buckets(self.dims.max_len, dynamic)
        self.encoders_dir = bundle.encoders_dir
        self.encoder_fingerprint = self._fingerprint(ENCODERS_DIR + "/")
        self._encoders = None
        self._encoders_lock = threading.Lock()
        self.load_seconds = bundle.load_seconds

    @classmethod
    def load(cls, path: str | Path) -> Runtime:
        start = time.perf_counter()
        from mml.bundle import read_manifest

        # recall_cooc is optional in the bundle contract: open it only where the manifest lists it
        # (load_bundle verifies the manifest and refuses a recall_cooc without tables/cooc.npz)
        listed = read_manifest(Path(path)).graphs if Path(path).is_dir() else {}
        roles = SERVING_GRAPHS + ((COOC_GRAPH,) if COOC_GRAPH in listed else ())
        runtime = cls(load_bundle(Path(path), intra_op_num_threads=1, roles=roles))
        import faiss

        faiss.omp_set_num_threads(1)  # one query per request: threads would only contend
        runtime.warm_up()
        runtime.load_seconds = time.perf_counter() - start
        return runtime

    def _fingerprint(self, prefix: str) -> str:
        """Identifies the encoders: new items' features are only valid for bundles sharing them."""
        digest = hashlib.sha256()
        for entry in sorted(self.manifest.files, key=lambda f: f.path):
            if entry.path.startswith(prefix):
                digest.update(f"{entry.path}:{entry.sha256}\n".encode())
        return digest.hexdigest()[:16]

    def warm_up(self) -> None:
        """One inference through every graph, and through the sequence graphs at every length bucket
        (first-run allocations and shape planning happen here, not in a request)."""
        rows = self.popular_rows[: min(3, len(self.popular_rows))]
        for length in self.length_buckets:
            x = self.history_inputs(np.resize(rows, length))  # popular rows repeated to the bucket length
            self.query(x)
            if self.has_cooc:
                self.query_cooc(x)
        self.generate(self.text[rows], self.image[rows], self.image_mask[rows])
        self.project(self.text[rows], self.image[rows], self.image_mask[rows])

    # --- inference --------------------------------------------------------------------------------

    def sequence_inputs(
        self, item_emb: np.ndarray, text: np.ndarray, image: np.ndarray, image_mask: np.ndarray
    ) -> SequenceInputs:
        """One history (n items, oldest first, n <= max_len) -> right-padded inputs of batch 1, of
        the padded length `padded_length(n)`."""
        dims = self.dims
        n = len(item_emb)
        if not 0 < n <= dims.max_len:
            raise ValueError(f"history length {n} outside 1..{dims.max_len}")
        length = self.padded_length(n)
        x = SequenceInputs(
            item_emb=np.zeros((1, length, dims.d), np.float32),
            text=np.zeros((1, length, dims.text_dim), np.float32),
            image=np.zeros((1, length, dims.image_dim), np.float32),
            image_mask=np.zeros((1, length), bool),
            valid=np.zeros((1, length), bool),
        )
        x.item_emb[0, :n] = item_emb
        x.text[0, :n] = text
        x.image[0, :n] = image
        x.image_mask[0, :n] = image_mask
        x.valid[0, :n] = True
        return x

    def history_inputs(self, rows: np.ndarray | list[int]) -> SequenceInputs:
        """Catalogue rows of one history (oldest first; the most recent max_len are kept) -> its
        padded inputs (`sequence_inputs`)."""
        rows = np.asarray(rows, dtype=np.int64)[-self.dims.max_len :]
        if len(rows) and (rows.min() < 1 or rows.max() > self.dims.n_items):
            raise ValueError(f"history rows must be in 1..{self.dims.n_items}")
        return self.sequence_inputs(
            self.id_emb[rows], self.text[rows], self.image[rows], self.image_mask[rows]
        )

    def catalogue_scores(self, query: np.ndarray, bias: float) -> np.ndarray:
        """One query (3d,) -> the fused score (N+1,) of every catalogue row; row 0 (pad) is -inf.
        What `ExactTopK` ranks, as one vector (brute-force checks, offline tools)."""
        scores = self.items_concat @ np.asarray(query, dtype=np.float32) + np.float32(bias)
        scores[0] = -np.inf
        return scores

    def padded_length(self, n: int) -> int:
        """The smallest length bucket that holds n items (max_len for a fixed-length bundle)."""
        for length in self.length_buckets:
            if n <= length:
                return length
        raise ValueError(f"history length {n} outside 1..{self.dims.max_len}")

    def query(self, x: SequenceInputs) -> tuple[np.ndarray, np.ndarray]:
        """Histories -> (query (B, 3d), bias (B,)) of the fused score, through recall.onnx."""
        out = self.bundle.run("recall", **x.feeds())
        return out["query"], np.asarray(out["bias"], np.float32).reshape(-1)

    @property
    def has_cooc(self) -> bool:
        """The bundle has the co-occurrence learner: the recall_cooc graph and tables/cooc.npz."""
        return self.cooc is not None and COOC_GRAPH in self.bundle.sessions

    def query_cooc(self, x: SequenceInputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Histories -> (query (B, 3d), bias (B,), cooc_weight (B,)) through recall_cooc.onnx: the
        dense part of the fused score with the co-occurrence learner, and that learner's weight
        (fused score = items_concat[i] . query + bias + mml.cooc.fused_cooc's bonus_i + shift)."""
        out = self.bundle.run(COOC_GRAPH, **x.feeds())
        return (
            out["query"],
            np.asarray(out["bias"], np.float32).reshape(-1),
            np.asarray(out["cooc_weight"], np.float32).reshape(-1),
        )

    def generate(self, text: np.ndarray, image: np.ndarray, image_mask: np.ndarray) -> np.ndarray:
        """New items' features (B, ...) -> generated ID embeddings (B, d): the K most similar old
        items by Eq. 14 (Faiss, mml.neighbours), then generator.onnx (Eq. 15-17)."""
        text = np.ascontiguousarray(text, np.float32)
        image = np.ascontiguousarray(image, np.float32)
        image_mask = np.asarray(image_mask, bool)
        nb, _ = self.bundle.neighbours.search(text, image, image_mask, self.dims.k_neighbours)
        out = self.bundle.run(
            "generator",
            z_text=text,
            z_image=image,
            z_mask=image_mask,
            nb_text=self.text[nb],
            nb_image=self.image[nb],
            nb_mask=self.image_mask[nb],
            nb_id=self.id_emb[nb],
        )
        return np.ascontiguousarray(out["id_emb"], np.float32)

    def project(self, text: np.ndarray, image: np.ndarray, image_mask: np.ndarray) -> np.ndarray:
        """New items' features -> their [text_vec | image_vec] (B, 2d) through item_tower.onnx."""
        out = self.bundle.run(
            "item_tower",
            text=np.ascontiguousarray(text, np.float32),
            image=np.ascontiguousarray(image, np.float32),
            image_mask=np.asarray(image_mask, bool),
        )
        return np.concatenate([out["text_vec"], out["image_vec"]], axis=1).astype(np.float32)

    # --- encoders (PUT /items) --------------------------------------------------------------------

    def encoders(self, max_image_bytes: int):
        """The bundle's text and image encoders, loaded on first use (only PUT /items needs them)."""
        if self.encoders_dir is None:
            raise BundleError(f"bundle {self.model_version} ships no encoders/: it cannot encode new items")
        with self._encoders_lock:
            if self._encoders is None:
                from mml.encoders import ImageEncoder, ImageLimits, TextEncoder

                limits = ImageLimits(max_bytes=max_image_bytes)
                self._encoders = (
                    TextEncoder(self.encoders_dir, threads=1),
                    ImageEncoder(self.encoders_dir, threads=1, limits=limits),
                )
            return self._encoders
