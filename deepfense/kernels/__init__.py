"""Fused Triton kernels for the four losses (a sub-package, not a top-level `kernels`, so that it never shadows the
PyPI package `kernels` that transformers probes for)."""

from .ops import INTERPRET, margin_loss

__all__ = ["margin_loss", "INTERPRET"]
