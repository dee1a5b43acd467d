"""Stage 1 (MAML of the three learners) across processes and machines: torchrun + torch.distributed.

    torchrun --nproc_per_node=2 -m training.distributed --data DIR --profile quick --out RUN

Every rank loads the same data and settings and seeds the same numpy generator, so every rank draws
the same epoch of tasks (windows and BPR negatives) as the single-process `train_stage1`. Each
meta-batch is sorted by length as there, then split by stride: rank r of W takes tasks r, r+W, ...
(disjoint, together the whole meta-batch, each rank a similar mix of lengths). A rank accumulates
the meta-gradient of its tasks chunk by chunk with the single-process chunk weights
len(chunk) / len(meta-batch), so the SUM over ranks (one all_reduce per learner and step) is exactly
the single-process meta-gradient, the mean over the whole meta-batch; uneven or empty shards need no
correction. Every rank then takes the same Adam step on the same gradient, so the parameters stay
identical (measured at the end: `rank_divergence` in the stage's losses). The meta-batch is global:
W ranks share `stage1.meta_batch` tasks, they do not multiply it.

Why an explicit all_reduce and not `torch.nn.parallel.DistributedDataParallel`: the learners never
run through their own forward. The local updates and the query loss call `functional_call` under
`vmap` on per-task copies of Theta (training/maml.py), while DDP expects every backward to follow
its wrapper's forward (which prepares its gradient hooks); a step also runs one backward per chunk
and learner, three learners with their own Adam and only one learner's parameters in each backward,
and DDP divides the summed gradient by W (equal shards assumed). Under DDP that is `no_sync` on
every chunk but the last, `find_unused_parameters`, one wrapper per learner and chunk weights
multiplied by W; one flat all_reduce of the accumulated .grad before `optimiser.step()` is the same
collective, and the chunk weights stay those of one process.
A parameter without a gradient on every rank keeps .grad None, as in one process (Adam skips it).

Dropout: `vmap(randomness="different")` draws the masks of a chunk from the process's generator,
so they depend on how tasks are laid out over ranks. Rank 0 seeds it like the single process
(seed + 1) and the other ranks from independent streams: with dropout the run is the
single-process run in distribution; with dropout off it equals it up to float rounding (the test).

Only rank 0 writes to RUN, in the single-process format (training/checkpoint.py, same stage key), so
`mml train --out RUN` resumes from it. Without --stage1-only rank 0 then trains stages 2-3 alone.
Started without torchrun (no WORLD_SIZE in the environment) the module runs as one process.
"""

from __future__ import annotations

# ruff: noqa: E402
import os

# Idle OpenMP threads sleep instead of spinning (as `mml train` does): must precede `import torch`,
# hence the imports below it (ruff: E402 off for this file).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mml.errors import MMLError
from model.mml import LEARNERS, MML
from model.tasks import TaskBatch
from training.checkpoint import read_stage, save_stage, stage_key, write_run_info
from training.config import Stage1Config, TrainConfig
from training.data.split import Split
from training.features.types import ItemFeatures
from training.maml import accumulate_meta_gradient, evaluate, learner_parameters, stage1_tasks, train_stage1
from training.run import check_inputs, data_fingerprint, restrict

BACKEND = "gloo"  # the training code keeps every tensor on the CPU (docs/distributed.md: nccl)
STAGE = 1


# --- who am I ------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n_tasks: int, rank: int, world: int) -> np.ndarray:
    """Indices of rank's share of n_tasks (strided: r, r+W, ...); disjoint, together all of them."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in 0..{world - 1}, got {rank}")
    return np.arange(rank, n_tasks, world)


def dropout_seed(seed: int, rank: int) -> int:
    """torch seed of a rank's stage-1 dropout: rank 0 = the single process's (seed + 1)."""
    if rank == 0:
        return seed + STAGE
    return int(np.random.SeedSequence([seed, STAGE, rank]).generate_state(1)[0])


# --- collectives (no-ops in a single process) ----------------------------------------------------
def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """.grad <- the sum over ranks of .grad, in one flat all_reduce. A parameter keeps .grad None
    only when it has none on every rank (then Adam skips it, as in one process)."""
    if rank_and_world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=params[0].dtype)
    flat = torch.cat([g.reshape(-1) for g in grads] + [has_grad])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, flag in zip(params, flat[-len(params) :], strict=True):
        part = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        p.grad = part.clone() if flag > 0 else None


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum of a few floats over ranks (float64)."""
    out = torch.tensor(list(values), dtype=torch.float64)
    if rank_and_world()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.tolist()


def broadcast_parameters(model: torch.nn.Module, src: int = 0) -> None:
    """Every rank starts from rank src's parameters (the buffers come from the same data)."""
    if rank_and_world()[1] == 1:
        return
    with torch.no_grad():
        flat = parameters_to_vector(model.parameters())
        dist.broadcast(flat, src=src)
        vector_to_parameters(flat, model.parameters())


