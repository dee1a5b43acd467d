"""`mml bench` figures of catalogue scale (`loadtest/scale.py`): the top-k stage over synthetic
catalogues of 100k and 1M items shaped like the bundle's item matrix, exact against the service's own
IVF top-k stage (`service.topk.IvfTopK`, served with `MML_TOPK__KIND=ivf`) with each codec of
`ScaleConfig.ivf_codecs`, and Faiss HNSW. Several minutes on 2 cores.

    python -m loadtest.bench_scale [BUNDLE]          # prints the figures as JSON

`run(context)`: context keys `bundle` (else MML_BENCH_BUNDLE, else the bundles `devtools.bench_service` looks
for; none: the documented Gaussian fallback) and `scale` (a dict of `ScaleConfig` overrides).
Headline figures: `scale_1m_p99_ms` and `scale_1m_recall_at_100` (the fastest method whose
recall@100 >= 0.95; targets in mml/bench.py: <= 10 ms and >= 0.95), `scale_1m_method`; the IVF
rows (`scale_<size>_ivf_*`: the service's default codec, pq4fs with exact re-ranking;
`scale_<size>_ivf_<codec>_*`: the others; codec, rerank and the tuned nprobe in `_params`) time
`IvfTopK.search`, the call the service's topk stage makes per request.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from loadtest.scale import ScaleConfig, run_scale

REPO = Path(__file__).resolve().parents[1]
BUNDLE_CANDIDATES = (  # the same order as devtools/bench_service.py
    REPO / "artifacts" / "bundles" / "quick",
    REPO / ".cache" / "test-artifacts" / "service-bundles" / "trained",
)


def find_bundle(context: dict) -> Path | None:
    given = context.get("bundle") or os.environ.get("MML_BENCH_BUNDLE")
    if given:
        return Path(given)
    return next((p for p in BUNDLE_CANDIDATES if (p / "manifest.json").is_file()), None)


def run(context: dict | None = None) -> dict[str, float | str]:
    context = context or {}
    bundle = find_bundle(context)
    if bundle is None:
        print(
            "scale bench: no bundle: synthetic Gaussian items and queries (loadtest/scale.py)",
            file=sys.stderr,
        )
    config = ScaleConfig(**context.get("scale", {}))
    return run_scale(config, bundle)


if __name__ == "__main__":
    print(json.dumps(run({"bundle": sys.argv[1]} if len(sys.argv) > 1 else {}), indent=2, sort_keys=True))
