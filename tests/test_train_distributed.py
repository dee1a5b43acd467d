"""Stage 1 across processes (training/distributed.py): two ranks on loopback (gloo) compute the
meta-gradient of one process (scale included: Adam would hide a wrong one) and end with its
parameters, in the single-process checkpoint format that `mml train` resumes from.

The two ranks are two runs of this file (`python tests/test_train_distributed.py ARGS`, see `rank`):
each checks the sharded meta-gradient on its own port, then runs the module entry point
`training.distributed.main(ARGS)`, so the costly start-up (importing torch) is paid once per rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from model.mml import LEARNERS, MML
from training.config import TrainConfig, profile
from training.data.split import Split, load_split
from training.distributed import main, meta_gradient, run_stage1, shard
from training.features.types import ItemFeatures, load_features
from training.maml import learner_parameters, meta_loss, stage1_tasks
from training.run import train
from training.synthetic import synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RANK_TIMEOUT_S = 120  # two tiny ranks take seconds; a hung rendezvous fails the test instead of hanging it
WORLD = 2
CHECK_SIZES = (8, 5, 1)  # meta-batches split evenly, unevenly, and leaving rank 1 nothing

# tiny: 41 old users, meta-batch 8 -> 6 Adam steps, the last on ONE task (rank 1's shard is empty);
# chunk 3 < a rank's 4 tasks; dropout off so that the layout of the tasks over ranks cannot matter
TINY = {
    "model": {
        "d": 16,
        "d_ffn": 32,
        "max_len": 12,
        "n_neighbours": 4,
        "dropout_hidden": 0.0,
        "dropout_attn": 0.0,
    },
    "stage1": {"epochs": 1, "meta_batch": 8, "chunk": 3, "inner_steps": 1, "lr_id": 1e-2},
    "stage2": {"epochs": 0},
    "stage3": {"epochs": 0},
    "warmup": {"steps": 1},
    "max_old_users": 41,
    "eval_tasks": 8,
    "threads": 1,
}


def config(**model) -> TrainConfig:
    return profile("paper-quick", **{**TINY, "model": {**TINY["model"], **model}})


def write_split(folder: Path, split: Split, features: ItemFeatures) -> None:
    """A synthetic split on disk in the prepared-split format (docs/architecture.md sections 2-3),
    the parts `load_split` / `load_features` read."""
    folder.mkdir(parents=True, exist_ok=True)
    support = split.new_support.shape[1]
    stats = {"support": support, "n_items": split.n_items, "n_old_items": split.n_old_items, **split.stats}
    (folder / "stats.json").write_text(json.dumps(stats))
    old = pd.DataFrame(
        {
            "user_id": np.repeat(split.old_users, [len(s) for s in split.old_seqs]),
            "item_idx": np.concatenate(split.old_seqs).astype(np.int32),
        }
    )
    old.to_parquet(folder / "old_interactions.parquet", index=False)
    items = np.column_stack([split.new_support, split.new_valid, split.new_query]).astype(np.int32)
    new = pd.DataFrame(
        {
            "user_id": np.repeat(split.new_users, items.shape[1]),
            "pos": np.tile(np.arange(items.shape[1], dtype=np.int8), len(items)),
            "item_idx": items.reshape(-1),
        }
    )
    new.to_parquet(folder / "new_users.parquet", index=False)
    arrays = {"text": features.text, "image": features.image, "image_mask": features.image_mask}
    np.savez(folder / "features.npz", **arrays, item_id=features.item_id)


# --- one rank (run as a script by `launch`) --------------------------------------------------------
def gradient_check(data_dir: Path) -> dict:
    """On this rank, for each meta-batch size: the meta-gradient of one process (all the tasks in one
    meta_loss call, no collective) vs `meta_gradient` (this rank's shard, all-reduced)."""
    split, features = load_split(data_dir), load_features(data_dir)
    cfg = config()
    torch.manual_seed(cfg.seed)
    model = MML(cfg.model, split.n_old_items, features.text, features.image, features.image_mask)
    tasks = stage1_tasks(split.old_seqs, cfg, split.n_old_items, np.random.default_rng(0))
    out: dict = {"max_abs_diff": 0.0, "max_abs_grad": 0.0, "none_mismatch": []}
    for size in CHECK_SIZES:
        batch = tasks.rows(slice(0, size))
        for name in LEARNERS:
            params = learner_parameters(model, name)
            model.zero_grad(set_to_none=True)
            meta_loss(model, name, batch.torch(), cfg.stage1, split.n_old_items, backward_weight=1.0)
            want = [None if p.grad is None else p.grad.clone() for p in params]
            model.zero_grad(set_to_none=True)
            meta_gradient(model, name, batch, cfg.stage1, split.n_old_items)
            for i, (p, w) in enumerate(zip(params, want, strict=True)):
                if (p.grad is None) != (w is None):
                    out["none_mismatch"].append(f"{name}[{i}] size {size}")
                elif w is not None:
                    out["max_abs_diff"] = max(out["max_abs_diff"], float((p.grad - w).abs().max()))
                    out["max_abs_grad"] = max(out["max_abs_grad"], float(w.abs().max()))
    return out


def rank(argv: list[str]) -> int:
    """One rank: the gradient check (written to CHECK_OUT/rank{r}.json), then the entry point."""
    torch.set_num_threads(1)
    me, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init = f"tcp://127.0.0.1:{os.environ['CHECK_PORT']}"
    dist.init_process_group("gloo", init_method=init, rank=me, world_size=world)
    try:
        result = gradient_check(Path(argv[argv.index("--data") + 1]))
    finally:
        dist.destroy_process_group()
    (Path(os.environ["CHECK_OUT"]) / f"rank{me}.json").write_text(json.dumps(result))
    return main(argv)


# --- the test side ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, check_out: Path, *args: str) -> None:
    """Ranks 0..world-1 of one job on loopback with the environment torchrun gives its workers
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT: env:// rendezvous). Not torchrun itself: its agent process
    would add seconds of start-up, and the workers are the same. Bounded by RANK_TIMEOUT_S."""
    port, check_port = free_port(), free_port()
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(r),
            "LOCAL_RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
            "CHECK_PORT": str(check_port),
            "CHECK_OUT": str(check_out),
        }
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        command = [sys.executable, __file__, *args]
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        for r, proc in enumerate(procs):
            _, err = proc.communicate(timeout=RANK_TIMEOUT_S)
            assert proc.returncode == 0, f"rank {r} failed:\n{err[-4000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_split(folder, *synthetic(n_old_users=48))
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def _stage1(run: Path) -> dict:
    return torch.load(run / "stage1.pt", weights_only=True)


