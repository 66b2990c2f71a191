"""Launchers (shapes, strides, grid, dtypes) and the torch.library custom ops around the fused kernels.

The ops are opaque to torch.compile (fullgraph works, no host sync): `deepfense::margin_ce_fwd` returns the per-row
statistics and, when the class dimension fits one tile, the unit-gradient dX and dW; `deepfense::margin_ce_bwd`
scales those by the upstream gradient or runs the two backward kernels.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..params import LossParams, Margin
from . import margin_ce as K
from . import plan as P
from .tiles import N_STATS, STAT_LOSS, STAT_ROWW

# triton.jit reads TRITON_INTERPRET when the kernels are decorated; this launcher follows the same switch.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# fp32 inputs: the dots' input_precision, chosen by measurement (bench/precision_study.py, README "fp32 dot
# precision"): tf32x3 (three tf32 tensor-core dots) meets the error rule as well as IEEE fp32, which runs on the FMA
# units; plain tf32 fails it (s = 30..64 turns its ~1e-3 operand rounding into 0.01-0.03 logit error).
# DEEPFENSE_FP32_PRECISION=ieee|tf32x3|tf32 overrides it. 16-bit inputs use the tensor cores with fp32 accumulation.
FP32_PRECISION = os.environ.get("DEEPFENSE_FP32_PRECISION", "tf32x3")
if FP32_PRECISION not in ("ieee", "tf32x3", "tf32"):
    raise ValueError(f"DEEPFENSE_FP32_PRECISION must be ieee, tf32x3 or tf32, got {FP32_PRECISION!r}")

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def _dtypes(x: torch.Tensor, w: torch.Tensor):
    """(dot operand dtype, accumulator torch dtype) for these inputs: the promoted dtype, accumulated in fp32/fp64."""
    dot = torch.promote_types(x.dtype, w.dtype)
    acc = torch.float64 if dot == torch.float64 else torch.float32
    if INTERPRET and dot == torch.bfloat16:
        dot = torch.float32  # the interpreter's bf16 tl.dot multiplies raw bit patterns (triton #11584)
    return _TL[dot], acc


def _plan(x, w, margin, sub=1, **kw):
    """The launch plan of these inputs (`plan.plan`), never the small-head path: these launchers run the large-head
    kernels. sub: sub-centres per class (w has C * sub columns)."""
    (B, D), C = x.shape, w.shape[1] // sub
    return P.plan(margin, B, D, C, x.dtype, w.dtype, n_sm=P.sm_count(x.device), small=False, sub=sub, **kw)


def op_params(p: LossParams, n_classes: int, class_offset: int = 0):
    """The custom ops' scalar arguments. `class_offset` / `n_classes`: the first class of this weight's columns and
    the class count of the whole softmax (they differ when the classes are sharded across ranks). The last int is
    the sub-centre count K (the weight then has K adjacent columns per class; read with `_sub`)."""
    return ([p.s, p.m, p.gamma, p.m_real, p.m_fake, p.alpha, p.label_smoothing],
            [int(p.margin), p.ignore_index, p.bonafide_label, class_offset, n_classes, p.sub_centers])


def _sub(ints: List[int]) -> int:
    """Sub-centres per class from the ops' ints (1 when absent)."""
    return ints[5] if len(ints) > 5 else 1


def _unpack(floats: List[float], ints: List[int]):
    s, m, gamma, m_real, m_fake, alpha, eps = floats
    margin, ignore_index, bonafide, c_offset, n_classes = ints[:5]
    return margin, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide, c_offset, n_classes


def _common(x, w, bias, targets, class_weights, lam, margin, sub=1):
    dot_dtype, acc = _dtypes(x, w)
    dummy = targets  # never read: its constexpr flag is off
    n_targets = 2 if margin == int(Margin.ONE_CLASS) else w.shape[1] // sub
    args = (x, w, dummy if bias is None else bias, targets, dummy if class_weights is None else class_weights,
            dummy if lam is None else lam)
    meta = dict(MARGIN=margin, HAS_BIAS=bias is not None, HAS_CW=class_weights is not None, DOT_DTYPE=dot_dtype,
                ACC_DTYPE=_TL[acc], PRECISION=FP32_PRECISION if dot_dtype == tl.float32 else "ieee")
    if sub > 1:
        meta["SUB"] = sub
    return args, meta, acc, n_targets


