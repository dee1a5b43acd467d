"""`mml train`: the three stages in order, with a checkpoint per stage in the run folder.

    RUN/config.json    the TrainConfig
    RUN/stage1.pt      after MAML of the three learners
    RUN/stage2.pt      after the generator (new items' ID rows filled with generated embeddings)
    RUN/stage3.pt      after the fusion layer: the final model (training.checkpoint.load_model)
    RUN/run.json       the data folder and its fingerprint
    RUN/metrics.json   each stage's losses (fixed evaluation tasks, before/after) and a validation
                       summary: Recall@10 / NDCG@10 of the new users' validation item, full ranking

A stage whose checkpoint was made with the same data and settings is loaded instead of retrained.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mml.errors import DataError, MMLError
from mml.progress import progress
from model.mml import MML
from training.checkpoint import (
    PRETRAINED,
    STAGES,
    model_from_state,
    pretrain_key,
    read_stage,
    save_stage,
    stage_key,
    write_run_info,
)
from training.config import TrainConfig
from training.cooc_learner import choose_table
from training.data.split import Split
from training.features.types import ItemFeatures
from training.maml import stage1_tasks, train_stage1
from training.pretrain import pretrain
from training.stage2_generator import train_stage2
from training.stage3_fusion import train_stage3
from training.validation import Validation
from training.warmup import choose_warmup, confirm_warmup, validation_summary


def data_fingerprint(split: Split, features: ItemFeatures) -> str:
    digest = hashlib.sha256(json.dumps(split.stats, sort_keys=True, default=str).encode())
    for seq in split.old_seqs:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
    for array in (
        split.new_support,
        split.new_valid,
        split.new_query,
        features.text,
        features.image,
        features.image_mask,
    ):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def restrict(split: Split, cfg: TrainConfig) -> Split:
    """The first max_old_users old users / max_new_users new users (tests, quick looks)."""
    n_old = cfg.max_old_users or len(split.old_seqs)
    n_new = cfg.max_new_users or len(split.new_users)
    return replace(
        split,
        old_users=split.old_users[:n_old],
        old_seqs=split.old_seqs[:n_old],
        new_users=split.new_users[:n_new],
        new_support=split.new_support[:n_new],
        new_valid=split.new_valid[:n_new],
        new_query=split.new_query[:n_new],
    )


def check_inputs(split: Split, features: ItemFeatures, cfg: TrainConfig) -> None:
    rows = split.n_items + 1
    if features.text.shape != (rows, cfg.model.text_dim) or features.image.shape != (
        rows,
        cfg.model.image_dim,
    ):
        raise DataError(
            f"features: text {features.text.shape} / image {features.image.shape} do not match the split's "
            f"{rows} item rows and the model's dims ({cfg.model.text_dim}, {cfg.model.image_dim})"
        )
    if split.n_old_items <= cfg.model.n_neighbours:
        raise DataError(
            f"n_old_items={split.n_old_items} must exceed model.n_neighbours={cfg.model.n_neighbours}"
        )
    if split.new_support.shape[1] + 1 > cfg.model.max_len + 1:
        raise DataError(
            f"new users' support ({split.new_support.shape[1]} items) exceeds max_len={cfg.model.max_len}"
        )
    if not any(len(s) > split.new_support.shape[1] for s in split.old_seqs):
        raise DataError(
            "no old user has more items than a new user's support: nothing to train the fusion on"
        )


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process so far (Linux: ru_maxrss in KiB) and, on a GPU, the peak
    of torch's allocations there, in GiB."""
    import resource

    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def device_of(cfg: TrainConfig) -> torch.device:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MMLError(f"device={cfg.device}: torch sees no CUDA device on this machine")
    return device


