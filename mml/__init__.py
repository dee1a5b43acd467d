"""mml-recall: shared, torch-free pieces (CLI, errors, paths, the bundle contract)."""

__version__ = "0.1.0"
