"""Benchmark: stage-1 meta-gradient throughput, batched (vmap over tasks) vs a per-task Python loop,
side by side in one run on the same model and the same tasks. `run() -> dict`.

Setting = the paper profile's stage 1 for the main (ID) learner: d=64, 2 blocks, 2 heads, max_len 50,
5 local steps, first-order, BPR, sampled windows of 10..51 items, a synthetic catalogue the size of
ML-1M's. The batched path runs a meta-batch as training does (sorted by length, vmapped chunks of
`Stage1Config.chunk` tasks without their pad columns); the loop (`meta_loss_looped`) runs each task at
its own length with torch.autograd and back-propagates the summed query losses once. Both compute
the same meta-gradient (tests/test_train_maml.py). One intra-op thread by default: on a small shared
machine extra threads mostly add synchronisation (set OMP_WAIT_POLICY=PASSIVE when using more).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from model.config import ModelConfig
from model.mml import LEARNERS, MML
from model.tasks import TaskBatch
from training.config import Stage1Config
from training.maml import meta_loss, meta_loss_looped
from training.synthetic import synthetic
from training.tasks import make_tasks, sample_windows


def _tasks_per_second(step: Callable[[], None], n_tasks: int, repeats: int, device: torch.device) -> float:
    def synchronize() -> None:  # GPU kernels run asynchronously: time them to completion
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up (allocations, first-call overheads)
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize()
    return n_tasks * repeats / (time.perf_counter() - start)


def run(
    context: dict | None = None,
    *,
    n_items: int = 3700,
    batched_tasks: int = 256,
    looped_tasks: int = 32,
    repeats: int = 2,
    learner: str = "id",
    threads: int = 1,
    seed: int = 0,
    device: str = "cpu",
    chunk: int | None = None,
    first_order: bool = True,
) -> dict:
    """`mml bench` entry point (`context` = its shared options; none are needed here).

    `device="cuda"` runs both paths on a GPU (`python -m training.bench_meta --device cuda`); `make
    bench` measures the CPU of the machine it runs on."""
    if learner not in LEARNERS:
        raise ValueError(f"learner must be one of {LEARNERS}")
    dev = torch.device(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        cfg = ModelConfig()
        s1 = Stage1Config(first_order=first_order, **({} if chunk is None else {"chunk": chunk}))
        n_old = n_items - n_items // 20
        split, feats = synthetic(
            n_items=n_items, n_old_items=n_old, n_old_users=batched_tasks, min_len=60, max_len=120, seed=seed
        )
        model = MML(cfg, n_old, feats.text, feats.image, feats.image_mask).to(dev).train()
        rng = np.random.default_rng(seed)
        windows = sample_windows(split.old_seqs, rng, "sampled", 10, cfg.max_len + 1)
        tasks = make_tasks(windows, cfg.max_len, n_old, rng)
        tasks = tasks.rows(np.argsort(tasks.lengths(), kind="stable"))  # as train_stage1 does
        chunks = [
            tasks.rows(slice(c, c + s1.chunk)).trimmed().torch(dev) for c in range(0, len(tasks), s1.chunk)
        ]
        # the loop gets an evenly spread sample of the same tasks (short and long ones alike)
        sample: TaskBatch = tasks.rows(np.linspace(0, len(tasks) - 1, looped_tasks).round().astype(int))
        looped_batch = sample.torch(dev)

        def batched() -> None:
            model.zero_grad(set_to_none=True)
            for part in chunks:
                meta_loss(model, learner, part, s1, n_old, backward_weight=len(part["seq"]) / len(tasks))

        def looped() -> None:
            model.zero_grad(set_to_none=True)
            meta_loss_looped(model, learner, looped_batch, s1, n_old, backward_weight=1.0)

        fast = _tasks_per_second(batched, len(tasks), repeats, dev)
        slow = _tasks_per_second(looped, looped_tasks, repeats, dev)
    finally:
        torch.set_num_threads(before)
    return {
        "meta_train_tasks_per_s_batched": round(fast, 2),
        "meta_train_tasks_per_s_looped": round(slow, 2),
        "meta_train_speedup": round(fast / slow, 2),
        "meta_train_setting": (
            f"learner={learner} d={cfg.d} layers={cfg.n_layers} heads={cfg.n_heads} max_len={cfg.max_len} "
            f"inner_steps={s1.inner_steps} first_order={s1.first_order} loss={s1.loss} chunk={s1.chunk} "
            f"windows=sampled 10..51 items={n_items} tasks(batched/looped)={len(tasks)}/{looped_tasks} "
            f"threads={threads} device={_device_name(dev)}"
        ),
    }


def _device_name(dev: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "cpu"


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batched-tasks", type=int, default=256)
    parser.add_argument("--looped-tasks", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--chunk", type=int, default=None, help="tasks per vmapped chunk (default: Stage1Config)"
    )
    parser.add_argument("--second-order", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(
        json.dumps(
            run(
                device=args.device,
                batched_tasks=args.batched_tasks,
                looped_tasks=args.looped_tasks,
                repeats=args.repeats,
                threads=args.threads,
                chunk=args.chunk,
                first_order=not args.second_order,
            ),
            indent=2,
        )
    )
