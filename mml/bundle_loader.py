"""Load a serving bundle (torch-free): verify it, then build every runtime object it describes.

    bundle = load_bundle("artifacts/bundles/quick")       # BundleError if anything is wrong
    out = bundle.run("recall", **feeds)                  # one graph by role (GRAPH_IO)

Inference over a loaded bundle (histories -> padded inputs -> query -> scores) has one API, the
service's `service.runtime.Runtime`; this module only loads and checks.

Order of work in `load_bundle`:
1. `mml.bundle.verify_bundle`: the format version and the size + sha256 of every listed file.
2. Each file this loader reads is read into memory once and its sha256 checked again on those
   bytes, so what was verified is exactly what gets loaded (a file replaced between the two steps
   is refused, not half-used).
3. Tables (npz), the fused item matrix items_concat = [id_emb | text_vec | image_vec], the Faiss
   neighbour index, the encoder spec, one ONNX Runtime session per graph (checked against the
   graph contract `GRAPH_IO` below).
4. Only when all of that succeeded is a `LoadedBundle` built and returned. Any failure raises
   `BundleError` and leaves no object behind: a caller that holds a working bundle keeps it.

The names below (`GRAPH_IO`, `GRAPH_FILES`, `TABLE_COLUMNS`, ...) are the one definition of the
layout in `mml/bundle.py`'s docstring; the exporter (`training/export`) writes against them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from mml.bundle import Manifest, verify_bundle
from mml.errors import BundleError, MMLError

# --- the layout ---------------------------------------------------------------------------------
TABLES_FILE = "tables/items.npz"
COOC_FILE = "tables/cooc.npz"  # the co-occurrence learner's top-M table: items, weights (N+1, M), window
INDEX_FILE = "index/neighbours.faiss"
ENCODERS_DIR = "encoders"
TORCH_DIR = "torch"  # state_dict + model config for warm-up with gradients (needs torch; optional)
TORCH_STATE = f"{TORCH_DIR}/state_dict.pt"
TORCH_CONFIG = f"{TORCH_DIR}/model.json"

# role -> (input names, output names). Shapes (B = batch, dynamic; L = sequence length, axis 1 of
# every input of the SEQUENCE_ROLES and of their "hidden" output: dynamic ("length", 1..max_len) in
# bundles exported since the dynamic-length graphs, fixed at dims.max_len in older ones; both load):
#   item_emb (B,L,d) f32, text (B,L,text_dim) f32, image (B,L,image_dim) f32, image_mask (B,L) bool,
#   valid (B,L) bool right-padded; hidden* (B,L,d); weights (B,3) in the order id, text, image;
#   query (B,3d) and bias (B,): fused score of item i = items_concat[i] . query + bias.
#   generator: z_text (B,text_dim), z_image (B,image_dim), z_mask (B,) bool, nb_* (B,K,...),
#   nb_mask (B,K) bool, nb_id (B,K,d) -> id_emb (B,d). item_tower: (B,...) -> (B,d), (B,d).
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "learner_id": (("item_emb", "text", "image", "image_mask", "valid"), ("hidden",)),
    "learner_text": (("text", "valid"), ("hidden",)),
    "learner_image": (("image", "image_mask", "valid"), ("hidden",)),
    "fusion": (("hidden_id", "hidden_text", "hidden_image", "valid"), ("weights", "query", "bias")),
    "recall": (("item_emb", "text", "image", "image_mask", "valid"), ("weights", "query", "bias")),
    "generator": (
        ("z_text", "z_image", "z_mask", "nb_text", "nb_image", "nb_mask", "nb_id"),
        ("id_emb",),
    ),
    "item_tower": (("text", "image", "image_mask"), ("text_vec", "image_vec")),
    # with the co-occurrence learner (mml/cooc.py): the second fusion layer; fused score of item i =
    # items_concat[i] . query + bias + cooc_weight * (c_i - mean c) / std c, c = the history's
    # co-occurrence scores from tables/cooc.npz (weights (B,4): id, text, image, cooc)
    "recall_cooc": (
        ("item_emb", "text", "image", "image_mask", "valid"),
        ("weights", "query", "bias", "cooc_weight"),
    ),
}
GRAPH_FILES = {role: f"graphs/{role}.onnx" for role in GRAPH_IO}
OPTIONAL_ROLES = ("recall_cooc",)  # only in bundles of models with the co-occurrence learner
SEQUENCE_ROLES = ("learner_id", "learner_text", "learner_image", "fusion", "recall", "recall_cooc")
LENGTH_AXIS = "length"  # the symbolic name of axis 1 in a dynamic-length sequence graph

# tables/items.npz, one row per catalogue row (row = item_idx, row 0 = pad)
TABLE_COLUMNS = (
    "item_id",  # (N+1,) str, "" at row 0
    "is_old",  # (N+1,) bool: rows 1..n_old_items
    "id_emb",  # (N+1, d) f32: trained ID embeddings of old items, generated ones for new items (Eq. 14-17)
    "text_vec",  # (N+1, d) f32: the text learner's projected item vectors
    "image_vec",  # (N+1, d) f32: the image learner's projected item vectors ("missing" vector without poster)
    "text",  # (N+1, text_dim) f32: raw text features
    "image",  # (N+1, image_dim) f32: raw image features (zeros without poster)
    "image_mask",  # (N+1,) bool: has a poster
    "popularity",  # (N+1,) int64: interactions in D_old (popularity fallback)
)


def _neighbour_index(index: Any, item_idx: np.ndarray):
    """A `mml.neighbours.NeighbourIndex` around an already built Faiss index (search is the same code
    path as training's neighbour table)."""
    from mml.neighbours import NeighbourIndex

    class LoadedNeighbourIndex(NeighbourIndex):
        def __init__(self) -> None:  # the index is read from the bundle, not rebuilt from features
            self.item_idx = np.asarray(item_idx, dtype=np.int64)
            self.index = index
            self.text_dim = None

    return LoadedNeighbourIndex()


@dataclass(frozen=True)
class LoadedBundle:
    """Everything a recall replica needs, read-only after loading (ONNX Runtime sessions are
    thread-safe for `run`)."""

    root: Path
    manifest: Manifest
    tables: MappingProxyType  # TABLE_COLUMNS -> np.ndarray (read-only arrays)
    items_concat: np.ndarray  # (N+1, 3d) f32 = [id_emb | text_vec | image_vec]
    row_of: MappingProxyType  # item_id -> catalogue row
    neighbours: Any  # mml.neighbours.NeighbourIndex over old items (Eq. 14)
    sessions: MappingProxyType  # role -> onnxruntime.InferenceSession
    encoders_dir: Path | None  # text.onnx, tokenizer.json, image.onnx, encoders.json (None: not shipped)
    torch_dir: Path | None  # torch/ state_dict + model.json (None: not shipped)
    load_seconds: float = field(default=0.0)
    cooc: Any = None  # mml.cooc.CoocTable of the co-occurrence learner (None: the paper's three learners)

    @property
    def dims(self):
        return self.manifest.dims

    @property
    def model_version(self) -> str:
        return self.manifest.model_version

    def run(self, role: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run one graph by role; returns its outputs by name."""
        if role not in self.sessions:
            raise MMLError(f"bundle {self.root} has no graph '{role}' (has {sorted(self.sessions)})")
        outputs = GRAPH_IO[role][1]
        return dict(zip(outputs, self.sessions[role].run(list(outputs), feeds), strict=True))

    def sequence_length(self, role: str) -> int | None:
        """Axis 1 of a sequence graph's inputs: None when dynamic (any length 1..max_len; pad to a
        short length, the graph pads to max_len inside), max_len for a fixed-length (older) graph."""
        if role not in SEQUENCE_ROLES:
            raise MMLError(f"graph '{role}' takes no sequences")
        if role not in self.sessions:
            raise MMLError(f"bundle {self.root} has no graph '{role}' open (has {sorted(self.sessions)})")
        return _sequence_length(self.sessions[role].get_inputs()[0].shape)


def _read_verified(root: Path, manifest: Manifest, rel: str) -> bytes:
    entries = {f.path: f for f in manifest.files}
    if rel not in entries:
        raise BundleError(f"{root}: the manifest does not list {rel}")
    data = (root / rel).read_bytes()
    if len(data) != entries[rel].bytes or hashlib.sha256(data).hexdigest() != entries[rel].sha256:
        raise BundleError(f"{root}: checksum mismatch for {rel}: the bundle was modified or corrupted")
    return data


def _load_tables(root: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    data = _read_verified(root, manifest, TABLES_FILE)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [c for c in TABLE_COLUMNS if c not in npz.files]
            if missing:
                raise BundleError(f"{root}/{TABLES_FILE}: missing column(s) {', '.join(missing)}")
            tables = {c: npz[c] for c in TABLE_COLUMNS}
    except (OSError, ValueError) as exc:
        raise BundleError(f"{root}/{TABLES_FILE}: unreadable ({exc})") from exc
    dims = manifest.dims
    rows = dims.n_items + 1
    expected = {
        "item_id": ((rows,), "U"),
        "is_old": ((rows,), "b"),
        "id_emb": ((rows, dims.d), "f"),
        "text_vec": ((rows, dims.d), "f"),
        "image_vec": ((rows, dims.d), "f"),
        "text": ((rows, dims.text_dim), "f"),
        "image": ((rows, dims.image_dim), "f"),
        "image_mask": ((rows,), "b"),
        "popularity": ((rows,), "i"),
    }
    for name, (shape, kind) in expected.items():
        array = tables[name]
        if array.shape != shape or array.dtype.kind != kind:
            raise BundleError(
                f"{root}/{TABLES_FILE}: column '{name}' is {array.dtype}{array.shape}, "
                f"the manifest dims say kind '{kind}' {shape}"
            )
    for name in ("id_emb", "text_vec", "image_vec", "text", "image"):
        tables[name] = np.ascontiguousarray(tables[name], dtype=np.float32)
        if not np.isfinite(tables[name]).all():
            raise BundleError(f"{root}/{TABLES_FILE}: column '{name}' has NaN or infinite values")
    is_old = np.zeros(rows, dtype=bool)
    is_old[1 : dims.n_old_items + 1] = True
    if not np.array_equal(tables["is_old"], is_old):
        raise BundleError(f"{root}/{TABLES_FILE}: is_old must mark exactly rows 1..{dims.n_old_items}")
    for array in tables.values():
        array.setflags(write=False)
    return tables


def _load_cooc(root: Path, manifest: Manifest):
    """tables/cooc.npz as a mml.cooc.CoocTable, or None when the bundle has no co-occurrence learner."""
    from mml.cooc import CoocTable

    if COOC_FILE not in {entry.path for entry in manifest.files}:
        return None
    data = _read_verified(root, manifest, COOC_FILE)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            items, weights, window = npz["items"], npz["weights"], int(npz["window"])
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{root}/{COOC_FILE}: unreadable ({exc})") from exc
    rows = manifest.dims.n_items + 1
    if (
        items.ndim != 2
        or items.shape[0] != rows
        or weights.shape != items.shape
        or items.dtype.kind not in "iu"
    ):
        raise BundleError(
            f"{root}/{COOC_FILE}: items/weights must be (N+1={rows}, M), got {items.shape}/{weights.shape}"
        )
    if items.min(initial=0) < 0 or items.max(initial=0) > manifest.dims.n_items:
        raise BundleError(
            f"{root}/{COOC_FILE}: neighbour items must be catalogue rows 0..{manifest.dims.n_items}"
        )
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise BundleError(f"{root}/{COOC_FILE}: weights must be finite and >= 0")
    items = np.ascontiguousarray(items, dtype=np.int64)
    items.setflags(write=False)
    weights.setflags(write=False)
    return CoocTable(items, weights, window)


def _load_index(root: Path, manifest: Manifest):
    import faiss

    data = _read_verified(root, manifest, INDEX_FILE)
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise BundleError(f"{root}/{INDEX_FILE}: Faiss cannot read the index ({exc})") from exc
    dims = manifest.dims
    if index.ntotal != dims.n_old_items or index.d != dims.text_dim + dims.image_dim:
        raise BundleError(
            f"{root}/{INDEX_FILE}: index holds {index.ntotal} vectors of size {index.d}, expected "
            f"{dims.n_old_items} old items of size {dims.text_dim + dims.image_dim}"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"{root}/{INDEX_FILE}: the neighbour index must use the inner product")
    return _neighbour_index(index, np.arange(1, dims.n_old_items + 1))  # Faiss row r = item_idx r+1


def _session(root: Path, manifest: Manifest, role: str, threads: int):
    import onnxruntime as ort

    rel = manifest.graphs[role]
    data = _read_verified(root, manifest, rel)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for invalid graphs
        raise BundleError(f"{root}/{rel}: ONNX Runtime cannot load graph '{role}' ({exc})") from exc
    inputs, outputs = GRAPH_IO[role]
    got_in = tuple(i.name for i in session.get_inputs())
    got_out = tuple(o.name for o in session.get_outputs())
    if sorted(got_in) != sorted(inputs) or sorted(got_out) != sorted(outputs):
        raise BundleError(
            f"{root}/{rel}: graph '{role}' has inputs {list(got_in)} and outputs {list(got_out)}, "
            f"the contract says {list(inputs)} -> {list(outputs)}"
        )
    if role in SEQUENCE_ROLES:
        lengths = {str(_sequence_length(i.shape)) for i in session.get_inputs()}
        if lengths not in ({"None"}, {str(manifest.dims.max_len)}):
            raise BundleError(
                f"{root}/{rel}: graph '{role}' has sequence lengths {sorted(lengths)} on axis 1, the "
                f"contract says '{LENGTH_AXIS}' (dynamic) or max_len={manifest.dims.max_len} on every input"
            )
    return session


def _sequence_length(shape: list) -> int | None:
    """Axis 1 of an ONNX Runtime input shape: an int when fixed, None when symbolic or unnamed."""
    length = shape[1] if len(shape) > 1 else -1
    return length if isinstance(length, int) else None


def load_bundle(
    root: str | Path, intra_op_num_threads: int = 1, roles: tuple[str, ...] | None = None
) -> LoadedBundle:
    """Verify and load a bundle. `roles`: the graphs to open (default: every graph the manifest
    lists); `intra_op_num_threads`: ONNX Runtime threads per graph (1 = one request per core)."""
    import time

    start = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    if intra_op_num_threads < 1:
        raise BundleError(f"intra_op_num_threads must be >= 1, got {intra_op_num_threads}")
    manifest = verify_bundle(root)
    unknown = sorted(set(manifest.graphs) - set(GRAPH_IO))
    if unknown:
        raise BundleError(f"{root}: manifest lists unknown graph role(s) {unknown}")
    roles = tuple(manifest.graphs) if roles is None else roles
    missing = [role for role in roles if role not in manifest.graphs]
    if missing:
        raise BundleError(f"{root}: manifest has no graph(s) {missing}")

    tables = _load_tables(root, manifest)
    items_concat = np.ascontiguousarray(
        np.concatenate([tables["id_emb"], tables["text_vec"], tables["image_vec"]], axis=1)
    )
    items_concat.setflags(write=False)
    row_of = {str(item_id): row for row, item_id in enumerate(tables["item_id"]) if row > 0}
    if len(row_of) != manifest.dims.n_items:
        raise BundleError(f"{root}/{TABLES_FILE}: item ids are not unique")
    neighbours = _load_index(root, manifest)
    cooc = _load_cooc(root, manifest)
    if (cooc is None) != ("recall_cooc" not in manifest.graphs):
        raise BundleError(f"{root}: {COOC_FILE} and the recall_cooc graph come together")

    listed = {f.path for f in manifest.files}
    encoders_dir = None
    if any(path.startswith(ENCODERS_DIR + "/") for path in listed):
        from mml.encoders import ENCODER_FILES, load_spec

        absent = [n for n in ENCODER_FILES if f"{ENCODERS_DIR}/{n}" not in listed]
        if absent:
            raise BundleError(f"{root}/{ENCODERS_DIR}: missing {', '.join(absent)}")
        try:
            load_spec(root / ENCODERS_DIR)
        except MMLError as exc:
            raise BundleError(str(exc)) from exc
        encoders_dir = root / ENCODERS_DIR
    torch_dir = root / TORCH_DIR if {TORCH_STATE, TORCH_CONFIG} <= listed else None

    sessions = {role: _session(root, manifest, role, intra_op_num_threads) for role in roles}
    return LoadedBundle(
        root=root,
        manifest=manifest,
        tables=MappingProxyType(tables),
        items_concat=items_concat,
        row_of=MappingProxyType(row_of),
        neighbours=neighbours,
        sessions=MappingProxyType(sessions),
        encoders_dir=encoders_dir,
        torch_dir=torch_dir,
        load_seconds=time.perf_counter() - start,
        cooc=cooc,
    )
