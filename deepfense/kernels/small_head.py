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
from .ops import _TL, INTERPRET, _unpack, op_params
from .plan import Launch, gpu_tiles, sm_count

MAX_CLASSES = 16
# Elements of the broadcast product tile (BLOCK_B x BLOCK_K x BLOCK_C) per program: 32 per thread at 4 warps keeps
# the kernels below 128 registers (25% occupancy on sm_90) without spills; fp64 takes two registers per element.
_TILE_ELEMS = {4: 4096, 8: 2048}
# The backward's programs write fp32 dW partials [D, C] that are read back once: at most 1/16 of x's bytes.
_PARTIAL_SHARE = 16


def plan_small(margin, B: int, D: int, C: int, x_dtype: torch.dtype, w_dtype: torch.dtype, *, n_sm: int,
               need_dx: bool = True, need_dw: bool = True, gpu: bool = True) -> Tuple[Launch, ...]:
    """Every launch of one training step of the small-head path: the forward, then (if a gradient is needed and
    B > 0) the backward.

    Args: margin (`Margin`, unused by the tiles today), B, D, C (<= 16) the shapes, x/w dtypes, n_sm the device's
    multiprocessors. gpu=False gives small interpreter tiles, so small tests run several row blocks and K chunks.
    Forward: one program per BLOCK_B rows (one row per thread), K chunks of BLOCK_K.
    Backward: about 2 x n_sm persistent programs (fewer when their dW partials would pass 1/16 of x's bytes), K chunks
    of up to 256 so the per-row coefficients it re-reads once per chunk stay a few % of x.
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
        rows = 32 * warps  # one row per thread; 16 classes per row need fewer rows (147 regs)
        bk_f = max(1, min(triton.next_power_of_2(D), elems // (bc * rows), 64 // x_bytes_el))
        bb_f = rows if bc < 16 else rows // 2
        # the backward keeps x, dX and two products per element: half the forward's tile (4096 took 140-250 regs)
        bk_b = min(triton.next_power_of_2(D), 64 * warps, elems // 2 // bc)
        bb_b = min(64, max(1, elems // 2 // (bk_b * bc)))
        target = 2 * n_sm
        if need_dw:
            x_bytes = B * D * x_bytes_el
            target = min(target, max(1, x_bytes // (_PARTIAL_SHARE * 2 * acc_bytes * (D + 1) * C)))
    else:
        bk_f, bb_f, bk_b, bb_b, target = 4, 4, 8, 2, 3
    fwd = Launch("_small_head_fwd_kernel", (triton.cdiv(B, bb_f),), warps, 2,
                 dict(BLOCK_B=bb_f, BLOCK_K=bk_f, BLOCK_C=bc))
    if B == 0 or not (need_dx or need_dw):
        return (fwd,)
    n_blocks = triton.cdiv(B, bb_b)
    per_prog = max(1, n_blocks // target)
    bwd = Launch("_small_head_bwd_kernel", (triton.cdiv(n_blocks, per_prog),), warps, 2,
                 dict(BLOCK_B=bb_b, BLOCK_K=bk_b, BLOCK_C=bc))
    return fwd, bwd


def n_saved(margin, C: int) -> int:
    """Columns of the forward's saved coefficients per row: a [C], b [1] and (every loss but CrossEntropy) e [C]."""
    return C + 1 if int(margin) == int(Margin.NONE) else 2 * C + 1


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


