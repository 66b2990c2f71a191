"""Class-parallel margin softmax over torch.distributed: one softmax head split by classes across ranks, exactly.

Layout:
    * ``n_classes`` is the global count C. Rank r of the group holds the contiguous class slice
      ``torch.tensor_split(torch.arange(C), world)[r]`` (the first C % world ranks hold one class more; see
      `class_slice`), as its local weight columns ([D, C_r]; CrossEntropy: fc.weight rows [C_r, D], bias [C_r];
      with K sub-centres [D, C_r * K], its classes' K adjacent columns each).
    * Every rank passes its own local batch (sizes may differ between ranks) and GLOBAL class indices as targets.
      ``class_weights``, when given, is the full [C] vector on every rank.

Algorithm: embeddings and targets are all-gathered (sizes first, then padded to the largest batch); each rank computes
the softmax statistics of the whole gathered batch against its class slice (fused kernels, or the torch backend's
helpers `cosines`, `target_logit`); the row max is combined by an all-reduce MAX and sum-exp, the target logit
(from the rank that owns the target) and the label-smoothing sum by one all-reduce SUM. Backward turns the local
dL/dlogits into the rank's dW slice and a partial dX for every gathered row; a reduce-scatter sums the partial dX and
hands each rank its own rows.

Gradient convention:
    * ``reduction='mean'|'sum'``: the returned scalar is the same on every rank, the loss of the concatenated batch
      with the full weight matrix. Call backward on every rank with the same upstream gradient (``loss.backward()``
      everywhere): then each rank's weight/bias gradient is its slice of the non-sharded gradient and its embedding
      gradient is its rows of the non-sharded dX. No extra averaging is needed, and the sharded head must not be
      wrapped in DistributedDataParallel (its weights differ per rank).
    * ``reduction='none'``: each rank gets the rows of its own batch; the objective is the sum over ranks of
      ``grad_r . rows_r``, and the upstream gradients of all ranks are gathered in backward.
    * A backbone wrapped in DDP averages its gradients over ranks, so with this loss it receives 1/world of the global
      gradient. With Adam-type optimisers that is harmless; to get the exact global gradient multiply the loss that
      reaches the backbone by world, or register a summing comm hook (`sum_comm_hook`).

Costs: per step, all-gathers of B x D embeddings and the targets, two all-reduces of [B_total] / [B_total, 2..3] row
statistics, a reduce-scatter of B_total x D in backward; batch sizes are exchanged with one small all-gather and a host
sync, which also carries everything the ranks must agree on (`deepfense.distributed_checks`: shapes, dtypes, options,
the outcome of each rank's own checks), so a disagreement raises the same error on every rank before the other
collectives (docs/distributed.md). With backend 'triton' (what 'auto' picks for CUDA inputs) each rank's share runs
on the fused kernels: their forward returns the rows' partial softmax statistics over the rank's classes
(`kernels.ops.partial_row_stats`), which the collectives merge, and their backward recomputes the logit tiles from the
merged LSE, so no rank holds the [B_total, C_r] logits. Otherwise the share runs as torch ops (`_local_logits`).

Partial FC (`sample_rate` < 1): each rank keeps every class of its slice that is a target in the gathered batch, plus
random others up to ceil(sample_rate * C_r) columns (in integers: `_kept_quota`); the softmax then runs over the kept
classes only. This is an approximation (insightface's Partial FC), reproducible under a seeded ``generator``; unkept
columns get zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
import torch.distributed as dist

from .distributed_checks import (DeclaredGroup, build_record, check_local, class_slice, exchange, gather,
                                 raise_not_finite, rank_slice, set_step, settle)
from .inputs import loss_is_finite, validating
from .params import LossParams, Margin
from .torch_backend import (compute_dtype, cosines, dlogits_of, dlogits_to_dcos, epilogue, logit_scale, project_grad,
                            reduce_rows, sub_center_max, target_logit, target_logit_grad, to_sub_centers)

__all__ = ["class_slice", "rank_slice", "set_step", "DeclaredGroup", "sharded_margin_loss",
           "ShardedMarginLossFunction", "sum_comm_hook"]


@dataclass(frozen=True)
class _Layout:
    """Who holds what: batch sizes of every rank, this rank's first class column and the softmax's class count."""

    group: object
    rank: int
    world: int
    sizes: tuple
    c0: int
    n_classes: int

    @property
    def bmax(self) -> int:
        return max(self.sizes)

    def mine(self) -> slice:
        """This rank's rows in the padded gathered batch."""
        return slice(self.rank * self.bmax, self.rank * self.bmax + self.sizes[self.rank])


