"""The 'torch' backend: one autograd Function with a closed-form backward, the fast path on CPU.

It computes the [B, C] logits once, keeps the softmax and cosines for backward, and turns dL/dlogits into dX and dW
with two matmuls, so a training step makes few passes over the embeddings and builds no autograd graph of a dozen ops.
The gradient derivation is written next to each line that computes it; the reference (`deepfense.reference`) stays
the oracle it is tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .params import ADAFACE_EPS, Fallback, LossParams, Margin, RowMargin
from .reference import arc_margin, chebyshev, hard_negatives, scalar_like


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs are upcast: fp32 arithmetic inside)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chebyshev_grad(cos: torch.Tensor, m: int) -> torch.Tensor:
    """d T_m(c) / dc = m * U_{m-1}(c), any integer m >= 1, U by the recurrence U_{-1} = 0, U_0 = 1,
    U_{j+1} = 2 c U_j - U_{j-1}."""
    prev, cur = torch.zeros_like(cos), torch.ones_like(cos)
    for _ in range(m - 1):
        prev, cur = cur, 2 * cos * cur - prev
    return m * cur


def _sphereface_k(cos: torch.Tensor, m: int) -> torch.Tensor:
    return torch.floor(m * torch.acos(cos) / torch.pi)


def combined_values(lam, p: LossParams):
    """(s, m1, m2, m3) of ArcFace / CombinedMargin as they broadcast against [B, C] cosines: from the runtime tensor
    `lam` [4, N] (`functional.arcface_loss`; N = 1 shared, or B per sample: each row [N, 1]) when given, else p's.
    m1 stays p's Python float unless it is per sample (`RowMargin.M1`)."""
    if lam is None:
        return p.s, p.m1, p.m, p.m3
    s, m1, m2, m3 = (lam[k].view(-1, 1) for k in range(4))
    return s, (m1 if p.row_margins & RowMargin.M1 else p.m1), m2, m3


def logit_scale(xnorm, lam, p: LossParams):
    """What multiplies every cosine: s, or |x| for ASoftmax."""
    if p.margin == Margin.ANGULAR:
        return xnorm
    return combined_values(lam, p)[0] if p.margin == Margin.COMBINED else p.s


def _margin_branch(c, m1, m2, fb: Fallback):
    """Where `arc_margin` takes cos(m1 theta + m2) (the rest is its fallback, cos - const), None where it always does
    (NONE, and ADAFACE, whose clip is handled by its caller)."""
    if fb == Fallback.EASY:
        return c > 0
    if fb in (Fallback.NONE, Fallback.ADAFACE):
        return None
    th = torch.cos(torch.clamp((torch.pi - m2) / m1, 0.0, torch.pi))
    return c >= th if fb == Fallback.PML else c > th  # pml keeps the margin at the tie (its angle <= pi - m)


def _arc_angles(cos, m1, m2, fb: Fallback):
    """(c, sin theta, 1 / sin theta, m2 as a tensor) of target cosines for `arc_margin`'s derivatives: c clamped as
    SpeechBrain clamps it; 1 / sin is 0 at cos = +-1, where d cos / dx = 0 and any finite value serves."""
    c = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7) if fb == Fallback.SPEECHBRAIN else cos
    m2 = scalar_like(m2, c) if not isinstance(m2, torch.Tensor) else m2
    sin = torch.sqrt(torch.clamp_min(1.0 - c * c, 0.0))
    return c, sin, torch.where(sin > 0, 1.0 / sin, 0.0), m2


def _identity(m1) -> bool:
    """m1 = 1 as a Python float: cos(theta + m2) by the identity c cos m2 - sin sin m2 (as WeSpeaker, SpeechBrain)."""
    return isinstance(m1, float) and m1 == 1.0


def _arc_margin_grad(cos, m1, m2, fallback):
    """d `arc_margin`(cos) / d cos: the margin branch's derivative, 1 on the fallback branches (cos - const)."""
    fb = Fallback(fallback)
    c, sin, rsin, m2 = _arc_angles(cos, m1, m2, fb)
    if fb == Fallback.ADAFACE:  # cos(clip(m1 theta + m2)): d/dc = m1 sin(angle) / sin theta, 0 where the clip binds
        angle = m1 * torch.atan2(sin, c) + m2
        return torch.where((angle >= ADAFACE_EPS) & (angle <= torch.pi - ADAFACE_EPS), m1 * torch.sin(angle) * rsin,
                           0.0)
    if _identity(m1):
        d = torch.cos(m2) + torch.sin(m2) * c * rsin  # d/dc (c cos m2 - sin sin m2), d sin / dc = -c / sin
    else:
        d = m1 * torch.sin(m1 * torch.atan2(sin, c) + m2) * rsin  # d theta / dc = -1 / sin
    branch = _margin_branch(c, m1, m2, fb)
    if branch is not None:
        d = torch.where(branch, d, 1.0)
    if fb == Fallback.SPEECHBRAIN:  # SpeechBrain's clamp passes no gradient outside its bounds
        d = torch.where((cos >= -1.0 + 1e-7) & (cos <= 1.0 - 1e-7), d, 0.0)
    return d


