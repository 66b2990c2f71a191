"""Launchers (shapes, strides, grid, dtypes) and the torch.library custom ops around the large-head kernels
(`margin_ce`), and the large-head loss.

The ops are opaque to torch.compile (fullgraph works, no host sync): `deepfense::margin_ce_fwd` returns the per-row
statistics and, when the class dimension fits one tile, the unit-gradient dX and dW; `deepfense::margin_ce_bwd`
scales those by the upstream gradient or runs the two backward kernels.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton

from ..params import LossParams, Margin
from . import margin_ce as K
from . import plan as P
from .common import TL, OpScalars, check_device, dot_dtypes, kernel_lam  # noqa: F401 (kernel_lam: the sharded path)
from .reduce_rows import ws_size
from .tiles import N_STATS


def _plan(x, C, sc: OpScalars, w_dtype, **kw):
    """The launch plan of these inputs (`plan.plan`) for a weight of C classes (C * sc.sub columns), never the
    small-head path: these launchers run the large-head kernels."""
    return P.plan(sc.margin, x.shape[0], x.shape[1], C, x.dtype, w_dtype, n_sm=P.sm_count(x.device), small=False,
                  fp32_precision=P.FP32_PRECISION, sub=sc.sub, **kw)


def op_params(p: LossParams, n_classes: int, class_offset: int = 0, classes_first: bool = False):
    """The custom ops' scalar arguments (floats, ints): `OpScalars.of(...).to_lists()`."""
    return OpScalars.of(p, n_classes, class_offset, classes_first).to_lists()


def _w_dc(w: torch.Tensor, sc: OpScalars):
    """(D, C, stride over D, stride over columns) of the weight: [D, C * K] (C classes of K sub-centres), or
    fc.weight [C, D] when classes_first."""
    if sc.classes_first:
        return w.shape[1], w.shape[0], w.stride(1), w.stride(0)
    return w.shape[0], w.shape[1] // sc.sub, w.stride(0), w.stride(1)


def _inputs(x, w, bias, targets, class_weights, lam, sc: OpScalars):
    """The kernels' input pointers and the constexprs every large-head kernel takes (HAS_BIAS and HAS_CW follow
    from the None pointers)."""
    dot_dtype, acc = dot_dtypes(x, w)
    ptrs = dict(X_ptr=x, W_ptr=w, BIAS_ptr=bias, T_ptr=targets, CW_ptr=class_weights, LAM_ptr=lam)
    meta = dict(MARGIN=sc.margin, SUB=sc.sub, DOT_DTYPE=dot_dtype, ACC_DTYPE=TL[acc],
                PRECISION=P.FP32_PRECISION if dot_dtype == TL[torch.float32] else "ieee")
    return ptrs, meta, acc


def _fused_sizes(B, D, C, fuse_dx, fuse_dw):
    """Elements of the forward's unit-gradient buffer: dX [B, D], then dW with d bias [D + 1, C] (fp32)."""
    return (B * D if fuse_dx else 0), ((D + 1) * C if fuse_dw else 0)


