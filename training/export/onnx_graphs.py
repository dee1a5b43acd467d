"""The ONNX graphs of a bundle: one small `nn.Module` per role of `mml.bundle_loader.GRAPH_IO`,
exported with the TorchScript-based exporter (`dynamo=False`: the dynamo exporter needs onnxscript,
which the project does not install), opset 17, a dynamic batch axis, no external data.

Sequences have a DYNAMIC length axis "length" (1 <= L <= max_len, right-padded, `valid` marks
real positions) in the learner, fusion and recall graphs. The learners only read positions < L
(position embedding `position.weight[:L]`, position-pair weights `w_text[:, :L, :L]`, the causal +
key-padding mask), and pad keys get an exact zero attention weight, so the hidden states of the
first L positions do not depend on how much padding follows; the fusion (model/fusion.py, Eq. 10)
zeroes pad positions and right-pads its input to max_len inside the graph before flatten(F^L), so
`weights`, `query`, `bias` are those of the same history padded to max_len. The service feeds a
few length buckets instead of max_len (service/runtime.py): a history of 8 items costs 8 positions,
not 50. `export_graph` checks this after each export by running the graph at shorter lengths
against the eager module on the max_len-padded inputs. Bundles exported before this (axis 1 fixed
at max_len) still load; the service pads them to max_len. A row with no valid position gives
finite numbers (the attention mask is a large finite negative, model/attention.py), never NaN.

Fusion in closed form (model/fusion.py): Eq. 9 normalises each learner's scores over the catalogue;
with the catalogue's item mean mu_m and covariance C_m per learner baked into the graph as
constants, the fused score is linear in the items: fused = items_concat @ query + bias. The graph
outputs (weights, query, bias); the serving side does one matrix product for the whole catalogue.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from mml.bundle_loader import GRAPH_IO, LENGTH_AXIS, SEQUENCE_ROLES
from model.fusion import N_LEARNERS, Fusion
from model.learners import IDLearner, ImageLearner, TextLearner
from model.mml import MML

OPSET = 17


class IDLearnerGraph(nn.Module):
    """learner_id: Eq. 1-8 on per-position inputs (no catalogue gather inside)."""

    def __init__(self, learner: IDLearner):
        super().__init__()
        self.learner = learner

    def forward(self, item_emb, text, image, image_mask, valid):
        return self.learner.encode(item_emb, text, image, image_mask, valid)


class TextLearnerGraph(nn.Module):
    def __init__(self, learner: TextLearner):
        super().__init__()
        self.learner = learner

    def forward(self, text, valid):
        return self.learner.encode(text, valid)


class ImageLearnerGraph(nn.Module):
    def __init__(self, learner: ImageLearner):
        super().__init__()
        self.learner = learner

    def forward(self, image, image_mask, valid):
        return self.learner.encode(image, image_mask, valid)


class FusionGraph(nn.Module):
    """fusion: Eq. 10-12 weights A, then Eq. 9 + 13 in closed form -> (weights, query, bias)."""

    def __init__(self, fusion: Fusion, means: torch.Tensor, covs: torch.Tensor):
        """means (3, d), covs (3, d, d): catalogue moments of the id, text and image item vectors."""
        super().__init__()
        self.fusion = fusion
        self.register_buffer("means", means.to(torch.float32))
        self.register_buffer("covs", covs.to(torch.float32))

    def forward(self, hidden_id, hidden_text, hidden_image, valid):
        weights = self.fusion.weights(hidden_id, hidden_text, hidden_image, valid)
        users = last_hidden_stacked(torch.stack([hidden_id, hidden_text, hidden_image], dim=1), valid)
        query, bias = closed_form_stacked(self.fusion, users, weights, self.means, self.covs)
        return weights, query, bias


def last_hidden_stacked(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`model.learners.last_hidden` of the three learners at once, as a one-hot sum over positions
    (exact: one term is the value, the others are zeros): (B, 3, L, d), (B, L) -> (B, 3, d). The
    gather + squeeze of last_hidden exports to a Shape/Expand/If chain per learner at a dynamic L."""
    last = (valid.sum(dim=-1) - 1).clamp(min=0)  # (B,); position 0 for an all-pad row, as last_hidden
    pick = torch.arange(valid.shape[-1], device=valid.device) == last.unsqueeze(-1)  # (B, L)
    return (hidden * pick[:, None, :, None].to(hidden.dtype)).sum(dim=2)