def arc_margin_param_grads(cos, m1, m2, fallback):
    """(d phi / d m1, d phi / d m2) of `arc_margin`'s phi = cos(m1 theta + m2) (before m3) at target cosines `cos`:
    -sin(m1 theta + m2) (theta, 1) on the margin branch; on the fallbacks d/d m2 of the shift they subtract
    (WeSpeaker 1 - cos m2, SpeechBrain and pml m2 sin m2, easy none) and nothing for m1; 0 where AdaFace's clip
    binds. (d phi / d m3 is -1.)"""
    fb = Fallback(fallback)
    c, sin, _, m2 = _arc_angles(cos, m1, m2, fb)
    theta = torch.atan2(sin, c)
    angle = m1 * theta + m2
    dm2 = -(sin * torch.cos(m2) + c * torch.sin(m2)) if _identity(m1) else -torch.sin(angle)
    if fb == Fallback.ADAFACE:
        dm2 = torch.where((angle >= ADAFACE_EPS) & (angle <= torch.pi - ADAFACE_EPS), dm2, 0.0)
    dm1 = dm2 * theta
    branch = _margin_branch(c, m1, m2, fb)
    if branch is not None:
        shift_grad = {Fallback.EASY: 0.0 * m2, Fallback.WESPEAKER: -torch.sin(m2)}.get(
            fb, -(torch.sin(m2) + m2 * torch.cos(m2)))
        dm2, dm1 = torch.where(branch, dm2, shift_grad), torch.where(branch, dm1, 0.0)
    return dm1, dm2


def target_logit(cos_y, xnorm, lam, p: LossParams):
    """Target-column logit from its clamped cosine ([B, 1] each)."""
    if p.margin == Margin.ADDITIVE:
        return p.s * (cos_y - p.m)
    if p.margin == Margin.COMBINED:
        s, m1, m2, m3 = combined_values(lam, p)
        return s * arc_margin(cos_y, m1, m2, m3, p.fallback)
    m = int(p.m)  # ANGULAR: |x| (lam cos + psi) / (1 + lam), psi = (-1)^k T_m(cos) - 2k
    k = _sphereface_k(cos_y, m)
    psi = (1.0 - 2.0 * torch.remainder(k, 2.0)) * chebyshev(cos_y, m) - 2.0 * k
    return xnorm * (lam * cos_y + psi) / (1.0 + lam)


def target_logit_grad(cos_y, xnorm, lam, p: LossParams):
    """ASoftmax's d(target logit) / d(cos_y), holding |x| fixed; k carries no gradient. (AMSoftmax's is just s.)
    CombinedMargin's is s d arc_margin / d cos, or s with insightface's straight-through gradient."""
    if p.margin == Margin.COMBINED:
        s, m1, m2, _ = combined_values(lam, p)
        return s + 0.0 * cos_y if p.straight_through else s * _arc_margin_grad(cos_y, m1, m2, p.fallback)
    m = int(p.m)
    dpsi = (1.0 - 2.0 * torch.remainder(_sphereface_k(cos_y, m), 2.0)) * _chebyshev_grad(cos_y, m)
    return xnorm * (lam + dpsi) / (1.0 + lam)


def margin_row_grads(cos_y, dlogit_y, lam, p: LossParams):
    """[4, B]: d(row loss) / d(s, m1, m2, m3) of CombinedMargin through the target logit s (phi(cos_y; m1, m2) - m3),
    at unit upstream gradient, from the target cosines [B, 1] and dL/d(target logit) [B, 1]. s's entry is 0: only
    the margins take a gradient (`functional.arcface_loss`), and none with the straight-through gradient, which holds
    the margin constant."""
    s, m1, m2, _ = combined_values(lam, p)
    d_m1, d_m2 = arc_margin_param_grads(cos_y, m1, m2, p.fallback)
    d = s * dlogit_y
    rows = torch.cat([torch.zeros_like(d), d * d_m1, d * d_m2, -d], 1).t()
    return torch.zeros_like(rows) if p.straight_through else rows


