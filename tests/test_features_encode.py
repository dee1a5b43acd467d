"""The features stage on a small real catalogue: ~55 ML-1M films (titles from movies.dat, real
posters from the mirror, two films without a poster). One module-scoped run of `compute_features`
exports both encoders; the tests then check the outputs, the ONNX graphs against torch, that the
vectors mean something, the mask, the cache, and the error paths."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from PIL import Image

from mml.encoders import (
    ENCODER_FILES,
    EncoderSpec,
    ImageEncoder,
    TextEncoder,
    image_pixels,
    item_text,
    load_spec,
)
from mml.errors import DataError
from training.features import load_features
from training.features.config import FeaturesConfig
from training.features.encode import (
    Items,
    compute_features,
    encode_items,
    hash_inputs,
    read_items,
    run_features,
)

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("MML_DATA_MIRROR") or REPO.parent / "shared" / "datasets")
STAR_WARS = ("260", "1196", "1210")  # Episodes IV (1977), V (1980), VI (1983)
UNRELATED = "17"  # Sense and Sensibility (1995), among films 1..48
NO_POSTER = ("770", "1107")  # two of the 11 ML-1M films without a poster


def _movies() -> dict[str, tuple[str, int, str]]:
    movies = {}
    for line in (MIRROR / "ml-1m" / "movies.dat").read_text(encoding="latin-1").splitlines():
        movie_id, title_year, genres = line.split("::")
        title, year = re.fullmatch(r"(.*?)\s*\((\d{4})\)", title_year).groups()
        movies[movie_id] = (title, int(year), genres)
    return movies


@pytest.fixture(scope="module")
def movies() -> dict[str, tuple[str, int, str]]:
    if not (MIRROR / "ml-1m" / "movies.dat").is_file():
        pytest.skip(f"ML-1M mirror not found at {MIRROR} (set MML_DATA_MIRROR)")
    return _movies()


def _write_items(directory: Path, movies: dict, ids: list[str]) -> pd.DataFrame:
    rows = []
    for idx, movie_id in enumerate(ids, 1):
        title, year, genres = movies[movie_id]
        poster = MIRROR / "ml-1m-posters" / f"{movie_id}.jpg"
        rows.append(
            {
                "item_idx": idx,
                "item_id": movie_id,
                "title": title,
                "year": year,
                "genres": genres,
                "text": item_text(title, year, genres),
                "image_path": str(poster) if poster.is_file() else None,
                "is_old": True,
            }
        )
    table = pd.DataFrame(rows)
    directory.mkdir(parents=True, exist_ok=True)
    table.to_parquet(directory / "items.parquet")
    return table


@pytest.fixture(scope="module")
def small(tmp_path_factory, movies) -> tuple[Path, pd.DataFrame]:
    """A prepared-split folder with ~55 items; posters missing for NO_POSTER (one of them mid-table)."""
    ids = [str(i) for i in range(1, 49)]
    ids[5:5] = [NO_POSTER[0]]
    ids += [*STAR_WARS, NO_POSTER[1]]
    directory = tmp_path_factory.mktemp("features-small")
    table = _write_items(directory, movies, ids)
    assert table["image_path"].isna().sum() == len(NO_POSTER)
    run = run_features(directory, FeaturesConfig(batch_size=16, parity_samples=8))  # 16: several batches
    assert not run.cache_hit
    return directory, table


@pytest.fixture(scope="module")
def encoders(small) -> tuple[TextEncoder, ImageEncoder]:
    directory = small[0] / "encoders"
    return TextEncoder(directory), ImageEncoder(directory)


# ------------------------------------------------------------------------------------ outputs


def test_outputs_follow_the_contract(small):
    directory, table = small
    n = len(table)
    assert sorted(p.name for p in (directory / "encoders").iterdir()) == sorted(
        ENCODER_FILES
    )  # no external data
    features = load_features(directory)
    assert features.text.shape == (n + 1, 384) and features.text.dtype == np.float32
    assert features.image.shape == (n + 1, 1280) and features.image.dtype == np.float32
    assert features.image_mask.shape == (n + 1,) and features.image_mask.dtype == np.bool_
    assert list(features.item_id) == ["", *table["item_id"]]
    assert not features.text[0].any() and not features.image[0].any() and not features.image_mask[0]
    np.testing.assert_allclose(np.linalg.norm(features.text[1:], axis=1), 1.0, atol=1e-5)
    meta = json.loads((directory / "features.json").read_text())
    assert meta["n_items"] == n and meta["n_images"] == n - len(NO_POSTER)
    assert meta["text"]["dim"] == 384 and meta["image"]["dim"] == 1280 and len(meta["input_hash"]) == 64
    assert min(meta["onnx_parity_min_cosine"].values()) > 0.999


def test_missing_posters_have_mask_false_and_zero_rows(small):
    directory, table = small
    features = load_features(directory)
    has_poster = table["image_path"].notna().to_numpy()
    np.testing.assert_array_equal(features.image_mask[1:], has_poster)
    rows = np.flatnonzero(~has_poster) + 1
    assert set(features.item_id[rows]) == set(NO_POSTER)
    assert not features.image[rows].any()
    np.testing.assert_allclose(np.linalg.norm(features.image[features.image_mask], axis=1), 1.0, atol=1e-5)
    assert sorted(json.loads((directory / "features.json").read_text())["items_without_image"]) == sorted(
        NO_POSTER
    )


def test_onnx_graphs_are_self_contained_with_dynamic_axes(small):
    directory = small[0] / "encoders"
    spec = load_spec(directory)
    assert spec == EncoderSpec()
    for name, inputs in (("text.onnx", ["input_ids", "attention_mask"]), ("image.onnx", ["pixels"])):
        model = onnx.load(str(directory / name))
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
        assert [i.name for i in model.graph.input] == inputs
        assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_features_are_what_the_runtime_encoders_give(small, encoders):
    directory, table = small
    text_encoder, image_encoder = encoders
    features = load_features(directory)
    np.testing.assert_allclose(features.text[1:], text_encoder.encode(list(table["text"])), atol=1e-5)
    posters = table["image_path"].dropna()
    encoded = image_encoder.encode([Path(p).read_bytes() for p in posters])
    np.testing.assert_allclose(features.image[posters.index.to_numpy() + 1], encoded, atol=1e-5)


# ------------------------------------------------------------------------------------- parity


def test_text_onnx_matches_torch_and_sentence_transformers(small, encoders):
    from sentence_transformers import SentenceTransformer

    from training.features import models

    texts = list(small[1]["text"])
    onnx_rows = encoders[0].encode(texts)
    torch_rows = models.torch_text(models.load_text_embedder(), encoders[0].tokenize(texts))
    assert models.min_cosine(onnx_rows, torch_rows) > 0.999
    # the pooling is the official sentence-transformers pipeline of all-MiniLM-L6-v2
    reference = SentenceTransformer(str(models.text_model_dir()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    assert models.min_cosine(onnx_rows, reference) > 0.999


def test_image_onnx_matches_torch(small, encoders):
    from training.features import models

    images = [Path(p).read_bytes() for p in small[1]["image_path"].dropna()[:12]]
    torch_rows = models.torch_image(models.load_image_embedder(), image_pixels(images))
    assert models.min_cosine(encoders[1].encode(images), torch_rows) > 0.999


def test_text_batching_does_not_change_vectors(encoders):
    texts = [
        "Heat (1995) | Action, Crime, Thriller",
        "Star Wars: Episode IV - A New Hope (1977) | Action",
        "x",
    ]
    together = encoders[0].encode(texts)  # padded to the longest
    alone = np.concatenate([encoders[0].encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


# ----------------------------------------------------------------------------------- semantics


def test_star_wars_films_are_closest_in_text_space(small):
    directory, table = small
    features = load_features(directory)
    row = {item_id: i for i, item_id in enumerate(features.item_id)}
    iv, v, other = (features.text[row[i]] for i in (*STAR_WARS[:2], UNRELATED))
    assert iv @ v > iv @ other and iv @ v > v @ other
    # and in this 53-film catalogue each episode's two nearest neighbours are the other two
    for episode in STAR_WARS:
        similarity = features.text @ features.text[row[episode]]
        similarity[[0, row[episode]]] = -np.inf
        nearest = {str(features.item_id[i]) for i in np.argsort(-similarity)[:2]}
        assert nearest == set(STAR_WARS) - {episode}


def test_poster_is_nearest_to_its_own_resized_recompressed_copy(small, encoders):
    directory, table = small
    features = load_features(directory)
    rows = np.flatnonzero(features.image_mask)
    assert len(rows) >= 50
    copies = []
    for path in table["image_path"].dropna():
        image = Image.open(path).convert("RGB")
        smaller = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        smaller.save(buffer, format="JPEG", quality=60)
        copies.append(buffer.getvalue())
    similarity = encoders[1].encode(copies) @ features.image[rows].T  # (copies, originals)
    np.testing.assert_array_equal(np.argmax(similarity, axis=1), np.arange(len(rows)))


def test_image_encoder_rejects_non_images_with_a_clear_error(encoders):
    poster = next((MIRROR / "ml-1m-posters").glob("*.jpg")).read_bytes()
    with pytest.raises(ValueError, match="image 1: not a JPEG or PNG image"):
        encoders[1].encode([poster, b"%PDF-1.4 definitely not a poster"])
    with pytest.raises(ValueError, match="list of image bytes"):
        encoders[1].encode(poster)  # type: ignore[arg-type]
    assert encoders[1].encode([]).shape == (0, 1280)


# -------------------------------------------------------------------------------------- cache


def test_second_run_is_a_cache_hit_and_touches_nothing(small):
    directory, _ = small
    outputs = [directory / "features.npz", directory / "features.json", *(directory / "encoders").iterdir()]
    before = {p: p.stat().st_mtime_ns for p in outputs}
    run = run_features(directory, FeaturesConfig(batch_size=8))  # batch size is not part of the hash
    assert run.cache_hit and run.path == directory / "features.npz"
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert compute_features(directory) == directory / "features.npz"


def test_input_hash_tracks_texts_and_poster_bytes(small, tmp_path):
    items = read_items(small[0] / "items.parquet")
    config = FeaturesConfig()
    base = hash_inputs(items, config)
    assert hash_inputs(read_items(small[0] / "items.parquet"), config) == base
    texts = [*items.text]
    texts[0] = texts[0] + " "
    assert hash_inputs(Items(items.item_id, texts, items.image_path), config) != base
    # same path, different bytes
    copy = tmp_path / "poster.jpg"
    shutil.copy(items.image_path[0], copy)
    moved = Items(items.item_id, items.text, [copy, *items.image_path[1:]])
    assert hash_inputs(moved, config) == base  # content, not location
    copy.write_bytes(Path(items.image_path[1]).read_bytes())
    assert hash_inputs(moved, config) != base
    spec = EncoderSpec(max_tokens=128)
    assert hash_inputs(items, FeaturesConfig(spec=spec)) != base


def test_cli_reports_cache_hit(small):
    result = subprocess.run(
        [sys.executable, "-m", "mml.cli", "data", "features", "--data", str(small[0])],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "cache hit" in result.stdout and f"{len(small[1])} items" in result.stdout


# ------------------------------------------------------------------------------------- errors


def test_items_table_is_checked(tmp_path, movies):
    table = _write_items(tmp_path, movies, ["1", "2"])
    table.drop(columns=["text"]).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match="missing column.*text"):
        read_items(tmp_path / "items.parquet")
    table.assign(item_idx=[2, 3]).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match="item_idx must run 1..N"):
        read_items(tmp_path / "items.parquet")
    table.assign(image_path=[str(tmp_path / "nope.jpg"), None]).to_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match="image_path of item '1'"):
        read_items(tmp_path / "items.parquet")
    with pytest.raises(DataError, match="not found"):
        compute_features(tmp_path / "absent")


def test_corrupt_poster_names_the_item(small, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    items = Items(["a", "b"], ["A (2000) | Drama", "B (2001) | Comedy"], [None, broken])
    with pytest.raises(DataError, match=r"poster of item 'b' .*not a JPEG or PNG"):
        encode_items(small[0] / "encoders", items, FeaturesConfig())


def test_load_features_refuses_missing_or_bad_files(tmp_path):
    with pytest.raises(DataError, match="mml data features"):
        load_features(tmp_path)
    np.savez(tmp_path / "features.npz", text=np.zeros((2, 384), np.float32))
    with pytest.raises(DataError, match="missing array"):
        load_features(tmp_path)


def test_runtime_encoders_run_without_torch(small):
    """The service side (mml.encoders) must encode text and images without importing torch."""
    directory, table = small
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mml.encoders import ImageEncoder, TextEncoder\n"
        f"d = Path({str(directory / 'encoders')!r})\n"
        "t = TextEncoder(d).encode(['Heat (1995) | Action'])\n"
        f"i = ImageEncoder(d).encode([Path({table['image_path'].dropna().iloc[0]!r}).read_bytes()])\n"
        "assert t.shape == (1, 384) and i.shape == (1, 1280)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
