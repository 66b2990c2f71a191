"""Fused Triton kernels for the losses (a sub-package, not a top-level `kernels`, so that it never shadows the PyPI
package `kernels` that transformers probes for).

Two kernel families serve a call: the small-head kernels (`small_head_loss`, at most `plan.SMALL_C` classes) and the
large-head kernels (`large_head_loss`); `plan.uses_small_head` says which one a head takes, and
`deepfense.dispatch` is the one place that asks it.
"""

from .common import INTERPRET, check_device
from .ops import large_head_loss
from .plan import uses_small_head
from .small_head import small_head_loss

__all__ = ["INTERPRET", "check_device", "large_head_loss", "small_head_loss", "uses_small_head"]

