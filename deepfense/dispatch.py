"""The one road every loss call takes: checks, then the one function that picks the implementation, then that path.

`choose` alone decides which implementation serves a call, from the device, dtypes, shapes, the loss and the backend
asked for; whether the value checks run never changes its answer:

    path        serves                                                        when
    SHARDED     class-parallel loss over torch.distributed                    process_group is given
    REFERENCE   plain-autograd float64-exact oracle (`deepfense.reference`)   backend='reference'
    SMALL_HEAD  fused small-head Triton kernels                               triton, C <= 16 without sub-centres,
                                                                              and OCSoftmax
    LARGE_HEAD  fused large-head Triton kernels                               triton, otherwise
    PLAIN       torch's own ops, autograd's backward (`deepfense.torch_plain`) torch, CPU, C <= 16, fp32/fp64:
                                                                              CrossEntropy up to 16,384 rows,
                                                                              OCSoftmax up to 2^16 embedding values
    FUNCTION    closed-form autograd Function (`deepfense.torch_backend`)     torch, otherwise

`backend='auto'` resolves to 'triton' for CUDA tensors when Triton imports, else 'torch' (`inputs.resolve_backend`).
Every path computes the same loss with the same options; the checks around it (`run`) are the same for all.
"""

from __future__ import annotations

import enum

import torch

from . import reference, torch_plain
from .inputs import (backend_for, check_class_weights, check_finite, check_targets, check_tensors, loss_is_finite,
                     validating)
from .options import readable
from .params import LossParams, Margin, RowMargin


class Path(enum.Enum):
    """An implementation of the losses (see the module docstring's table)."""

    SHARDED = "class-parallel (torch.distributed)"
    REFERENCE = "reference (plain autograd)"
    SMALL_HEAD = "small-head Triton kernels"
    LARGE_HEAD = "large-head Triton kernels"
    PLAIN = "plain torch ops"
    FUNCTION = "closed-form torch Function"


def choose(p: LossParams, x: torch.Tensor, w: torch.Tensor, bias, backend: str, process_group=None,
           lam=None) -> Path:
    """The implementation that serves a call on embeddings `x` [B, D] and weight `w` (CrossEntropy: fc.weight [C, D];
    the others: [D, C*K]). Reads only shapes, dtypes, devices, options and whether CombinedMargin's margins (`lam`)
    require grad, never tensor values: such margins take the large-head kernels, whose statistics their gradient
    is computed from (`kernels.ops.margin_grad_term`)."""
    if process_group is not None:
        return Path.SHARDED
    name = backend_for(backend, x)
    n_classes = w.shape[0] if p.margin == Margin.NONE else w.shape[1] // p.sub_centers
    if name == "reference":
        return Path.REFERENCE
    if name == "triton":
        from .kernels import uses_small_head  # imports triton: only when the kernels are asked for
        small = uses_small_head(n_classes, p.sub_centers, one_class=p.margin == Margin.ONE_CLASS)
        small = small and not (p.margin == Margin.COMBINED and isinstance(lam, torch.Tensor) and lam.requires_grad)
        return Path.SMALL_HEAD if small else Path.LARGE_HEAD
    if torch_plain.serves(p, x, w.dtype, bias, n_classes) and p.sub_centers == 1:
        return Path.PLAIN
    return Path.FUNCTION


