"""How good are generated ID embeddings? Old items held out as "new" (issue: a generator that shows).

For a sample of old items z (which have trained ID rows e_z), the generator makes g_z from z's K old
neighbours (Eq. 14-17; z itself is never among its own neighbours). We report:

  * cosine(g_z, e_z): mean and median over the sample;
  * retrieval: rank of e_z among all old items' trained rows by inner product with g_z (MRR and
    hit@10), i.e. whether the generated vector points at the item it stands for;
  * the same for two references: the plain mean of the neighbours' trained rows (what the attention
    of Eq. 15 improves on) and a random N(0, init_std) row (what No-Gen gives a new item).

    python -m training.generator_check --run RUN [--out docs/results/generator-check.json]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer

from model.mml import MML


@torch.no_grad()
def measure(model: MML, n_items: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    old = np.arange(1, model.n_old_items + 1)
    items = torch.as_tensor(rng.choice(old, size=min(n_items, len(old)), replace=False))
    trained = model.item_emb.weight[1 : model.n_old_items + 1]  # (n_old, d), row i-1 = item i
    candidates = {
        "generated": model.generate(items),
        "neighbour_mean": model.item_emb.weight[model.neighbours[items]].mean(dim=1),
        "random": torch.randn(len(items), model.cfg.d, generator=torch.Generator().manual_seed(seed))
        * model.cfg.init_std,
    }
    truth = model.item_emb.weight[items]
    out = {}
    for name, vectors in candidates.items():
        cosine = torch.nn.functional.cosine_similarity(vectors, truth, dim=-1)
        scores = vectors @ trained.T  # (n, n_old)
        own = scores.gather(1, (items - 1).unsqueeze(1))
        rank = 1 + (scores > own).sum(dim=1).float()
        out[name] = {
            "cosine_mean": float(cosine.mean()),
            "cosine_median": float(cosine.median()),
            "mrr": float((1.0 / rank).mean()),
            "hit@10": float((rank <= 10).float().mean()),
            "median_rank": float(rank.median()),
        }
    out["_sample"] = {"items": len(items), "n_old_items": model.n_old_items, "seed": seed}
    return out


def main(
    run: Path = typer.Option(..., help="a trained run folder (mml train --out)"),
    out: Path | None = typer.Option(None, help="write the figures as JSON here"),
    items: int = typer.Option(1000, help="old items sampled"),
) -> None:
    from training.checkpoint import load_model

    model, _ = load_model(run)
    result = {"run": str(run), **measure(model, items)}
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    typer.run(main)