def parameter_divergence(model: torch.nn.Module) -> float:
    """Largest |parameter - rank 0's| over all ranks (0.0 = in sync)."""
    if rank_and_world()[1] == 1:
        return 0.0
    with torch.no_grad():
        mine = parameters_to_vector(model.parameters())
        reference = mine.clone()
        dist.broadcast(reference, src=0)
        diff = (mine - reference).abs().max().reshape(1).double()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


# --- stage 1, sharded ----------------------------------------------------------------------------
def meta_gradient(
    model: MML, name: str, meta_batch: TaskBatch, cfg: Stage1Config, n_candidates: int
) -> float:
    """The meta-gradient of a whole meta-batch (sorted as in `train_stage1`, sharded over the ranks,
    summed by all_reduce) into .grad of the learner's parameters, identical on every rank. Returns
    the meta-batch's summed query loss (all ranks)."""
    rank, world = rank_and_world()
    mine = meta_batch.rows(shard(len(meta_batch), rank, world))
    loss_sum = accumulate_meta_gradient(model, name, mine, len(meta_batch), cfg, n_candidates)
    all_reduce_gradients(learner_parameters(model, name))
    return loss_sum


def evaluate_sharded(model: MML, tasks: TaskBatch, cfg: Stage1Config, n_candidates: int) -> dict[str, float]:
    """`training.maml.evaluate` with the tasks shared out over the ranks (same result on each)."""
    rank, world = rank_and_world()
    if world == 1:
        return evaluate(model, tasks, cfg, n_candidates)
    mine = tasks.rows(shard(len(tasks), rank, world))
    local = evaluate(model, mine, cfg, n_candidates) if len(mine) else dict.fromkeys(LEARNERS, 0.0)
    sums = all_reduce_sum([local[name] * len(mine) for name in LEARNERS])
    return {name: total / max(len(tasks), 1) for name, total in zip(LEARNERS, sums, strict=True)}


def train_stage1_distributed(
    model: MML,
    old_seqs: list[np.ndarray],
    cfg: TrainConfig,
    eval_tasks: TaskBatch,
    rng: np.random.Generator,
    report: Callable[[int, int, str], None] | None = None,
) -> dict:
    """`training.maml.train_stage1` over the ranks of the default process group (or one process):
    same tasks, same meta-batches, each meta-gradient computed in shards and all-reduced, the same
    Adam step on every rank. `rng` must be seeded alike on every rank. Same result dict. Runs the
    MAML part of stage 1 only: next-item pre-training and validation selection are single-process."""
    if cfg.stage1.pretrain.steps or cfg.stage1.eval_every is not None:
        raise MMLError(
            "the distributed trainer runs stage 1b (MAML) only: use a profile without pre-training and "
            "validation selection (stage1.pretrain.steps=0, stage1.eval_every unset), e.g. paper"
        )
    return train_stage1(
        model,
        old_seqs,
        cfg,
        eval_tasks,
        rng,
        report,
        meta_gradient=meta_gradient,
        evaluate_tasks=evaluate_sharded,
        sum_losses=all_reduce_sum,
    )


# --- the run folder ------------------------------------------------------------------------------
def same_key_everywhere(key: str) -> None:
    """Every rank must train on the same data and settings (the stage key hashes both): an all_reduce
    keeps a rank with other data from silently joining (its gradients would be summed all the same)."""
    rank, world = rank_and_world()
    if world == 1:
        return
    reference = [key]
    dist.broadcast_object_list(reference, src=0)
    mismatched = torch.tensor([float(reference[0] != key)])
    dist.all_reduce(mismatched, op=dist.ReduceOp.SUM)
    if mismatched.item() > 0:
        raise MMLError(
            f"{int(mismatched.item())} rank(s) have other data or settings than rank 0 (stage key {key} on "
            f"rank {rank}, {reference[0]} on rank 0): give every node the same --data and options"
        )


def _stage1_done(out: Path, key: str) -> bool:
    """Rank 0 looks for RUN/stage1.pt with this key and tells every rank."""
    rank, world = rank_and_world()
    found = [False]
    if rank == 0:
        ckpt = read_stage(out, STAGE)
        found = [ckpt is not None and ckpt["key"] == key]
    if world > 1:
        dist.broadcast_object_list(found, src=0)
    return bool(found[0])