@torch.library.custom_op("deepfense::small_head_fwd", mutates_args=())
def small_head_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], floats: List[float],
                   ints: List[int], reduction: int,
                   classes_first: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher, with the reduction (`REDUCTIONS`) inside the op: a step's forward is 1 allocation, a sum,
    an unbind and a division besides the launch.

    Args: x [B, D], w [D, C] or, when classes_first, [C, D] (any strides, C <= 16), bias [C], targets [B] int,
    class_weights [C] ([2] OCSoftmax), lam [1] (ASoftmax); floats, ints from `ops.op_params`.
    Returns: the loss (row losses [B] for 'none', else a scalar), the backward coefficients (see
    `small_head_kernels`; 'sum'/'mean': the whole buffer [2 + n, B + 1] whose rows are the row losses, the row
    weights and the n = n_saved(margin, C) coefficients; 'none': [n, B]) and the buffer's row sums [2 + n] (loss,
    row weight + tiny, ...) (the row weights [B] for 'none'); fp32 (fp64 for fp64 inputs). 'mean' divides by the
    row weights' sum, 0 (not NaN) when every row is ignored.
    """
    margin, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide, _, _ = _unpack(floats, ints)
    B, D = x.shape
    C, stride_w_d, stride_w_c = _w_layout(w, classes_first)
    acc = _acc_dtype(x, w)
    n = n_saved(margin, C)
    reduced = reduction != REDUCTIONS["none"]
    if reduced:  # one buffer: loss, row weight and coefficient rows, padded with a column (0, tiny, 0 ...)
        buf = torch.empty(2 + n, B + 1, dtype=acc, device=x.device)
        out, row_w, saved, offsets = buf, buf, buf, (B + 1, 2 * (B + 1), B + 1)
    else:
        out, row_w = torch.empty(B, dtype=acc, device=x.device), torch.empty(B, dtype=acc, device=x.device)
        saved, offsets = torch.empty(n, B, dtype=acc, device=x.device), (0, 0, B)
    if B > 0:
        launch = _plan(x, w, C, margin, False, False)[0]
        dummy = targets  # never read: its constexpr flag is off
        K._small_head_fwd_kernel[launch.grid](
            x, w, dummy if bias is None else bias, targets, dummy if class_weights is None else class_weights,
            dummy if lam is None else lam, out, row_w, saved, B, D, C, 2 if margin == int(Margin.ONE_CLASS) else C,
            n, *offsets, torch.finfo(torch.float32).tiny, x.stride(0), x.stride(1), stride_w_d, stride_w_c,
            s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide,
            MARGIN=margin, HAS_BIAS=bias is not None, HAS_CW=class_weights is not None, ACC_DTYPE=_TL[acc],
            PAD=reduced, num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.meta)
    if not reduced:
        return out, saved, row_w
    if B == 0:  # an empty batch: loss 0 (no backward launch reads the buffer)
        return torch.zeros((), dtype=acc, device=x.device), buf, torch.ones(2 + n, dtype=acc, device=x.device)
    tot = buf.sum(1)  # fixed order: deterministic
    if reduction == REDUCTIONS["sum"]:
        return tot[0].clone(), buf, tot
    loss_sum, weight_sum = tot.unbind()[:2]
    return torch.div(loss_sum, weight_sum), buf, tot


@small_head_fwd.register_fake
def _(x, w, bias, targets, class_weights, lam, floats, ints, reduction, classes_first):
    B = x.shape[0]
    acc = _acc_dtype(x, w)
    n = n_saved(ints[0], _w_layout(w, classes_first)[0])
    if reduction != REDUCTIONS["none"]:
        return x.new_empty((), dtype=acc), x.new_empty((2 + n, B + 1), dtype=acc), x.new_empty(2 + n, dtype=acc)
    return x.new_empty(B, dtype=acc), x.new_empty((n, B), dtype=acc), x.new_empty(B, dtype=acc)


@torch.library.custom_op("deepfense::small_head_bwd", mutates_args=())
def small_head_bwd(x: torch.Tensor, w: torch.Tensor, saved: torch.Tensor, grad: torch.Tensor,
                   den: Optional[torch.Tensor], mean: bool, margin: int, has_bias: bool, need_dx: bool,
                   need_dw: bool, classes_first: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher.

    Args: x, w, classes_first as the forward; saved its coefficients (either layout it returns); grad [B] the
    upstream gradient of each row's loss (any stride; a scalar for 'sum'/'mean'); den: the forward's row sums for
    'sum'/'mean' (grad is divided by den[1] when mean), else None. Returns dX [B, D] in x's dtype and dW
    fp32/fp64: [D, C] or [C, D] like w (contiguous), or with a bias flat [D * C + C], d bias last ([0] where not
    needed): one output, so the step allocates and sums one buffer.
    """
    B, D = x.shape
    C, stride_w_d, stride_w_c = _w_layout(w, classes_first)
    acc = _acc_dtype(x, w)
    dw_shape = (D * C + C,) if has_bias else tuple(w.shape)
    dx = torch.empty((B, D) if need_dx else (0,), dtype=x.dtype, device=x.device)
    if B == 0 or not (need_dx or need_dw):  # nothing to launch: the gradients of an empty batch are zero
        return dx, torch.zeros(dw_shape if need_dw else (0,), dtype=acc, device=x.device)
    launch = _plan(x, w, C, margin, need_dx, need_dw)[1]
    n_prog = launch.grid[0]
    part = torch.empty((n_prog, *dw_shape) if need_dw else (0,), dtype=acc, device=x.device)
    stride_s = saved.shape[1]
    K._small_head_bwd_kernel[launch.grid](
        x, w, saved, grad, grad if den is None else den, dx, part, B, D, C,
        (saved.shape[0] - n_saved(margin, C)) * stride_s, stride_s,
        triton.cdiv(triton.cdiv(B, launch.meta["BLOCK_B"]), n_prog),
        x.stride(0), x.stride(1), stride_w_d, stride_w_c, grad.stride(0) if grad.dim() else 0,
        *((1, D) if classes_first else (C, 1)), int(mean),
        HAS_XCOEF=margin != int(Margin.NONE), HAS_DEN=den is not None, HAS_BIAS=has_bias, NEED_DX=need_dx,
        NEED_DW=need_dw, ACC_DTYPE=_TL[acc], num_warps=launch.num_warps,
        num_stages=launch.num_stages, **launch.meta)
    # fixed-order sum over programs: deterministic; the partials already hold dW's cosine term
    return dx, part.sum(0) if need_dw else part


