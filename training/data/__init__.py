"""Stage 1 of the pipeline: source data -> generic format -> cold-start split."""

from training.data.split import Split, load_items, load_split

__all__ = ["Split", "load_items", "load_split"]
