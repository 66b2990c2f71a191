"""Functional API: the losses over explicit tensors, with a backend switch.

Backends:
    'torch'     -- PyTorch: plain torch ops for small CrossEntropy / OCSoftmax heads on the CPU, else a closed-form
                   autograd Function (`deepfense.torch_backend`).
    'triton'    -- fused Triton kernels (`deepfense.kernels`); CUDA, or CPU tensors under TRITON_INTERPRET=1.
    'reference' -- the plain-autograd oracle (`deepfense.reference`).
    'auto'      -- 'triton' for CUDA inputs when Triton imports, else 'torch'. DEEPFENSE_BACKEND overrides it.
`deepfense.dispatch.choose` picks the implementation; every option is checked by its rule in `deepfense.options`.

Input checks: shapes, dtypes and devices are always checked. Value checks (targets in range, a non-finite loss) need
small host syncs: by default they run for CPU tensors and not for CUDA tensors, where a bad target or a NaN/Inf input
shows up as a NaN loss instead; `validate=True` / `False` (or DEEPFENSE_VALIDATE=1 / 0) turns them on or off
everywhere. They never run while torch.compile traces. See `deepfense.inputs` for the table.
"""

from __future__ import annotations

import functools

import torch

from . import dispatch, reference
from .inputs import BACKENDS, resolve_backend
from .options import ANGLE, COSINE, COSINE_MARGIN, NON_NEGATIVE, ROW_ANGLE, ROW_COSINE_MARGIN, SCALE, check_rows
from .params import Fallback, LossParams, Margin, RowMargin

__all__ = ["am_softmax_loss", "a_softmax_loss", "oc_softmax_loss", "cross_entropy_loss", "arcface_loss",
           "curricular_face_loss",
           "resolve_backend", "BACKENDS"]


# LossParams checks every option on construction (~5 us); a training loop passes the same options every step
_cached_params = functools.lru_cache(maxsize=256)(LossParams)


def loss_params(margin: Margin, **options) -> LossParams:
    """The checked options of one loss (`deepfense.params.LossParams`), cached by value: what the functions below
    and the loss modules build once per option change."""
    if torch.compiler.is_compiling():  # dynamo cannot trace an lru_cache call (graph break); it folds this anyway
        return LossParams(margin, **options)
    return _cached_params(margin, **options)



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
    p = loss_params(Margin.ADDITIVE, s=float(s), m=float(m), ignore_index=ignore_index,
                   label_smoothing=float(label_smoothing), reduction=reduction, sub_centers=int(sub_centers))
    return dispatch.run(p, embeddings, weight, None, targets, class_weights, None, backend=backend,
                        process_group=process_group, validate=validate)


def a_softmax_loss(embeddings, weight, targets, *, m=4, lam=5.0, gamma=0.5, class_weights=None, ignore_index=-100,
                   reduction="mean", backend="auto", process_group=None, validate=None):
    """ASoftmax (SphereFace) loss with lambda blending and focal factor.

    Args:
        embeddings: [B, D]; weight: [D, C]; targets: [B].
        m: integer angular margin >= 1. lam: the current lambda, a float or a 0-dim tensor (a tensor keeps an annealed
            lambda free of host syncs and recompiles). gamma: focal exponent (no gradient through the factor).
        process_group, validate: as in `am_softmax_loss`.

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    p = loss_params(Margin.ANGULAR, m=float(m), gamma=float(gamma), ignore_index=ignore_index, reduction=reduction)
    NON_NEGATIVE("ASoftmax", "lam", lam, tensors="cpu")
    return dispatch.run(p, embeddings, weight, None, targets, class_weights, lam, backend=backend,
                        process_group=process_group, validate=validate)


def oc_softmax_loss(embeddings, weight, targets, *, m_real=0.5, m_fake=0.2, alpha=20.0, bonafide_label=1,
                    class_weights=None, ignore_index=-100, reduction="mean", backend="auto", validate=None):
    """OCSoftmax (one-class) loss.

    Args:
        embeddings: [B, D]; weight: [D, 1] the bonafide centre; targets: [B] in {0, 1} or `ignore_index`.
        class_weights: [2] indexed by target, or None. validate: as in `am_softmax_loss`.

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    p = loss_params(Margin.ONE_CLASS, m_real=float(m_real), m_fake=float(m_fake), alpha=float(alpha),
                   bonafide_label=int(bonafide_label), ignore_index=ignore_index, reduction=reduction)
    return dispatch.run(p, embeddings, weight, None, targets, class_weights, None, backend=backend, validate=validate)


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
    p = loss_params(Margin.NONE, ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction=reduction)
    return dispatch.run(p, embeddings, weight, bias, targets, class_weights, None, backend=backend,
                        process_group=process_group, validate=validate)


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
            m, m3 and m1 may also be per-sample tensors [B] (the adaptive-margin heads: AdaFace, MagFace,
            ElasticFace), read once per row by the kernels; a per-sample m may be negative (within +-pi/2), a
            per-sample m3 lies in [-2, 2]. A margin tensor that requires grad gets its gradient (MagFace's margin
            is a function of the feature norm); s takes none.
        fallback: 'wespeaker' | 'speechbrain' | 'pml' | 'easy' | 'adaface' | 'none' (insightface); see
            `deepfense.params.Fallback`.
        m1: angle multiplier (a Python float, or a per-sample tensor); m3: additive cosine margin. ArcFace is
            m1 = 1, m3 = 0; CosFace (= `am_softmax_loss`) m1 = 1, m = 0, m3 = its m.
        interclass_filtering_threshold: > 0 sets non-target cosines above it to 0 with no gradient (insightface).
        straight_through: insightface's gradient (theta under no_grad): d target logit / d cos_y = s.
        sub_centers: K sub-centres per class; a class's cosine is the max over its K adjacent columns.
        Other options (validate too) as `am_softmax_loss`.

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    if not isinstance(fallback, str) or fallback.upper() not in Fallback.__members__:
        raise ValueError(f"fallback must be one of {tuple(f.name.lower() for f in Fallback)}, got {fallback!r}")
    lam, rows = combined_lam(embeddings, s, m1, m, m3)
    p = loss_params(Margin.COMBINED, s=1.0, m=0.0, m1=1.0 if rows & RowMargin.M1 else float(m1), m3=0.0,
                    fallback=int(Fallback[fallback.upper()]), filter_threshold=float(interclass_filtering_threshold),
                    straight_through=bool(straight_through), sub_centers=int(sub_centers), ignore_index=ignore_index,
                    label_smoothing=float(label_smoothing), reduction=reduction, row_margins=int(rows))
    return dispatch.run(p, embeddings, weight, None, targets, class_weights, lam, backend=backend,
                        process_group=process_group, validate=validate)


