"""Shared fixtures. Integration fixtures build real artefacts from the ML-1M mirror once per
machine under .cache/test-artifacts (git-ignored); the stages' own caches make reruns cheap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "test-artifacts"


@pytest.fixture(scope="session")
def mirror() -> Path:
    value = os.environ.get("MML_DATA_MIRROR")
    if not value:
        pytest.skip("MML_DATA_MIRROR is not set: integration tests on the full ML-1M mirror skipped")
    path = Path(value).resolve()
    if not (path / "ml-1m" / "ratings.dat").exists():
        pytest.fail(f"MML_DATA_MIRROR={value} has no ml-1m/ratings.dat")
    return path


@pytest.fixture(scope="session")
def ml1m_dir(mirror: Path) -> Path:
    """The default cold-start split of ML-1M, prepared from the mirror."""
    from training.data.prepare import prepare_dataset

    out = CACHE / "ml-1m"
    prepare_dataset(out=out, mirror=mirror)
    return out


@pytest.fixture(scope="session")
def ml1m_features_dir(ml1m_dir: Path) -> Path:
    """ml1m_dir with features.npz and the ONNX encoders added."""
    from training.features.encode import compute_features

    compute_features(ml1m_dir)
    return ml1m_dir


# the quick profile's recipe with budgets for tests: what is served is exercised, not how well it learns
SMOKE = {
    "stage1": {"pretrain": {"steps": 60, "eval_every": 30}, "steps": 4, "eval_every": 2},
    "warmup": {"grid_steps": (0, 1), "grid_lrs": (1e-2,), "grid_params": ("theta",)},
    "cooc": {"windows": (3,)},
}


@pytest.fixture(scope="session")
def ml1m_quick_run(ml1m_features_dir: Path) -> Path:
    """`mml train --profile quick` on the ML-1M split with shortened budgets (SMOKE: every stage and
    selection runs, a few CPU-minutes), trained once per machine; a finished run with the same
    settings and data is loaded, not retrained (training.run resumes)."""
    from training.checkpoint import stage_path
    from training.config import profile
    from training.run import train_from_dir

    run = CACHE / "runs" / "ml-1m-quick"
    if not stage_path(run, 3).is_file():
        train_from_dir(ml1m_features_dir, run, profile("quick", **SMOKE), show_progress=False)
    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread avoids thread-pool overhead (restored afterwards). Modules
    opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def service_bundles(ml1m_features_dir: Path) -> tuple[Path, Path]:
    """Two serving bundles of an untrained MML over the ML-1M split (seeds 0 and 1), cached under
    .cache and rebuilt when the code that shapes a bundle changes (devtools/bundles.py)."""
    from devtools.bundles import sources_digest, untrained_bundle

    bundles, digest = CACHE / "service-bundles", sources_digest(REPO)
    a = untrained_bundle(ml1m_features_dir, bundles / "a", seed=0, model_version=f"untrained-a-{digest}")
    b = untrained_bundle(ml1m_features_dir, bundles / "b", seed=1, model_version=f"untrained-b-{digest}")
    return a, b


@pytest.fixture(scope="session")
def service_cooc_bundle(ml1m_features_dir: Path) -> Path:
    """A serving bundle of an untrained MML with the co-occurrence learner (M = 100 neighbours, the
    quick profile's model.cooc_neighbours; the table built from the split's D_old): recall_cooc and
    tables/cooc.npz over the ML-1M catalogue, for the `mml_cooc` arm's tests."""
    from devtools.bundles import sources_digest, untrained_bundle

    digest = sources_digest(REPO)
    return untrained_bundle(
        ml1m_features_dir,
        CACHE / "service-bundles" / "cooc",
        seed=0,
        model_version=f"untrained-cooc-{digest}",
        cooc_neighbours=100,
    )