def run_stage1(
    split: Split,
    features: ItemFeatures,
    out_dir: str | Path,
    cfg: TrainConfig,
    show_progress: bool = True,
    data_dir: str | Path | None = None,
) -> dict | None:
    """Stage 1 of `training.run.train` on every rank of the process group; rank 0 writes
    RUN/config.json, RUN/run.json and RUN/stage1.pt (single-process format and key). Returns the
    stage-1 losses, or None when RUN/stage1.pt already holds this stage (nothing trained)."""
    from mml.progress import progress

    started = time.perf_counter()
    rank, world = rank_and_world()
    out = Path(out_dir)
    split = restrict(split, cfg)
    check_inputs(split, features, cfg)
    torch.set_num_threads(cfg.threads)
    fingerprint = data_fingerprint(split, features)
    key = stage_key(cfg, fingerprint, STAGE)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
        if data_dir is not None:
            write_run_info(out, data_dir, fingerprint)
    same_key_everywhere(key)
    if _stage1_done(out, key):
        return None

    # as training.run.train: model seed, fixed evaluation tasks, the stage's generators
    torch.manual_seed(cfg.seed)
    model = MML(cfg.model, split.n_old_items, features.text, features.image, features.image_mask)
    broadcast_parameters(model)
    eval_rng = np.random.default_rng([cfg.seed, 0])
    eval_users = eval_rng.permutation(len(split.old_seqs))[: cfg.eval_tasks]
    eval_tasks = stage1_tasks([split.old_seqs[i] for i in eval_users], cfg, split.n_old_items, eval_rng)
    torch.manual_seed(dropout_seed(cfg.seed, rank))
    rng = np.random.default_rng([cfg.seed, STAGE])

    n_tasks = len(stage1_tasks(split.old_seqs, cfg, split.n_old_items, np.random.default_rng(0)))
    with progress() as bar:
        handle = bar.add_task(
            f"stage 1 MAML ({world} ranks)",
            total=max(cfg.stage1.epochs * n_tasks, 1),
            info="",
            visible=show_progress and rank == 0,
        )

        def report(epoch: int, done_in_epoch: int, info: str) -> None:
            bar.update(handle, completed=epoch * n_tasks + done_in_epoch, info=info)

        result = train_stage1_distributed(model, split.old_seqs, cfg, eval_tasks, rng, report)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["world_size"] = world
    # the same summed gradient and the same Adam step keep the ranks bit-identical; a difference
    # could only come from ranks rounding differently (e.g. other CPU types): recorded, rank 0 saved
    result["rank_divergence"] = parameter_divergence(model)
    if result["rank_divergence"] > 0.0 and rank == 0:
        warnings.warn(
            f"ranks ended stage 1 with parameters up to {result['rank_divergence']:.3g} apart; "
            "rank 0's are saved",
            stacklevel=2,
        )
    if rank == 0:
        save_stage(out, STAGE, key, model, cfg, result)
    return result


# --- entry point ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m training.distributed",
        description="Stage-1 MAML meta-training over torchrun ranks (gloo); rank 0 writes RUN and, "
        "unless --stage1-only, trains stages 2-3 as `mml train` does.",
    )
    parser.add_argument("--data", type=Path, required=True, help="a prepared split with its features")
    parser.add_argument("--out", type=Path, required=True, help="run folder (written by rank 0 only)")
    parser.add_argument(
        "--profile",
        default="paper-quick",
        help="a profile without stage-1a pre-training: paper-quick or paper (training/config.py)",
    )
    parser.add_argument(
        "--config", type=Path, help="JSON of settings merged over the profile (e.g. a run's config.json)"
    )
    parser.add_argument("--seed", type=int, help="seed of every random draw (default: the profile's)")
    parser.add_argument("--loss", choices=("bpr", "ce"), help="stage-1 loss (default: the profile's)")
    parser.add_argument("--stage1-only", action="store_true", help="stop after RUN/stage1.pt")
    parser.add_argument(
        "--timeout-s", type=float, default=1800.0, help="how long a collective waits for the other ranks"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the command line: profile, then --config, then --seed / --loss."""
    from pydantic import ValidationError

    from training.config import PROFILES
    from training.config import profile as make_profile

    if args.profile not in PROFILES:
        raise MMLError(f"--profile must be one of {', '.join(sorted(PROFILES))}, got {args.profile!r}")
    overrides: dict = {}
    if args.config is not None:
        try:
            overrides = json.loads(args.config.read_text())
        except (OSError, ValueError) as exc:
            raise MMLError(f"--config {args.config}: not a readable JSON file ({exc})") from exc
        if not isinstance(overrides, dict):
            raise MMLError(f"--config {args.config}: must hold a JSON object of settings")
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.loss is not None:
        overrides["stage1"] = {**overrides.get("stage1", {}), "loss": args.loss}
    try:
        return make_profile(args.profile, **overrides)
    except ValidationError as exc:
        raise MMLError(f"invalid training settings: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        cfg = config_from_args(args)
        from training.data.split import load_split
        from training.features.types import load_features
        from training.run import train

        split, features = load_split(args.data), load_features(args.data)
        if distributed:
            dist.init_process_group(BACKEND, timeout=timedelta(seconds=args.timeout_s))
        try:
            run_stage1(split, features, args.out, cfg, not args.quiet, args.data)
            rank = rank_and_world()[0]
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if rank == 0 and not args.stage1_only:  # loads RUN/stage1.pt (same key), trains stages 2-3
            train(split, features, args.out, cfg, not args.quiet, args.data)
    except MMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
