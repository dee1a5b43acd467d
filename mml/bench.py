"""`mml bench`: run every stage's benchmark and merge the figures into one JSON file.

Each benchmark module exposes `run(context) -> dict[str, float | str]`; figures are measured, never
typed in. Targets are recorded next to the figures, with whether they were met.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import typer

# (module, description); pipeline order.
BENCHMARKS = [
    ("training.bench_meta", "stage-1 meta-training throughput, batched vs per-task loop"),
    ("training.export.bench", "fused scoring latency, ONNX Runtime vs eager PyTorch"),
    ("devtools.bench_service", "POST /recall latency and throughput"),
    ("devtools.bench_cooc", "POST /recall on the mml_cooc arm beside the mml arm (co-occurrence learner)"),
    ("loadtest.bench_scale", "catalogue scale: exact vs IVF/HNSW top-k at 100k and 1M items"),
]

# name -> (comparison, target)
TARGETS = {
    "meta_train_speedup": (">=", 10.0),
    "onnx_vs_eager_latency_ratio": ("<=", 0.5),
    "recall_p50_ms": ("<=", 1.5),
    "recall_p99_ms": ("<=", 5.0),
    "recall_max_rps_p99_20ms": (">=", 500.0),
    "recall_rps_one_worker_p99_10ms": (">=", 1000.0),
    "recall_cooc_p99_ms": ("<=", 10.0),  # the mml_cooc arm, server-side (issue 14)
    "recall_cooc_p50_minus_mml_ms": ("<=", 0.3),  # issue 14: p50 rises by at most 0.3 ms on ML-1M
    "scale_1m_p99_ms": ("<=", 10.0),
    "scale_1m_recall_at_100": (">=", 0.95),
}


def _met(name: str, value: float) -> bool | None:
    if name not in TARGETS or not isinstance(value, int | float):
        return None
    op, target = TARGETS[name]
    return value >= target if op == ">=" else value <= target


def run_all(out: Path, only: list[str] | None = None, context: dict | None = None) -> dict:
    out = Path(out)
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    context = context or {}
    for module_name, description in BENCHMARKS:
        if only and not any(o in module_name for o in only):
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                typer.secho(f"skip {module_name}: not built yet", err=True)
                continue
            raise
        typer.secho(f"bench: {description}", err=True)
        start = time.perf_counter()
        figures = module.run(context)
        results.update(figures)
        results.setdefault("_runs", {})[module_name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    results["_targets"] = {
        name: {"target": f"{op} {target}", "value": results.get(name), "met": _met(name, results.get(name))}
        for name, (op, target) in TARGETS.items()
        if name in results
    }
    results["_machine"] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


def _cpu_model() -> str:
    """The processor's name (/proc/cpuinfo): latency figures are only comparable on the same one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def register(groups: dict[str, typer.Typer]) -> None:
    @groups["root"].command("bench")
    def bench(
        out: Path = typer.Option(
            Path("docs/results/bench.json"), help="JSON file the figures are merged into"
        ),
        only: list[str] = typer.Option(None, help="run only benchmarks whose module name contains this"),
    ) -> None:
        """Run the benchmarks (speed and memory targets live here, not in tests)."""
        results = run_all(out, only)
        for name, row in results.get("_targets", {}).items():
            mark = "ok " if row["met"] else "MISS"
            typer.echo(f"{mark} {name} = {row['value']} (target {row['target']})")