@torch.library.custom_op("deepfense::margin_ce_fwd", mutates_args=())
def margin_ce_fwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], floats: List[float],
                  ints: List[int], fuse_dx: bool, fuse_dw: bool) -> List[torch.Tensor]:
    """Forward launcher.

    Args: x [B, D], w [D, C * K] or (classes_first) [C, D], any strides; bias [C], targets [B] int, class_weights
    [C], lam (`kernel_lam`), each optional tensor None when absent; floats, ints: the options
    (`common.OpScalars.to_lists`; every loss but OCSoftmax, which runs on the small-head kernels).
    Returns [loss, workspace] or with fuse_dx / fuse_dw [loss, workspace, unit gradients]: the loss ('mean' / 'sum':
    [], 'none': [B]; fp32, fp64 for fp64 inputs), the workspace (STATS [5, B] first, `reduce_rows.ws_size`), the
    unit-gradient dX [B, D] then dW in the weight's layout ([D, C] or [C, D]) and d bias [C], flat fp32, times the
    reduction's scale when one program wrote them (B <= its BLOCK_B). (A list: no empty output to allocate.)
    """
    sc = OpScalars.from_lists(floats, ints)
    B, (D, C, sw_d, sw_c) = x.shape[0], _w_dc(w, sc)
    inputs, meta, acc = _inputs(x, w, bias, targets, class_weights, lam, sc)
    launches = _plan(x, C, sc, w.dtype, need_dx=fuse_dx, need_dw=fuse_dw, fuse_dx=fuse_dx)
    fwd = launches[0]
    n_prog, n_splits = fwd.grid
    ws = torch.zeros(ws_size(B, n_prog), dtype=acc, device=x.device)  # zeroed: the reduction's ticket starts at 0
    loss = (torch.zeros if B == 0 else torch.empty)((B,) if sc.reduce == 0 else (), dtype=acc, device=x.device)
    n_dx, n_dw = _fused_sizes(B, D, C, fuse_dx, fuse_dw)
    fused = bool(n_dx or n_dw)
    if B == 0:
        return [loss, ws, torch.zeros(n_dx + n_dw, dtype=acc, device=x.device)] if fused else [loss, ws]
    partials = n_dw and n_prog > 1  # several row blocks: dW partials [n_prog, (D + 1) C], summed in program order
    # one buffer for the unit gradients, unless the dW partials' sum below allocates it
    grads = torch.empty(n_dx + n_dw, dtype=acc, device=x.device) if n_dx or (n_dw and not partials) else None
    dwp = torch.empty(n_prog, n_dw, dtype=acc, device=x.device) if partials else grads[n_dx:] if n_dw else None
    part = torch.empty(N_STATS, n_splits, B, dtype=acc, device=x.device) if n_splits > 1 else None
    K._margin_ce_fwd_kernel[fwd.grid](
        **inputs, STATS_ptr=ws, PART_ptr=part, DX_ptr=grads if n_dx else None, DWP_ptr=dwp, RED_ptr=loss,
        B=B, D=D, C=C, n_targets=C, c_offset=sc.c_offset, n_total=sc.n_classes,
        tiles_per_split=fwd.meta["tiles_per_split"],
        reduce=sc.reduce, stride_x_row=x.stride(0), stride_x_col=x.stride(1), stride_w_d=sw_d, stride_w_c=sw_c,
        stride_dwp_d=1 if sc.classes_first else C, stride_dwp_c=D if sc.classes_first else 1,
        s=sc.s, m=sc.m, gamma=sc.gamma, eps=sc.eps, ignore_index=sc.ignore_index,
        **P.constexprs(fwd), **meta)
    if n_splits > 1:
        comb = P.launch(launches, "_margin_ce_combine_kernel")
        K._margin_ce_combine_kernel[comb.grid](
            T_ptr=targets, CW_ptr=class_weights, PART_ptr=part, STATS_ptr=ws, RED_ptr=loss,
            B=B, C=C, n_targets=C, c_offset=sc.c_offset, n_total=sc.n_classes, n_splits=n_splits,
            n_part=n_splits * B,
            reduce=sc.reduce, gamma=sc.gamma, eps=sc.eps, ignore_index=sc.ignore_index,
            MARGIN=sc.margin, ACC_DTYPE=meta["ACC_DTYPE"], **P.constexprs(comb))
    if partials and n_dx:
        torch.sum(dwp, 0, out=grads[n_dx:])
    elif partials:
        grads = dwp.sum(0)
    if sc.reduce == 0:  # 'none': the row losses are STATS' first row
        loss.copy_(ws[:B])
    return [loss, ws, grads] if fused else [loss, ws]