def _gather_rows(t: torch.Tensor, lay: _Layout, fill=0) -> torch.Tensor:
    """All-gather [B_r, ...] tensors of uneven length into [world * bmax, ...], each rank's rows padded with `fill`."""
    padded = t.new_full((lay.bmax, *t.shape[1:]), fill)
    padded[: t.shape[0]] = t
    return gather(padded, lay.group).flatten(0, 1)


class ShardedMarginLossFunction(torch.autograd.Function):
    """The loss of the gathered batch over all ranks' class slices; see the module docstring for the convention.

    Inputs: x [B_r, D] local embeddings; w [D, C_r] local columns; bias [C_r] or None; tg [world * bmax] gathered
    targets in this softmax's class space (pads are ignore_index); row_w [world * bmax] row weights (0 for ignored and
    pad rows); cw [C_r] class weights of the local columns; cw_total: 0-dim sum of all C class weights; lam: ASoftmax
    lambda; p: options; lay: `_Layout`; kernels: run the per-rank work on the fused Triton kernels (else torch ops);
    validate: check that the loss of the gathered rows is finite (the same answer on every rank).
    A target owned by no rank (out of range, value checks off) makes its row's loss and gradients NaN, as in the
    single-process path.
    """

    @staticmethod
    def forward(ctx, x, w, bias, tg, row_w, cw, cw_total, lam, p: LossParams, lay: _Layout, kernels: bool,
                validate: bool):
        dt = compute_dtype(x, w)
        ctx.p, ctx.lay, ctx.dtypes, ctx.has_bias, ctx.kernels = p, lay, (x.dtype, w.dtype), bias is not None, kernels
        valid = tg != p.ignore_index
        if kernels:  # local (max, sum-exp, target logit, smoothing sum) from the fused forward, no [B, C_r] logits
            from .kernels import ops
            xg = _gather_rows(x.detach(), lay)
            lam_k = ops.kernel_lam(lam, p, x, w)
            ctx.op_args = ops.op_params(p, lay.n_classes, lay.c0)
            part = ops.partial_row_stats(xg, w, bias, tg, cw, lam_k, *ctx.op_args).to(dt)
            gmax = part[0].clone()
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=lay.group)
            cols = [part[1] * torch.exp(part[0] - gmax), part[2], part[3]]
        else:
            xg, wf = _gather_rows(x.detach().to(dt), lay), w.to(dt)
            (logits, cos, xnorm, rx, rw, cos_y, lam_t, tcol, owned, wf, best,
             dirty) = _local_logits(xg, wf, bias, tg, valid, lam, p, lay)
            gmax = logits.amax(1)
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=lay.group)
            cols = [torch.exp(logits - gmax[:, None]).sum(1), torch.where(owned, logits.gather(1, tcol)[:, 0], 0.0)]
            if p.label_smoothing:
                cols.append(logits @ cw)
        # one SUM over ranks of [sum-exp, target logit (owner only), smoothing sum]
        stats = torch.stack(cols[:3] if p.label_smoothing else cols[:2], 1)
        dist.all_reduce(stats, group=lay.group)
        lse = gmax + torch.log(stats[:, 0])
        nll = lse - stats[:, 1]
        unowned = valid & ((tg < 0) | (tg >= lay.n_classes))  # no rank holds it: NaN loss and gradients for the row
        eps = p.label_smoothing
        # sum_c cw_c log p_c = sum_c cw_c l_c - lse sum_c cw_c
        rows, coef_t, coef_p, smooth = epilogue(nll, torch.where(unowned, torch.nan, row_w), valid,
                                                (stats[:, 2] - lse * cw_total) if eps else None, cw_total, p,
                                                lay.n_classes)
        out, scale = reduce_rows(rows, row_w, p.reduction)  # mean over the class weights of all ranks' kept rows
        if p.reduction == "none":
            out = rows[lay.mine()]
        if validate and not loss_is_finite(rows.sum()):  # the gathered rows: every rank takes this branch together
            raise_not_finite(x, w, bias, lay.group)
        if kernels:  # backward recomputes the logit tiles from the global LSE and coefficients
            ctx.save_for_backward(xg, w, bias, tg, cw, lam_k, torch.stack([lse, coef_p, coef_t]), scale)
            return out
        dlogits = dlogits_of(torch.exp(logits - lse[:, None]), coef_p, coef_t, tcol, smooth, cw, owned)  # global LSE
        xscale = None
        if p.margin != Margin.NONE:  # a row whose target lives elsewhere keeps a plain |x| cos logit in tcol
            scale_c = logit_scale(xnorm, lam_t, p)  # |x| (ASoftmax) or s
            tgrad = (torch.where(owned[:, None], target_logit_grad(cos_y, xnorm, lam_t, p), scale_c)
                     if p.margin in (Margin.ANGULAR, Margin.COMBINED) else None)
            xscale = dlogits_to_dcos(dlogits, logits, scale_c, rx, tcol, tgrad, p)
            if dirty is not None:
                dlogits.masked_fill_(dirty, 0.0)  # filtered cosines are constants
        if best is not None:  # sub-centres: each class's gradient to its winning column
            dlogits = to_sub_centers(dlogits, best, p.sub_centers)
        ctx.save_for_backward(xg, wf, cos, dlogits, rx, rw, xscale, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        p, lay = ctx.p, ctx.lay
        scale = ctx.saved_tensors[-1]
        if p.reduction == "none":
            g = _gather_rows(grad.to(scale.dtype), lay) * scale  # every rank's upstream rows
        else:
            g = (grad * scale).expand(lay.world * lay.bmax)
        if ctx.kernels:
            from .kernels import ops
            xg, w, bias, tg, cw, lam_k, row_stats, _ = ctx.saved_tensors
            stats = ops.saved_stats(row_stats)  # LSE, COEF_P, COEF_T rows (margin_ce's STAT_* order), scale 1
            dx_all, dw, db = ops.bwd_grads(ops.margin_ce_bwd(xg, w, bias, tg, cw, lam_k, stats, g.to(stats.dtype),
                                                             *ctx.op_args, True, True), True, True, bias is not None)
        else:
            xg, wf, cos, dlogits, rx, rw, xscale, _ = ctx.saved_tensors
            dx_all, dw, db = project_grad(xg, wf, cos, dlogits, rx, rw, xscale, ctx.has_bias, row_scale=g[:, None])
        dx = torch.empty((lay.bmax, dx_all.shape[1]), dtype=dx_all.dtype, device=dx_all.device)
        dist.reduce_scatter(dx, list(dx_all.contiguous().chunk(lay.world)), group=lay.group)  # sum of partial dX
        dx = dx[: lay.sizes[lay.rank]]
        x_dtype, w_dtype = ctx.dtypes
        return dx.to(x_dtype), dw.to(w_dtype), db, None, None, None, None, None, None, None, None, None


def _local_logits(xg, wf, bias, tg, valid, lam, p: LossParams, lay: _Layout):
    """Logits [B_total, C_r] of the gathered rows against this rank's classes (torch ops), margin on owned targets,
    with what backward needs: the cosines of every column ([B_total, C_r * K] with K sub-centres), ..., the weight
    `project_grad` takes (normalised for the cosine losses), each class's winning sub-centre (None for K = 1) and
    the logits insightface's interclass filtering zeroes (non-target cosines above the threshold; None when off)."""
    n_local = wf.shape[1] // p.sub_centers
    owned = valid & (tg >= lay.c0) & (tg < lay.c0 + n_local)  # this rank holds the row's target column
    tcol = (tg - lay.c0).clamp(0, n_local - 1)[:, None]
    cos = xnorm = rx = rw = cos_y = lam_t = best = dirty = None
    if p.margin == Margin.NONE:
        logits = torch.addmm(bias.to(xg.dtype), xg, wf) if bias is not None else xg @ wf
    else:
        cos_cols, xnorm, rx, rw, wf = cosines(xg, wf)
        cos = cos_cols
        if p.sub_centers > 1:
            cos, best = sub_center_max(cos_cols, p.sub_centers)
        cos_y = cos.gather(1, tcol)
        lam_t = None if lam is None else torch.as_tensor(lam, dtype=xg.dtype, device=xg.device)
        logits = cos * logit_scale(xnorm, lam_t, p)
        if p.margin == Margin.COMBINED and p.filter_threshold > 0:  # the target column only where this rank owns it
            dirty = cos > p.filter_threshold
            dirty.scatter_(1, tcol, dirty.gather(1, tcol) & ~owned[:, None])
            logits.masked_fill_(dirty, 0.0)
        logits.scatter_(1, tcol, torch.where(owned[:, None], target_logit(cos_y, xnorm, lam_t, p),
                                             logits.gather(1, tcol)))
        cos = cos_cols
    return logits, cos, xnorm, rx, rw, cos_y, lam_t, tcol, owned, wf, best, dirty


def _kept_quota(sample_rate: float, width: int) -> int:
    """ceil(sample_rate * width) in integers, the rate read as the decimal it was written as: 0.07 of 100 classes
    keeps 7 (the float product is 7.000000000000001, whose ceil keeps 8)."""
    rate = Fraction(repr(float(sample_rate)))
    return -(-rate.numerator * width // rate.denominator)


def _sample(tg, valid, lay: _Layout, n_local, sample_rate, generator):
    """Partial FC: the local columns to keep, this softmax's targets in the kept-class space, and its new layout.

    Every rank keeps its slice's positive classes (sorted, first) and random others up to k_r = max(#positives,
    `_kept_quota(sample_rate, C_r)`). The kept spaces are concatenated in rank order, so every rank can map any
    target from the gathered targets alone. valid: the rows whose target some rank holds (the others keep theirs).
    Host syncs: the number of positives decides the shapes.
    """
    world, n_classes, dev = lay.world, lay.n_classes, tg.device
    bounds = [class_slice(n_classes, world, r) for r in range(world)]
    starts = torch.tensor([a for a, _ in bounds], device=dev)
    quota = torch.tensor([_kept_quota(sample_rate, b - a) for a, b in bounds], device=dev)
    positives = torch.unique(tg[valid])  # sorted
    owner = torch.searchsorted(starts, positives, right=True) - 1
    n_pos = torch.bincount(owner, minlength=world)
    keep = torch.maximum(n_pos, quota)
    offsets = torch.cumsum(keep, 0) - keep
    pos_offsets = torch.cumsum(n_pos, 0) - n_pos
    # a target's kept-space index: its owner's offset + its rank among that owner's positives
    t_owner = torch.searchsorted(starts, tg, right=True) - 1
    mapped = offsets[t_owner] + torch.searchsorted(positives, tg) - pos_offsets[t_owner]
    new_tg = torch.where(valid, mapped, tg)
    mine = positives[owner == lay.rank] - lay.c0
    others = torch.ones(n_local, dtype=torch.bool, device=dev)
    others[mine] = False
    order = torch.randperm(n_local, generator=generator, device=generator.device if generator else "cpu").to(dev)
    negatives = order[others[order]][: int(keep[lay.rank]) - mine.numel()]
    idx = torch.cat([mine, negatives])
    new_lay = _Layout(lay.group, lay.rank, world, lay.sizes, int(offsets[lay.rank]), int(keep.sum()))
    return idx, new_tg, new_lay


def sharded_margin_loss(x, w_dc, bias, targets, class_weights, lam, p: LossParams, group, *,
                        sample_rate: float = 1.0, generator: Optional[torch.Generator] = None, backend: str = "auto",
                        validate: Optional[bool] = None, n_classes: Optional[int] = None):
    """Class-parallel AMSoftmax / ASoftmax / CrossEntropy; `functional.*_loss(..., process_group=group)` lands here.

    Args:
        x: [B_r, D] this rank's embeddings (B_r may differ between ranks, 0 included).
        w_dc: [D, C_r] this rank's class columns, C_r from `class_slice` (CrossEntropy passes fc.weight.t()).
        bias: [C_r] or None (CrossEntropy). targets: [B_r] global class indices in [0, C) or ignore_index.
        class_weights: [C] (all classes, the same on every rank) or None. lam: ASoftmax lambda (float or 0-dim).
        p: options (OCSoftmax is not shardable: it has one class). group: the process group (dist.group.WORLD for all).
        sample_rate: Partial FC keep ratio in (0, 1]; 1 is the exact loss. generator: seeds the class sampling
            (e.g. `torch.Generator().manual_seed(seed + step)`); the same seed on every rank is fine.
        backend: 'triton' (what 'auto' picks for CUDA inputs) runs each rank's share on the fused kernels, which
            merge their per-rank log-sum-exp across ranks and never hold the [B_total, C_r] logits; else torch ops.
        validate: the value checks' switch (`deepfense.inputs.validating`); they run when any rank's policy says so.
        n_classes: the global C the caller's head was built for (None: the sum of the ranks' slices); a
            `DeclaredGroup` as `group` carries it too.

    Every rank first sends its shapes, dtypes, options and checks' outcome in one small all-gather
    (`deepfense.distributed_checks`); any disagreement or failed check raises on every rank before the step's other
    collectives, so no rank waits for a peer that has raised.

    Returns:
        The loss per `p.reduction` (a scalar equal on every rank, or [B_r] for 'none'), float32 (float64 for float64
        inputs). Gradient convention: see the module docstring.
    """
    if p.margin == Margin.COMBINED and isinstance(lam, torch.Tensor) and lam.requires_grad:
        raise ValueError("process_group: margins that require grad (MagFace's) are not supported on the class-parallel "
                         "path; pass detached margins")
    if p.margin == Margin.ONE_CLASS:
        raise ValueError("process_group does not apply to OCSoftmax: it has a single class centre, nothing to shard")
    if isinstance(group, DeclaredGroup):
        group, n_classes = group.group, group.n_classes
    if group is None or not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs an initialised torch.distributed process group")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = next((t.device for t in (x, w_dc, targets) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    error = None
    try:  # a failed local check is raised after the exchange, on every rank, so that no peer waits for this one
        kernels = check_local(x, w_dc, bias, targets, class_weights, p, sample_rate, backend)
        record = build_record(group, device, p, ok=True, validate=validating(targets, validate), x=x, w_dc=w_dc,
                              bias=bias, targets=targets, class_weights=class_weights, lam=lam,
                              sample_rate=sample_rate, declared=n_classes)
    except Exception as exc:  # noqa: BLE001 - any error: the peers must still get this rank's record
        error, record = exc, build_record(group, device, p, ok=False, validate=False)
    agreed = settle(exchange(record, group), group, error)  # host sync: shapes of the gathered batch
    k, n_classes = p.sub_centers, agreed.n_classes
    lay = _Layout(group, rank, world, agreed.sizes, class_slice(n_classes, world, rank)[0], n_classes)
    tg = _gather_rows(targets, lay, fill=p.ignore_index)
    if p.row_margins:  # per-sample margins travel with their rows: [4, B_r] -> [4, world * bmax]
        lam = _gather_rows(lam.t(), lay, fill=1.0).t()
    dt = compute_dtype(x, w_dc)
    valid = tg != p.ignore_index
    safe = torch.where(valid, tg, 0).clamp(0, n_classes - 1)
    cw_full = torch.ones(n_classes, dtype=dt, device=x.device) if class_weights is None else class_weights.to(dt)
    row_w = cw_full[safe] * valid
    cw = cw_full[lay.c0: lay.c0 + w_dc.shape[1] // k]
    cw_total = cw_full.sum()
    if sample_rate < 1.0:
        owned = valid & (tg >= 0) & (tg < n_classes)
        idx, tg, lay = _sample(tg, owned, lay, w_dc.shape[1] // k, sample_rate, generator)
        cols = (idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1)  # a kept class's k columns
        w_dc, cw = w_dc[:, cols], cw[idx]  # indexing through autograd: unkept columns get zero gradient
        bias = bias[idx] if bias is not None else None
        cw_total = cw.sum()
        dist.all_reduce(cw_total, group=group)
    cw_cols = cw if (class_weights is not None or not kernels) else None  # the kernels take none as all ones
    return ShardedMarginLossFunction.apply(x, w_dc, bias, tg, row_w, cw_cols, cw_total, lam, p, lay, kernels,
                                           agreed.validate)


def sum_comm_hook(state, bucket):
    """DDP comm hook that sums gradients over ranks instead of averaging (`ddp.register_comm_hook(None, hook)`), so a
    DDP backbone under the sharded loss receives the exact global gradient. `state`: the process group, or None."""
    fut = dist.all_reduce(bucket.buffer(), group=state, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
