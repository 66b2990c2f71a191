"""Input checks and backend resolution, shared by the functional API and the class-parallel path.

Shapes, dtypes and devices are always checked (on the host, no tensor op). Value checks (targets in range, a
non-finite loss) read tensor values, so they need host syncs; `validating` says when they run:

    asked                                   CPU tensors   CUDA (and other device) tensors
    default                                 on            off: a bad target or a NaN/Inf input gives a NaN loss
    DEEPFENSE_VALIDATE=1 or validate=True   on            on (two small host syncs per call)
    DEEPFENSE_VALIDATE=0 or validate=False  off           off
    while torch.compile traces              off           off

`validate=` (functional API and modules) wins over the variable; DEEPFENSE_VALIDATE takes 1/true/on/yes and
0/false/off/no (any other value is an error). Tests force the CUDA column on CPU tensors by setting
`deepfense.options.POLICY_DEVICE = "cuda"` (internal, for tests only).
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from typing import Optional

import torch

from .options import class_weights_error, readable
from .params import LossParams, Margin

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


def backend_for(backend: str, x: torch.Tensor) -> str:
    """`resolve_backend` for the embeddings' device, on the per-call path (no torch.device object is built)."""
    if backend == "auto" and not _getenv("DEEPFENSE_BACKEND"):
        return "triton" if x.is_cuda and _triton_importable() else "torch"
    return resolve_backend(backend, x.device)


