"""Stage 4 of the pipeline: a trained run -> ONNX graphs + item tables + Faiss index = a serving
bundle (docs/export.md). The bundle layout is mml/bundle.py; the torch-free loader is
mml/bundle_loader.py.

    export_bundle(run_dir, out_dir, data_dir=None)            # a trained run (`mml export`)
    export_model(model, out_dir, item_ids=..., popularity=...) # an in-memory MML (tests)

Attributes are imported on first use, so `training.export.cli` stays light (no torch at CLI start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.export.build import export_model
    from training.export.run import export_bundle

__all__ = ["export_bundle", "export_model"]


def __getattr__(name: str) -> Any:
    if name == "export_bundle":
        from training.export.run import export_bundle

        return export_bundle
    if name == "export_model":
        from training.export.build import export_model

        return export_model
    raise AttributeError(f"module 'training.export' has no attribute {name!r}")
