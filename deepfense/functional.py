"""Functional API: the four losses over explicit tensors, with a backend switch.

Backends:
    'torch'     -- closed-form autograd Function in PyTorch (`deepfense.torch_backend`); the fast path on CPU.
    'triton'    -- fused Triton kernels (`deepfense.kernels`); CUDA, or CPU tensors under TRITON_INTERPRET=1.
    'reference' -- the plain-autograd oracle (`deepfense.reference`).
    'auto'      -- 'triton' for CUDA inputs when Triton imports, else 'torch'. DEEPFENSE_BACKEND overrides it.

Input checks: shapes, dtypes and devices are always checked. Value checks (targets in range, a non-finite loss) need
small host syncs: by default they run for CPU tensors and not for CUDA tensors, where a bad target or a NaN/Inf input
shows up as a NaN loss instead; `validate=True` / `False` (or DEEPFENSE_VALIDATE=1 / 0) turns them on or off
everywhere. They never run while torch.compile traces. See `deepfense.inputs` for the table.
"""

from __future__ import annotations

import functools

import torch

from . import reference, torch_plain
from .inputs import BACKENDS, check_finite, check_targets, check_tensors, loss_is_finite, resolve_backend, validating
from .params import Fallback, Margin, LossParams

__all__ = ["am_softmax_loss", "a_softmax_loss", "oc_softmax_loss", "cross_entropy_loss", "arcface_loss",
           "resolve_backend", "BACKENDS"]


# LossParams validates its fields on construction (~5 us); a training loop passes the same options every step
_cached_params = functools.lru_cache(maxsize=256)(LossParams)


def _params(margin: Margin, **options) -> LossParams:
    if torch.compiler.is_compiling():  # dynamo cannot trace an lru_cache call (graph break); it folds this anyway
        return LossParams(margin, **options)
    return _cached_params(margin, **options)


def _dispatch(p: LossParams, x, w, bias, targets, class_weights, lam, backend, process_group=None, validate=None):
    """w: the [D, C] weight, or for CrossEntropy (p.margin NONE) fc.weight [C, D] as given (its [D, C] view is made
    only for the paths that take it, so the plain path's graph has no transpose node)."""
    if isinstance(targets, torch.Tensor) and targets.dtype in (torch.uint8, torch.int8, torch.int16):
        targets = targets.long()  # torch's gather/scatter index with int32/int64 only; Triton takes any: alike on all
    ce = p.margin == Margin.NONE
    if process_group is not None:  # class-parallel: w is this rank's class slice (see deepfense.distributed)
        from .distributed import sharded_margin_loss
        return sharded_margin_loss(x, w.t() if ce else w, bias, targets, class_weights, lam, p, process_group,
                                   backend=backend, validate=validate)
    n_cols = w.shape[0] if ce else w.shape[-1]
    if w.dim() == 2 and n_cols % p.sub_centers:
        raise ValueError(f"weight has {n_cols} columns, not a multiple of sub_centers={p.sub_centers}")
    n_classes = n_cols // p.sub_centers
    n_targets = 2 if p.margin == Margin.ONE_CLASS else n_classes
    check_tensors(x, w, bias, targets, class_weights, n_targets, classes_first=ce)
    if p.margin == Margin.ONE_CLASS and n_classes != 1:
        raise ValueError(f"OCSoftmax weight must have shape [embedding_dim, 1], got {tuple(w.shape)}")
    name = resolve_backend(backend, x.device)
    validate = validating(targets, validate)
    if (p.margin == Margin.ONE_CLASS and name == "torch" and validate
            and torch_plain.applies(p, x, n_classes, bias, class_weights, w.dtype)):
        loss = _plain_oc(p, x, w, targets)
        if loss is not None:
            return loss
    if validate:
        check_targets(targets, n_targets, p)
    if name == "reference":
        loss = _reference(p, x, w.t() if ce else w, bias, targets, class_weights, lam)
    elif name == "torch":
        from .torch_backend import margin_loss
        loss = margin_loss(x, w.t() if ce else w, bias, targets, class_weights, lam, p)
    else:  # the kernels read CrossEntropy's [C, D] weight through its strides: no transpose op in the step
        from .kernels import margin_loss
        loss = margin_loss(x, w, bias, targets, class_weights, lam, p, classes_first=ce)
    if validate:
        check_finite(loss, x, w, bias)
    return loss


def _plain_oc(p: LossParams, x, w, targets):
    """OCSoftmax's small-batch plain-autograd loss (`deepfense.torch_plain`), or None where the general path must
    answer: some row ignored, or a loss that is not finite (NaN/Inf inputs, which the general path then names)."""
    if not check_targets(targets, 2, p):
        return None
    loss = torch_plain.margin_loss(x, w, None, targets, p)
    return loss if loss_is_finite(loss) else None