@small_head_bwd.register_fake
def _(x, w, saved, grad, den, mean, margin, has_bias, need_dx, need_dw, classes_first):
    B, D = x.shape
    C = _w_layout(w, classes_first)[0]
    return (x.new_empty((B, D) if need_dx else (0,)),
            x.new_empty(((D * C + C,) if has_bias else tuple(w.shape)) if need_dw else (0,),
                        dtype=_acc_dtype(x, w)))


def _setup_context(ctx, inputs, output):
    x, w, bias, _, _, _, _, ints, reduction, classes_first = inputs
    ctx.save_for_backward(x, w, output[1], output[2] if reduction != REDUCTIONS["none"] else None)
    ctx.margin, ctx.bias_dtype, ctx.classes_first = ints[0], None if bias is None else bias.dtype, classes_first
    ctx.mean = reduction == REDUCTIONS["mean"]
    ctx.set_materialize_grads(False)  # the row weights and coefficients carry no gradient: no zeros for them


def _backward(ctx, grad_loss, _grad_saved, _grad_sums):
    x, w, saved, den = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_loss is None:
        return (None,) * 10
    has_bias = ctx.bias_dtype is not None
    dx, dwb = small_head_bwd(x, w, saved, grad_loss, den, ctx.mean, ctx.margin, has_bias, need_x,
                             need_w or need_b, ctx.classes_first)
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
    `deepfense.kernels.ops.margin_loss`.

    Args: x [B, D], w_dc [D, C] (any strides; OCSoftmax [D, 1]) or, when classes_first, CrossEntropy's fc.weight
    [C, D] as it is, bias [C] or None (CrossEntropy), targets [B] int, class_weights [C] ([2] OCSoftmax) or None,
    lam (ASoftmax: float or 0-dim tensor), p the loss options.
    Returns: fp32 (fp64 for fp64 inputs) loss, a scalar or [B] for reduction='none'; 'mean' divides by the row
    weights' sum (0, not NaN, when every row is ignored).
    """
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing deepfense "
                           f"to run the kernels on CPU in the interpreter); got tensors on {x.device}.")
    if x.dtype not in _TL or w_dc.dtype not in _TL:
        raise ValueError("backend='triton' supports float16, bfloat16, float32 and float64, "
                         f"got {x.dtype}/{w_dc.dtype}")
    C = _w_layout(w_dc, classes_first)[0]
    if not 1 <= C <= MAX_CLASSES:
        raise ValueError(f"the small-head path takes 1..{MAX_CLASSES} classes, got {C}")
    if p.margin == Margin.ANGULAR:
        lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
        lam = lam if lam.numel() == 1 and lam.dim() <= 1 else lam.reshape(1)  # one value: 0-dim or [1], no view
    elif p.margin != Margin.COMBINED:  # CombinedMargin's LAM comes from ops.kernel_lam
        lam = None
    class_weights = None if class_weights is None else class_weights.contiguous()
    floats, ints = op_params(p, C)
    # the reduction runs inside the op: no autograd graph of torch ops around it (issue 12: ops per step)
    return small_head_fwd(x, w_dc, bias, targets.contiguous(), class_weights, lam, floats, ints,
                          REDUCTIONS[p.reduction], classes_first)[0]
