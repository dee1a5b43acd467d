"""A small synthetic split + item features with learnable structure, for unit tests and benchmarks
(no data files needed). Items belong to topics; a user walks mostly inside one topic; text and image
features are noisy topic centroids (L2-normalised), some items have no poster."""

from __future__ import annotations

import numpy as np

from training.data.split import Split
from training.features.types import ItemFeatures


def synthetic(
    n_items: int = 60,
    n_old_items: int = 50,
    n_old_users: int = 40,
    n_new_users: int = 12,
    n_topics: int = 4,
    text_dim: int = 384,
    image_dim: int = 1280,
    min_len: int = 12,
    max_len: int = 80,
    missing_posters: int = 3,
    seed: int = 0,
) -> tuple[Split, ItemFeatures]:
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, n_topics, size=n_items + 1)
    topic[0] = -1

    def features(dim: int) -> np.ndarray:
        centres = rng.normal(size=(n_topics, dim))
        rows = centres[np.maximum(topic, 0)] + 0.7 * rng.normal(size=(n_items + 1, dim))
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        rows[0] = 0.0
        return rows.astype(np.float32)

    text, image = features(text_dim), features(image_dim)
    image_mask = np.ones(n_items + 1, dtype=bool)
    image_mask[0] = False
    no_poster = rng.choice(np.arange(1, n_items + 1), size=missing_posters, replace=False)
    image_mask[no_poster] = False
    image[~image_mask] = 0.0

    def walk(length: int, pool: np.ndarray) -> np.ndarray:
        favourite = rng.integers(0, n_topics)
        in_topic = pool[topic[pool] == favourite]
        choices = np.where(
            rng.random(length) < 0.8, rng.choice(in_topic, size=length), rng.choice(pool, size=length)
        )
        return choices.astype(np.int32)

    old_pool = np.arange(1, n_old_items + 1)
    all_pool = np.arange(1, n_items + 1)
    old_seqs = [walk(int(rng.integers(min_len, max_len + 1)), old_pool) for _ in range(n_old_users)]
    new = np.stack([walk(10, all_pool) for _ in range(n_new_users)])
    split = Split(
        n_items=n_items,
        n_old_items=n_old_items,
        old_users=np.array([f"o{i}" for i in range(n_old_users)]),
        old_seqs=old_seqs,
        new_users=np.array([f"n{i}" for i in range(n_new_users)]),
        new_support=new[:, :8],
        new_valid=new[:, 8],
        new_query=new[:, 9],
        stats={"source": "synthetic", "seed": seed},
    )
    item_id = np.array([""] + [str(i) for i in range(1, n_items + 1)])
    return split, ItemFeatures(text=text, image=image, image_mask=image_mask, item_id=item_id)


def tiny_meta_setup(device: str = "cpu", *, min_len: int = 4, query_share: float = 0.0, seed: int = 0):
    """A tiny float64 MML in eval mode and 5 meta-training tasks on `device`, for exact comparisons of
    the batched and looped meta-gradients (tests/test_train_maml.py, training/gpu_check.py):
    (model, tasks as tensors, n_old_items)."""
    import torch

    from model.config import ModelConfig
    from model.mml import MML
    from training.tasks import make_tasks, sample_windows

    torch.manual_seed(0)
    cfg = ModelConfig(d=16, d_ffn=32, max_len=12, n_neighbours=4, feature_bias_init=0.5)
    split, feats = synthetic(n_old_users=8)
    model = MML(cfg, split.n_old_items, feats.text, feats.image, feats.image_mask).double().eval().to(device)
    rng = np.random.default_rng(seed)
    windows = sample_windows(split.old_seqs[:5], rng, "sampled", min_len, cfg.max_len + 1)
    tasks = make_tasks(windows, cfg.max_len, split.n_old_items, rng, query_share).torch(device)
    return model, tasks, split.n_old_items