def _plain_ce(x, w, bias, targets, ignore_index, label_smoothing, reduction, backend, validate):
    """CrossEntropy's small-batch path, taken before any other work (no LossParams either): torch's `linear` +
    `cross_entropy` (`deepfense.torch_plain`) when the call is well-formed, its options valid, the backend resolves to
    'torch', the value checks run and `torch_plain.cross_entropy_applies`; else None, and the general path answers
    (and names any problem). torch checks the targets itself: an out-of-range one raises inside, and the general
    path then raises our error for it. A loss that is not finite also goes to the general path: every row ignored
    (torch's mean is NaN, ours 0) or NaN/Inf inputs (named there). At B = 8 a forward costs ~10 us of torch ops, so
    these checks are kept to attribute reads."""
    if not (isinstance(x, torch.Tensor) and isinstance(targets, torch.Tensor) and x.dim() == 2 and targets.dim() == 1
            and targets.dtype == torch.int64 and w.shape[1] == x.shape[1] and targets.shape[0] == x.shape[0]
            and (bias is None or bias.shape == (w.shape[0],)) and type(ignore_index) is int
            and reduction in ("mean", "sum", "none") and type(label_smoothing) in (float, int)
            and 0.0 <= label_smoothing <= 1.0):
        return None
    if (resolve_backend(backend, x.device) != "torch" or not validating(targets, validate)
            or not torch_plain.cross_entropy_applies(x, w, bias)):
        return None
    try:
        loss = torch_plain.cross_entropy(x, w, bias, targets, reduction, ignore_index, float(label_smoothing))
    except (IndexError, RuntimeError):  # a target out of range, tensors on two devices: named by the general path
        return None
    return loss if loss_is_finite(loss) else None


def _reference(p: LossParams, x, w_dc, bias, targets, class_weights, lam):
    common = dict(class_weights=class_weights, ignore_index=p.ignore_index, reduction=p.reduction)
    if p.margin == Margin.ADDITIVE:
        return reference.am_softmax_ref(x, w_dc, targets, m=p.m, s=p.s, label_smoothing=p.label_smoothing,
                                        sub_centers=p.sub_centers, **common)
    if p.margin == Margin.COMBINED:
        s, m2, m3 = (p.s, p.m, p.m3) if lam is None else lam.unbind()
        return reference.combined_margin_ref(x, w_dc, targets, s=s, m1=p.m1, m2=m2, m3=m3, fallback=p.fallback,
                                             filter_threshold=p.filter_threshold, straight_through=p.straight_through,
                                             sub_centers=p.sub_centers, label_smoothing=p.label_smoothing, **common)
    if p.margin == Margin.ANGULAR:
        return reference.a_softmax_ref(x, w_dc, targets, m=int(p.m), lam=lam, gamma=p.gamma, **common)
    if p.margin == Margin.ONE_CLASS:
        return reference.oc_softmax_ref(x, w_dc, targets, m_real=p.m_real, m_fake=p.m_fake, alpha=p.alpha,
                                        bonafide_label=p.bonafide_label, **common)
    return reference.cross_entropy_ref(x, w_dc.t(), targets, bias=bias, label_smoothing=p.label_smoothing, **common)


def am_softmax_loss(embeddings, weight, targets, *, m=0.3, s=30.0, class_weights=None, ignore_index=-100,
                    label_smoothing=0.0, reduction="mean", backend="auto", process_group=None, validate=None,
                    sub_centers=1):
    """AMSoftmax loss.

    Args:
        embeddings: [B, D] float tensor (fp32, fp16, bf16 or fp64).
        weight: [D, C] class weights (DeepFense's `mapper.weight`), columns normalised inside.
        targets: [B] integer class indices in [0, C) or `ignore_index`.
        m, s: additive margin and scale. class_weights: [C] or None. label_smoothing: torch's epsilon.
        reduction: 'mean' | 'sum' | 'none'. backend: see module docstring.
        process_group: a torch.distributed group to split the classes over: `weight` is then this rank's slice
            [D, C_r] and targets are global (see `deepfense.distributed`; the sharded path runs torch ops).
        validate: None (default: value checks on for CPU tensors, off for CUDA ones, or DEEPFENSE_VALIDATE), True or
            False; see the module docstring.
        sub_centers: K; weight is then [D, C*K], a class's K columns adjacent, its cosine the max over them.

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    p = _params(Margin.ADDITIVE, s=float(s), m=float(m), ignore_index=ignore_index,
                   label_smoothing=float(label_smoothing), reduction=reduction, sub_centers=int(sub_centers))
    return _dispatch(p, embeddings, weight, None, targets, class_weights, None, backend, process_group, validate)


def a_softmax_loss(embeddings, weight, targets, *, m=4, lam=5.0, gamma=0.5, class_weights=None, ignore_index=-100,
                   reduction="mean", backend="auto", process_group=None, validate=None):
    """ASoftmax (SphereFace) loss with lambda blending and focal factor.

    Args:
        embeddings: [B, D]; weight: [D, C]; targets: [B].
        m: integer angular margin 1..5. lam: the current lambda, a float or a 0-dim tensor (a tensor keeps an annealed
            lambda free of host syncs and recompiles). gamma: focal exponent (no gradient through the factor).
        process_group, validate: as in `am_softmax_loss`.

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    p = _params(Margin.ANGULAR, m=float(m), gamma=float(gamma), ignore_index=ignore_index, reduction=reduction)
    return _dispatch(p, embeddings, weight, None, targets, class_weights, lam, backend, process_group, validate)