def combined_lam(embeddings, s, m1, m2, m3, owner="ArcFace"):
    """CombinedMargin's runtime values as one float64 tensor [4, N] of rows (s, m1, m2, m3) on the embeddings' device,
    N = B when any is a per-sample [B] tensor (the others broadcast), else 1, and the `RowMargin` flags of the
    per-sample ones. Each value is checked by its rule (per-sample ones by `options.check_rows`).

    Built by arithmetic (`reference.scalar_like`): a schedule never changes the static options, and torch.compile
    keeps a Python float symbolic. A margin tensor that requires grad keeps its autograd history through the stack.
    """
    is_tensor = isinstance(embeddings, torch.Tensor)
    n_rows = embeddings.shape[0] if is_tensor and embeddings.dim() >= 1 else None
    rows = RowMargin(0)
    values = []
    for flag, name, v, rule, row_rule in ((RowMargin.S, "s", s, SCALE, None), (RowMargin.M1, "m1", m1, SCALE, SCALE),
                                          (RowMargin.M2, "m", m2, ANGLE, ROW_ANGLE),
                                          (RowMargin.M3, "m3", m3, COSINE_MARGIN, ROW_COSINE_MARGIN)):
        if isinstance(v, torch.Tensor) and v.dim() == 1 and row_rule is not None and n_rows is not None:
            values.append(check_rows(owner, name, v, row_rule, n_rows))
            rows |= flag
        else:
            if flag == RowMargin.M1:
                v = SCALE(owner, name, float(v))  # a Python float: 1 selects the identity form (static)
            else:
                v = rule(owner, name, v, tensors="cpu")
            if flag == RowMargin.S and isinstance(v, torch.Tensor) and v.requires_grad:
                raise ValueError(f"{owner}: 's' takes no gradient; pass s.detach() (only the margins m, m1, m3 are "
                                 "differentiable)")
            values.append(v)
    like = torch.empty((), dtype=torch.float64, device=embeddings.device if is_tensor else None)
    n = n_rows if rows else 1
    lam = torch.stack([reference.scalar_like(v, like).reshape(-1).expand(n) for v in values])
    return lam, rows


def curricular_face_loss(embeddings, weight, targets, *, m=0.5, s=64.0, t=0.0, class_weights=None,
                         ignore_index=-100, label_smoothing=0.0, reduction="mean", backend="auto", validate=None):
    """CurricularFace: ArcFace's target logit s cos(theta_y + m) (with pytorch-metric-learning's fallback s (cos_y -
    m sin m) past theta_y = pi - m, as CurricularFace's authors), and every non-target cosine above its row's
    cos(theta_y + m) (a hard negative) becomes cos (t + cos), t held constant.

    Args:
        embeddings: [B, D]; weight: [D, C]; targets: [B].
        m: angular margin (radians); s: scale (floats or 0-dim tensors). t: the running average of the target
            cosines that weighs the hard negatives, a float or 0-dim tensor in [-1, 1] (it takes no gradient;
            `deepfense.losses.CurricularFace` keeps it). Other options as `am_softmax_loss` (no process_group).

    Returns:
        float32 (float64 for float64 inputs) loss: a scalar, or [B] for reduction='none'.
    """
    lam, rows = combined_lam(embeddings, s, 1.0, m, 0.0, owner="CurricularFace")
    t = COSINE("CurricularFace", "t", t, tensors="cpu")
    t = reference.scalar_like(t, lam).detach().reshape(1).expand(lam.shape[1])
    p = loss_params(Margin.COMBINED, s=1.0, m=0.0, m1=1.0, m3=0.0, fallback=int(Fallback.PML),
                    ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction=reduction,
                    row_margins=int(rows | RowMargin.CURRICULAR))
    return dispatch.run(p, embeddings, weight, None, targets, class_weights, torch.cat([lam, t[None]]),
                        backend=backend, validate=validate)