def closed_form_stacked(
    fusion: Fusion, users: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.fusion.closed_form` with the three learners batched on one axis (a handful of graph
    nodes instead of three copies): users (B, 3, d), weights (B, 3), means (3, d), covs (3, d, d) ->
    query (B, 3d) [id | text | image], bias (B,). Same maths; float32 rounding differs by ~1e-7."""
    mu = (users * means).sum(dim=-1)  # (B, 3)
    spread = torch.matmul(users.transpose(0, 1), covs).transpose(0, 1)  # h_m^T C_m, (B, 3, d)
    var = (spread * users).sum(dim=-1).clamp(min=0.0)
    scale = weights * fusion.score_weight / torch.sqrt(var + fusion.cfg.ln_eps)  # (B, 3)
    query = (scale.unsqueeze(-1) * users).reshape(-1, N_LEARNERS * fusion.cfg.d)
    bias = (weights * fusion.score_bias - scale * mu).sum(dim=-1)
    return query, bias


class FusionCoocGraph(FusionGraph):
    """The second fusion layer (with the co-occurrence learner): its three dense weights in closed
    form as FusionGraph, plus cooc_weight = A_c * gamma_c, the co-occurrence term's scale."""

    def forward(self, hidden_id, hidden_text, hidden_image, valid):
        weights = self.fusion.weights(hidden_id, hidden_text, hidden_image, valid)  # (B, 4)
        users = last_hidden_stacked(torch.stack([hidden_id, hidden_text, hidden_image], dim=1), valid)
        query, bias = closed_form_stacked(self.fusion, users, weights[:, :N_LEARNERS], self.means, self.covs)
        return weights, query, bias, weights[:, N_LEARNERS] * self.fusion.cooc_gamma()


class RecallGraph(nn.Module):
    """recall: the three learners and the fusion in one graph (the serving fast path)."""

    def __init__(self, model: MML, fusion: FusionGraph):
        super().__init__()
        self.id_learner = model.id_learner
        self.text_learner = model.text_learner
        self.image_learner = model.image_learner
        self.fusion = fusion

    def forward(self, item_emb, text, image, image_mask, valid):
        hidden_id = self.id_learner.encode(item_emb, text, image, image_mask, valid)
        hidden_text = self.text_learner.encode(text, valid)
        hidden_image = self.image_learner.encode(image, image_mask, valid)
        return self.fusion(hidden_id, hidden_text, hidden_image, valid)


class GeneratorGraph(nn.Module):
    """generator: Eq. 15-17 from raw features of an item and of its K neighbours (searched outside)."""

    def __init__(self, model: MML):
        super().__init__()
        self.generator = model.generator

    def forward(self, z_text, z_image, z_mask, nb_text, nb_image, nb_mask, nb_id):
        return self.generator(z_text, z_image, z_mask, nb_text, nb_image, nb_mask, nb_id)


class ItemTowerGraph(nn.Module):
    """item_tower: raw features -> the text and image learners' item vectors (a new item's row of
    items_concat besides its generated ID embedding)."""

    def __init__(self, model: MML):
        super().__init__()
        self.text_learner = model.text_learner
        self.image_learner = model.image_learner

    def forward(self, text, image, image_mask):
        return self.text_learner.item_vectors(text), self.image_learner.item_vectors(image, image_mask)


def graph_modules(model: MML, means: torch.Tensor, covs: torch.Tensor) -> dict[str, nn.Module]:
    """role -> module, all in eval mode, sharing the model's parameters."""
    fusion = FusionGraph(model.fusion, means, covs)
    modules = {
        "learner_id": IDLearnerGraph(model.id_learner),
        "learner_text": TextLearnerGraph(model.text_learner),
        "learner_image": ImageLearnerGraph(model.image_learner),
        "fusion": fusion,
        "recall": RecallGraph(model, fusion),
        "generator": GeneratorGraph(model),
        "item_tower": ItemTowerGraph(model),
    }
    if model.has_cooc:
        modules["recall_cooc"] = RecallGraph(model, FusionCoocGraph(model.fusion_cooc, means, covs))
    return {role: module.eval() for role, module in modules.items()}


@torch.no_grad()
def example_inputs(model: MML, batch: int = 2) -> dict[str, dict[str, torch.Tensor]]:
    """role -> inputs by name, shaped as the contract says, built from the model's catalogue (rows
    1..batch, one full row and one of length 1 so masks are not constant)."""
    cfg = model.cfg
    length = cfg.max_len
    seq = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        n = length if b == 0 else 1
        seq[b, :n] = (torch.arange(n) + b) % model.n_items + 1
    valid = seq > 0
    hidden = model.hidden(seq)
    rows = torch.arange(1, batch + 1)
    nb = model.neighbours[rows]
    sequence = {
        "item_emb": model.item_emb.weight[seq],
        "text": model.text[seq],
        "image": model.image[seq],
        "image_mask": model.image_mask[seq],
        "valid": valid,
    }
    inputs = {
        "learner_id": sequence,
        "learner_text": {"text": sequence["text"], "valid": valid},
        "learner_image": {"image": sequence["image"], "image_mask": sequence["image_mask"], "valid": valid},
        "fusion": {
            "hidden_id": hidden["id"],
            "hidden_text": hidden["text"],
            "hidden_image": hidden["image"],
            "valid": valid,
        },
        "recall": sequence,
        "recall_cooc": sequence,
        "generator": {
            "z_text": model.text[rows],
            "z_image": model.image[rows],
            "z_mask": model.image_mask[rows],
            "nb_text": model.text[nb],
            "nb_image": model.image[nb],
            "nb_mask": model.image_mask[nb],
            "nb_id": model.item_emb.weight[nb],
        },
        "item_tower": {
            "text": model.text[rows],
            "image": model.image[rows],
            "image_mask": model.image_mask[rows],
        },
    }
    roles = [role for role in GRAPH_IO if role != "recall_cooc" or model.has_cooc]
    return {role: {name: inputs[role][name] for name in GRAPH_IO[role][0]} for role in roles}


def export_graph(
    module: nn.Module,
    role: str,
    inputs: dict[str, torch.Tensor],
    path: Path,
    doc: str,
    dynamic_length: bool = True,
) -> None:
    """Export one role to `path` (a single self-contained .onnx file), run the ONNX checker and, for a
    sequence role, `check_length_axis`. `dynamic_length=False` fixes the length axis at the inputs'
    length (the format of bundles exported before dynamic lengths; tests use it)."""
    names_in, names_out = GRAPH_IO[role]
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter warns that it is deprecated and about traced shape arithmetic;
        # the parity check after export is what tells whether a graph is right
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs[name] for name in names_in),
            str(path),
            input_names=list(names_in),
            output_names=list(names_out),
            dynamic_axes=dynamic_axes(role, dynamic_length),
            opset_version=OPSET,
            dynamo=False,
            external_data=False,
            do_constant_folding=True,
        )
    module.eval()  # the exporter restores the wrapper's mode recursively: keep every submodule in eval
    graph = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(graph)
    graph.doc_string = doc
    onnx.helper.set_model_props(graph, {"role": role})
    onnx.save(graph, str(path))
    if dynamic_length and role in SEQUENCE_ROLES:
        check_length_axis(module, role, inputs, path)


def dynamic_axes(role: str, dynamic_length: bool = True) -> dict[str, dict[int, str]]:
    """Axis 0 (batch) of every input and output; axis 1 (length) of every input of a sequence role
    and of its per-position output `hidden`."""
    names_in, names_out = GRAPH_IO[role]
    axes = {name: {0: "batch"} for name in (*names_in, *names_out)}
    if dynamic_length and role in SEQUENCE_ROLES:
        for name in (*names_in, *(n for n in names_out if n == "hidden")):
            axes[name][1] = LENGTH_AXIS
    return axes


def truncate(inputs: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Sequence inputs cut to their first `length` positions (axis 1)."""
    return {name: value[:, :length] for name, value in inputs.items()}


def mask_beyond(inputs: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The same inputs at full length with positions >= `length` turned into pads (valid False,
    zero vectors): what a history of at most `length` items looks like padded to max_len."""
    out = {}
    for name, value in inputs.items():
        value = value.clone()
        value[:, length:] = False if value.dtype == torch.bool else 0
        out[name] = value
    return out


LENGTH_CHECK_ATOL = 1e-5  # ONNX Runtime at a short length vs eager padded to max_len (float32)


def check_length_axis(module: nn.Module, role: str, inputs: dict[str, torch.Tensor], path: Path) -> None:
    """The exported graph run at shorter lengths (ONNX Runtime) must give the eager module's outputs
    on the same histories padded to max_len (hidden states: the first `length` positions). Raises
    ValueError if the length axis was traced into a constant or padding changes the outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    full = int(inputs["valid"].shape[1])
    for length in sorted({1, max(1, full // 3), full}):
        short = truncate(inputs, length)
        got = session.run(list(GRAPH_IO[role][1]), {k: v.numpy() for k, v in short.items()})
        expected = run_torch(module, role, mask_beyond(inputs, length))
        for name, value in zip(GRAPH_IO[role][1], got, strict=True):
            reference = expected[name][:, :length] if name == "hidden" else expected[name]
            error = float(np.abs(value - reference).max()) / max(1.0, float(np.abs(reference).max()))
            if value.shape != reference.shape or not error <= LENGTH_CHECK_ATOL:
                raise ValueError(
                    f"graph '{role}' at length {length}: output '{name}' {value.shape} differs from "
                    f"eager padded to max_len {reference.shape} by {error:.2e}"
                )


def run_torch(module: nn.Module, role: str, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The eager reference of a graph on the same inputs, as numpy by output name."""
    module.eval()
    with torch.inference_mode():
        out = module(*(inputs[name] for name in GRAPH_IO[role][0]))
    out = out if isinstance(out, tuple) else (out,)
    return {name: value.numpy() for name, value in zip(GRAPH_IO[role][1], out, strict=True)}
