"""Stage-1 meta-training on a GPU: the batched meta-gradient equals the per-task loop there too, and
the batched/looped throughput of `training.bench_meta` at the `make bench` setting and at larger
meta-batches and chunks. Needs CUDA (CI and `make bench` run on CPU only).

    python -m training.gpu_check --out docs/results/meta-train-gpu.json

The equivalence part is tests/test_train_maml.py's check (float64, a tiny model, large local
learning rate, first and second order, every learner) on the GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from model.mml import LEARNERS
from training import bench_meta
from training.config import Stage1Config
from training.maml import learner_parameters, meta_loss, meta_loss_looped
from training.synthetic import tiny_meta_setup

# (batched tasks, tasks per vmapped chunk or None = Stage1Config's, second order)
SWEEP = ((256, None, False), (1024, None, False), (1024, 256, False), (1024, 1024, False),
         (4096, 1024, False), (256, None, True), (1024, 256, True))  # fmt: skip
TOLERANCE = 1e-9  # relative to the largest gradient entry, float64


def equivalence(device: torch.device) -> list[dict]:
    model, tasks, n_old = tiny_meta_setup(device)
    checks = []
    for first_order in (True, False):
        s1 = Stage1Config(first_order=first_order, inner_steps=2, inner_lr=0.5)
        for name in LEARNERS:
            out = []
            for fn in (meta_loss, meta_loss_looped):
                model.zero_grad(set_to_none=True)
                loss = fn(model, name, tasks, s1, n_old, backward_weight=1.0)
                out.append((float(loss), [p.grad.clone() for p in learner_parameters(model, name)]))
            (loss_b, grads_b), (loss_l, grads_l) = out
            diff = max(float((a - b).abs().max()) for a, b in zip(grads_b, grads_l, strict=True))
            scale = max(float(b.abs().max()) for b in grads_l)
            checks.append({
                "first_order": first_order, "learner": name, "loss_batched": loss_b, "loss_looped": loss_l,
                "max_abs_grad_diff": diff, "max_abs_grad": scale,
                "ok": diff <= TOLERANCE * max(1.0, scale) and loss_b == loss_l,
            })  # fmt: skip
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    device = torch.device("cuda")
    out: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device)}
    out["equivalence"] = equivalence(device)
    out["equivalence_ok"] = all(c["ok"] for c in out["equivalence"])
    print(json.dumps({"equivalence_ok": out["equivalence_ok"]}), flush=True)
    out["bench"] = []
    for batched, chunk, second_order in SWEEP:
        start = time.perf_counter()
        run = bench_meta.run(
            device="cuda", batched_tasks=batched, chunk=chunk, first_order=not second_order, repeats=3
        )
        run["seconds"] = round(time.perf_counter() - start, 1)
        out["bench"].append(run)
        print(json.dumps(run), flush=True)
    out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
