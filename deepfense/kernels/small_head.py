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
    if gpu:
        elems = _TILE_ELEMS[acc_bytes]
        # at most 64 bytes of its row per thread per K step: 32 fp32 values took 130-150 registers
        x_bytes_el = torch.finfo(x_dtype).bits // 8
        bk_f = max(1, min(triton.next_power_of_2(D), elems // (bc * 128), 64 // x_bytes_el))
        bb_f = 128 if bc < 16 else 64  # one row per thread at 4 warps; 16 classes per row need fewer rows (147 regs)
        # the backward keeps x, dX and two products per element: half the forward's tile (4096 took 140-250 regs)
        bk_b = min(triton.next_power_of_2(D), 256, elems // 2 // bc)
        bb_b = min(64, max(1, elems // 2 // (bk_b * bc)))
        target = 2 * n_sm
        if need_dw:
            x_bytes = B * D * x_bytes_el
            target = min(target, max(1, x_bytes // (_PARTIAL_SHARE * 2 * acc_bytes * (D + 1) * C)))
    else:
        bk_f, bb_f, bk_b, bb_b, target = 4, 4, 8, 2, 3
    fwd = Launch("_small_head_fwd_kernel", (triton.cdiv(B, bb_f),), 4, 2, dict(BLOCK_B=bb_f, BLOCK_K=bk_f, BLOCK_C=bc))
    if B == 0 or not (need_dx or need_dw):
        return (fwd,)
    n_blocks = triton.cdiv(B, bb_b)
    per_prog = max(1, n_blocks // target)
    bwd = Launch("_small_head_bwd_kernel", (triton.cdiv(n_blocks, per_prog),), 4, 2,
                 dict(BLOCK_B=bb_b, BLOCK_K=bk_b, BLOCK_C=bc))
    return fwd, bwd


def n_saved(margin, C: int) -> int:
    """Columns of the forward's saved coefficients per row: a [C], b [1] and (every loss but CrossEntropy) e [C]."""
    return C + 1 if int(margin) == int(Margin.NONE) else 2 * C + 1


def _acc_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


def _plan(x, w, margin, need_dx, need_dw) -> Tuple[Launch, ...]:
    return plan_small(Margin(margin), x.shape[0], x.shape[1], w.shape[1], x.dtype, w.dtype, n_sm=sm_count(x.device),
                      need_dx=need_dx, need_dw=need_dw, gpu=gpu_tiles())


REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


@torch.library.custom_op("deepfense::small_head_fwd", mutates_args=())
def small_head_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], floats: List[float],
                   ints: List[int], reduction: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher, with the reduction (`REDUCTIONS`) inside the op: a step's forward is 2 allocations, a sum
    and a division besides the launch.

    Args: x [B, D], w [D, C] (any strides, C <= 16), bias [C], targets [B] int, class_weights [C] ([2] OCSoftmax),
    lam [1] (ASoftmax); floats, ints from `ops.op_params`.
    Returns: the loss (row losses [B] for 'none', else a scalar), the backward coefficients [B, n_saved(margin, C)]
    and the sums (loss, row weight + tiny) [2] (the row weights [B] for 'none'); fp32 (fp64 for fp64 inputs).
    'mean' divides by the row weights' sum, 0 (not NaN) when every row is ignored.
    """
    margin, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide, _, _ = _unpack(floats, ints)
    (B, D), C = x.shape, w.shape[1]
    acc = _acc_dtype(x, w)
    reduced = reduction != REDUCTIONS["none"]
    # 'sum'/'mean': loss and row weights side by side in one buffer [2, B + 1], padded with (0, tiny)
    lw = torch.empty((2, B + 1) if reduced else (B,), dtype=acc, device=x.device)
    row_w = lw if reduced else torch.empty(B, dtype=acc, device=x.device)
    saved = torch.empty(B, n_saved(margin, C), dtype=acc, device=x.device)
    if B > 0:
        launch = _plan(x, w, margin, False, False)[0]
        dummy = targets  # never read: its constexpr flag is off
        K._small_head_fwd_kernel[launch.grid](
            x, w, dummy if bias is None else bias, targets, dummy if class_weights is None else class_weights,
            dummy if lam is None else lam, lw, row_w, saved, B, D, C, 2 if margin == int(Margin.ONE_CLASS) else C,
            saved.shape[1], B + 1 if reduced else 0, torch.finfo(acc).tiny, x.stride(0), x.stride(1),
            w.stride(0), w.stride(1), s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide,
            MARGIN=margin, HAS_BIAS=bias is not None, HAS_CW=class_weights is not None, ACC_DTYPE=_TL[acc],
            PAD=reduced, num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.meta)
    if not reduced:
        return lw, saved, row_w
    if B == 0:  # an empty batch: loss 0
        return torch.zeros((), dtype=acc, device=x.device), saved, torch.ones(2, dtype=acc, device=x.device)
    tot = lw.sum(1)  # fixed order: deterministic
    if reduction == REDUCTIONS["sum"]:
        return tot[0].clone(), saved, tot
    return torch.div(*tot.unbind()), saved, tot


@small_head_fwd.register_fake
def _(x, w, bias, targets, class_weights, lam, floats, ints, reduction):
    (B, _), C = x.shape, w.shape[1]
    acc = _acc_dtype(x, w)
    reduced = reduction != REDUCTIONS["none"]
    return (x.new_empty(() if reduced else (B,), dtype=acc), x.new_empty((B, n_saved(ints[0], C)), dtype=acc),
            x.new_empty(2 if reduced else B, dtype=acc))


@torch.library.custom_op("deepfense::small_head_bwd", mutates_args=())
def small_head_bwd(x: torch.Tensor, w: torch.Tensor, saved: torch.Tensor, grad: torch.Tensor,
                   den: Optional[torch.Tensor], margin: int,
                   has_bias: bool, need_dx: bool, need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher.

    Args: x, w as the forward; saved [B, n_saved] its coefficients; grad [B] the upstream gradient of each row's loss
    (any stride; a scalar for 'sum'/'mean'); den: the forward's sums [2] for 'mean' (grad is divided by den[1]), else
    None. Returns dX [B, D] in x's dtype and dW with d bias as its row D [D (+1), C] fp32/fp64 (contiguous;
    [0] where not needed): one output, so the step allocates and sums one buffer.
    """
    (B, D), C = x.shape, w.shape[1]
    acc = _acc_dtype(x, w)
    dx = torch.empty((B, D) if need_dx else (0,), dtype=x.dtype, device=x.device)
    if B == 0 or not (need_dx or need_dw):  # nothing to launch: the gradients of an empty batch are zero
        return dx, torch.zeros((D + has_bias, C) if need_dw else (0,), dtype=acc, device=x.device)
    launch = _plan(x, w, margin, need_dx, need_dw)[1]
    n_prog = launch.grid[0]
    part = torch.empty((n_prog, D + has_bias, C) if need_dw else (0,), dtype=acc, device=x.device)
    K._small_head_bwd_kernel[launch.grid](
        x, w, saved, grad, grad if den is None else den, dx, part, B, D, C, saved.shape[1],
        triton.cdiv(triton.cdiv(B, launch.meta["BLOCK_B"]), n_prog),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), grad.stride(0) if grad.dim() else 0,
        HAS_XCOEF=margin != int(Margin.NONE), HAS_DEN=den is not None, HAS_BIAS=has_bias, NEED_DX=need_dx,
        NEED_DW=need_dw, ACC_DTYPE=_TL[acc], num_warps=launch.num_warps,
        num_stages=launch.num_stages, **launch.meta)
    # fixed-order sum over programs: deterministic; the partials already hold dW's cosine term
    return dx, part.sum(0) if need_dw else part


@small_head_bwd.register_fake
def _(x, w, saved, grad, den, margin, has_bias, need_dx, need_dw):
    (B, D), C = x.shape, w.shape[1]
    return (x.new_empty((B, D) if need_dx else (0,)),
            x.new_empty((D + has_bias, C) if need_dw else (0,), dtype=_acc_dtype(x, w)))


def _setup_context(ctx, inputs, output):
    x, w, bias, _, _, _, _, ints, reduction = inputs
    ctx.save_for_backward(x, w, output[1], output[2] if reduction == REDUCTIONS["mean"] else None)
    ctx.margin, ctx.bias_dtype = ints[0], None if bias is None else bias.dtype
    ctx.set_materialize_grads(False)  # the row weights and coefficients carry no gradient: no zeros for them


def _backward(ctx, grad_loss, _grad_saved, _grad_sums):
    x, w, saved, den = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_loss is None:
        return None, None, None, None, None, None, None, None, None
    has_bias = ctx.bias_dtype is not None
    dx, dwb = small_head_bwd(x, w, saved, grad_loss, den, ctx.margin, has_bias, need_x, need_w or need_b)
    dw = (dwb[:-1] if has_bias else dwb) if need_w else None
    return (dx if need_x else None, None if dw is None else dw.to(w.dtype),
            dwb[-1].to(ctx.bias_dtype) if need_b else None, None, None, None, None, None, None)


small_head_fwd.register_autograd(_backward, setup_context=_setup_context)


def small_head_loss(x, w_dc, bias, targets, class_weights, lam, p: LossParams):
    """Loss of any of the four kinds with at most `MAX_CLASSES` classes, on the small-head kernels; the contract of
    `deepfense.kernels.ops.margin_loss`.

    Args: x [B, D], w_dc [D, C] (any strides; OCSoftmax [D, 1]), bias [C] or None (CrossEntropy), targets [B] int,
    class_weights [C] ([2] OCSoftmax) or None, lam (ASoftmax: float or 0-dim tensor), p the loss options.
    Returns: fp32 (fp64 for fp64 inputs) loss, a scalar or [B] for reduction='none'; 'mean' divides by the row
    weights' sum (0, not NaN, when every row is ignored).
    """
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing deepfense "
                           f"to run the kernels on CPU in the interpreter); got tensors on {x.device}.")
    if x.dtype not in _TL or w_dc.dtype not in _TL:
        raise ValueError("backend='triton' supports float16, bfloat16, float32 and float64, "
                         f"got {x.dtype}/{w_dc.dtype}")
    if not 1 <= w_dc.shape[1] <= MAX_CLASSES:
        raise ValueError(f"the small-head path takes 1..{MAX_CLASSES} classes, got {w_dc.shape[1]}")
    if p.margin == Margin.ANGULAR:
        lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
        lam = lam if lam.numel() == 1 and lam.dim() <= 1 else lam.reshape(1)  # one value: 0-dim or [1], no view
    elif p.margin != Margin.COMBINED:  # CombinedMargin's LAM comes from ops.kernel_lam
        lam = None
    class_weights = None if class_weights is None else class_weights.contiguous()
    floats, ints = op_params(p, w_dc.shape[1])
    # the reduction runs inside the op: no autograd graph of torch ops around it (issue 12: ops per step)
    return small_head_fwd(x, w_dc, bias, targets.contiguous(), class_weights, lam, floats, ints,
                          REDUCTIONS[p.reduction])[0]
