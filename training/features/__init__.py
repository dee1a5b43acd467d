"""Stage 2 of the pipeline: item text and posters -> pretrained encoders -> item features."""

from training.features.types import ItemFeatures, load_features

__all__ = ["ItemFeatures", "load_features"]
