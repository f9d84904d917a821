"""Primitives shared by the networks: attention, embeddings, normalisation."""

from .attention import attention

__all__ = ["attention"]
