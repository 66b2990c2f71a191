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


def _acc_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


def _plan(x, w, margin, need_dx, need_dw) -> Tuple[Launch, ...]:
    return plan_small(Margin(margin), x.shape[0], x.shape[1], w.shape[1], x.dtype, w.dtype, n_sm=sm_count(x.device),
                      need_dx=need_dx, need_dw=need_dw, gpu=gpu_tiles())


@torch.library.custom_op("deepfense::small_head_fwd", mutates_args=())
def small_head_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], floats: List[float],
                   ints: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher.

    Args: x [B, D], w [D, C] (any strides, C <= 16), bias [C], targets [B] int, class_weights [C] ([2] OCSoftmax),
    lam [1] (ASoftmax); floats, ints from `ops.op_params`.
    Returns: row losses [B], row weights [B] and the backward coefficients [B, C + 1], fp32 (fp64 for fp64 inputs).
    """
    margin, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide, _, _ = _unpack(floats, ints)
    (B, D), C = x.shape, w.shape[1]
    acc = _acc_dtype(x, w)
    loss = torch.empty(B, dtype=acc, device=x.device)
    row_w = torch.empty(B, dtype=acc, device=x.device)
    saved = torch.empty(B, C + 1, dtype=acc, device=x.device)
    if B > 0:
        launch = _plan(x, w, margin, False, False)[0]
        dummy = targets  # never read: its constexpr flag is off
        K._small_head_fwd_kernel[launch.grid](
            x, w, dummy if bias is None else bias, targets, dummy if class_weights is None else class_weights,
            dummy if lam is None else lam, loss, row_w, saved, B, D, C, 2 if margin == int(Margin.ONE_CLASS) else C,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), s, m, gamma, m_real, m_fake, alpha, eps,
            ignore_index, bonafide, MARGIN=margin, HAS_BIAS=bias is not None, HAS_CW=class_weights is not None,
            ACC_DTYPE=_TL[acc], num_warps=launch.num_warps, num_stages=launch.num_stages, **launch.meta)
    return loss, row_w, saved


@small_head_fwd.register_fake
def _(x, w, bias, targets, class_weights, lam, floats, ints):
    (B, _), C = x.shape, w.shape[1]
    acc = _acc_dtype(x, w)
    return x.new_empty(B, dtype=acc), x.new_empty(B, dtype=acc), x.new_empty((B, C + 1), dtype=acc)


@torch.library.custom_op("deepfense::small_head_bwd", mutates_args=())
def small_head_bwd(x: torch.Tensor, w: torch.Tensor, saved: torch.Tensor, grad: torch.Tensor, margin: int,
                   has_bias: bool, need_dx: bool, need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher.

    Args: x, w as the forward; saved [B, C + 1] its coefficients; grad [B] the upstream gradient of each row's loss
    (any stride). Returns dX [B, D] in x's dtype, dW [D, C] in w's dtype, d bias [C] fp32/fp64 (contiguous; [0]
    where not needed).
    """
    (B, D), C = x.shape, w.shape[1]
    acc = _acc_dtype(x, w)
    dx = torch.empty((B, D) if need_dx else (0,), dtype=x.dtype, device=x.device)
    dw = torch.zeros((D, C) if need_dw else (0,), dtype=w.dtype, device=x.device)
    db = torch.zeros(C if need_dw and has_bias else 0, dtype=acc, device=x.device)
    if B == 0 or not (need_dx or need_dw):
        return dx, dw, db
    launch = _plan(x, w, margin, need_dx, need_dw)[1]
    n_prog = launch.grid[0]
    part = torch.empty((n_prog, D + has_bias, C) if need_dw else (0,), dtype=acc, device=x.device)
    K._small_head_bwd_kernel[launch.grid](
        x, w, saved, grad, dx, part, B, D, C, triton.cdiv(triton.cdiv(B, launch.meta["BLOCK_B"]), n_prog),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), grad.stride(0), HAS_XCOEF=margin != int(Margin.NONE),
        HAS_BIAS=has_bias, NEED_DX=need_dx, NEED_DW=need_dw, ACC_DTYPE=_TL[acc], num_warps=launch.num_warps,
        num_stages=launch.num_stages, **launch.meta)
    if need_dw:
        total = part.sum(0)  # fixed-order sum over programs: deterministic
        p_w = total[:D]
        if margin != int(Margin.NONE):
            # dW_c = P_c - w_hat_c (w_hat_c . P_c): the second term is -(sum_i dcos_ic cos_ic) rw_c^2 w_c
            wf = w.to(acc)
            norm = torch.linalg.vector_norm(wf, dim=0)
            w_hat = wf * torch.where(norm == 0, 0.0, 1.0 / torch.where(norm == 0, 1.0, norm))  # NaN/Inf stay NaN
            p_w = p_w - w_hat * (w_hat * p_w).sum(0)
        dw = p_w.to(w.dtype).clone()
        if has_bias:
            db = total[D].clone()
    return dx, dw, db


@small_head_bwd.register_fake
def _(x, w, saved, grad, margin, has_bias, need_dx, need_dw):
    (B, D), C = x.shape, w.shape[1]
    acc = _acc_dtype(x, w)
    return (x.new_empty((B, D) if need_dx else (0,)), w.new_empty((D, C) if need_dw else (0,)),
            x.new_empty(C if need_dw and has_bias else 0, dtype=acc))


def _setup_context(ctx, inputs, output):
    x, w, bias, _, _, _, _, ints = inputs
    ctx.save_for_backward(x, w, output[2])
    ctx.margin, ctx.bias_dtype = ints[0], None if bias is None else bias.dtype


def _backward(ctx, grad_loss, _grad_row_w, _grad_saved):
    x, w, saved = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = small_head_bwd(x, w, saved, grad_loss, ctx.margin, ctx.bias_dtype is not None, need_x,
                                need_w or need_b)
    return (dx if need_x else None, dw if need_w else None, db.to(ctx.bias_dtype) if need_b else None,
            None, None, None, None, None)


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
        lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device).reshape(1)
    elif p.margin != Margin.COMBINED:  # CombinedMargin's LAM comes from ops.kernel_lam
        lam = None
    class_weights = None if class_weights is None else class_weights.contiguous()
    floats, ints = op_params(p, w_dc.shape[1])
    rows, row_w, _ = small_head_fwd(x, w_dc, bias, targets.contiguous(), class_weights, lam, floats, ints)
    if p.reduction == "none":
        return rows
    if p.reduction == "sum":
        return rows.sum()
    # row weights carry no gradient: a detached denominator keeps ~10 backward ops out of every step (issue 12)
    return rows.sum() / row_w.detach().sum().clamp_min(torch.finfo(rows.dtype).tiny)