def cosines(xf, wf):
    """Clamped cosines [B, C] of the rows of xf [B, D] and the columns of wf [D, C], with |x| [B, 1], 1/|x| [B, 1],
    1/|w| [1, C] and the normalised columns w_hat [D, C] (`_gemm_layout`); zero vectors normalise to zero, with zero
    gradient; only exact zeros: a NaN norm stays NaN, and an Inf row's 0 times its Inf products makes NaN cosines.
    The row scale 1/|x| is applied to the [B, C] product rather than to the [B, D] embeddings."""
    xnorm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
    rx = torch.where(xnorm == 0, 0.0, 1.0 / xnorm)
    wnorm = wf.square().sum(0, keepdim=True).sqrt_()  # 7x faster than vector_norm(dim=0) on CPU at C = 5994
    rw = torch.where(wnorm == 0, 0.0, 1.0 / wnorm)
    w_hat = _gemm_layout(wf * rw)
    return (xf @ w_hat).mul_(rx).clamp_(-1.0, 1.0), xnorm, rx, rw, w_hat


def sub_center_max(cos_cols, k: int):
    """Class cosines [B, C]: the max over each class's K adjacent columns of cos_cols [B, C*K], and the winners."""
    best = cos_cols.view(cos_cols.shape[0], -1, k).max(2)
    return best.values, best.indices


def to_sub_centers(dcos, best, k: int):
    """dL/dcos of the classes [B, C] sent to each class's winning column: [B, C*K]."""
    full = dcos.new_zeros(*dcos.shape, k).scatter_(2, best[..., None], dcos[..., None])
    return full.view(dcos.shape[0], -1)


def _gemm_layout(w_dc):
    """The [D, C] weight, stored class-major when C < D: CPU GEMMs against a narrow weight run several times faster
    in that layout (measured 4x at B=4096, D=192, C=2); for wide heads the copy would cost more than it saves."""
    return w_dc.t().contiguous().t() if w_dc.shape[1] < w_dc.shape[0] else w_dc


