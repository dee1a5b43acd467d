"""Image bytes -> graph input: the decoding guards and the preprocessing, without any model."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mml.encoders import (
    EncoderSpec,
    ImageLimits,
    InvalidImageError,
    decode_image,
    image_pixels,
    preprocess_image,
)

REPO = Path(__file__).resolve().parents[1]
# real posters when the ML-1M mirror is around (MML_DATA_MIRROR or ../shared/datasets), else a synthetic JPEG
POSTERS = Path(os.environ.get("MML_DATA_MIRROR") or REPO.parent / "shared" / "datasets") / "ml-1m-posters"


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _jpeg() -> bytes:
    poster = POSTERS / "1.jpg"
    if poster.is_file():
        return poster.read_bytes()
    gradient = np.linspace(0, 255, 185 * 278 * 3).reshape(278, 185, 3).astype(np.uint8)
    return _encode(Image.fromarray(gradient), "JPEG")


def test_real_jpeg_decodes_to_rgb():
    image = decode_image(_jpeg())
    assert image.mode == "RGB" and min(image.size) > 0


@pytest.mark.parametrize("data", [b"hello, not an image", b"<html></html>", b"\x00" * 64])
def test_non_image_bytes_rejected(data):
    with pytest.raises(ValueError, match="not a JPEG or PNG image"):
        decode_image(data)


def test_other_formats_rejected():
    gif = _encode(Image.new("RGB", (8, 8), "red"), "GIF")
    with pytest.raises(InvalidImageError, match="not a JPEG or PNG"):
        decode_image(gif)


def test_empty_and_non_bytes_rejected():
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(InvalidImageError, match="must be bytes"):
        decode_image("1.jpg")  # type: ignore[arg-type]


def test_truncated_jpeg_rejected():
    data = _jpeg()
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_rejected_before_decoding():
    # 6000 x 6000 one-bit PNG: a few kB on disk, 36 M pixels declared (limit 25 M)
    bomb = _encode(Image.new("1", (6000, 6000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        decode_image(bomb)


def test_limits_are_configurable():
    data = _jpeg()
    with pytest.raises(InvalidImageError, match="pixels"):
        decode_image(data, ImageLimits(max_pixels=1000))
    with pytest.raises(InvalidImageError, match="bytes"):
        decode_image(data, ImageLimits(max_bytes=100))


def test_modes_become_rgb_and_transparency_becomes_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    image = decode_image(_encode(rgba, "PNG"))
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    grey = decode_image(_encode(Image.new("L", (4, 4), 128), "PNG"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (128, 128, 128)


def test_preprocess_stretches_and_normalises():
    spec = EncoderSpec()
    white = Image.new("RGB", (185, 278), (255, 255, 255))
    pixels = preprocess_image(white, spec)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, 1.0, atol=1e-6)  # (255/255 - 0.5) / 0.5
    black = preprocess_image(Image.new("RGB", (300, 100)), spec)
    np.testing.assert_allclose(black, -1.0, atol=1e-6)
    # channel order is RGB, channels first
    red = preprocess_image(Image.new("RGB", (10, 10), (255, 0, 0)), spec)
    np.testing.assert_allclose(red[:, 0, 0], [1.0, -1.0, -1.0], atol=1e-6)


def test_image_pixels_names_the_failing_image():
    with pytest.raises(InvalidImageError, match="image 3: not a JPEG"):
        image_pixels([_jpeg(), b"junk"], first_index=2)