@margin_ce_fwd.register_fake
def _(x, w, bias, targets, class_weights, lam, floats, ints, fuse_dx, fuse_dw):
    sc = OpScalars.from_lists(floats, ints)
    B, (D, C, _, _) = x.shape[0], _w_dc(w, sc)
    acc = dot_dtypes(x, w)[1]
    launches = _plan(x, C, sc, w.dtype, need_dx=fuse_dx, need_dw=fuse_dw, fuse_dx=fuse_dx)
    n_grads = sum(_fused_sizes(B, D, C, fuse_dx, fuse_dw))
    out = [x.new_empty((B,) if sc.reduce == 0 else (), dtype=acc),
           x.new_empty((ws_size(B, launches[0].grid[0]),), dtype=acc)]
    return out + [x.new_empty((n_grads,), dtype=acc)] if n_grads else out


@torch.library.custom_op("deepfense::margin_ce_bwd", mutates_args=())
def margin_ce_bwd(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  class_weights: Optional[torch.Tensor], lam: Optional[torch.Tensor], stats: torch.Tensor,
                  grad: torch.Tensor, floats: List[float], ints: List[int], need_dx: bool,
                  need_dw: bool) -> List[torch.Tensor]:
    """Backward launcher for what the forward did not fuse.

    Args: as the forward, plus stats: the forward's workspace (or `saved_stats`), and grad: the upstream gradient,
    [] for a reduced loss or [B] per row (any stride); the kernels multiply it by the workspace's scale.
    Returns [dX] if need_dx, then [dW, d bias] if need_dw (d bias only with a bias): dX [B, D] in x's dtype, dW in
    w's dtype and strides, d bias [C] fp32 (`bwd_grads` unpacks them). A list: no empty tensor for what is not needed.
    """
    sc = OpScalars.from_lists(floats, ints)
    B, (D, C, sw_d, sw_c) = x.shape[0], _w_dc(w, sc)
    inputs, meta, acc = _inputs(x, w, bias, targets, class_weights, lam, sc)
    launches = _plan(x, C, sc, w.dtype, need_dx=need_dx, need_dw=need_dw, uniform_grad=False, fuse_dx=False)
    lx = P.launch(launches, "_margin_ce_bwd_dx_kernel") if need_dx and B > 0 else None
    lw = P.launch(launches, "_margin_ce_bwd_dw_kernel") if need_dw and B > 0 else None
    dx_splits = lx.meta["n_splits"] if lx is not None else 1
    dw_splits = lw.meta["n_splits"] if lw is not None else 1
    # one split writes dX / dW (d bias) in place; several write fp32 partials, summed below
    dx = torch.empty((B, D), dtype=x.dtype, device=x.device) if need_dx and dx_splits == 1 else None
    one_dw = need_dw and dw_splits == 1
    dw = torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device) if one_dw else None
    db = torch.empty(C, dtype=acc, device=x.device) if one_dw and bias is not None else None
    if B == 0:  # nothing to launch: the gradients of an empty batch are zero
        return [t.zero_() for t in (dx, dw, db) if t is not None]
    common = dict(inputs, STATS_ptr=stats, G_ptr=grad, B=B, D=D, C=C, n_targets=C, c_offset=sc.c_offset,
                  n_smooth=sc.n_classes,
                  stride_x_row=x.stride(0), stride_x_col=x.stride(1), stride_w_d=sw_d, stride_w_c=sw_c,
                  stride_g=grad.stride(0) if grad.dim() else 0, s=sc.s, m=sc.m, eps=sc.eps,
                  ignore_index=sc.ignore_index, **meta)
    if lx is not None:
        # several class splits write fp32 partials, summed below in split order (deterministic)
        dxp = dx if dx_splits == 1 else torch.empty(dx_splits, B, D, dtype=acc, device=x.device)
        K._margin_ce_bwd_dx_kernel[lx.grid](
            DX_ptr=dxp, tiles_per_split=lx.meta["tiles_per_split"],
            stride_dx_split=B * D if dx_splits == 1 else dxp.stride(0), stride_dx_row=dxp.stride(-2),
            **common, **P.constexprs(lx))
        if dx_splits > 1:
            dx = dxp.sum(0)
            dx = dx if dx.dtype == x.dtype else dx.to(x.dtype)
    if lw is not None:
        # several row splits write fp32 partials [splits, D, C * K] ([splits, C, D] for fc.weight) and d bias
        # [splits, C], summed in split order (deterministic)
        shape = (dw_splits, C, D) if sc.classes_first else (dw_splits, D, C * sc.sub)
        dwp = dw if dw_splits == 1 else torch.empty(shape, dtype=acc, device=x.device)
        dbp = db if dw_splits == 1 or bias is None else torch.empty(dw_splits, C, dtype=acc, device=x.device)
        if dw_splits == 1:
            sw = (0, *_w_dc(dw, sc)[2:])
        else:
            sw = (dwp.stride(0), *((1, D) if sc.classes_first else (C * sc.sub, 1)))
        K._margin_ce_bwd_dw_kernel[lw.grid](
            DW_ptr=dwp, DB_ptr=dbp, tiles_per_split=lw.meta["tiles_per_split"], stride_dw_split=sw[0],
            stride_dw_d=sw[1], stride_dw_c=sw[2], **common, **P.constexprs(lw))
        if dw_splits > 1:
            dw = dwp.sum(0)
            if dw.dtype != w.dtype or dw.stride() != w.stride():  # into the weight's dtype and layout
                dw = torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device).copy_(dw)
            db = None if bias is None else dbp.sum(0)
    return [t for t in (dx, dw, db) if t is not None]