class MarginLossFunction(torch.autograd.Function):
    """The loss of one of the four kinds, reduced inside (scalar) or per row ([B] for reduction='none').

    Forward keeps the cosines (or inputs) and dL/dlogits of the unit upstream gradient; backward only scales them by
    the upstream gradient and applies two matmuls. The clamp of the cosine passes no gradient outside [-1, 1]; inside,
    at |cos| = 1 exactly, x is parallel to w and dcos/dx = (w_hat - cos x_hat)/|x| vanishes, so no mask is needed.
    """

    @staticmethod
    def forward(ctx, x, w, bias, targets, class_weights, lam, p: LossParams):
        dt = compute_dtype(x, w)
        xf, wf = x.to(dt), w.to(dt)
        n_classes = wf.shape[1] // p.sub_centers
        valid = targets != p.ignore_index
        n_targets = 2 if p.margin == Margin.ONE_CLASS else n_classes
        # any in-range index serves an ignored row: its row weight and coefficients are 0
        safe = targets.clamp(0, n_targets - 1)[:, None]
        row_w = valid.to(dt) if class_weights is None else class_weights.to(dt)[safe[:, 0]] * valid
        # an out-of-range target (value checks off) makes its row's loss NaN: no host sync, no device assert
        row_w = row_w.masked_fill(valid & ((targets < 0) | (targets >= n_targets)), float("nan"))
        rx = rw = xnorm = cos = None
        if p.margin == Margin.NONE:
            logits = torch.addmm(bias.to(dt), xf, wf) if bias is not None else xf @ wf
        else:
            cos, xnorm, rx, rw, wf = cosines(xf, wf)  # backward needs only the normalised columns
            cos_cols = cos
            if p.sub_centers > 1:
                cos, best = sub_center_max(cos_cols, p.sub_centers)

        if p.margin == Margin.ONE_CLASS:
            coef = one_class_coefficients(safe[:, 0], p, dt)
            z = torch.addcmul(coef[:, 1:], coef[:, :1], cos)
            rows = row_w * one_class_rows(z)[:, 0]
            dcos = row_w[:, None] * torch.sigmoid(z) * coef[:, :1]  # softplus' = sigmoid
            return _finish(ctx, p, rows, row_w, xf, wf, bias, cos, dcos, rx, rw, None, (x.dtype, w.dtype))

        lam_t = None if lam is None else torch.as_tensor(lam, dtype=dt, device=x.device)
        ctx.lam_rows = lam_t.shape[-1] if lam_t is not None and lam_t.dim() == 2 else 1
        dirty = None  # insightface's interclass filtering: non-target cosines above the threshold count as 0
        if p.margin == Margin.COMBINED and p.filter_threshold > 0:
            dirty = (cos > p.filter_threshold).scatter_(1, safe, False)
        frozen = None  # AdaFace's clamp of every cosine: no gradient where it binds
        if p.margin == Margin.COMBINED and p.fallback == Fallback.ADAFACE:
            frozen = (cos < -1.0 + ADAFACE_EPS) | (cos > 1.0 - ADAFACE_EPS)
            cos = cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS)
        if p.margin == Margin.NONE:
            logits_y = logits.gather(1, safe)
        else:
            cos_y = cos.gather(1, safe)
            logits = cos * logit_scale(xnorm, lam_t, p)
            if dirty is not None:
                logits.masked_fill_(dirty, 0.0)
            hard = None
            if p.row_margins & RowMargin.CURRICULAR:  # hard negatives: s cos (t + cos), t constant
                hard, t = hard_negatives(cos, arc_margin(cos_y, 1.0, combined_values(lam_t, p)[2], 0.0), safe), lam_t[4, 0]
                logits = torch.where(hard, logits * (t + cos), logits)
            logits_y = target_logit(cos_y, xnorm, lam_t, p)
            logits.scatter_(1, safe, logits_y)
        logp = torch.log_softmax(logits, dim=1)
        nll = -logp.gather(1, safe)[:, 0]
        if p.margin == Margin.NONE:  # a -inf logit (Inf in x, w or bias) leaves the softmax finite but the gradient
            nll = nll + 0.0 * logits.sum(1)  # NaN: the row's loss is NaN instead, as on the kernels
        eps = p.label_smoothing
        cw = None
        if eps:
            cw = torch.ones(n_classes, dtype=dt, device=x.device) if class_weights is None else class_weights.to(dt)
        rows, coef_t, coef_p, smooth = epilogue(nll, row_w, valid, (logp @ cw) if eps else None,
                                                cw.sum() if eps else None, p, n_classes)
        dlogits = dlogits_of(logp.exp_(), coef_p, coef_t, safe, smooth, cw)
        if p.margin == Margin.NONE:
            return _finish(ctx, p, rows, row_w, xf, wf, bias, None, dlogits, None, None, None, (x.dtype, w.dtype))
        ctx.dlam = None
        if p.margin == Margin.COMBINED and ctx.needs_input_grad[5]:
            ctx.dlam = margin_row_grads(cos_y, dlogits.gather(1, safe), lam_t, p)
        tgrad = target_logit_grad(cos_y, xnorm, lam_t, p) if p.margin in (Margin.ANGULAR, Margin.COMBINED) else None
        xscale = dlogits_to_dcos(dlogits, logits, logit_scale(xnorm, lam_t, p), rx, safe, tgrad, p)
        if hard is not None:  # d/dcos of cos (t + cos) = t + 2 cos
            dlogits = torch.where(hard, dlogits * (t + 2.0 * cos), dlogits)
        for constant in (dirty, frozen):  # filtered cosines are constants, and so are AdaFace's clamped ones
            if constant is not None:
                dlogits.masked_fill_(constant, 0.0)
        if p.sub_centers > 1:
            cos, dlogits = cos_cols, to_sub_centers(dlogits, best, p.sub_centers)
        return _finish(ctx, p, rows, row_w, xf, wf, bias, cos, dlogits, rx, rw, xscale, (x.dtype, w.dtype))

    @staticmethod
    def backward(ctx, grad):
        p, (x_dtype, w_dtype) = ctx.p, ctx.dtypes
        xf, wf, cos, dcos, rx, rw, xscale, scale = ctx.saved_tensors
        g = (grad[:, None] if p.reduction == "none" else grad) * scale
        dx, dw, db = project_grad(xf, wf, cos, dcos, rx, rw, xscale, ctx.has_bias, row_scale=g)
        dlam = getattr(ctx, "dlam", None)
        if dlam is not None:  # per-row partials [4, B] times each row's upstream gradient, summed for shared values
            dlam = dlam * (g.reshape(1, -1) if g.dim() else g)
            dlam = dlam if ctx.lam_rows > 1 else dlam.sum(1, keepdim=True)
        return dx.to(x_dtype), dw.to(w_dtype), db, None, None, dlam, None