def train(
    split: Split,
    features: ItemFeatures,
    out_dir: str | Path,
    cfg: TrainConfig,
    show_progress: bool = True,
    data_dir: str | Path | None = None,
    validation: Validation | None = None,
    pretrained_from: tuple[Path, ...] = (),
) -> dict:
    """Train (or resume) a run; returns the metrics written to RUN/metrics.json. `validation`: what
    selection scores against (default: the split's new users' support and validation items).
    `pretrained_from`: other run folders whose stage-1a result (RUN/stage1a.pt) is reused when it
    was made from the same data and pre-training settings (MML and PT-FT share it)."""
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = restrict(split, cfg)
    check_inputs(split, features, cfg)
    if validation is None:
        validation = Validation.from_items(split.new_support, split.new_valid)
    torch.set_num_threads(cfg.threads)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    fingerprint = data_fingerprint(split, features)
    keys = {stage: stage_key(cfg, fingerprint, stage) for stage in STAGES}
    if data_dir is not None:
        write_run_info(out, data_dir, fingerprint)

    # the longest prefix of stages already done with these settings
    done: dict[int, dict] = {}
    for stage in STAGES:
        ckpt = read_stage(out, stage)
        if ckpt is None or ckpt["key"] != keys[stage]:
            break
        done[stage] = ckpt
    if done:
        last = max(done)
        model = model_from_state(cfg, split.n_old_items, done[last]["state"])
        if 3 in done:  # the warm-up the finished run chose (WarmupConfig.select)
            cfg = cfg.model_copy(update={"warmup": TrainConfig.model_validate(done[3]["config"]).warmup})
    else:
        torch.manual_seed(cfg.seed)
        model = MML(cfg.model, split.n_old_items, features.text, features.image, features.image_mask)
    model.to(device_of(cfg))
    losses = {f"stage{stage}": ckpt["losses"] for stage, ckpt in done.items()}

    eval_rng = np.random.default_rng([cfg.seed, 0])
    eval_users = eval_rng.permutation(len(split.old_seqs))[: cfg.eval_tasks]
    eval_tasks = stage1_tasks([split.old_seqs[i] for i in eval_users], cfg, split.n_old_items, eval_rng)
    n_tasks = len(stage1_tasks(split.old_seqs, cfg, split.n_old_items, np.random.default_rng(0)))
    n_fusion = int(round(cfg.stage3.user_fraction * len(split.old_seqs)))

    with progress() as bar:
        todo = {
            1: (cfg.stage1.epochs * n_tasks, "stage 1 MAML"),
            2: (cfg.stage2.epochs * n_tasks, "stage 2 generator"),
            3: (cfg.stage3.epochs * n_fusion, "stage 3 fusion"),
        }
        handles = {
            stage: bar.add_task(
                label, total=max(total, 1), info="done" if stage in done else "", visible=show_progress
            )
            for stage, (total, label) in todo.items()
        }
        for stage in STAGES:
            if stage in done:
                bar.update(handles[stage], completed=max(todo[stage][0], 1))
                continue
            torch.manual_seed(cfg.seed + stage)
            rng = np.random.default_rng([cfg.seed, stage])
            per_epoch = todo[stage][0] // max(getattr(cfg, f"stage{stage}").epochs, 1)

            def report(
                epoch: int, done_in_epoch: int, info: str, stage: int = stage, per_epoch: int = per_epoch
            ) -> None:
                bar.update(handles[stage], completed=epoch * per_epoch + done_in_epoch, info=info)

            stage_start = time.perf_counter()
            if stage == 1:
                result = {}
                if cfg.stage1.pretrain.steps:
                    pre_key = pretrain_key(cfg, fingerprint)
                    reused = _pretrained(pre_key, (out, *pretrained_from))
                    if reused is not None:
                        model.load_state_dict(reused["state"])
                        result["pretrain"] = {**reused["record"], "reused_from": reused["from"]}
                    else:

                        def report_pre(step: int, info: str, stage: int = stage) -> None:
                            bar.update(handles[stage], info=f"pre-training {info}")

                        result["pretrain"] = pretrain(
                            model,
                            split.old_seqs,
                            cfg.stage1.pretrain,
                            cfg.window_max,
                            validation,
                            rng,
                            report_pre,
                        )
                        torch.save(
                            {
                                "key": pre_key,
                                "record": result["pretrain"],
                                "state": {k: v.cpu() for k, v in model.state_dict().items()},
                            },
                            out / PRETRAINED,
                        )
                result.update(
                    train_stage1(model, split.old_seqs, cfg, eval_tasks, rng, report, validation=validation)
                )
            elif stage == 2:
                result = train_stage2(model, split.old_seqs, cfg, eval_tasks, rng, report)
                model.fill_new_items()  # new items' ID rows <- generator (before stage 3 and export)
            else:
                result = {}
                if cfg.warmup.select:
                    cfg, result["warmup_selection"] = choose_warmup(model, cfg, validation)
                table = None
                if model.has_cooc:
                    m = cfg.model.cooc_neighbours
                    table, result["cooc_windows"] = choose_table(
                        split.old_seqs, split.n_items, m, cfg.cooc, validation
                    )
                    result["cooc_window"] = table.window
                support_size = split.new_support.shape[1]
                result.update(
                    train_stage3(
                        model,
                        split.old_seqs,
                        support_size,
                        cfg,
                        eval_tasks,
                        rng,
                        report,
                        cooc=table,
                        validation=validation,
                    )  # fmt: skip
                )
                if cfg.warmup.steps and cfg.stage3.select:
                    cfg, result["warmup_confirmed"] = confirm_warmup(model, cfg, validation)
            result["wall_s"] = round(time.perf_counter() - stage_start, 1)
            losses[f"stage{stage}"] = result
            save_stage(out, stage, keys[stage], model, cfg, result)
            bar.update(handles[stage], completed=max(todo[stage][0], 1))

    model.eval()
    summary = {
        f"warmup_steps_{steps}": validation_summary(model, split.new_support, split.new_valid, cfg, steps)
        for steps in sorted({0, cfg.warmup.steps})
    }
    metrics = {
        "profile": cfg.profile,
        "seed": cfg.seed,
        "loss": cfg.stage1.loss,
        "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        "n_old_users": len(split.old_seqs),
        "n_new_users": len(split.new_users),
        "n_items": split.n_items,
        "n_old_items": split.n_old_items,
        "stages_loaded": sorted(done),
        **losses,
        "warmup": cfg.warmup.model_dump(mode="json"),
        "validation": summary,
        "wall_s": round(time.perf_counter() - started, 1),
        **peak_memory(model.device),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _pretrained(key: str, folders: tuple[Path, ...]) -> dict | None:
    """A stage-1a result with this key from the first of `folders` that has one."""
    for folder in folders:
        path = Path(folder) / PRETRAINED
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                return {**saved, "from": str(folder)}
    return None


def train_from_dir(
    data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, show_progress: bool = True
) -> dict:
    """`mml train`: load the prepared split and its features from DATA, train into OUT."""
    from training.data.split import load_split
    from training.features.types import load_features

    return train(load_split(data_dir), load_features(data_dir), out_dir, cfg, show_progress, data_dir)