@margin_ce_bwd.register_fake
def _(x, w, bias, targets, class_weights, lam, stats, grad, floats, ints, need_dx, need_dw):
    C = _w_dc(w, OpScalars.from_lists(floats, ints))[1]
    acc = dot_dtypes(x, w)[1]
    out = [x.new_empty(x.shape)] if need_dx else []
    if need_dw:
        out.append(torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device))
    return out + [x.new_empty((C,), dtype=acc)] if need_dw and bias is not None else out


def bwd_grads(outs: List[torch.Tensor], need_dx: bool, need_dw: bool, has_bias: bool):
    """(dX, dW, d bias) from `margin_ce_bwd`'s list, None where it returned none."""
    it = iter(outs)
    dx = next(it) if need_dx else None
    dw = next(it) if need_dw else None
    return dx, dw, next(it) if need_dw and has_bias else None


def saved_stats(row_stats: torch.Tensor) -> torch.Tensor:
    """A backward workspace from the LSE, COEF_P and COEF_T rows [3, B] (the sharded path's merged statistics), with
    the gradient scale 1: its upstream gradient comes already scaled."""
    B = row_stats.shape[1]
    ws = torch.zeros(ws_size(B, 0), dtype=row_stats.dtype, device=row_stats.device)
    ws[2 * B:N_STATS * B] = row_stats.reshape(-1)
    ws[N_STATS * B] = 1.0
    return ws


def _setup_context(ctx, inputs, output):
    x, w, bias, targets, class_weights, lam, floats, ints, fuse_dx, fuse_dw = inputs
    ws, grads = output[1], (output[2] if len(output) > 2 else None)
    ctx.save_for_backward(x, w, bias, targets, class_weights, lam, ws, grads)
    ctx.floats, ctx.ints, ctx.fuse_dx, ctx.fuse_dw = floats, ints, fuse_dx, fuse_dw
    ctx.set_materialize_grads(False)  # the workspace and the unit gradients carry no gradient: no zeros for them


