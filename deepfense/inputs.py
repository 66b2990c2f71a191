"""Input checks and backend resolution, shared by the functional API and the class-parallel path.

Shapes, dtypes and devices are always checked (on the host, no tensor op). Value checks (targets in range, a
non-finite loss) read tensor values, so they need host syncs; `validating` says when they run:

    asked                                   CPU tensors   CUDA (and other device) tensors
    default                                 on            off: a bad target or a NaN/Inf input gives a NaN loss
    DEEPFENSE_VALIDATE=1 or validate=True   on            on (two small host syncs per call)
    DEEPFENSE_VALIDATE=0 or validate=False  off           off
    while torch.compile traces              off           off

`validate=` (functional API and modules) wins over the variable. Tests force the CUDA column on CPU tensors by
setting `POLICY_DEVICE = "cuda"` (internal, for tests only).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .params import LossParams

BACKENDS = ("auto", "torch", "triton", "reference")

# os.environ.get of an unset name raises and catches a KeyError inside (~2 us, twice per loss call); on POSIX the
# mapping's bytes dict answers the same question without it
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _getenv(name: str) -> str:
    """The environment variable's value, or '' when unset."""
    if _ENV_BYTES is None:
        return os.environ.get(name, "")
    value = _ENV_BYTES.get(name.encode())
    return "" if value is None else os.fsdecode(value)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # any failure to import (missing, broken CUDA libs) means: no Triton
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn 'auto' (or DEEPFENSE_BACKEND) into a concrete backend name for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _getenv("DEEPFENSE_BACKEND") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"DEEPFENSE_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_importable() else "torch"
    return backend


def check_tensors(x, w_dc, bias, targets, class_weights, n_weights, *, classes_first=False):
    """Raise a ValueError naming the problem for bad shapes, dtypes or devices. w_dc is the [D, C] view, or with
    `classes_first` the [C, D] weight itself (CrossEntropy's fc.weight). Host-side only: no tensor op."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D tensor [batch, embedding_dim], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {x.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
        raise ValueError(f"targets must be a 1-D tensor [batch] of class indices, got "
                         f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of class indices, got {targets.dtype}")
    if targets.shape[0] != x.shape[0]:
        raise ValueError(f"batch size mismatch: embeddings have {x.shape[0]} rows, targets {targets.shape[0]}")
    if not isinstance(w_dc, torch.Tensor) or w_dc.dim() != 2 or not w_dc.is_floating_point():
        raise ValueError("weight must be a 2-D floating-point tensor")
    dim, n_classes = (w_dc.shape[1], w_dc.shape[0]) if classes_first else w_dc.shape
    if dim != x.shape[1]:
        raise ValueError(f"embedding_dim mismatch: embeddings have {x.shape[1]} features, the weight expects {dim}")
    device = x.device
    for name, t in (("weight", w_dc), ("targets", targets), ("bias", bias), ("class_weights", class_weights)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but embeddings are on {device}; move them to one device")
    if bias is not None and tuple(bias.shape) != (n_classes,):
        raise ValueError(f"bias must have shape ({n_classes},), got {tuple(bias.shape)}")
    if class_weights is not None and tuple(class_weights.shape) != (n_weights,):
        raise ValueError(f"class_weights must have {n_weights} entries (one per class), "
                         f"got {tuple(class_weights.shape)}")


# Tests only: the device type whose check policy applies ("cuda" makes CPU tensors follow the CUDA column); None:
# the tensors' own device.
POLICY_DEVICE = None


def validating(targets, validate=None) -> bool:
    """Whether the value checks run for a call on `targets`' device (see the module docstring's table)."""
    if targets.numel() == 0 or torch.compiler.is_compiling():
        return False
    if validate is None:
        env = _getenv("DEEPFENSE_VALIDATE")
        if env:
            return env != "0"
        return (POLICY_DEVICE or targets.device.type) == "cpu"
    return bool(validate)


def check_targets(targets, n_targets, p: LossParams) -> bool:
    """Raise unless every target is in [0, n_targets) or ignore_index. One host sync (a min and a max) in the common
    case; the full scan runs only when some target lies outside [0, n_targets).

    Returns True when every target is in range and none can be ignore_index (so no row is ignored), False otherwise.
    """
    lo, hi = (int(v) for v in torch.aminmax(targets))
    if lo >= 0 and hi < n_targets:
        return not lo <= p.ignore_index <= hi
    bad = (targets != p.ignore_index) & ((targets < 0) | (targets >= n_targets))
    if bad.any():
        raise ValueError(f"target {targets[bad][0].item()} is out of range: targets must be in [0, {n_targets}) or "
                         f"ignore_index ({p.ignore_index})")
    return False


def loss_is_finite(loss) -> bool:
    """Whether every value of the (small) loss is finite: one host sync."""
    return math.isfinite(loss.item()) if loss.dim() == 0 else bool(torch.isfinite(loss).all())


def check_finite(loss, x, w_dc, bias):
    """Host sync on the (small) loss; only when it is not finite are the inputs scanned to name the culprit."""
    if loss_is_finite(loss):
        return
    for name, t in (("embeddings", x), ("weight", w_dc), ("bias", bias)):
        if t is not None and not torch.isfinite(t.detach()).all():
            raise ValueError(f"{name} {'contain' if name.endswith('s') else 'contains'} NaN or Inf values")
    raise ValueError("the loss is not finite although the inputs are; check the scale parameters (s, alpha, lam)")