@torch.library.custom_op("deepfense::margin_ce_fwd", mutates_args=())
def margin_ce_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], floats: List[float],
                  ints: List[int], fuse_dx: bool, fuse_dw: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward launcher.

    Args: x [B, D], w [D, C] (any strides), bias [C], targets [B] int, class_weights [C] ([2] OCSoftmax), lam [1].
    Returns: stats [5, B] (see margin_ce), unit-gradient dX [B, D] fp32 (or [0]), dW with d bias [D + 1, C] fp32
    (or [0]).
    """
    margin, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide, c_offset, n_classes = _unpack(floats,
                                                                                                            ints)
    sub = _sub(ints)
    (B, D), C = x.shape, w.shape[1] // sub
    args, meta, acc, n_targets = _common(x, w, bias, targets, class_weights, lam, margin, sub)
    n_total = 2 if margin == int(Margin.ONE_CLASS) else n_classes
    launches = _plan(x, w, margin, sub, need_dx=fuse_dx, need_dw=fuse_dw, fuse_dx=fuse_dx)
    fwd = launches[0]
    n_prog, n_splits = fwd.grid
    stats = torch.empty(N_STATS, B, dtype=acc, device=x.device)
    # without class splits the kernel never touches the partials (SPLIT is off): stats stands in, no allocation
    part = torch.empty((N_STATS, n_splits, B), dtype=acc, device=x.device) if n_splits > 1 else stats
    dx = torch.empty((B, D) if fuse_dx else (0,), dtype=acc, device=x.device)  # fp32: rounded once, after g
    dwp = torch.empty((n_prog, D + 1, C) if fuse_dw else (0,), dtype=acc, device=x.device)
    if B > 0:
        K._margin_ce_fwd_kernel[fwd.grid](
            *args, stats, part, dx, dwp, B, D, C, n_targets, c_offset, n_total, fwd.meta["tiles_per_split"],
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), s, m, gamma, m_real, m_fake, alpha, eps, ignore_index,
            bonafide, **P.constexprs(fwd), **meta)
        if n_splits > 1:
            comb = P.launch(launches, "_margin_ce_combine_kernel")
            K._margin_ce_combine_kernel[comb.grid](
                targets, args[4], part, stats, B, C, n_targets, c_offset, n_total, n_splits, n_splits * B, gamma, eps,
                ignore_index, MARGIN=margin, HAS_CW=class_weights is not None, ACC_DTYPE=meta["ACC_DTYPE"],
                **P.constexprs(comb))
    dw = dwp.sum(0) if fuse_dw else dwp  # fixed-order sum over programs: deterministic; contiguous, as the fake says
    if fuse_dw and B == 0:
        dw = torch.zeros(D + 1, C, dtype=acc, device=x.device)
    return stats, dx, dw


@margin_ce_fwd.register_fake
def _(x, w, bias, targets, class_weights, lam, floats, ints, fuse_dx, fuse_dw):
    (B, D), C = x.shape, w.shape[1]
    acc = _dtypes(x, w)[1]
    return (x.new_empty((N_STATS, B), dtype=acc), x.new_empty((B, D) if fuse_dx else (0,), dtype=acc),
            x.new_empty((D + 1, C) if fuse_dw else (0,), dtype=acc))


@torch.library.custom_op("deepfense::margin_ce_bwd", mutates_args=())
def margin_ce_bwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], stats: torch.Tensor,
                  grad: torch.Tensor, floats: List[float], ints: List[int], need_dx: bool,
                  need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher for what the forward did not fuse.

    Args: as the forward, plus stats [5, B] and grad [B] (the upstream gradient of each row's loss, any stride).
    Returns: dX [B, D] in x's dtype, dW [D, C] in w's dtype (strides of w), d bias [C]; [0] where not needed.
    """
    margin, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide, c_offset, n_classes = _unpack(floats, ints)
    sub = _sub(ints)
    (B, D), C = x.shape, w.shape[1] // sub
    args, meta, acc, n_targets = _common(x, w, bias, targets, class_weights, lam, margin, sub)
    launches = _plan(x, w, margin, sub, need_dx=need_dx, need_dw=need_dw, uniform_grad=False, fuse_dx=False)
    dx = torch.empty((B, D) if need_dx else (0,), dtype=x.dtype, device=x.device)
    dw = torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device) if need_dw else w.new_empty(0)
    db = torch.empty(C if need_dw and bias is not None else 0, dtype=acc, device=x.device)
    if B == 0:  # nothing to launch: the gradients of an empty batch are zero
        dw.zero_(), db.zero_()
        return dx, dw, db
    common = (B, D, C, n_targets, c_offset, n_classes, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
              grad.stride(0))
    lx = P.launch(launches, "_margin_ce_bwd_dx_kernel") if need_dx else None
    if lx is not None:
        n_splits = lx.meta["n_splits"]
        # several class splits write fp32 partials, summed below in split order (deterministic)
        dxp = dx[None] if n_splits == 1 else torch.empty(n_splits, B, D, dtype=acc, device=x.device)
        K._margin_ce_bwd_dx_kernel[lx.grid](*args, stats, grad, dxp, *common, lx.meta["tiles_per_split"],
                                            dxp.stride(0), dxp.stride(1), s, m, eps, ignore_index,
                                            **P.constexprs(lx), **meta)
        if n_splits > 1:
            dx = dxp.sum(0).to(x.dtype)
    lw = P.launch(launches, "_margin_ce_bwd_dw_kernel") if need_dw else None
    if lw is not None:
        n_splits = lw.meta["n_splits"]
        # several row splits write fp32 partials [splits, D, C] (and d bias [splits, C]), summed in split order
        dwp = dw if n_splits == 1 else torch.empty(n_splits, D, C * sub, dtype=acc, device=x.device)
        dbp = db if n_splits == 1 else torch.empty(n_splits, db.shape[0], dtype=acc, device=x.device)
        sw = (0, dw.stride(0), dw.stride(1)) if n_splits == 1 else dwp.stride()
        K._margin_ce_bwd_dw_kernel[lw.grid](*args, stats, grad, dwp, dbp if bias is not None else dwp, *common,
                                            lw.meta["tiles_per_split"], *sw, s, m, eps, ignore_index,
                                            **P.constexprs(lw), **meta)
        if n_splits > 1:
            dw.copy_(dwp.sum(0))
            db = dbp.sum(0)
    return dx, dw, db


