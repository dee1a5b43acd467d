"""The recall service (FastAPI). Imports no torch on its default path."""
