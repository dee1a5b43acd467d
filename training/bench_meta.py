"""Benchmark: stage-1 meta-gradient throughput, batched (vmap over tasks) vs a per-task Python loop,
side by side on the same model and the same tasks (the paper-size learner: d=64, 2 blocks, 2 heads,
max_len 50, 5 local steps, first-order, BPR; a synthetic ML-1M-sized catalogue). `run() -> dict`."""

from __future__ import annotations

import time

import numpy as np
import torch

from model.config import ModelConfig
from model.mml import LEARNERS, MML
from training.config import Stage1Config
from training.maml import meta_loss, meta_loss_looped
from training.synthetic import synthetic
from training.tasks import make_tasks, sample_windows


def _throughput(step, n_tasks: int, repeats: int) -> float:
    step()  # warm-up (allocations, first-call overheads)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return n_tasks * repeats / (time.perf_counter() - start)


def run(
    n_items: int = 3700,
    batched_tasks: int = 256,
    looped_tasks: int = 16,
    repeats: int = 2,
    learner: str = "id",
    threads: int = 1,
    seed: int = 0,
) -> dict:
    if learner not in LEARNERS:
        raise ValueError(f"learner must be one of {LEARNERS}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = ModelConfig()
    n_old = n_items - n_items // 20
    split, feats = synthetic(
        n_items=n_items, n_old_items=n_old, n_old_users=batched_tasks, min_len=60, max_len=120, seed=seed
    )
    model = MML(cfg, n_old, feats.text, feats.image, feats.image_mask)
    model.train()
    rng = np.random.default_rng(seed)
    windows = sample_windows(split.old_seqs, rng, "recent", 10, cfg.max_len + 1)
    tasks = make_tasks(windows, cfg.max_len, n_old, rng)
    s1 = Stage1Config()
    big = tasks.rows(slice(0, batched_tasks)).torch()
    small = tasks.rows(slice(0, looped_tasks)).torch()

    def batched() -> None:
        model.zero_grad(set_to_none=True)
        meta_loss(model, learner, big, s1, n_old, backward_weight=1.0)

    def looped() -> None:
        model.zero_grad(set_to_none=True)
        meta_loss_looped(model, learner, small, s1, n_old, backward_weight=1.0)

    fast = _throughput(batched, batched_tasks, repeats)
    slow = _throughput(looped, looped_tasks, repeats)
    return {
        "meta_train_tasks_per_s_batched": round(fast, 2),
        "meta_train_tasks_per_s_looped": round(slow, 2),
        "meta_train_speedup": round(fast / slow, 2),
        "meta_train_setting": (
            f"learner={learner} d={cfg.d} layers={cfg.n_layers} heads={cfg.n_heads} max_len={cfg.max_len} "
            f"inner_steps={s1.inner_steps} first_order={s1.first_order} loss={s1.loss} items={n_items} "
            f"tasks(batched/looped)={batched_tasks}/{looped_tasks} threads={threads} device=cpu"
        ),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