def _backward(ctx, grads_out):
    x, w, bias, targets, class_weights, lam, ws, grads = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad = grads_out[0]  # only the loss is differentiable; the workspace and unit gradients are saved values
    if grad is None:
        return None, None, None, None, None, None, None, None, None, None
    bx, bw = need_x and not ctx.fuse_dx, (need_w or need_b) and not ctx.fuse_dw
    dx, dw, db = bwd_grads(margin_ce_bwd(x, w, bias, targets, class_weights, lam, ws, grad, ctx.floats, ctx.ints,
                                         bx, bw), bx, bw, bias is not None)
    if ctx.fuse_dx or ctx.fuse_dw:
        dx, dw, db = _fused_backward(x, w, ws, grads, grad, ctx, dx, dw, db)
    return (dx if need_x else None, dw if need_w else None,
            db.to(bias.dtype) if need_b and bias is not None else None,
            None, None, None, None, None, None, None)


def _fused_backward(x, w, ws, grads, grad, ctx, dx, dw, db):
    """dX, dW and d bias from the forward's unit gradients (one-tile heads) times the upstream gradient (and the
    reduction's scale, unless one forward program already applied it)."""
    sc = OpScalars.from_lists(ctx.floats, ctx.ints)
    (B, D), C = x.shape, _w_dc(w, sc)[1]
    n_dx, n_dw = _fused_sizes(B, D, C, ctx.fuse_dx, ctx.fuse_dw)
    one_prog = ws.numel() - ws_size(B, 0) == 2  # the workspace holds 2 sums per forward program
    g = grad if one_prog else grad * ws[N_STATS * B]
    if ctx.fuse_dx:
        g_rows = g.to(grads.dtype)
        dx = (grads[:n_dx].view(B, D) * (g_rows[:, None] if g_rows.dim() else g_rows)).to(x.dtype)
    if ctx.fuse_dw:  # the forward fused dW only when every row has the same upstream gradient
        dwu = (grads[n_dx:] if n_dx else grads) * g.to(grads.dtype)
        dw = dwu.as_strided(w.shape, (D, 1) if sc.classes_first else (C, 1))  # the layout the kernel wrote
        dw = dw if dw.dtype == w.dtype else dw.to(w.dtype)
        db = dwu.as_strided((C,), (1,), D * C) if ctx.needs_input_grad[2] else None
    return dx, dw, db


margin_ce_fwd.register_autograd(_backward, setup_context=_setup_context)


def large_head_loss(x, w, bias, targets, class_weights, lam, p: LossParams, classes_first: bool = False):
    """Loss of the softmax losses on the large-head fused kernels (see `deepfense.torch_backend.margin_loss`).

    w: the [D, C*K] weight, or with classes_first CrossEntropy's fc.weight [C, D] as given: the kernels read it through
    its strides and write dW in its layout, so a step has no transpose op. The reduction happens in the forward launch.
    OCSoftmax (one centre) runs on the small-head kernels only (`plan.uses_small_head`).
    """
    if p.margin == Margin.ONE_CLASS:
        raise ValueError("OCSoftmax runs on the small-head kernels: the large-head kernels have no one-class path")
    check_device(x, w)
    lam_k = kernel_lam(lam, p, x, w, targets)
    targets = targets.contiguous()
    class_weights = None if class_weights is None else class_weights.contiguous()
    grad_on = torch.is_grad_enabled()
    need_x, need_w = grad_on and x.requires_grad, grad_on and (w.requires_grad or
                                                              (bias is not None and bias.requires_grad))
    C = w.shape[0] if classes_first else w.shape[1] // p.sub_centers
    sc = OpScalars.of(p, C, classes_first=classes_first)
    fwd = _plan(x, C, sc, w.dtype, need_dx=need_x, need_dw=need_w, uniform_grad=p.reduction != "none")[0]
    out = margin_ce_fwd(x, w, bias, targets, class_weights, lam_k, *sc.to_lists(), fwd.meta["FUSE_DX"],
                        fwd.meta["FUSE_DW"])
    if grad_on and isinstance(lam, torch.Tensor) and lam.requires_grad and not p.straight_through:
        return out[0] + margin_grad_term(x, w, targets, class_weights, lam, p, out[1], C)
    return out[0]