def _one_class_table(p: LossParams, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    bona, spoof = (-p.alpha, p.alpha * p.m_real), (p.alpha, -p.alpha * p.m_fake)
    return torch.tensor([bona, spoof] if p.bonafide_label == 0 else [spoof, bona], dtype=dtype, device=device)


_one_class_tables = functools.lru_cache(maxsize=64)(_one_class_table)  # eager: built once per options and dtype


def one_class_coefficients(targets, p: LossParams, dtype: torch.dtype) -> torch.Tensor:
    """OCSoftmax's z = slope cos + offset, per row: [B, 2] (slope, offset) from targets [B] in {0, 1}: alpha (m_real -
    cos) for bonafide rows, alpha (cos - m_fake) for spoof rows. A target outside {0, 1} raises (index_select)."""
    table = (_one_class_table if torch.compiler.is_compiling() else _one_class_tables)(p, dtype, targets.device)
    return torch.index_select(table, 0, targets)


def one_class_rows(z):
    """OCSoftmax's row loss softplus(z). (softplus' own threshold, 20, returns z itself above it: 2e-9 relative off
    log1p(exp(z)), too far for float64; 40 is exact in both precisions.)"""
    return F.softplus(z, threshold=40.0)


def epilogue(nll, row_w, valid, cw_logp, cw_total, p: LossParams, n_classes: int):
    """The softmax cross-entropy's per-row loss and its gradient coefficients, from each row's NLL [B].

    row_w [B]: the row's class weight (0 ignored, NaN for a target no class holds); valid [B]: kept rows; cw_logp [B]:
    sum_c cw_c log p_c and cw_total: sum_c cw_c (label smoothing only, else None). ASoftmax's focal factor
    (1 - p_y)^gamma is held constant. Returns (rows, coef_t, coef_p, smooth) with
    dL/dlogit_c = coef_p p_c - coef_t [c == y] - smooth cw_c (`dlogits_of`); smooth is None without smoothing.
    """
    coef_t = row_w
    if p.margin == Margin.ANGULAR and p.gamma:
        coef_t = row_w * (1.0 - torch.exp(-nll)).clamp_min(0.0) ** p.gamma  # focal factor, no gradient through it
    eps = p.label_smoothing
    if not eps:
        return coef_t * nll, coef_t, coef_t, None
    coef_t = (1.0 - eps) * coef_t
    smooth = eps / n_classes * valid.to(nll.dtype)
    return coef_t * nll - smooth * cw_logp, coef_t, coef_t + smooth * cw_total, smooth


def dlogits_of(probs, coef_p, coef_t, tcol, smooth, cw, owned=None):
    """In place on the softmax `probs` [B, C]: dL/dlogits = coef_p p_c - coef_t [c == y] - smooth cw_c (`epilogue`).
    tcol [B, 1]: the target column; owned [B] (sharded): whether this rank holds the row's target."""
    dlogits = probs.mul_(coef_p[:, None])
    dlogits.scatter_add_(1, tcol, (-coef_t if owned is None else torch.where(owned, -coef_t, 0.0))[:, None])
    if smooth is not None:
        dlogits.sub_(smooth[:, None] * cw)
    return dlogits


def reduce_rows(rows, row_w, reduction: str):
    """(loss, scale): the rows reduced, and what maps the upstream gradient to each row. 'mean' divides by the kept
    rows' class weights: 0, not NaN, when none are kept (the rows then sum to 0)."""
    one = torch.ones((), dtype=rows.dtype, device=rows.device)
    if reduction == "none":
        return rows, one
    if reduction == "sum":
        return rows.sum(), one
    den = row_w.sum()
    scale = torch.where(den > 0, 1.0 / den, 0.0)
    return rows.sum() * scale, scale


def dlogits_to_dcos(dlogits, logits, xnorm, rx, tcol, tgrad, p: LossParams):
    """In place, turn dL/dlogits [B, C] into dL/dcos for the cosine losses; returns ASoftmax's |x| term or None.

    xnorm: what scales the non-target cosines (|x| [B, 1]; s for CombinedMargin). tcol [B, 1]: the target column.
    tgrad [B, 1]: d(target logit)/d(cos_y) (ASoftmax, CombinedMargin; a caller that must leave a row's target column
    as a plain scaled cosine passes the scale there).
    """
    if p.margin == Margin.ADDITIVE:
        dlogits.mul_(p.s)  # every logit, the target's too, is s * cos + const
        return None
    if p.margin == Margin.COMBINED:  # logits s cos_c, the target's s h(cos_y)
        dlogits_y = dlogits.gather(1, tcol)
        dlogits.mul_(xnorm).scatter_(1, tcol, dlogits_y * tgrad)
        return None
    # logits are |x| h(cos): dL/d|x| = sum_c dL/dl_c * l_c / |x|, and d|x|/dx = x / |x|
    xscale = (dlogits * logits).sum(1, keepdim=True) * rx * rx
    dlogits_y = dlogits.gather(1, tcol)
    dlogits.mul_(xnorm).scatter_(1, tcol, dlogits_y * tgrad)
    return xscale


def project_grad(xf, wf, cos, a, rx, rw, xscale, has_bias, row_scale=None):
    """dX [B, D], dW [D, C] and db [C] (or None) from a = dL/dcos [B, C] (dL/dlogits for CrossEntropy, cos None).

    wf: the [D, C] weight for CrossEntropy; for the cosine losses its normalised columns w_hat from `cosines`.
    xscale [B, 1]: ASoftmax's dL/d|x| / |x|, or None. row_scale: the upstream gradient per row ([B, 1]) or a scalar
    (None: already in `a` and `xscale`).
    """
    g = 1.0 if row_scale is None else row_scale
    if cos is None:
        ag = a * g
        return ag @ _gemm_layout(wf).t(), (ag.t() @ xf).t(), ag.sum(0) if has_bias else None
    # d cos_c/dx = rx (w_hat_c - cos_c x_hat) and d cos_c/dw_c = rw_c (x_hat - cos_c w_hat_c), so with a' = a rx g:
    #   dx = a' @ W_hat^T - (sum_c a'_c cos_c) x_hat,
    #   dw_c = rw_c (X^T a')_c - (sum_i a'_ic |x_i| cos_ic) rw_c w_hat_c.
    # Since cos_c = x_hat . w_hat_c, each correction sum is also a projection of the matmul it corrects; every sum is
    # taken over whichever side is smaller ([B, C] with cos, or [B, D] / [D, C] with the matmul's output).
    B, D, C = xf.shape[0], xf.shape[1], wf.shape[1]
    ag = a * (rx * g)
    dx = ag @ wf.t()
    k = (ag * cos).sum(1, keepdim=True) * rx if C < D else (dx * xf).sum(1, keepdim=True) * (rx * rx)
    if xscale is not None:  # ASoftmax: + dL/d|x| x_hat
        k = k - xscale * g
    dx.addcmul_(xf, k, value=-1.0)
    # dW [D, C]: for a wide head computed in the weight's own layout (a transposed result costs autograd a copy of all
    # of W to store it: 20% of a 128 x 512 x 93431 step); for a narrow one (C < D) as [C, D], the GEMM shape that runs
    # 2x faster there (1024 x 1024 x 2), whose copy is small
    nw = (ag.t() @ xf).t() if C < D else xf.t() @ ag
    if B < D:
        csum = torch.where(rx > 0, 1.0 / rx, 0.0).t() @ (ag * cos)  # a' |x| = a g on rows of nonzero norm
    else:
        csum = (nw * wf).sum(0, keepdim=True)
    dw = nw.mul_(rw).addcmul_(wf, csum * rw, value=-1.0)
    return dx, dw, None


def _finish(ctx, p, rows, row_w, xf, wf, bias, cos, dcos, rx, rw, xscale, dtypes):
    """Reduce the per-row losses and save what backward needs; `scale` maps the upstream gradient to rows."""
    out, scale = reduce_rows(rows, row_w, p.reduction)
    ctx.save_for_backward(xf, wf, cos, dcos, rx, rw, xscale, scale)
    ctx.p, ctx.dtypes, ctx.has_bias = p, dtypes, bias is not None
    return out


def margin_loss(x, w_dc, bias, targets, class_weights, lam, p: LossParams):
    """Loss of any of the four kinds on the torch backend.

    Args:
        x: [B, D] embeddings. w_dc: [D, C] weight view (CrossEntropy passes fc.weight.t()). bias: [C] or None.
        targets: [B] integer. class_weights: [C] ([2] for OCSoftmax) or None. lam: ASoftmax lambda (float or tensor).
        p: scalar options.

    Returns:
        Loss reduced per `p.reduction`, float32 (float64 for float64 inputs).
    """
    return MarginLossFunction.apply(x, w_dc, bias, targets, class_weights, lam, p)