def check_tensors(x, w, bias, targets, class_weights, p: LossParams, n_weights: Optional[int] = None) -> int:
    """Raise a ValueError naming the problem for bad shapes, dtypes or devices; return the number of classes.

    w: CrossEntropy's fc.weight [C, D] (p.margin NONE), else the [D, C*K] weight. n_weights: how many class weights
    the loss takes (default: one per class, 2 for OCSoftmax; the sharded path: the global class count). Host-side
    only: no tensor op. A well-formed call is recognised from a few cheap attribute reads (a step at DeepFense's
    sizes costs ~100 us, so these microseconds count); anything else gets the checks one by one, with their errors.
    """
    n_classes = _well_formed(x, w, bias, targets, class_weights, p, n_weights)
    if n_classes is not None:
        return n_classes
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"embeddings must be a 2-D tensor [batch, embedding_dim], got {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {x.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1:
        raise ValueError(f"targets must be a 1-D tensor [batch] of class indices, got {_shape(targets)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of class indices, got {targets.dtype}")
    if targets.shape[0] != x.shape[0]:
        raise ValueError(f"batch size mismatch: embeddings have {x.shape[0]} rows, targets {targets.shape[0]}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor, got {_shape(w)}")
    ce = p.margin == Margin.NONE
    dim, n_cols = (w.shape[1], w.shape[0]) if ce else w.shape
    if dim != x.shape[1]:
        raise ValueError(f"embedding_dim mismatch: embeddings have {x.shape[1]} features, the weight expects {dim}")
    if n_cols % p.sub_centers:
        raise ValueError(f"weight has {n_cols} columns, not a multiple of sub_centers={p.sub_centers}")
    n_classes = n_cols // p.sub_centers
    if p.margin == Margin.ONE_CLASS and n_classes != 1:
        raise ValueError(f"OCSoftmax weight must have shape [embedding_dim, 1], got {tuple(w.shape)}")
    device = x.device
    for name, t in (("weight", w), ("targets", targets), ("bias", bias), ("class_weights", class_weights)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but embeddings are on {device}; move them to one device")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_classes,)):
        raise ValueError(f"bias must have shape ({n_classes},), got {_shape(bias)}")
    n_weights = n_weights or (2 if p.margin == Margin.ONE_CLASS else n_classes)
    if class_weights is not None and (not isinstance(class_weights, torch.Tensor) or class_weights.dim() != 1
                                      or class_weights.shape[0] != n_weights or not class_weights.is_floating_point()):
        raise ValueError(f"class_weights must be a 1-D floating-point tensor of {n_weights} entries (one per "
                         f"{'target' if p.margin == Margin.ONE_CLASS else 'class'}), got {_shape(class_weights)}")
    return n_classes


def _well_formed(x, w, bias, targets, class_weights, p: LossParams, n_weights: Optional[int]) -> Optional[int]:
    """The number of classes when every check of `check_tensors` passes on all-CPU or all-CUDA tensors, else None."""
    try:
        xs, ws, ts = x.shape, w.shape, targets.shape
        if len(xs) != 2 or len(ws) != 2 or len(ts) != 1 or ts[0] != xs[0] or targets.dtype not in _INDEX_DTYPES:
            return None
        if not (x.dtype.is_floating_point and w.dtype.is_floating_point):
            return None
        dim, n_cols = (ws[1], ws[0]) if p.margin == Margin.NONE else (ws[0], ws[1])
        n_classes, rest = divmod(n_cols, p.sub_centers)
        if dim != xs[1] or rest or (p.margin == Margin.ONE_CLASS and n_classes != 1):
            return None
        cpu = x.is_cpu
        if w.is_cpu != cpu or targets.is_cpu != cpu or not (cpu or x.device == w.device == targets.device):
            return None
        if bias is not None and (bias.shape != (n_classes,) or bias.is_cpu != cpu
                                 or not (cpu or bias.device == x.device)):
            return None
        if class_weights is not None:
            n_weights = n_weights or (2 if p.margin == Margin.ONE_CLASS else n_classes)
            if (class_weights.shape != (n_weights,) or not class_weights.dtype.is_floating_point
                    or class_weights.is_cpu != cpu or not (cpu or class_weights.device == x.device)):
                return None
        return n_classes
    except (AttributeError, TypeError):  # not tensors: the checks one by one name what was passed
        return None


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _shape(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}" + ("" if t.is_floating_point() else f" ({t.dtype})")
    return type(t).__name__


def validating(targets, validate=None) -> bool:
    """Whether the value checks run for a call on `targets`' device (see the module docstring's table)."""
    if validate is None:
        env = _getenv("DEEPFENSE_VALIDATE")
        on = env_flag("DEEPFENSE_VALIDATE", env) if env else readable(targets)
    elif validate is True or validate is False:
        on = validate
    else:
        raise ValueError(f"validate must be None, True or False, got {validate!r}")
    return on and targets.numel() > 0 and not torch.compiler.is_compiling()


_FLAGS = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def env_flag(name: str, value: str) -> bool:
    """A boolean environment variable's value: 1/true/on/yes or 0/false/off/no (any case); anything else raises."""
    flag = _FLAGS.get(value.strip().lower())
    if flag is None:
        raise ValueError(f"{name}={value!r}: use 1/true/on/yes or 0/false/off/no")
    return flag


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


# class-weight tensors whose values were checked, by id: (a weak reference, the tensor's version counter then)
_CHECKED_WEIGHTS: dict = {}


def check_class_weights(class_weights: torch.Tensor) -> None:
    """Raise unless every class weight is finite and >= 0 (a value check: one host sync). A tensor checked before and
    not written since (same object, same version counter) is not read again: a training loop passes the same one."""
    key = id(class_weights)
    seen = _CHECKED_WEIGHTS.get(key)
    if seen is not None and seen[0]() is class_weights and seen[1] == class_weights._version:
        return
    problem = class_weights_error(class_weights)
    if problem:
        raise ValueError(problem)
    if len(_CHECKED_WEIGHTS) > 64:
        _CHECKED_WEIGHTS.clear()
    _CHECKED_WEIGHTS[key] = (weakref.ref(class_weights), class_weights._version)


def check_finite(loss, **inputs):
    """Host sync on the (small) loss; only when it is not finite are the named inputs (x=..., weight=..., None skipped)
    scanned to name the culprit."""
    if loss_is_finite(loss):
        return
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t.detach()).all():
            raise ValueError(f"{_NAMES.get(name, name)} contain{'' if name == 'x' else 's'} NaN or Inf values")
    raise ValueError("the loss is not finite although the inputs are; check the scale parameters (s, alpha, lam)")


_NAMES = {"x": "embeddings", "lam": "the runtime scalars (lambda, or ArcFace's s and margins)"}