def margin_grad_term(x, w, targets, class_weights, lam, p: LossParams, ws, n_classes: int):
    """A term of value 0 whose gradient is the loss's gradient in CombinedMargin's margins (m1, m2, m3 of `lam`
    [4, N], which the kernels hold constant): dL/d(target logit), from the forward's statistics (`margin_ce`: LSE,
    COEF_P, COEF_T), times the target logit's derivative in the margins at the target cosine, which torch computes
    from one gathered weight column per row (a [B, D] read; only when a margin requires grad)."""
    from ..reference import arc_margin, target_cosine  # the margin formula's one torch home, differentiable in the margins
    from ..torch_backend import combined_values
    B = x.shape[0]
    ws = ws.detach()
    lse, coef_p, coef_t = ws[2 * B:3 * B], ws[3 * B:4 * B], ws[4 * B:5 * B]
    valid = targets != p.ignore_index
    safe = torch.where(valid & (targets >= 0) & (targets < n_classes), targets, 0)
    with torch.no_grad():
        cos_y = target_cosine(x, w, safe, p.sub_centers)[:, None]
    cos_y = cos_y.to(ws.dtype)
    s, m1, m2, m3 = combined_values(lam.to(ws.dtype), p)
    logit_y = s * arc_margin(cos_y, m1, m2, m3, p.fallback)  # differentiable in m1, m2, m3 only
    cw_y = 1.0 if class_weights is None else class_weights.to(ws.dtype)[safe][:, None]
    smooth = p.label_smoothing / n_classes * valid.to(ws.dtype)[:, None]
    dl_y = coef_p[:, None] * torch.exp(logit_y.detach() - lse[:, None]) - coef_t[:, None] - smooth * cw_y
    rows = (dl_y * (logit_y - logit_y.detach()))[:, 0]
    if p.reduction == "none":
        return rows
    return rows.sum() * (ws[N_STATS * B] if p.reduction == "mean" else 1.0)


def partial_row_stats(x, w, bias, targets, class_weights, lam, floats: List[float], ints: List[int]):
    """Softmax statistics of every row over this weight's classes only, to be merged across ranks by the caller.

    Args: as `margin_ce_fwd`; `ints` from `op_params(p, n_classes, class_offset)` (targets are global class ids;
    class_weights holds this weight's columns only). Returns [5, B]: running max m, sum of exp(logit - m), the target
    logit (0 where another rank holds the target), sum_c cw_c logit_c, and sum_c cw_c.
    """
    sc = OpScalars.from_lists(floats, ints)
    B, (D, C, sw_d, sw_c) = x.shape[0], _w_dc(w, sc)
    inputs, meta, acc = _inputs(x, w, bias, targets, class_weights, lam, sc)
    fwd = _plan(x, C, sc, w.dtype, need_dx=False, need_dw=False)[0]
    part = torch.empty(N_STATS, 1, B, dtype=acc, device=x.device)
    if B > 0:  # one split over all this weight's classes: the ranks' partials are merged by the caller
        K._margin_ce_fwd_kernel[(fwd.grid[0], 1)](
            **inputs, STATS_ptr=None, PART_ptr=part, DX_ptr=None, DWP_ptr=None, RED_ptr=None,
            B=B, D=D, C=C, n_targets=C, c_offset=sc.c_offset, n_total=sc.n_classes,
            tiles_per_split=triton.cdiv(C, fwd.meta["BLOCK_C"]), reduce=0,
            stride_x_row=x.stride(0), stride_x_col=x.stride(1), stride_w_d=sw_d, stride_w_c=sw_c,
            stride_dwp_d=0, stride_dwp_c=0, s=sc.s, m=sc.m, gamma=sc.gamma, eps=sc.eps, ignore_index=sc.ignore_index,
            **dict(P.constexprs(fwd), SPLIT=True, FUSE_DX=False, FUSE_DW=False), **meta)
    return part[:, 0]
