"""Torch-free runtime of the pretrained item encoders (docs/features.md).

The features stage (`mml data features`) exports two ONNX graphs next to the item features, in
`DIR/encoders/`: all-MiniLM-L6-v2 for item text and EfficientNet-Lite0 for posters. This module runs
them with onnxruntime + `tokenizers` + Pillow + numpy, so the recall service can encode a brand-new
item exactly as training did. The features stage itself encodes the catalogue through this module,
so there is one preprocessing path: `item_text` builds the text, `decode_image` + `preprocess_image`
turn image bytes into the graph input.

    TextEncoder(dir).encode(["Toy Story (1995) | Animation, Children's, Comedy"])  # (1, 384)
    ImageEncoder(dir).encode([jpeg_bytes])                                         # (1, 1280)

Both return float32 rows with L2 norm 1 (the normalisation is inside the graphs).
onnxruntime, tokenizers and Pillow are imported when first needed, so `item_text` and
`EncoderSpec` work with numpy and pydantic alone.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mml.errors import MMLError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

TEXT_ONNX = "text.onnx"
TOKENIZER_JSON = "tokenizer.json"
IMAGE_ONNX = "image.onnx"
ENCODERS_JSON = "encoders.json"
ENCODER_FILES = (TEXT_ONNX, TOKENIZER_JSON, IMAGE_ONNX, ENCODERS_JSON)
ENCODERS_FORMAT_VERSION = 1


class EncoderSpec(BaseModel):
    """What both encoders expect and produce; written as DIR/encoders/encoders.json.
    The paper uses BERT and ResNet (Sec. 4.2.1); this reimplementation uses smaller pretrained
    encoders that install offline from PyPI (docs/features.md explains the choice)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = ENCODERS_FORMAT_VERSION
    # text: sentence-transformers all-MiniLM-L6-v2, mean pooling over non-pad tokens, then L2 norm
    text_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    text_dim: int = 384
    max_tokens: int = Field(
        256, ge=2
    )  # the model's sentence-transformers max_seq_length; longer input is cut
    pad_token: str = "[PAD]"
    pad_id: int = 0
    text_inputs: tuple[str, ...] = ("input_ids", "attention_mask")  # int64 (B, L); token_type_ids = 0 inside
    # image: EfficientNet-Lite0 (ImageNet), global average pool of the 1280-channel head, then L2 norm
    image_model: str = "efficientnet-lite0"
    image_dim: int = 1280
    image_size: int = Field(224, ge=16)  # EfficientNet-Lite0's training resolution
    # "stretch": the whole image is resized to image_size x image_size, aspect ratio not kept (a
    # 185x278 poster keeps its title and artwork; a centre crop would cut a third of its height)
    resize: Literal["stretch"] = "stretch"
    resample: Literal["bicubic"] = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # pixel = (x / 255 - mean) / std, per RGB channel
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_input: str = "pixels"  # float32 (B, 3, image_size, image_size), already normalised
    output: str = "embedding"  # float32 (B, dim), L2-normalised, in both graphs


