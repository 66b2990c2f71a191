"""The small-head path (C <= plan.SMALL_C classes; the deepfake heads C = 1 and 2): launchers, custom ops, loss.

Two launches per training step, planned by `plan.plan_small`, kernels in `small_head_kernels` (its docstring gives the
maths): the forward reads x once and saves O(B C) per-row backward coefficients; the backward reads x once, writes dX
once and about 2 x SM-count fp32 dW partials [D (+1), C], summed here in program order (deterministic, no atomics).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from ..params import LossParams, Margin
from . import small_head_kernels as K
from .common import REDUCE, TL, OpScalars, acc_dtype, check_device, kernel_lam
from .plan import SMALL_C, Launch, gpu_tiles, plan_small, sm_count
from .reduce_rows import sums_size


def n_saved(margin, C: int, reduced: bool) -> int:
    """Rows of the forward's saved coefficients: a [C], b [1], and for reduction='none' (every loss but
    CrossEntropy) e [C]."""
    return C + 1 if reduced or int(margin) == int(Margin.NONE) else 2 * C + 1


def n_sums(margin, C: int) -> int:
    """Sums of the reduced forward (`reduce_rows`): the loss, the row weight and (but for CrossEntropy) e's C."""
    return 2 if int(margin) == int(Margin.NONE) else 2 + C


def _plan(x, w, C, margin, need_dx, need_dw) -> Tuple[Launch, ...]:
    return plan_small(Margin(margin), x.shape[0], x.shape[1], C, x.dtype, w.dtype, n_sm=sm_count(x.device),
                      need_dx=need_dx, need_dw=need_dw, gpu=gpu_tiles())


def _w_layout(w: torch.Tensor, classes_first: bool):
    """(C, stride along D, stride along C) of the weight: [D, C], or CrossEntropy's fc.weight [C, D] taken as it is
    (by its strides: no transpose op each way)."""
    if classes_first:
        return w.shape[0], w.stride(1), w.stride(0)
    return w.shape[1], w.stride(0), w.stride(1)


def _fwd_plan(x, w, sc: OpScalars):
    """The forward's launch (None for an empty batch) and the shapes of its outputs: the loss, the saved
    coefficients, the row weights ('none') or the reduction's workspace."""
    B, C = x.shape[0], _w_layout(w, sc.classes_first)[0]
    launch = _plan(x, w, C, sc.margin, False, False)[0] if B else None
    reduced = sc.reduce != REDUCE["none"]
    saved = (n_saved(sc.margin, C, reduced), B)
    if not reduced:
        return launch, ((B,), saved, (B,))
    return launch, ((), saved, (sums_size(n_sums(sc.margin, C), launch.grid[0] if B else 0),))