def oc_softmax_loss(embeddings, weight, targets, *, m_real=0.5, m_fake=0.2, alpha=20.0, bonafide_label=1,
                    class_weights=None, ignore_index=-100, reduction="mean", backend="auto", validate=None):
    """OCSoftmax (one-class) loss.

    Args:
        embeddings: [B, D]; weight: [D, 1] the bonafide centre; targets: [B] in {0, 1} or `ignore_index`.
        class_weights: [2] indexed by target, or None. validate: as in `am_softmax_loss`.

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    p = _params(Margin.ONE_CLASS, m_real=float(m_real), m_fake=float(m_fake), alpha=float(alpha),
                   bonafide_label=int(bonafide_label), ignore_index=ignore_index, reduction=reduction)
    return _dispatch(p, embeddings, weight, None, targets, class_weights, None, backend, validate=validate)


def cross_entropy_loss(embeddings, weight, targets, *, bias=None, class_weights=None, ignore_index=-100,
                       label_smoothing=0.0, reduction="mean", backend="auto", process_group=None, validate=None):
    """Linear projection + softmax cross-entropy.

    Args:
        embeddings: [B, D]; weight: [C, D] (`fc.weight`); bias: [C] or None; targets: [B].
        process_group: class-parallel group, as in `am_softmax_loss` (weight [C_r, D], bias [C_r]). validate: as
            in `am_softmax_loss`.

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor [n_classes, embedding_dim]")
    if class_weights is None and process_group is None:
        loss = _plain_ce(embeddings, weight, bias, targets, ignore_index, label_smoothing, reduction, backend, validate)
        if loss is not None:
            return loss
    p = _params(Margin.NONE, ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction=reduction)
    return _dispatch(p, embeddings, weight, bias, targets, class_weights, None, backend, process_group, validate)


def arcface_loss(embeddings, weight, targets, *, m=0.2, s=32.0, fallback="wespeaker", m1=1.0, m3=0.0,
                 interclass_filtering_threshold=0.0, straight_through=False, sub_centers=1, class_weights=None,
                 ignore_index=-100, label_smoothing=0.0, reduction="mean", backend="auto", process_group=None,
                 validate=None):
    """ArcFace (additive angular margin) and insightface's combined margin: logits s*cos_c, target logit
    s*(cos(m1 theta_y + m) - m3), past the monotone range the `fallback` of the toolkit it names.

    Args:
        embeddings: [B, D]; weight: [D, C*K] (K = sub_centers; pytorch-metric-learning's `W` layout); targets: [B].
        m: additive angular margin m2 (radians). s: scale. m, s (and m3) may be 0-dim tensors: a scheduled margin
            then never recompiles under torch.compile (a changed Python float recompiles once, then stays dynamic).
        fallback: 'wespeaker' | 'speechbrain' | 'pml' | 'easy' | 'none' (insightface); see `deepfense.params.Fallback`.
        m1: angle multiplier (a Python float); m3: additive cosine margin. ArcFace is m1 = 1, m3 = 0; CosFace
            (= `am_softmax_loss`) m1 = 1, m = 0, m3 = its m.
        interclass_filtering_threshold: > 0 sets non-target cosines above it to 0 with no gradient (insightface).
        straight_through: insightface's gradient (theta under no_grad): d target logit / d cos_y = s.
        sub_centers: K sub-centres per class; a class's cosine is the max over its K adjacent columns.
        Other options (validate too) as `am_softmax_loss`.

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    if not isinstance(fallback, str) or fallback.upper() not in Fallback.__members__:
        raise ValueError(f"fallback must be one of {tuple(f.name.lower() for f in Fallback)}, got {fallback!r}")
    for name, v in (("s", s), ("m", m), ("m3", m3)):
        if not isinstance(v, torch.Tensor) and (v < 0 or (name == "s" and v == 0)):
            raise ValueError(f"{name} must be {'> 0' if name == 's' else '>= 0'}, got {v}")
    # the runtime scalars (s, m2, m3) travel as one float64 tensor on the embeddings' device, built by arithmetic
    # (`scalar_like`): a schedule never changes the static options, and torch.compile keeps a Python float symbolic
    device = embeddings.device if isinstance(embeddings, torch.Tensor) else None
    like = torch.empty((), dtype=torch.float64, device=device)
    lam = torch.stack([reference.scalar_like(v, like).reshape(()) for v in (s, m, m3)])
    p = LossParams(Margin.COMBINED, s=1.0, m=0.0, m1=float(m1), m3=0.0,
                   fallback=int(Fallback[fallback.upper()]), filter_threshold=float(interclass_filtering_threshold),
                   straight_through=bool(straight_through), sub_centers=int(sub_centers), ignore_index=ignore_index,
                   label_smoothing=float(label_smoothing), reduction=reduction)
    return _dispatch(p, embeddings, weight, None, targets, class_weights, lam, backend, process_group,
                     validate)