def run(p: LossParams, x, w, bias, targets, class_weights, lam, backend="auto", process_group=None, validate=None):
    """The loss of one call, on the path `choose` picks, with the same checks on every path.

    w: CrossEntropy's fc.weight [C, D] as given (p.margin NONE), else the [D, C*K] weight. Shapes, dtypes and devices
    are always checked; class weights (finite and >= 0) on the CPU always, elsewhere with the value checks (targets
    in range, a non-finite loss traced to its input), which follow `inputs.validating`. The plain path's own index
    ops check its targets (and name a bad one) whether or not the value checks run.
    """
    if isinstance(targets, torch.Tensor) and targets.dtype is not torch.int64 and targets.dtype in _NARROW_INTS:
        targets = targets.long()  # torch's index ops take int64: alike on every path
    if process_group is None:  # the sharded path checks its rank's slice against the other ranks' itself
        n_classes = check_tensors(x, w, bias, targets, class_weights, p)
    path = choose(p, x, w, bias, backend, process_group, lam)
    if path is Path.SHARDED:
        from .distributed import sharded_margin_loss
        return sharded_margin_loss(x, w.t() if p.margin == Margin.NONE else w, bias, targets, class_weights, lam, p,
                                   process_group, backend=backend, validate=validate)
    checking = validating(targets, validate)
    # class weights are an option: checked whenever that needs no device sync (CPU), else with the value checks
    if class_weights is not None and (checking or readable(class_weights)):
        check_class_weights(class_weights)
    n_targets = 2 if p.margin == Margin.ONE_CLASS else n_classes
    if checking and path is not Path.PLAIN:
        check_targets(targets, n_targets, p)
    try:
        loss = _IMPLEMENTATIONS[path](p, x, w, bias, targets, class_weights, lam)
    except IndexError:  # the plain path's index ops on an out-of-range target: our error names it
        check_targets(targets, n_targets, p)
        raise
    if checking and not loss_is_finite(loss):
        check_finite(loss, x=x, weight=w, bias=bias, class_weights=class_weights, lam=lam)  # names the culprit
    return loss


_NARROW_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32)


def _plain(p, x, w, bias, targets, class_weights, lam):
    if p.margin == Margin.NONE:
        return torch_plain.cross_entropy(x, w, bias, targets, class_weights, p)
    return torch_plain.one_class(x, w, targets, class_weights, p)


def _function(p, x, w, bias, targets, class_weights, lam):
    from .torch_backend import margin_loss
    return margin_loss(x, w.t() if p.margin == Margin.NONE else w, bias, targets, class_weights, lam, p)


def _small_head(p, x, w, bias, targets, class_weights, lam):
    from .kernels import small_head_loss
    return small_head_loss(x, w, bias, targets, class_weights, lam, p, classes_first=p.margin == Margin.NONE)


def _large_head(p, x, w, bias, targets, class_weights, lam):
    from .kernels import large_head_loss  # reads CrossEntropy's [C, D] weight through its strides: no transpose op
    return large_head_loss(x, w, bias, targets, class_weights, lam, p, classes_first=p.margin == Margin.NONE)


def _reference(p, x, w, bias, targets, class_weights, lam):
    common = dict(class_weights=class_weights, ignore_index=p.ignore_index, reduction=p.reduction)
    if p.margin == Margin.ADDITIVE:
        return reference.am_softmax_ref(x, w, targets, m=p.m, s=p.s, label_smoothing=p.label_smoothing,
                                        sub_centers=p.sub_centers, **common)
    if p.margin == Margin.COMBINED:
        from .torch_backend import combined_values  # (s, m1, m2, m3), each broadcasting against the [B, C] cosines
        s, m1, m2, m3 = combined_values(lam, p)
        if p.row_margins & RowMargin.CURRICULAR:
            return reference.curricular_face_ref(x, w, targets, m=m2, s=s, t=lam[4, 0], label_smoothing=p.label_smoothing,
                                                 **common)
        return reference.combined_margin_ref(x, w, targets, s=s, m1=m1, m2=m2, m3=m3, fallback=p.fallback,
                                             filter_threshold=p.filter_threshold, straight_through=p.straight_through,
                                             sub_centers=p.sub_centers, label_smoothing=p.label_smoothing, **common)
    if p.margin == Margin.ANGULAR:
        return reference.a_softmax_ref(x, w, targets, m=int(p.m), lam=lam, gamma=p.gamma, **common)
    if p.margin == Margin.ONE_CLASS:
        return reference.oc_softmax_ref(x, w, targets, m_real=p.m_real, m_fake=p.m_fake, alpha=p.alpha,
                                        bonafide_label=p.bonafide_label, **common)
    return reference.cross_entropy_ref(x, w, targets, bias=bias, label_smoothing=p.label_smoothing, **common)


_IMPLEMENTATIONS = {Path.PLAIN: _plain, Path.FUNCTION: _function, Path.SMALL_HEAD: _small_head,
                    Path.LARGE_HEAD: _large_head, Path.REFERENCE: _reference}
