"""The exported ONNX graphs against the eager model, on a small synthetic catalogue: every role, any
batch size, short / full / all-pad rows, new items, items without a poster; the fused scores of
the bundle (items_concat @ query + bias) against `MML.scores`; the dynamic length axis as the
service feeds it (length buckets) against eager, against max_len padding and against a bundle of
the older fixed-length format."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from devtools.bundles import batch_feeds
from mml.bundle import read_manifest, write_manifest
from mml.bundle_loader import GRAPH_FILES, GRAPH_IO, SEQUENCE_ROLES, LoadedBundle, load_bundle
from mml.cooc import build_table
from mml.errors import BundleError
from model.config import ModelConfig
from model.fusion import closed_form
from model.learners import last_hidden
from model.mml import LEARNERS, MML
from service.runtime import Runtime
from training.export import export_model
from training.export.onnx_graphs import OPSET, example_inputs, export_graph, graph_modules, run_torch
from training.export.tables import fusion_moments, item_vectors, popularity_counts, serving_model
from training.synthetic import synthetic

SMALL = ModelConfig(
    d=16,
    n_heads=2,
    d_ffn=32,
    max_len=12,
    text_dim=24,
    image_dim=40,
    n_neighbours=4,
    feature_sim_dim=8,
    fusion_hidden=16,
    cooc_neighbours=5,  # every graph role, recall_cooc included
)
ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[MML, LoadedBundle, object]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    split, features = synthetic(n_items=60, n_old_items=50, text_dim=24, image_dim=40, missing_posters=4)
    model = MML(SMALL, split.n_old_items, features.text, features.image, features.image_mask)
    # an untrained fusion has equal weights and unit gammas: perturb so every term matters
    with torch.no_grad():
        model.fusion.score_weight.copy_(torch.tensor([1.5, 0.7, 2.0]))
        model.fusion.score_bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        model.fusion.attend.weight.normal_(0.0, 1.0)
        model.fusion_cooc.attend.weight.normal_(0.0, 1.0)
        model.fusion_cooc.cooc_attend.weight.normal_(0.0, 1.0)
        model.fusion_cooc.cooc_scale.fill_(0.5)
    table = build_table(split.old_seqs, split.n_items, window=2, m=5)
    model.set_cooc(table.items, table.weights)
    out = tmp_path_factory.mktemp("export") / "bundle"
    export_model(
        model, out, item_ids=features.item_id, popularity=popularity_counts(split.old_seqs, split.n_items)
    )
    return serving_model(model), load_bundle(out), split


def _sequences(rows: list[list[int]], length: int) -> torch.Tensor:
    seq = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        row = row[-length:]
        seq[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return seq


def _cases(model: MML, split) -> dict[str, list[list[int]]]:
    new = list(range(model.n_old_items + 1, model.n_items + 1))
    no_poster = [int(i) for i in np.flatnonzero(~model.image_mask.numpy())[1:]]
    long = [int(i) for i in max(split.old_seqs, key=len)]
    assert len(long) > model.cfg.max_len
    return {
        "length 1": [[long[0]]],
        "full length": [long[: model.cfg.max_len]],
        "longer than max_len": [long],
        "mixed padding": [long[:3], long[:7], [long[1]], long[: model.cfg.max_len]],
        "only new items": [new[:5], new[-1:]],
        "items without a poster": [no_poster, no_poster[:1] + long[:4]],
        "all pad": [[]],
    }


def test_graph_files_are_self_contained_opset_17(exported) -> None:
    _, bundle, _ = exported
    for role, rel in GRAPH_FILES.items():
        graph = onnx.load(str(bundle.root / rel), load_external_data=False)
        onnx.checker.check_model(graph)
        assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= OPSET
        assert not any(init.external_data for init in graph.graph.initializer), role
        assert [i.name for i in graph.graph.input] == list(GRAPH_IO[role][0])
        assert [o.name for o in graph.graph.output] == list(GRAPH_IO[role][1])
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic batch


@pytest.mark.parametrize("case", ["length 1", "full length", "longer than max_len", "mixed padding",
                                  "only new items", "items without a poster", "all pad"])  # fmt: skip
def test_learner_and_fusion_graphs_match_eager(exported, case: str) -> None:
    model, bundle, split = exported
    rows = _cases(model, split)[case]
    seq = _sequences(rows, model.cfg.max_len)
    inputs = batch_feeds(bundle, rows)
    assert np.array_equal(inputs["valid"], (seq > 0).numpy())
    modules = graph_modules(model, *fusion_moments(item_vectors(model)))
    with torch.no_grad():
        hidden = model.hidden(seq)
    torch_inputs = {name: torch.from_numpy(value) for name, value in inputs.items()}
    fusion_inputs = {
        "hidden_id": hidden["id"], "hidden_text": hidden["text"], "hidden_image": hidden["image"], "valid": seq > 0,
    }  # fmt: skip
    for role in ("learner_id", "learner_text", "learner_image", "recall", "fusion"):
        feeds = fusion_inputs if role == "fusion" else torch_inputs
        feeds = {name: feeds[name] for name in GRAPH_IO[role][0]}
        expected = run_torch(modules[role], role, feeds)
        got = bundle.run(role, **{name: value.numpy() for name, value in feeds.items()})
        for name in GRAPH_IO[role][1]:
            assert np.isfinite(got[name]).all(), (role, name)
            np.testing.assert_allclose(got[name], expected[name], atol=ATOL, rtol=0, err_msg=f"{role}.{name}")
    for name, learner in (("id", "learner_id"), ("text", "learner_text"), ("image", "learner_image")):
        got = bundle.run(learner, **{k: inputs[k] for k in GRAPH_IO[learner][0]})["hidden"]
        np.testing.assert_allclose(got, hidden[name].numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["length 1", "longer than max_len", "mixed padding", "only new items",
                                  "items without a poster"])  # fmt: skip
def test_fused_scores_of_the_bundle_match_eager(exported, case: str) -> None:
    model, bundle, split = exported
    rows = _cases(model, split)[case]
    out = bundle.run("recall", **batch_feeds(bundle, rows))
    query, bias, runtime = out["query"], out["bias"], Runtime(bundle)
    with torch.no_grad():
        eager, _ = model.scores(_sequences(rows, model.cfg.max_len))
    for b in range(len(rows)):
        got = runtime.catalogue_scores(query[b], bias[b])
        assert got[0] == -np.inf and np.isfinite(got[1:]).all()
        np.testing.assert_allclose(got[1:], eager[b, 1:].numpy(), atol=ATOL, rtol=0)
        # the same ranking, apart from items whose eager scores tie within ATOL
        expected = eager[b, 1:].numpy()
        order_got, order_exp = np.argsort(-got[1:], kind="stable"), np.argsort(-expected, kind="stable")
        np.testing.assert_allclose(expected[order_got], expected[order_exp], atol=ATOL, rtol=0)


def test_split_graphs_equal_the_combined_recall_graph(exported) -> None:
    model, bundle, split = exported
    inputs = batch_feeds(bundle, _cases(model, split)["mixed padding"])
    hidden = {
        role: bundle.run(role, **{k: inputs[k] for k in GRAPH_IO[role][0]})["hidden"]
        for role in ("learner_id", "learner_text", "learner_image")
    }
    split_out = bundle.run(
        "fusion", hidden_id=hidden["learner_id"], hidden_text=hidden["learner_text"],
        hidden_image=hidden["learner_image"], valid=inputs["valid"],
    )  # fmt: skip
    combined = bundle.run("recall", **inputs)
    for name in ("weights", "query", "bias"):
        np.testing.assert_allclose(split_out[name], combined[name], atol=1e-5, rtol=0)
    np.testing.assert_allclose(combined["weights"].sum(axis=1), 1.0, atol=1e-6)


def test_generator_and_item_tower_rebuild_the_tables(exported) -> None:
    """The service's path for a new item: Faiss neighbours (index from the bundle) -> generator.onnx,
    and item_tower.onnx, give the tables' rows of the catalogue's new items."""
    model, bundle, _ = exported
    t = bundle.tables
    new = np.arange(model.n_old_items + 1, model.n_items + 1)
    nb, _ = bundle.neighbours.search(
        t["text"][new], t["image"][new], t["image_mask"][new], bundle.dims.k_neighbours
    )
    assert np.array_equal(nb, model.neighbours[new].numpy())
    out = bundle.run(
        "generator", z_text=t["text"][new], z_image=t["image"][new], z_mask=t["image_mask"][new],
        nb_text=t["text"][nb], nb_image=t["image"][nb], nb_mask=t["image_mask"][nb], nb_id=t["id_emb"][nb],
    )  # fmt: skip
    np.testing.assert_allclose(out["id_emb"], t["id_emb"][new], atol=1e-5, rtol=0)
    rows = np.arange(1, model.n_items + 1)
    tower = bundle.run(
        "item_tower", text=t["text"][rows], image=t["image"][rows], image_mask=t["image_mask"][rows]
    )
    np.testing.assert_allclose(tower["text_vec"], t["text_vec"][rows], atol=1e-5, rtol=0)
    np.testing.assert_allclose(tower["image_vec"], t["image_vec"][rows], atol=1e-5, rtol=0)
    no_poster = ~t["image_mask"][rows]
    # items without a poster get the learned "missing" vector, not a projection of zeros
    assert no_poster.any()
    np.testing.assert_allclose(
        tower["image_vec"][no_poster], np.broadcast_to(model.image_learner.embedding.missing.detach().numpy(),
                                                       tower["image_vec"][no_poster].shape), atol=1e-6)  # fmt: skip


def test_graphs_take_any_batch_size_and_any_length_up_to_max_len(exported) -> None:
    model, bundle, split = exported
    for batch in (1, 5):
        rows = [[int(i) for i in split.old_seqs[b][:4]] for b in range(batch)]
        out = bundle.run("recall", **batch_feeds(bundle, rows))
        assert out["query"].shape == (batch, 3 * model.cfg.d) and out["bias"].shape == (batch,)
        short = bundle.run("recall", **{k: v[:, :4] for k, v in batch_feeds(bundle, rows).items()})
        np.testing.assert_allclose(short["query"], out["query"], atol=1e-5, rtol=0)
    for role in SEQUENCE_ROLES:
        assert bundle.sequence_length(role) is None, role  # dynamic
        graph = onnx.load(str(bundle.root / GRAPH_FILES[role]), load_external_data=False)
        assert all(i.type.tensor_type.shape.dim[1].dim_param == "length" for i in graph.graph.input), role
    full = batch_feeds(bundle, [[1, 2]])
    longer = {k: np.concatenate([v, v[:, :1]], axis=1) for k, v in full.items()}  # max_len + 1
    for wrong in (longer, {**full, "valid": full["valid"][:, :-1]}):  # too long; lengths that differ
        with pytest.raises((Fail, InvalidArgument), match="(?i)broadcast"):
            bundle.run("recall", **wrong)


# --- dynamic length as served: buckets vs eager vs max_len padding vs the fixed-length format ------

LONG = ModelConfig(
    d=8, n_heads=2, d_ffn=16, max_len=50, text_dim=12, image_dim=20, n_neighbours=3, feature_sim_dim=4,
    fusion_hidden=8,
)  # fmt: skip
SERVED_LENGTHS = {1: 8, 7: 8, 8: 8, 9: 16, 33: 40, 50: 50}  # history length -> padded (bucket) length


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[MML, Runtime, Runtime]:
    """A max_len=50 model exported as usual (dynamic length) and the same bundle with the sequence
    graphs re-exported at a fixed length max_len (the format of older bundles)."""
    torch.manual_seed(1)
    torch.set_num_threads(1)
    split, features = synthetic(n_items=80, n_old_items=64, text_dim=12, image_dim=20, missing_posters=6)
    model = MML(LONG, split.n_old_items, features.text, features.image, features.image_mask)
    with torch.no_grad():
        model.fusion.score_weight.copy_(torch.tensor([1.5, 0.7, 2.0]))
        model.fusion.score_bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
        model.fusion.attend.weight.normal_(0.0, 1.0)
        for block in model.id_learner.encoder.blocks:  # position-dependent pair weights
            block.attention.w_text.normal_(0.0, 1.0)
            block.attention.w_image.normal_(0.0, 1.0)
    root = tmp_path_factory.mktemp("served")
    export_model(
        model, root / "dynamic", item_ids=features.item_id,
        popularity=popularity_counts(split.old_seqs, split.n_items),
    )  # fmt: skip
    model = serving_model(model)
    fixed = root / "fixed"
    shutil.copytree(root / "dynamic", fixed)
    modules, examples = graph_modules(model, *fusion_moments(item_vectors(model))), example_inputs(model)
    for role in (r for r in SEQUENCE_ROLES if r in modules):  # recall_cooc only with the cooc learner
        export_graph(modules[role], role, examples[role], fixed / GRAPH_FILES[role], "", dynamic_length=False)
    write_manifest(fixed, read_manifest(fixed))
    return model, Runtime.load(root / "dynamic"), Runtime.load(fixed)


def _eager_query(model: MML, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """query, bias of one history padded to max_len, with the model's own code (not the graphs')."""
    seq = _sequences([rows], model.cfg.max_len)
    with torch.no_grad():
        hidden = model.hidden(seq)
        weights = model.fusion.weights(hidden["id"], hidden["text"], hidden["image"], seq > 0)
        users = [last_hidden(hidden[name], seq > 0) for name in LEARNERS]
        means, covs = (m.to(torch.float32) for m in fusion_moments(item_vectors(model)))  # as exported
        query, bias = closed_form(model.fusion, users, weights, list(zip(means, covs, strict=True)))
    return query.numpy(), bias.numpy()


@pytest.mark.parametrize("n", sorted(SERVED_LENGTHS))
def test_served_dynamic_length_equals_eager_and_max_len_padding(served, n: int) -> None:
    model, dynamic, fixed = served
    assert dynamic.length_buckets == (8, 16, 24, 32, 40, 48, 50) and fixed.length_buckets == (50,)
    rows = [int(r) for r in np.random.default_rng(n).permutation(np.arange(1, model.n_items + 1))[:n]]
    assert not model.image_mask[rows].all() or n < 9  # longer histories include items without a poster
    x = dynamic.history_inputs(rows)
    assert x.valid.shape == (1, SERVED_LENGTHS[n]) and x.valid.sum() == n
    query, bias = dynamic.query(x)
    expected_query, expected_bias = _eager_query(model, rows)
    np.testing.assert_allclose(query, expected_query, atol=1e-5, rtol=0)
    np.testing.assert_allclose(bias, expected_bias, atol=1e-5, rtol=0)
    padded = dynamic.bundle.run("recall", **batch_feeds(dynamic.bundle, [rows]))  # the same graph at max_len
    x_fixed = fixed.history_inputs(rows)
    assert x_fixed.valid.shape == (1, model.cfg.max_len)
    fixed_query, fixed_bias = fixed.query(x_fixed)  # a fixed-length graph, padded to max_len
    for other_query, other_bias in ((padded["query"], padded["bias"]), (fixed_query, fixed_bias)):
        np.testing.assert_allclose(query, other_query, atol=1e-5, rtol=0)
        np.testing.assert_allclose(bias, other_bias, atol=1e-5, rtol=0)
    with torch.no_grad():
        scores, _ = model.scores(_sequences([rows], model.cfg.max_len))
    got = dynamic.catalogue_scores(query[0], bias[0])
    np.testing.assert_allclose(got[1:], scores[0, 1:].numpy(), atol=ATOL, rtol=0)


def test_fixed_length_bundle_serves_and_a_wrong_length_is_refused(served, tmp_path: Path) -> None:
    model, dynamic, fixed = served
    every_graph = load_bundle(fixed.path)
    for role in (r for r in SEQUENCE_ROLES if r in every_graph.sessions):
        assert every_graph.sequence_length(role) == model.cfg.max_len, role
    with pytest.raises(ValueError, match="history length 51"):
        dynamic.sequence_inputs(*(np.zeros((51, k)) for k in (8, 12, 20)), np.zeros(51, bool))
    wrong = tmp_path / "wrong"
    shutil.copytree(fixed.path, wrong)
    modules = graph_modules(model, *fusion_moments(item_vectors(model)))
    short = {k: v[:, :-1] for k, v in example_inputs(model)["recall"].items()}
    export_graph(modules["recall"], "recall", short, wrong / GRAPH_FILES["recall"], "", dynamic_length=False)
    write_manifest(wrong, read_manifest(wrong))
    with pytest.raises(BundleError, match="graph 'recall' has sequence lengths"):
        load_bundle(wrong)


def test_export_leaves_the_callers_model_untouched(tmp_path: Path) -> None:
    split, features = synthetic(n_items=30, n_old_items=25, text_dim=24, image_dim=40)
    model = MML(SMALL, split.n_old_items, features.text, features.image, features.image_mask).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, tmp_path / "b", item_ids=features.item_id, popularity=np.zeros(31, np.int64))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
