"""Build a serving bundle (layout: mml/bundle.py, names: mml/bundle_loader.py) from a model.

`export_model` works on an in-memory `MML` (tests export an untrained model in seconds);
`export_bundle` loads a trained run and its prepared split, then calls it. Steps of `export_model`:

1. A serving copy of the model: eval mode, new items' ID rows generated (tables.serving_model).
2. Item tables, the fusion's catalogue moments, the model version (default: UTC date + a short
   sha256 of every weight), all before anything is written.
3. Everything is written into a hidden staging folder next to `out`: tables, Faiss index, the seven
   ONNX graphs, torch/ (state_dict + config for warm-up with gradients), the encoders.
4. Parity check: every graph in ONNX Runtime against the eager module, and the fused scores of the
   bundle (items_concat @ query + bias) against `MML.scores`, on a batch with a full row, a short
   row and an all-pad row. A mismatch aborts the export.
5. manifest.json (sha256 of every file), then one rename puts the bundle in place. A failure at any
   step removes the staging folder: `out` is either the complete new bundle or untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mml.bundle import Dims, Manifest, write_manifest
from mml.bundle_loader import (
    COOC_FILE,
    ENCODERS_DIR,
    GRAPH_FILES,
    GRAPH_IO,
    INDEX_FILE,
    OPTIONAL_ROLES,
    TABLES_FILE,
    TORCH_CONFIG,
    TORCH_STATE,
    load_bundle,
)
from mml.encoders import ENCODER_FILES
from mml.errors import DataError, MMLError
from model.from_bundle import FEATURE_BUFFERS
from model.mml import MML
from training.export.onnx_graphs import example_inputs, export_graph, graph_modules, run_torch
from training.export.tables import (
    fusion_moments,
    item_tables,
    item_vectors,
    serving_model,
    write_index,
    write_tables,
)

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # safe as a folder name
# ONNX Runtime vs eager on every output and the fused scores: max abs error over max(1, max |value|)
# (float32 rounding grows with the scores' magnitude; the tests check 1e-4 absolute on ML-1M)
PARITY_RTOL = 1e-4
GRAPH_DOCS = {
    "learner_id": "MML ID learner, paper Eq. 1-8: right-padded sequence -> last-layer hidden states",
    "learner_text": "MML text learner, Sec. 4.2.2: right-padded sequence -> last-layer hidden states",
    "learner_image": "MML image learner, Sec. 4.2.2: right-padded sequence -> last-layer hidden states",
    "fusion": "MML fusion, Eq. 9-13 in closed form: fused score = items_concat @ query + bias",
    "recall": "MML learners + fusion: right-padded sequence -> fusion weights, query, bias",
    "generator": "MML cold-start item ID embedding generator, Eq. 15-17 (neighbours of Eq. 14 given)",
    "item_tower": "MML text and image item vectors of raw item features",
    "recall_cooc": "MML learners + the fusion with the co-occurrence learner: weights, query, bias, cooc_weight",
}


def bundle_roles(model: MML) -> list[str]:
    """The graph roles a model's bundle holds (recall_cooc only with the co-occurrence learner)."""
    return [role for role in GRAPH_IO if role not in OPTIONAL_ROLES or model.has_cooc]