@torch.library.custom_op("deepfense::small_head_fwd", mutates_args=())
def small_head_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], floats: List[float],
                   ints: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher, with the reduction inside the launch: a step's forward is its 3 allocations besides the
    launch.

    Args: x [B, D], w [D, C] or, when classes_first, [C, D] (any strides, C <= SMALL_C), bias [C], targets [B] int,
    class_weights [C] ([2] OCSoftmax), lam (`common.kernel_lam`: ASoftmax's [1], CombinedMargin's scalars); floats, ints: the
    options (`common.OpScalars.to_lists`, with the reduction and the weight's layout).
    Returns: the loss (row losses [B] for 'none', else a scalar), the backward coefficients [n_saved, B] (see
    `small_head_kernels`) and, for 'sum' / 'mean', the reduction's workspace (`reduce_rows`: the backward's gradient
    scale and cosine-term totals), for 'none' the row weights [B]; fp32 (fp64 for fp64 inputs). 'mean' divides by
    the row weights' sum, 0 (not NaN) when every row is ignored.
    """
    sc = OpScalars.from_lists(floats, ints)
    B, D = x.shape
    C, stride_w_d, stride_w_c = _w_layout(w, sc.classes_first)
    acc = acc_dtype(x, w)
    launch, (loss_shape, saved_shape, third_shape) = _fwd_plan(x, w, sc)
    reduced = sc.reduce != REDUCE["none"]
    # reduced: the workspace zeroed (its ticket starts at 0); an empty batch's loss is 0
    loss = (torch.zeros if B == 0 else torch.empty)(loss_shape, dtype=acc, device=x.device)
    saved = torch.empty(saved_shape, dtype=acc, device=x.device)
    third = (torch.zeros if reduced else torch.empty)(third_shape, dtype=acc, device=x.device)
    if B > 0:
        K._small_head_fwd_kernel[launch.grid](
            X_ptr=x, W_ptr=w, BIAS_ptr=bias, T_ptr=targets, CW_ptr=class_weights, LAM_ptr=lam, LOSS_ptr=loss,
            ROWW_ptr=None if reduced else third, SAVED_ptr=saved, WS_ptr=third if reduced else None,
            B=B, D=D, C=C, n_targets=2 if sc.one_class else C, reduce=sc.reduce,
            stride_x_row=x.stride(0), stride_x_col=x.stride(1), stride_w_d=stride_w_d, stride_w_c=stride_w_c,
            **sc.runtime(), MARGIN=sc.margin, ACC_DTYPE=TL[acc], num_warps=launch.num_warps,
            num_stages=launch.num_stages, **launch.meta)
    return loss, saved, third


@small_head_fwd.register_fake
def _(x, w, bias, targets, class_weights, lam, floats, ints):
    acc = acc_dtype(x, w)
    return tuple(x.new_empty(shape, dtype=acc) for shape in _fwd_plan(x, w, OpScalars.from_lists(floats, ints))[1])


def _bwd_plan(x, w, C, margin, bias_dtype, need_dx, need_dw):
    """(the backward's launch, its row groups, the dtype of its dW (and d bias) output); (None, 0, ...) when
    nothing is launched. One row group writes dW itself, in w's dtype when a bias has that dtype too (else fp32 /
    fp64, cast by the caller); several write fp32 (fp64) partials."""
    launch = _plan(x, w, C, margin, need_dx, need_dw)[1] if x.shape[0] and (need_dx or need_dw) else None
    n_prog = launch.grid[0] if launch is not None else 0
    return launch, n_prog, w.dtype if n_prog == 1 and bias_dtype in (None, w.dtype) else acc_dtype(x, w)


@torch.library.custom_op("deepfense::small_head_bwd", mutates_args=())
def small_head_bwd(x: torch.Tensor, w: torch.Tensor, saved: torch.Tensor, grad: torch.Tensor,
                   ws: Optional[torch.Tensor], margin: int, bias_dtype: Optional[torch.dtype], need_dx: bool,
                   need_dw: bool, classes_first: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher.

    Args: x, w, classes_first as the forward; saved its coefficients; grad [B] the upstream gradient of each row's
    loss (any stride; a scalar for 'sum'/'mean'); ws: the forward's reduction workspace for 'sum'/'mean' (the
    gradient scale and the cosine-term totals), else None; bias_dtype: the bias's dtype, None without one.
    Returns dX [B, D] in x's dtype and dW: [D, C] or [C, D] like w (contiguous), or with a bias flat [D * C + C],
    d bias last ([0] where not needed), fp32/fp64 (in w's dtype when one program wrote it, `_bwd_plan`): one output,
    so the step allocates one buffer.
    """
    B, D = x.shape
    has_bias = bias_dtype is not None
    C, stride_w_d, stride_w_c = _w_layout(w, classes_first)
    acc = acc_dtype(x, w)
    dw_shape = (D * C + C,) if has_bias else tuple(w.shape)
    dx = torch.empty((B, D) if need_dx else (0,), dtype=x.dtype, device=x.device)
    launch, n_prog, dw_dtype = _bwd_plan(x, w, C, margin, bias_dtype, need_dx, need_dw)
    if n_prog == 0:  # nothing to launch: the gradients of an empty batch are zero
        return dx, torch.zeros(dw_shape if need_dw else (0,), dtype=dw_dtype, device=x.device)
    # one program: dW itself; several: partials [programs, ...], summed below in program order
    part = torch.empty(((n_prog,) if n_prog > 1 else ()) + dw_shape if need_dw else (0,), dtype=dw_dtype,
                       device=x.device)
    K._small_head_bwd_kernel[launch.grid](
        X_ptr=x, W_ptr=w, SAVED_ptr=saved, G_ptr=grad, WS_ptr=ws, DX_ptr=dx if need_dx else None,
        PART_ptr=part if need_dw else None,
        B=B, D=D, C=C, blocks_per_prog=triton.cdiv(triton.cdiv(B, launch.meta["BLOCK_B"]), n_prog),
        stride_x_row=x.stride(0), stride_x_col=x.stride(1), stride_w_d=stride_w_d, stride_w_c=stride_w_c,
        stride_g=grad.stride(0) if grad.dim() else 0, stride_p_d=1 if classes_first else C,
        stride_p_c=D if classes_first else 1,
        HAS_XCOEF=margin != int(Margin.NONE), HAS_BIAS=has_bias, ACC_DTYPE=TL[acc], num_warps=launch.num_warps,
        num_stages=launch.num_stages, **launch.meta)
    # fixed-order sum over programs: deterministic; the partials already hold dW's cosine term
    return dx, part.sum(0) if need_dw and n_prog > 1 else part


