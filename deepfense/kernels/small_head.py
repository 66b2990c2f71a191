"""The small-head path (C <= 16 classes; the deepfake heads C = 1 and 2): launch plan, launchers, custom ops, loss.

Two launches per training step, kernels in `small_head_kernels` (its docstring gives the maths): the forward reads x
once and saves O(B C) per-row backward coefficients; the backward reads x once, writes dX once and about 2 x SM-count
fp32 dW partials [D (+1), C], summed here in program order (deterministic, no atomics).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton

from ..params import LossParams, Margin
from . import small_head_kernels as K
# the plan's kernel names resolve here too (compile checks look a Launch's kernel up in this module)
from .small_head_kernels import _small_head_bwd_kernel, _small_head_fwd_kernel  # noqa: F401
from .ops import _TL, INTERPRET, _unpack, check_device, kernel_lam, op_params
from .plan import Launch, gpu_tiles, sm_count
from .reduce_rows import sums_size

MAX_CLASSES = 16
# Elements of the broadcast product tile (BLOCK_B x BLOCK_K x BLOCK_C) per program: 32 per thread at 4 warps keeps
# the kernels below 128 registers (25% occupancy on sm_90) without spills; fp64 takes two registers per element.
_TILE_ELEMS = {4: 4096, 8: 2048}
# The backward's row groups write fp32 dW partials [D, C] that are read back once: at most 1/32 of x's bytes.
_PARTIAL_SHARE = 32


def plan_small(margin, B: int, D: int, C: int, x_dtype: torch.dtype, w_dtype: torch.dtype, *, n_sm: int,
               need_dx: bool = True, need_dw: bool = True, gpu: bool = True) -> Tuple[Launch, ...]:
    """Every launch of one training step of the small-head path: the forward, then (if a gradient is needed and
    B > 0) the backward.

    Args: margin (`Margin`, unused by the tiles today), B, D, C (<= 16) the shapes, x/w dtypes, n_sm the device's
    multiprocessors. gpu=False gives small interpreter tiles, so small tests run several row blocks and K chunks.
    Forward: one program per BLOCK_B rows (one row per thread), K chunks of BLOCK_K.
    Backward: grid (row groups, K slices of BLOCK_K), about 2 x n_sm programs; each row group writes one dW partial,
    so there are at most as many as keep the partials within 1/32 of x's bytes, and each K slice re-reads the
    per-row coefficients, so the slices are as wide as the registers allow (up to 64 features per thread).
    """
    del margin
    bc = triton.next_power_of_2(C)
    acc_bytes = 8 if torch.float64 in (x_dtype, w_dtype) else 4
    warps = 4
    if gpu:
        # 8 or more classes: 8 warps and twice the rows (forward) or features (backward) per program, the same
        # registers per thread; the forward then re-reads w for half as many rows, the backward its per-row
        # coefficients for half as many K chunks (issue 8's bytes budget at C = 8)
        warps = 16 if bc >= 8 else 4
        elems = _TILE_ELEMS[acc_bytes] * warps // 4
        # at most 64 bytes of its row per thread per K step: 32 fp32 values took 130-150 registers
        x_bytes_el = torch.finfo(x_dtype).bits // 8
        bb_f = 32 * warps  # one row per thread
        bk_f = max(1, min(triton.next_power_of_2(D), elems // (bc * bb_f), 64 // x_bytes_el))
        # the backward keeps x, dX and two products per element: half the forward's tile (4096 took 140-250 regs)
        bk_b = min(triton.next_power_of_2(D), 64 * warps, elems // 2 // bc)
        bb_b = min(64, max(1, elems // 2 // (bk_b * bc)))
        groups = triton.cdiv(2 * n_sm, triton.cdiv(D, bk_b))
        if need_dw:
            x_bytes = B * D * x_bytes_el
            groups = min(groups, max(1, x_bytes // (_PARTIAL_SHARE * 2 * acc_bytes * (D + 1) * C)))
        # fewer programs than SMs: narrower K slices (down to 512 features) for more programs, at the cost of one
        # more read of the per-row coefficients per slice
        while groups * triton.cdiv(D, bk_b) < n_sm and bk_b >= 1024 and groups < triton.cdiv(B, bb_b):
            bk_b //= 2
            bb_b = min(64, max(1, elems // 2 // (bk_b * bc)))
    else:
        bk_f, bb_f, bk_b, bb_b, groups = 4, 4, 8, 2, 3
    fwd = Launch("_small_head_fwd_kernel", (triton.cdiv(B, bb_f),), warps, 2,
                 dict(BLOCK_B=bb_f, BLOCK_K=bk_f, BLOCK_C=bc, SUM_BLOCK=triton.next_power_of_2(bc + 2)))
    if B == 0 or not (need_dx or need_dw):
        return (fwd,)
    n_blocks = triton.cdiv(B, bb_b)
    per_group = max(1, n_blocks // groups)
    bwd = Launch("_small_head_bwd_kernel", (triton.cdiv(n_blocks, per_group), triton.cdiv(D, bk_b)), warps, 2,
                 dict(BLOCK_B=bb_b, BLOCK_K=bk_b, BLOCK_C=bc))
    return fwd, bwd


def n_saved(margin, C: int, reduced: bool) -> int:
    """Rows of the forward's saved coefficients: a [C], b [1], and for reduction='none' (every loss but
    CrossEntropy) e [C]."""
    return C + 1 if reduced or int(margin) == int(Margin.NONE) else 2 * C + 1


def n_sums(margin, C: int) -> int:
    """Sums of the reduced forward (`reduce_rows`): the loss, the row weight and (but for CrossEntropy) e's C."""
    return 2 if int(margin) == int(Margin.NONE) else 2 + C


