"""Text embedding family: a pre-trained encoder + pooling head, served as vectors (family.py)."""

from pipelines.families.text_embedder.family import TextEmbedder

__all__ = ["TextEmbedder"]