def test_shards_are_disjoint_cover_the_meta_batch_and_are_balanced():
    for n_tasks in (0, 1, 7, 8, 256):
        for world in (1, 2, 3, 8):
            parts = [shard(n_tasks, r, world) for r in range(world)]
            assert sorted(np.concatenate(parts).tolist()) == list(range(n_tasks))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(4, 2, 2)


def test_one_process_without_a_process_group_is_train_stage1_exactly(data_dir, tmp_path):
    """No process group: the sharded loop is `mml train`'s stage 1 itself, dropout draws included."""
    cfg = config(dropout_hidden=0.3, dropout_attn=0.3)
    split, features = load_split(data_dir), load_features(data_dir)
    train(split, features, tmp_path / "reference", cfg, show_progress=False)
    result = run_stage1(split, features, tmp_path / "one", cfg, show_progress=False)
    assert result is not None and result["world_size"] == 1
    want, got = _stage1(tmp_path / "reference"), _stage1(tmp_path / "one")
    assert got["key"] == want["key"]
    for name, value in want["state"].items():
        assert torch.equal(got["state"][name], value), name
    # the same settings again: stage 1 is found done, nothing is trained
    assert run_stage1(split, features, tmp_path / "one", cfg, show_progress=False) is None


def test_two_ranks_equal_one_process_and_mml_train_resumes(data_dir, tmp_path):
    out, checks = tmp_path / "run", tmp_path / "checks"
    checks.mkdir()
    launch(
        WORLD,
        checks,
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--profile",
        "paper-quick",
        "--config",
        str(data_dir / "config.json"),
        "--quiet",
    )

    # the meta-gradient: one all_reduce of pre-weighted shards = one process's mean over the meta-batch
    for r in range(WORLD):
        check = json.loads((checks / f"rank{r}.json").read_text())
        assert check["none_mismatch"] == []
        assert check["max_abs_grad"] > 0.0
        assert check["max_abs_diff"] <= 1e-5 * check["max_abs_grad"], check

    # the run: the reference is the single-process `mml train` path on the same data and settings
    cfg = config()
    split, features = load_split(data_dir), load_features(data_dir)
    train(split, features, tmp_path / "single", cfg, show_progress=False)
    want, got = _stage1(tmp_path / "single"), _stage1(out)
    assert got["key"] == want["key"] and got["stage"] == 1 and got["config"] == want["config"]
    assert got["losses"]["world_size"] == WORLD and got["losses"]["rank_divergence"] == 0.0
    for name, value in want["state"].items():
        assert got["state"][name].dtype == value.dtype, name
        assert (got["state"][name].double() - value.double()).abs().max() <= 1e-5, name
    for learner in LEARNERS:
        for field in ("initial_loss", "final_loss"):
            assert got["losses"][learner][field] == pytest.approx(want["losses"][learner][field], rel=1e-5)
    # ... and stage 1 did move the learners away from their initialisation
    torch.manual_seed(cfg.seed)
    init = MML(cfg.model, split.n_old_items, features.text, features.image, features.image_mask)
    with torch.no_grad():
        moved = {name: float((got["state"][name] - p).abs().max()) for name, p in init.named_parameters()}
    for name in (
        "item_emb.weight",
        "text_learner.embedding.weight",
        "image_learner.embedding.project.weight",
    ):
        assert moved[name] > 1e-3, name

    # rank 0 went on with stages 2-3 from its own stage1.pt, as `mml train --out RUN` would
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages_loaded"] == [1]
    assert (out / "stage3.pt").is_file() and (out / "config.json").is_file()


if __name__ == "__main__":  # one rank of `launch`
    sys.exit(rank(sys.argv[1:]))