def weights_hash(model: MML) -> str:
    """sha256 over every parameter and buffer of the model (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.cpu().contiguous().numpy()  # state_dict tensors carry no autograd history
        digest.update(f"{name}:{array.dtype}:{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def default_model_version(model: MML, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d}-{weights_hash(model)[:8]}"


def _check_version(version: str) -> str:
    if not VERSION_PATTERN.match(version):
        raise MMLError(
            f"model version {version!r} must be 1-64 characters of letters, digits, '.', '_' or '-' "
            "(it names the bundle folder)"
        )
    return version


def _parity_batch(model: MML) -> torch.Tensor:
    """(3, L) sequences: the most recent max_len of the catalogue's last rows (old and new items),
    one of length 1, one all-pad."""
    length = model.cfg.max_len
    seq = torch.zeros(3, length, dtype=torch.long)
    tail = torch.arange(max(1, model.n_items - length + 1), model.n_items + 1)
    seq[0, : len(tail)] = tail
    seq[1, 0] = 1
    return seq


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def _learner_inputs(model: MML, seq: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "item_emb": model.item_emb.weight[seq],
        "text": model.text[seq],
        "image": model.image[seq],
        "image_mask": model.image_mask[seq],
        "valid": seq > 0,
    }


@torch.no_grad()
def check_parity(model: MML, bundle_dir: Path, rtol: float = PARITY_RTOL) -> dict[str, float]:
    """ONNX Runtime (through `load_bundle`) against the eager serving model; returns output -> max
    abs error / max(1, max |eager value|) and raises MMLError above `rtol` or on any NaN."""
    bundle = load_bundle(bundle_dir)
    modules = graph_modules(model, *fusion_moments(item_vectors(model)))
    seq = _parity_batch(model)
    sequence = _learner_inputs(model, seq)
    hidden = model.hidden(seq)
    rows = torch.arange(1, 4) % model.n_items + 1
    rows[-1] = model.n_items  # a new item when the catalogue has one
    nb = model.neighbours[rows]
    feeds = {
        "learner_id": sequence,
        "learner_text": sequence,
        "learner_image": sequence,
        "recall": sequence,
        "recall_cooc": sequence,
        "fusion": {"hidden_id": hidden["id"], "hidden_text": hidden["text"], "hidden_image": hidden["image"], "valid": seq > 0},
        "generator": {
            "z_text": model.text[rows], "z_image": model.image[rows], "z_mask": model.image_mask[rows],
            "nb_text": model.text[nb], "nb_image": model.image[nb], "nb_mask": model.image_mask[nb],
            "nb_id": model.item_emb.weight[nb],
        },
        "item_tower": {"text": model.text[rows], "image": model.image[rows], "image_mask": model.image_mask[rows]},
    }  # fmt: skip
    errors: dict[str, float] = {}  # max abs error relative to max(1, max |eager value|)
    for role in bundle_roles(model):
        inputs = {name: feeds[role][name] for name in GRAPH_IO[role][0]}
        expected = run_torch(modules[role], role, inputs)
        got = bundle.run(role, **{name: value.numpy() for name, value in inputs.items()})
        for name, value in got.items():
            if not np.isfinite(value).all():
                raise MMLError(f"export parity: graph '{role}' output '{name}' has NaN or infinite values")
            errors[f"{role}.{name}"] = _relative_error(value, expected[name])
    out = bundle.run("recall", **{k: v.numpy() for k, v in sequence.items()})
    fused = (bundle.items_concat[1:] @ out["query"].T + out["bias"]).T  # (B, N)
    eager, _ = model.scores(seq)
    errors["fused_scores"] = _relative_error(fused, eager[:, 1:].numpy())
    if model.has_cooc:  # the served co-occurrence fusion: dense closed form + the sparse cooc term
        from mml.cooc import fused_cooc, sparse_scores

        out = bundle.run("recall_cooc", **{k: v.numpy() for k, v in sequence.items()})
        served = (bundle.items_concat[1:] @ out["query"].T + out["bias"]).T
        for b, history in enumerate(seq.numpy()):
            items, values = sparse_scores(bundle.cooc, history)
            bonus, shift = fused_cooc(values, float(out["cooc_weight"][b]), model.n_items, model.cfg.ln_eps)
            served[b] += shift
            served[b, items - 1] += bonus
        eager_cooc, _ = model.fuse(model.hidden(seq), seq > 0, cooc=model.cooc_scores(seq))
        errors["fused_cooc_scores"] = _relative_error(served, eager_cooc[:, 1:].numpy())
    worst = max(errors, key=errors.get)
    if not errors[worst] <= rtol:  # also catches NaN
        raise MMLError(
            f"export parity: {worst} differs from eager PyTorch by {errors[worst]:.2e} > {rtol:.0e} "
            "(relative to max(1, |value|))"
        )
    return errors


def _write_torch(model: MML, root: Path, warmup: dict[str, Any] | None) -> None:
    """torch/state_dict.pt (weights + neighbour table; features are in the tables) and model.json."""
    state = {k: v for k, v in model.state_dict().items() if k not in FEATURE_BUFFERS}
    (root / TORCH_STATE).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, root / TORCH_STATE)
    config = {
        "model": model.cfg.model_dump(mode="json"),
        "n_old_items": model.n_old_items,
        "n_items": model.n_items,
        "feature_buffers_from_tables": list(FEATURE_BUFFERS),
        "warmup": warmup or {},
    }
    (root / TORCH_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def export_model(
    model: MML,
    out_dir: str | Path,
    *,
    item_ids: np.ndarray,
    popularity: np.ndarray,
    encoders_dir: str | Path | None = None,
    dataset: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    warmup: dict[str, Any] | None = None,
    model_version: str | None = None,
    overwrite: bool = False,
    check: bool = True,
    cooc_window: int | None = None,
) -> Manifest:
    """Export an in-memory model to a bundle at `out_dir`.

    item_ids (N+1,) str with '' at row 0; popularity (N+1,) interactions in D_old; encoders_dir: the
    features stage's DIR/encoders (None: the bundle ships no encoders, e.g. a unit test);
    dataset / training: recorded in the manifest; warmup: the warm-up settings recorded in torch/;
    cooc_window: the co-occurrence window the table was built with (recorded in tables/cooc.npz).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MMLError(f"{out} exists: bundles are immutable; pass another --out or overwrite it explicitly")
    if encoders_dir is not None:
        encoders_dir = Path(encoders_dir)
        absent = [name for name in ENCODER_FILES if not (encoders_dir / name).is_file()]
        if absent:
            raise DataError(f"{encoders_dir} lacks {', '.join(absent)} (run `mml data features`)")

    served = serving_model(model)
    vectors = item_vectors(served)
    means, covs = fusion_moments(vectors)
    tables = item_tables(served, item_ids, popularity, vectors)
    version = _check_version(model_version or default_model_version(served))
    cfg = served.cfg
    manifest = Manifest(
        model_version=version,
        dataset=dataset or {},
        dims=Dims(
            d=cfg.d,
            max_len=cfg.max_len,
            text_dim=cfg.text_dim,
            image_dim=cfg.image_dim,
            n_items=served.n_items,
            n_old_items=served.n_old_items,
            k_neighbours=cfg.n_neighbours,
        ),
        training=training or {},
        graphs={role: GRAPH_FILES[role] for role in bundle_roles(served)},
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write_tables(staging / TABLES_FILE, tables)
        write_index(staging / INDEX_FILE, served)
        modules = graph_modules(served, means, covs)
        examples = example_inputs(served)
        for role in bundle_roles(served):
            export_graph(modules[role], role, examples[role], staging / GRAPH_FILES[role], GRAPH_DOCS[role])
        if served.has_cooc:
            with open(staging / COOC_FILE, "wb") as fh:
                np.savez(
                    fh,
                    items=served.cooc_items.numpy().astype(np.int32),
                    weights=served.cooc_weights.numpy(),
                    window=np.int64(cooc_window or 0),
                )
        _write_torch(served, staging, warmup)
        if encoders_dir is not None:
            (staging / ENCODERS_DIR).mkdir()
            for name in ENCODER_FILES:
                shutil.copyfile(encoders_dir / name, staging / ENCODERS_DIR / name)
        manifest = write_manifest(staging, manifest)
        if check:
            check_parity(served, staging)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to `out` (an existing `out` is moved aside first, then
    deleted once the new bundle is in place)."""
    if not out.exists():
        staging.rename(out)
        return
    aside = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    out.rename(aside)
    try:
        staging.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