class ImageLimits(BaseModel):
    """Guards for untrusted image bytes (the service encodes uploaded posters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(20 * 1024 * 1024, ge=1)  # encoded size
    max_pixels: int = Field(25_000_000, ge=1)  # width * height, checked before decoding (decompression bombs)
    formats: tuple[str, ...] = ("JPEG", "PNG")  # Pillow format names accepted


class InvalidImageError(ValueError):
    """Bytes that are not an acceptable image (not JPEG/PNG, corrupt, too large, a decompression bomb)."""


# ---------------------------------------------------------------------------------------- text


def _year(year: object) -> int | None:
    if year is None:
        return None
    try:
        if year != year:  # NaN
            return None
    except TypeError:  # pandas.NA: its comparisons are ambiguous
        return None
    try:
        value = int(year)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"year must be an integer or missing, got {year!r}") from exc
    if value != year and not (isinstance(year, str) and year.strip() == str(value)):
        raise ValueError(f"year must be an integer or missing, got {year!r}")
    return value


def _clean(value: str) -> str:
    return " ".join(value.split())


def item_text(
    title: str,
    year: int | None,
    genres: str | Sequence[str] | None,
    description: str | None = None,
) -> str:
    """The text encoder's input for one item: "title (year) | genre, genre [| description]".

    `genres` is a "|"-separated string (the generic items table) or a list; genres are joined with
    ", " so the encoder reads words, not separators. A missing year, empty genres or an empty
    description leave their part out. Whitespace runs become one space.

    >>> item_text("Toy Story", 1995, "Animation|Children's|Comedy")
    "Toy Story (1995) | Animation, Children's, Comedy"
    """
    if not isinstance(title, str) or not _clean(title):
        raise ValueError(f"title must be a non-empty string, got {title!r}")
    head = _clean(title)
    value = _year(year)
    if value is not None:
        head = f"{head} ({value})"
    parts = [head]
    if genres is not None and not (isinstance(genres, float) and math.isnan(genres)):
        if isinstance(genres, str):
            genre_list = genres.split("|")
        elif isinstance(genres, Sequence):
            genre_list = list(genres)
        else:
            raise ValueError(f"genres must be a '|'-separated string or a list of strings, got {genres!r}")
        cleaned = [_clean(str(g)) for g in genre_list]
        if any(cleaned):
            parts.append(", ".join(g for g in cleaned if g))
    if description is not None and not (isinstance(description, float) and math.isnan(description)):
        if not isinstance(description, str):
            raise ValueError(f"description must be a string, got {description!r}")
        if _clean(description):
            parts.append(_clean(description))
    return " | ".join(parts)


# --------------------------------------------------------------------------------------- image


def decode_image(data: bytes, limits: ImageLimits | None = None) -> PILImage:
    """Decode JPEG/PNG bytes into an RGB Pillow image, refusing anything else with InvalidImageError.

    The pixel count is checked from the header before the pixels are decoded, so a small file that
    declares a huge image (a decompression bomb) is refused without allocating it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    limits = limits or ImageLimits()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidImageError(f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidImageError(f"image is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(limits.formats))
        except UnidentifiedImageError as exc:
            raise InvalidImageError(f"not a {' or '.join(limits.formats)} image") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidImageError(f"image refused as a decompression bomb: {exc}") from exc
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidImageError(f"image has no pixels ({width}x{height})")
        if width * height > limits.max_pixels:
            raise InvalidImageError(
                f"image is {width}x{height} = {width * height} pixels, more than the limit of "
                f"{limits.max_pixels} (decompression bomb guard)"
            )
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidImageError(f"corrupt or truncated {image.format} image: {exc}") from exc
    image = ImageOps.exif_transpose(image)  # phone photos: honour the orientation tag
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent areas -> white
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def preprocess_image(image: PILImage, spec: EncoderSpec | None = None) -> np.ndarray:
    """RGB image -> float32 (3, S, S): stretch-resize to S x S (bicubic), then (x / 255 - mean) / std."""
    from PIL import Image

    spec = spec or EncoderSpec()
    if image.mode != "RGB":
        raise ValueError(f"preprocess_image expects an RGB image, got mode {image.mode}")
    size = (spec.image_size, spec.image_size)
    resized = image.resize(size, Image.Resampling.BICUBIC) if image.size != size else image
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def image_pixels(
    images: Sequence[bytes],
    spec: EncoderSpec | None = None,
    limits: ImageLimits | None = None,
    first_index: int = 0,
) -> np.ndarray:
    """Image bytes -> the image graph's input, float32 (B, 3, S, S). An error names the failing
    image by its position, counted from `first_index`."""
    spec = spec or EncoderSpec()
    out = np.empty((len(images), 3, spec.image_size, spec.image_size), dtype=np.float32)
    for i, data in enumerate(images):
        try:
            out[i] = preprocess_image(decode_image(data, limits), spec)
        except InvalidImageError as exc:
            raise InvalidImageError(f"image {first_index + i}: {exc}") from exc
    return out


# ------------------------------------------------------------------------------------ runtimes


def load_spec(directory: str | Path) -> EncoderSpec:
    """Read and check DIR/encoders.json and that the encoder files are there."""
    directory = Path(directory)
    missing = [name for name in ENCODER_FILES if not (directory / name).is_file()]
    if missing:
        raise MMLError(f"encoders directory {directory} lacks {', '.join(missing)} (run `mml data features`)")
    try:
        spec = EncoderSpec.model_validate(json.loads((directory / ENCODERS_JSON).read_text()))
    except (ValueError, TypeError) as exc:
        raise MMLError(f"{directory / ENCODERS_JSON} is not a valid encoder spec: {exc}") from exc
    if spec.format_version != ENCODERS_FORMAT_VERSION:
        raise MMLError(
            f"{directory / ENCODERS_JSON} has format_version {spec.format_version}, "
            f"this code reads {ENCODERS_FORMAT_VERSION}"
        )
    return spec


def _session(path: Path, threads: int | None, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:  # idle threads sleep instead of busy-waiting: better on a shared, busy CPU
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_output(session, path: Path, dim: int) -> None:
    shape = session.get_outputs()[0].shape
    if not shape or shape[-1] != dim:
        raise MMLError(f"{path} outputs shape {shape}, expected (batch, {dim})")


class TextEncoder:
    """all-MiniLM-L6-v2 on onnxruntime. `encode(texts)` -> float32 (B, 384), rows of norm 1."""

    def __init__(
        self, directory: str | Path, threads: int | None = None, batch_size: int = 64, spinning: bool = True
    ):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.spec = load_spec(directory)
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_JSON))
        self.tokenizer.enable_truncation(max_length=self.spec.max_tokens)
        # no fixed length: each batch is padded to its longest text
        self.tokenizer.enable_padding(pad_id=self.spec.pad_id, pad_token=self.spec.pad_token)
        self.session = _session(directory / TEXT_ONNX, threads, spinning)
        _check_output(self.session, directory / TEXT_ONNX, self.spec.text_dim)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch: input_ids and attention_mask, int64 (B, L)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        }

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(text).__name__}")
        out = np.empty((len(texts), self.spec.text_dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = texts[start : start + self.batch_size]
            out[start : start + len(batch)] = self.session.run([self.spec.output], self.tokenize(batch))[0]
        return out


class ImageEncoder:
    """EfficientNet-Lite0 on onnxruntime. `encode(images)` takes JPEG/PNG bytes -> float32 (B, 1280),
    rows of norm 1; bytes that are not an acceptable image raise InvalidImageError (a ValueError)."""

    def __init__(
        self,
        directory: str | Path,
        threads: int | None = None,
        batch_size: int = 64,
        limits: ImageLimits | None = None,
        spinning: bool = True,
    ):
        directory = Path(directory)
        self.spec = load_spec(directory)
        self.batch_size = batch_size
        self.limits = limits or ImageLimits()
        self.session = _session(directory / IMAGE_ONNX, threads, spinning)
        _check_output(self.session, directory / IMAGE_ONNX, self.spec.image_dim)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Already preprocessed input, float32 (B, 3, S, S) -> (B, 1280)."""
        size = self.spec.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixels must have shape (B, 3, {size}, {size}), got {pixels.shape}")
        feed = {self.spec.image_input: np.ascontiguousarray(pixels, dtype=np.float32)}
        return self.session.run([self.spec.output], feed)[0]

    def encode(self, images: Sequence[bytes]) -> np.ndarray:
        if isinstance(images, bytes | bytearray):
            raise ValueError("images must be a list of image bytes, not one bytes object")
        out = np.empty((len(images), self.spec.image_dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = image_pixels(batch, self.spec, self.limits, first_index=start)
            out[start : start + len(batch)] = self.encode_pixels(pixels)
        return out