def _acc_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


def _plan(x, w, C, margin, need_dx, need_dw) -> Tuple[Launch, ...]:
    return plan_small(Margin(margin), x.shape[0], x.shape[1], C, x.dtype, w.dtype, n_sm=sm_count(x.device),
                      need_dx=need_dx, need_dw=need_dw, gpu=gpu_tiles())


REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def _w_layout(w: torch.Tensor, classes_first: bool):
    """(C, stride along D, stride along C) of the weight: [D, C], or CrossEntropy's fc.weight [C, D] taken as it is
    (by its strides: no transpose op each way)."""
    if classes_first:
        return w.shape[0], w.stride(1), w.stride(0)
    return w.shape[1], w.stride(0), w.stride(1)


def _fwd_plan(x, w, ints, reduction, classes_first):
    """The forward's launch (None for an empty batch) and the shapes of its outputs: the loss, the saved
    coefficients, the row weights ('none') or the reduction's workspace."""
    B, margin, C = x.shape[0], ints[0], _w_layout(w, classes_first)[0]
    launch = _plan(x, w, C, margin, False, False)[0] if B else None
    reduced = reduction != REDUCTIONS["none"]
    saved = (n_saved(margin, C, reduced), B)
    if not reduced:
        return launch, ((B,), saved, (B,))
    return launch, ((), saved, (sums_size(n_sums(margin, C), launch.grid[0] if B else 0),))


