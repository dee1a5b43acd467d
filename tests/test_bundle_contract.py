"""The bundle contract: a bundle is verified whole before use; any tampering is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mml.bundle import FORMAT_VERSION, Dims, Manifest, verify_bundle, write_manifest
from mml.errors import BundleError


def _bundle(root: Path) -> Path:
    (root / "graphs").mkdir(parents=True)
    (root / "graphs" / "recall.onnx").write_bytes(b"graph bytes")
    (root / "tables").mkdir()
    (root / "tables" / "items.npz").write_bytes(b"table bytes" * 100)
    manifest = Manifest(
        model_version="test-1",
        dims=Dims(d=64, max_len=50, text_dim=384, image_dim=1280, n_items=10, n_old_items=8, k_neighbours=5),
        graphs={"recall": "graphs/recall.onnx"},
    )
    write_manifest(root, manifest)
    return root


def test_valid_bundle_verifies_and_lists_every_file(tmp_path: Path) -> None:
    manifest = verify_bundle(_bundle(tmp_path))
    assert manifest.format_version == FORMAT_VERSION
    assert {f.path for f in manifest.files} == {"graphs/recall.onnx", "tables/items.npz"}
    assert all(len(f.sha256) == 64 for f in manifest.files)


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    data = bytearray((root / "tables" / "items.npz").read_bytes())
    data[5] ^= 0xFF  # same size, different content
    (root / "tables" / "items.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for tables/items.npz"):
        verify_bundle(root)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "graphs" / "recall.onnx").unlink()
    with pytest.raises(BundleError, match="missing file graphs/recall.onnx"):
        verify_bundle(root)


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, "1", None])
def test_wrong_format_version_is_refused(tmp_path: Path, version: object) -> None:
    root = _bundle(tmp_path)
    raw = json.loads((root / "manifest.json").read_text())
    raw["format_version"] = version
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="format_version"):
        verify_bundle(root)


def test_invalid_manifest_names_the_field(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    raw = json.loads((root / "manifest.json").read_text())
    raw["dims"]["d"] = "sixty-four"
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="dims.d"):
        verify_bundle(root)


def test_path_escaping_the_bundle_is_refused(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    (tmp_path / "outside.bin").write_bytes(b"x")
    raw = json.loads((root / "manifest.json").read_text())
    raw["files"].append({"path": "../outside.bin", "sha256": "0" * 64, "bytes": 1})
    (root / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(root)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle"):
        verify_bundle(tmp_path)