@small_head_bwd.register_fake
def _(x, w, saved, grad, ws, margin, bias_dtype, need_dx, need_dw, classes_first):
    B, D = x.shape
    C = _w_layout(w, classes_first)[0]
    dtype = _bwd_plan(x, w, C, margin, bias_dtype, need_dx, need_dw)[2]
    return (x.new_empty((B, D) if need_dx else (0,)),
            x.new_empty(((D * C + C,) if bias_dtype else tuple(w.shape)) if need_dw else (0,), dtype=dtype))


def _setup_context(ctx, inputs, output):
    x, w, bias, _, _, _, floats, ints = inputs
    sc = OpScalars.from_lists(floats, ints)
    ctx.save_for_backward(x, w, output[1], output[2] if sc.reduce != REDUCE["none"] else None)
    ctx.margin, ctx.bias_dtype, ctx.classes_first = sc.margin, None if bias is None else bias.dtype, sc.classes_first
    ctx.set_materialize_grads(False)  # the row weights and coefficients carry no gradient: no zeros for them


def _backward(ctx, grad_loss, _grad_saved, _grad_third):
    x, w, saved, ws = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_loss is None:
        return (None,) * 8
    has_bias = ctx.bias_dtype is not None
    dx, dwb = small_head_bwd(x, w, saved, grad_loss, ws, ctx.margin, ctx.bias_dtype, need_x, need_w or need_b,
                             ctx.classes_first)
    dw = db = None
    if has_bias:  # views of the one summed buffer: dW contiguous in w's shape, then d bias
        dw = dwb.as_strided(w.shape, (w.shape[1], 1)).to(w.dtype) if need_w else None
        db = dwb[w.numel():].to(ctx.bias_dtype) if need_b else None
    elif need_w:
        dw = dwb.to(w.dtype)
    return (dx if need_x else None, dw, db) + (None,) * 5


small_head_fwd.register_autograd(_backward, setup_context=_setup_context)


def small_head_loss(x, w_dc, bias, targets, class_weights, lam, p: LossParams, classes_first: bool = False):
    """Loss of any of the four kinds with at most `SMALL_C` classes, on the small-head kernels; the contract of
    `deepfense.kernels.ops.large_head_loss`.

    Args: x [B, D], w_dc [D, C] (any strides; OCSoftmax [D, 1]) or, when classes_first, CrossEntropy's fc.weight
    [C, D] as it is, bias [C] or None (CrossEntropy), targets [B] int, class_weights [C] ([2] OCSoftmax) or None,
    lam (ASoftmax: float or 0-dim tensor), p the loss options.
    Returns: fp32 (fp64 for fp64 inputs) loss, a scalar or [B] for reduction='none'; 'mean' divides by the row
    weights' sum (0, not NaN, when every row is ignored).
    """
    check_device(x, w_dc)
    C = _w_layout(w_dc, classes_first)[0]
    if not 1 <= C <= SMALL_C:
        raise ValueError(f"the small-head path takes 1..{SMALL_C} classes, got {C}")
    lam = kernel_lam(lam, p, x, w_dc, targets)
    class_weights = None if class_weights is None else class_weights.contiguous()
    # the reduction runs inside the op: no autograd graph of torch ops around it
    return small_head_fwd(x, w_dc, bias, targets.contiguous(), class_weights, lam,
                          *OpScalars.of(p, C, classes_first=classes_first).to_lists())[0]