@margin_ce_bwd.register_fake
def _(x, w, bias, targets, class_weights, lam, stats, grad, floats, ints, need_dx, need_dw):
    C = w.shape[1]
    acc = _dtypes(x, w)[1]
    return (x.new_empty(x.shape if need_dx else (0,)),
            torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device) if need_dw else w.new_empty(0),
            x.new_empty((C if need_dw and bias is not None else 0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    x, w, bias, targets, class_weights, lam, floats, ints, fuse_dx, fuse_dw = inputs
    stats, dx_unit, dw_unit = output
    ctx.save_for_backward(x, w, bias, targets, class_weights, lam, stats, dx_unit, dw_unit)
    ctx.floats, ctx.ints, ctx.fuse_dx, ctx.fuse_dw = floats, ints, fuse_dx, fuse_dw
    ctx.set_materialize_grads(False)  # dX and dW units carry no gradient: no zeros for them (issue 12)


def _backward(ctx, grad_stats, _grad_dx, _grad_dw):
    x, w, bias, targets, class_weights, lam, stats, dx_unit, dw_unit = ctx.saved_tensors
    if grad_stats is None:
        return None, None, None, None, None, None, None, None, None, None
    g = grad_stats[int(STAT_LOSS)]  # only the per-row loss is differentiable; the other stats are saved values
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = margin_ce_bwd(x, w, bias, targets, class_weights, lam, stats, g, ctx.floats, ctx.ints,
                               need_x and not ctx.fuse_dx, (need_w or need_b) and not ctx.fuse_dw)
    if ctx.fuse_dx:
        dx = (dx_unit * g[:, None].to(dx_unit.dtype)).to(x.dtype) if need_x else None
    if ctx.fuse_dw:  # the forward fused dW only when every row has the same upstream gradient
        gw = g[:1].to(dw_unit.dtype) if g.shape[0] else dw_unit.new_zeros(1)
        dw, db = dw_unit[:-1] * gw, dw_unit[-1] * gw
        dw = dw.to(w.dtype)
    return (dx if need_x else None, dw if need_w else None,
            db.to(bias.dtype) if need_b and bias is not None else None,
            None, None, None, None, None, None, None)


margin_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


def margin_loss(x, w_dc, bias, targets, class_weights, lam, p: LossParams, classes_first: bool = False):
    """Loss of any of the four kinds on the fused Triton kernels (see `deepfense.torch_backend.margin_loss`).
    classes_first: w_dc is CrossEntropy's fc.weight [C, D] as it is (the small-head kernels take it by its strides,
    no transpose op; the large-head path takes its [D, C] view)."""
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing deepfense "
                           f"to run the kernels on CPU in the interpreter); got tensors on {x.device}. "
                           "Use backend='torch' or 'auto' on this device.")
    if x.dtype not in _TL or w_dc.dtype not in _TL:
        raise ValueError("backend='triton' supports float16, bfloat16, float32 and float64, "
                         f"got {x.dtype}/{w_dc.dtype}")
    lam = kernel_lam(lam, p, x, w_dc)
    targets = targets.contiguous()
    class_weights = None if class_weights is None else class_weights.contiguous()
    grad_on = torch.is_grad_enabled()
    need_x, need_w = grad_on and x.requires_grad, grad_on and (w_dc.requires_grad or
                                                              (bias is not None and bias.requires_grad))
    if w_dc.shape[0 if classes_first else 1] <= P.SMALL_C and p.sub_centers == 1 and P._small_head_ready():
        from .small_head import small_head_loss
        return small_head_loss(x, w_dc, bias, targets, class_weights, lam, p, classes_first)
    w_dc = w_dc.t() if classes_first else w_dc
    sub = p.sub_centers  # K > 1: the large-head kernels, whatever C * K (the small-head path has no sub-centres)
    fwd = _plan(x, w_dc, int(p.margin), sub, need_dx=need_x, need_dw=need_w, uniform_grad=p.reduction != "none")[0]
    fuse_dx, fuse_dw = fwd.meta["FUSE_DX"], fwd.meta["FUSE_DW"]
    floats, ints = op_params(p, w_dc.shape[1] // sub)
    stats, _, _ = margin_ce_fwd(x, w_dc, bias, targets, class_weights, lam, floats, ints, fuse_dx, fuse_dw)
    rows = stats[int(STAT_LOSS)]
    if p.reduction == "none":
        return rows
    if p.reduction == "sum":
        return rows.sum()
    # mean over the class weights of kept rows; 0, not NaN, when no row is kept (the rows then sum to 0). The row
    # weights do not depend on x or w: a detached denominator keeps its ~10 backward ops out of every step (issue 12)
    return rows.sum() / stats[int(STAT_ROWW)].detach().sum().clamp_min(torch.finfo(rows.dtype).tiny)


def kernel_lam(lam, p: LossParams, x: torch.Tensor, w: torch.Tensor) -> Optional[torch.Tensor]:
    """The kernels' LAM tensor: ASoftmax's lambda [1] or 0-dim (fp32); CombinedMargin's scalars [ARC_N] in the
    accumulator dtype, the runtime (s, m2, m3) from `lam` [3] and the static (m1, fallback, straight_through, filter
    threshold) from p; None for the other losses."""
    if p.margin == Margin.ANGULAR:  # the kernels read one value: a 0-dim or [1] tensor goes as it is (no view op)
        lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
        return lam if lam.numel() == 1 and lam.dim() <= 1 else lam.reshape(1)
    if p.margin != Margin.COMBINED:
        return None
    acc = _dtypes(x, w)[1]
    runtime = lam.to(device=x.device, dtype=acc).reshape(3) if lam is not None else None
    if runtime is None:
        runtime = torch.tensor([p.s, p.m, p.m3], dtype=acc, device=x.device)
    static = torch.tensor([p.m1, float(p.fallback), float(p.straight_through), p.filter_threshold], dtype=acc,
                          device=x.device)
    return torch.cat([runtime, static])


def partial_row_stats(x, w, bias, targets, class_weights, lam, floats: List[float], ints: List[int]):
    """Softmax statistics of every row over this weight's classes only, to be merged across ranks by the caller.

    Args: as `margin_ce_fwd`; `ints` from `op_params(p, n_classes, class_offset)` (targets are global class ids;
    class_weights holds this weight's columns only). Returns [5, B]: running max m, sum of exp(logit - m), the target
    logit (0 where another rank holds the target), sum_c cw_c logit_c, and sum_c cw_c.
    """
    margin, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide, c_offset, n_classes = _unpack(floats,
                                                                                                            ints)
    sub = _sub(ints)
    (B, D), C = x.shape, w.shape[1] // sub
    args, meta, acc, n_targets = _common(x, w, bias, targets, class_weights, lam, margin, sub)
    fwd = _plan(x, w, margin, sub, need_dx=False, need_dw=False)[0]
    part = torch.empty(N_STATS, 1, B, dtype=acc, device=x.device)
    if B > 0:  # one split over all this weight's classes: the ranks' partials are merged by the caller
        unused = part
        tiles = dict(P.constexprs(fwd), SPLIT=True, FUSE_DX=False, FUSE_DW=False)
        K._margin_ce_fwd_kernel[(fwd.grid[0], 1)](
            *args, unused, part, unused, unused, B, D, C, n_targets, c_offset, n_classes,
            triton.cdiv(C, fwd.meta["BLOCK_C"]), x.stride(0), x.stride(1), w.stride(0), w.stride(1), s, m, gamma,
            m_real, m_fake, alpha, eps, ignore_index, bonafide, **tiles, **meta)
    return part[:, 0]