@torch.library.custom_op("deepfense::small_head_fwd", mutates_args=())
def small_head_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], floats: List[float],
                   ints: List[int], reduction: int,
                   classes_first: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher, with the reduction (`REDUCTIONS`) inside the launch: a step's forward is its 3 allocations
    besides the launch.

    Args: x [B, D], w [D, C] or, when classes_first, [C, D] (any strides, C <= 16), bias [C], targets [B] int,
    class_weights [C] ([2] OCSoftmax), lam [1] (ASoftmax); floats, ints from `ops.op_params`.
    Returns: the loss (row losses [B] for 'none', else a scalar), the backward coefficients [n_saved, B] (see
    `small_head_kernels`) and, for 'sum' / 'mean', the reduction's workspace (`reduce_rows`: the backward's gradient
    scale and cosine-term totals), for 'none' the row weights [B]; fp32 (fp64 for fp64 inputs). 'mean' divides by
    the row weights' sum, 0 (not NaN) when every row is ignored.
    """
    margin, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide, _, _ = _unpack(floats, ints)
    B, D = x.shape
    C, stride_w_d, stride_w_c = _w_layout(w, classes_first)
    acc = _acc_dtype(x, w)
    launch, (loss_shape, saved_shape, third_shape) = _fwd_plan(x, w, ints, reduction, classes_first)
    reduced = reduction != REDUCTIONS["none"]
    # reduced: the workspace zeroed (its ticket starts at 0); an empty batch's loss is 0
    loss = (torch.zeros if B == 0 else torch.empty)(loss_shape, dtype=acc, device=x.device)
    saved = torch.empty(saved_shape, dtype=acc, device=x.device)
    third = (torch.zeros if reduced else torch.empty)(third_shape, dtype=acc, device=x.device)
    if B > 0:
        dummy = targets  # never read: its constexpr flag is off
        row_w, ws = (dummy, third) if reduced else (third, dummy)
        K._small_head_fwd_kernel[launch.grid](
            x, w, dummy if bias is None else bias, targets, dummy if class_weights is None else class_weights,
            dummy if lam is None else lam, loss, row_w, saved, ws, B, D, C,
            2 if margin == int(Margin.ONE_CLASS) else C, reduction, x.stride(0), x.stride(1), stride_w_d,
            stride_w_c, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide,
            MARGIN=margin, HAS_BIAS=bias is not None, HAS_CW=class_weights is not None, ACC_DTYPE=_TL[acc],
            REDUCED=reduced, num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.meta)
    return loss, saved, third


@small_head_fwd.register_fake
def _(x, w, bias, targets, class_weights, lam, floats, ints, reduction, classes_first):
    acc = _acc_dtype(x, w)
    return tuple(x.new_empty(shape, dtype=acc) for shape in _fwd_plan(x, w, ints, reduction, classes_first)[1])


def _bwd_plan(x, w, C, margin, bias_dtype, need_dx, need_dw):
    """(the backward's launch, its row groups, the dtype of its dW (and d bias) output); (None, 0, ...) when
    nothing is launched. One row group writes dW itself, in w's dtype when a bias has that dtype too (else fp32 /
    fp64, cast by the caller); several write fp32 (fp64) partials."""
    launch = _plan(x, w, C, margin, need_dx, need_dw)[1] if x.shape[0] and (need_dx or need_dw) else None
    n_prog = launch.grid[0] if launch is not None else 0
    return launch, n_prog, w.dtype if n_prog == 1 and bias_dtype in (None, w.dtype) else _acc_dtype(x, w)


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
    acc = _acc_dtype(x, w)
    dw_shape = (D * C + C,) if has_bias else tuple(w.shape)
    dx = torch.empty((B, D) if need_dx else (0,), dtype=x.dtype, device=x.device)
    launch, n_prog, dw_dtype = _bwd_plan(x, w, C, margin, bias_dtype, need_dx, need_dw)
    if n_prog == 0:  # nothing to launch: the gradients of an empty batch are zero
        return dx, torch.zeros(dw_shape if need_dw else (0,), dtype=dw_dtype, device=x.device)
    # one program: dW itself; several: partials [programs, ...], summed below in program order
    part = torch.empty(((n_prog,) if n_prog > 1 else ()) + dw_shape if need_dw else (0,), dtype=dw_dtype,
                       device=x.device)
    K._small_head_bwd_kernel[launch.grid](
        x, w, saved, grad, grad if ws is None else ws, dx, part, B, D, C,
        triton.cdiv(triton.cdiv(B, launch.meta["BLOCK_B"]), n_prog),
        x.stride(0), x.stride(1), stride_w_d, stride_w_c, grad.stride(0) if grad.dim() else 0,
        *((1, D) if classes_first else (C, 1)),
        HAS_XCOEF=margin != int(Margin.NONE), REDUCED=ws is not None, HAS_BIAS=has_bias, NEED_DX=need_dx,
        NEED_DW=need_dw, ACC_DTYPE=_TL[acc], num_warps=launch.num_warps,
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
    x, w, bias, _, _, _, _, ints, reduction, classes_first = inputs
    ctx.save_for_backward(x, w, output[1], output[2] if reduction != REDUCTIONS["none"] else None)
    ctx.margin, ctx.bias_dtype, ctx.classes_first = ints[0], None if bias is None else bias.dtype, classes_first
    ctx.set_materialize_grads(False)  # the row weights and coefficients carry no gradient: no zeros for them


def _backward(ctx, grad_loss, _grad_saved, _grad_third):
    x, w, saved, ws = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_loss is None:
        return (None,) * 10
    has_bias = ctx.bias_dtype is not None
    dx, dwb = small_head_bwd(x, w, saved, grad_loss, ws, ctx.margin, ctx.bias_dtype, need_x, need_w or need_b,
                             ctx.classes_first)
    dw = db = None
    if has_bias:  # views of the one summed buffer: dW contiguous in w's shape, then d bias
        dw = dwb.as_strided(w.shape, (w.shape[1], 1)).to(w.dtype) if need_w else None
        db = dwb[w.numel():].to(ctx.bias_dtype) if need_b else None
    elif need_w:
        dw = dwb.to(w.dtype)
    return (dx if need_x else None, dw, db) + (None,) * 7


small_head_fwd.register_autograd(_backward, setup_context=_setup_context)


def small_head_loss(x, w_dc, bias, targets, class_weights, lam, p: LossParams, classes_first: bool = False):
    """Loss of any of the four kinds with at most `MAX_CLASSES` classes, on the small-head kernels; the contract of
    `deepfense.kernels.ops.large_head_loss`.

    Args: x [B, D], w_dc [D, C] (any strides; OCSoftmax [D, 1]) or, when classes_first, CrossEntropy's fc.weight
    [C, D] as it is, bias [C] or None (CrossEntropy), targets [B] int, class_weights [C] ([2] OCSoftmax) or None,
    lam (ASoftmax: float or 0-dim tensor), p the loss options.
    Returns: fp32 (fp64 for fp64 inputs) loss, a scalar or [B] for reduction='none'; 'mean' divides by the row
    weights' sum (0, not NaN, when every row is ignored).
    """
    check_device(x, w_dc)
    C = _w_layout(w_dc, classes_first)[0]
    if not 1 <= C <= MAX_CLASSES:
        raise ValueError(f"the small-head path takes 1..{MAX_CLASSES} classes, got {C}")
    lam = kernel_lam(lam, p, x, w_dc)
    class_weights = None if class_weights is None else class_weights.contiguous()
    floats, ints = op_params(p, C)
    # the reduction runs inside the op: no autograd graph of torch ops around it
    return small_head_fwd(x, w_dc, bias, targets.contiguous(), class_weights, lam, floats, ints,
                          REDUCTIONS[p.reduction], classes_first)[0]
