"""Tile-level Triton helpers of the fused loss kernels (`margin_ce.py`): the cosine tile, the per-loss target-logit
maths and its derivative, the log-sum-exp epilogue and the gradient of one recomputed tile.

Notation and the per-row statistics are described in `margin_ce`.
"""

import triton
import triton.language as tl

from ..params import Margin
from .arc_margin import (ADA_EPS, ARC_FALLBACK, ARC_FILTER, ARC_STRAIGHT, FALLBACK_ADAFACE, _arc_margin, _load_arc,
                         _sincos)

STAT_LOSS: tl.constexpr = tl.constexpr(0)
STAT_ROWW: tl.constexpr = tl.constexpr(1)
STAT_LSE: tl.constexpr = tl.constexpr(2)
STAT_COEF_P: tl.constexpr = tl.constexpr(3)
STAT_COEF_T: tl.constexpr = tl.constexpr(4)
N_STATS = 5

MARGIN_NONE: tl.constexpr = tl.constexpr(int(Margin.NONE))
MARGIN_ADDITIVE: tl.constexpr = tl.constexpr(int(Margin.ADDITIVE))
MARGIN_ANGULAR: tl.constexpr = tl.constexpr(int(Margin.ANGULAR))
MARGIN_ONE_CLASS: tl.constexpr = tl.constexpr(int(Margin.ONE_CLASS))
MARGIN_COMBINED: tl.constexpr = tl.constexpr(int(Margin.COMBINED))


@triton.jit
def _dot_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col, stride_w_d, stride_w_c,
              DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """x_tile @ w_tile over all of D, with the squared norms of the rows and the columns read on the way.

    Returns acc [BLOCK_B, BLOCK_C], xsq [BLOCK_B], wsq [BLOCK_C], all ACC_DTYPE.
    """
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC_DTYPE)
    xsq = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
    wsq = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(X_ptr + rows[:, None] * stride_x_row + ks[None, :] * stride_x_col,
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W_ptr + ks[:, None] * stride_w_d + cols[None, :] * stride_w_c,
                    mask=kmask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        xf = x.to(ACC_DTYPE)
        wf = w.to(ACC_DTYPE)
        xsq += tl.sum(xf * xf, axis=1)
        wsq += tl.sum(wf * wf, axis=0)
    return acc, xsq, wsq


@triton.jit
def _recip_norm(sq):
    """1/sqrt(sq), 0 for an exact zero vector (it normalises to zero with zero gradient); NaN stays NaN, and an Inf
    row's 0 times its Inf dot products makes NaN cosines, so a non-finite input never passes as a zero vector."""
    return tl.where(sq == 0, 0.0, 1.0 / tl.sqrt(tl.where(sq == 0, 1.0, sq)))


@triton.jit
def _clamp_cos(cos):
    """clamp(cos, -1, 1), keeping NaN (the GPU's default min/max, and the interpreter's, return the other operand)."""
    return tl.minimum(tl.maximum(cos, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _sphereface_psi(cos, m):
    """psi = (-1)^k T_m(cos) - 2k and d psi / d cos, k = floor(m acos(cos) / pi) counted from thresholds cos(j pi / m).

    m is a runtime float holding an integer >= 1, so one compiled kernel serves every m, and the loop runs m - 1
    steps of the Chebyshev recurrences: T_m, and T_m' = m U_{m-1}. The thresholds cos(j pi / m) = T_j(cos(pi / m)) by
    the same recurrence, from cos(pi / m) by `_sincos`, not libdevice cosf (its argument reduction takes a stack
    frame: 4 B spilled in the bf16 small-head forward on sm_90; the interpreter has no libdevice).
    """
    mf = tl.cast(m, cos.dtype)  # (tl.cast: the interpreter passes a float argument as a Python float)
    _, c1 = _sincos(3.141592653589793 / mf)
    th_prev, th = c1 * 0.0 + 1.0, c1  # cos(0), cos(pi / m)
    # threshold j = m is cos(pi) = -1 exactly: k = m at cos = -1, as floor(m acos(cos) / pi) gives
    k = tl.where(cos <= -1.0, 1.0, 0.0).to(cos.dtype)
    t_prev = tl.full(cos.shape, 1.0, cos.dtype)  # T_0
    t_cur = cos  # T_1
    u_prev = tl.zeros_like(cos)  # U_{-1}
    u_cur = tl.full(cos.shape, 1.0, cos.dtype)  # U_0
    for _ in range(1, tl.cast(m, tl.int32)):  # step j = 1 .. m - 1: threshold j, then T_{j+1} and U_j
        k += tl.where(cos <= th, 1.0, 0.0)
        th_prev, th = th, 2.0 * c1 * th - th_prev
        t_prev, t_cur = t_cur, 2.0 * cos * t_cur - t_prev
        u_prev, u_cur = u_cur, 2.0 * cos * u_cur - u_prev
    sign = 1.0 - 2.0 * (k - 2.0 * tl.floor(k * 0.5))
    return sign * t_cur - 2.0 * k, sign * mf * u_cur


@triton.jit
def _target_logit(cos, xn, lam, s, m, MARGIN: tl.constexpr):
    """The target column's logit from its cosine: AMSoftmax s (cos - m); ASoftmax |x| (lam cos + psi) / (1 + lam);
    CombinedMargin s arc_margin(cos) (lam is then the pointer LAM)."""
    if MARGIN == MARGIN_ADDITIVE:
        return s * (cos - m)
    elif MARGIN == MARGIN_COMBINED:
        phi, _ = _arc_margin(cos, lam)
        return lam[1].to(cos.dtype) * phi
    else:
        psi, _ = _sphereface_psi(cos, m)
        return xn * (lam * cos + psi) / (1.0 + lam)


@triton.jit
def _target_logit_grad(cos, xn, lam, m, MARGIN: tl.constexpr):
    """d(target logit)/d cos. ASoftmax at fixed |x|: |x| (lam + psi') / (1 + lam), k held constant; CombinedMargin
    s arc_margin'(cos), or s with insightface's straight-through gradient. (AMSoftmax's is s, as every column's.)"""
    if MARGIN == MARGIN_COMBINED:
        _, dphi = _arc_margin(cos, lam)
        s = lam[1].to(cos.dtype)
        return tl.where(tl.load(lam[0] + ARC_STRAIGHT) != 0, s, s * dphi)
    else:
        _, dpsi = _sphereface_psi(cos, m)
        return xn * (lam + dpsi) / (1.0 + lam)


@triton.jit
def _filtered(cos, is_target, lam, MARGIN: tl.constexpr):
    """insightface's interclass filtering: the non-target cosines above ARC_FILTER (when > 0) count as 0."""
    if MARGIN == MARGIN_COMBINED:
        thr = tl.load(lam[0] + ARC_FILTER).to(cos.dtype)
        return (cos > tl.where(thr > 0, thr, 2.0)) & (~is_target)  # thr <= 0: off (no cosine exceeds 2)
    else:
        return cos < -2.0  # nothing is filtered


@triton.jit
def _load_lam(LAM_ptr, rows, row_mask, B, MARGIN: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """What the tile helpers take as `lam` for these rows: ASoftmax's lambda, CombinedMargin's (LAM, s, m1, m2, m3)
    (`arc_margin._load_arc`: a per-sample value read once per row, a shared one once), else 0."""
    if MARGIN == MARGIN_ANGULAR:
        return tl.load(LAM_ptr).to(ACC_DTYPE)
    elif MARGIN == MARGIN_COMBINED:
        return _load_arc(LAM_ptr, rows, row_mask, B)
    else:
        return 0.0


@triton.jit
def _hard(cos, is_target, lam):
    """CurricularFace's hard negatives of a tile: the non-target cosines above their row's threshold (`_load_arc`)."""
    return (cos > lam[6].to(cos.dtype)[:, None]) & (~is_target)


@triton.jit
def _ada_clamp(cos, lam, MARGIN: tl.constexpr):
    """Whether each cosine of a tile lies outside AdaFace's clamp +-(1 - eps) (fallback ADAFACE; never otherwise)."""
    if MARGIN == MARGIN_COMBINED:
        ada = tl.load(lam[0] + ARC_FALLBACK).to(tl.int32) == FALLBACK_ADAFACE
        return ada & ((cos < -1.0 + ADA_EPS) | (cos > 1.0 - ADA_EPS))
    else:
        return cos < -2.0  # nothing is clamped


@triton.jit
def _logit_tile(acc, xsq, wsq, bias, is_target, col_mask, lam, s, m, MARGIN: tl.constexpr):
    """Logits of one [BLOCK_B, BLOCK_C] tile (padded columns -inf) and what their gradient needs.

    Returns logits, cos (the linear logits for CrossEntropy), |x| [BLOCK_B], rx [BLOCK_B], rw [BLOCK_C].
    """
    rx = _recip_norm(xsq)
    rw = _recip_norm(wsq)
    xn = tl.sqrt(xsq)
    if MARGIN == MARGIN_NONE:
        cos = acc + bias[None, :]
        logits = tl.where(col_mask[None, :], cos, float("-inf"))
    else:
        cos = _clamp_cos(acc * rx[:, None] * rw[None, :])
        logits = _cos_logits(cos, xn, is_target, col_mask, lam, s, m, MARGIN=MARGIN)
    return logits, cos, xn, rx, rw


@triton.jit
def _cos_logits(cos, xn, is_target, col_mask, lam, s, m, MARGIN: tl.constexpr):
    """Logits [BLOCK_B, BLOCK_C] of a tile of cosines (padded columns -inf), for every loss but CrossEntropy;
    xn [BLOCK_B] the rows' norms."""
    if MARGIN == MARGIN_ONE_CLASS:
        logits = cos
    else:
        if MARGIN == MARGIN_ANGULAR:
            logits = xn[:, None] * cos
        elif MARGIN == MARGIN_COMBINED:
            filtered = _filtered(cos, is_target, lam, MARGIN=MARGIN)
            cos = tl.where(_ada_clamp(cos, lam, MARGIN=MARGIN), tl.minimum(tl.maximum(cos, -1.0 + ADA_EPS),
                                                                           1.0 - ADA_EPS), cos)
            # CurricularFace's hard negatives cos (t + cos) (none unless it set a finite threshold)
            hard = _hard(cos, is_target, lam)
            logits = lam[1].to(cos.dtype)[:, None] * tl.where(filtered, 0.0, tl.where(
                hard, cos * (lam[5].to(cos.dtype)[:, None] + cos), cos))
        else:
            logits = s * cos
        cos_y = tl.sum(tl.where(is_target, cos, 0.0), 1)  # the margin maths runs on one column, not the tile
        logits = tl.where(is_target, _target_logit(cos_y, xn, lam, s, m, MARGIN=MARGIN)[:, None], logits)
    return tl.where(col_mask[None, :], logits, float("-inf"))


@triton.jit
def _dcos_tile(logits, cos, xn, is_target, cw, lse, coef_p, coef_t, smooth, g, lam, s, m, MARGIN: tl.constexpr):
    """dL/dcos (dL/dlogit for CrossEntropy) of a tile, scaled by the per-row upstream gradient g, and dL/dlogit.

    dL/dlogit_c = coef_p p_c - coef_t [c == y] - smooth cw_c   (p_c = exp(logit_c - lse)).
    """
    prob = tl.exp(logits - lse[:, None])
    dl = coef_p[:, None] * prob - tl.where(is_target, coef_t[:, None], 0.0) - smooth[:, None] * cw[None, :]
    dl = dl * g[:, None]
    if MARGIN == MARGIN_NONE:
        dcos = dl
    elif MARGIN == MARGIN_ADDITIVE:
        dcos = s * dl  # every logit, the target's too, is s cos + const
    elif MARGIN == MARGIN_COMBINED:  # s cos_c, the target's s phi(cos_y); filtered cosines are constants
        cos_y = tl.sum(tl.where(is_target, cos, 0.0), 1)
        tgrad = _target_logit_grad(cos_y, xn, lam, m, MARGIN=MARGIN)
        hard_grad = tl.where(_hard(cos, is_target, lam), lam[5].to(cos.dtype)[:, None] + 2.0 * cos, 1.0)
        dcos = dl * tl.where(is_target, tgrad[:, None], lam[1].to(cos.dtype)[:, None] * hard_grad)
        dcos = tl.where(_filtered(cos, is_target, lam, MARGIN=MARGIN) | _ada_clamp(cos, lam, MARGIN=MARGIN), 0.0, dcos)
    else:
        cos_y = tl.sum(tl.where(is_target, cos, 0.0), 1)
        dcos = dl * tl.where(is_target, _target_logit_grad(cos_y, xn, lam, m, MARGIN=MARGIN)[:, None], xn[:, None])
    return dcos, dl


@triton.jit
def _softplus(z):
    """log(1 + e^z) without overflow: max(z, 0) + log(1 + e^-|z|)."""
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _one_class(cos, bona, row_w, m_real, m_fake, alpha):
    """OCSoftmax's row loss row_w softplus(z), z = alpha (m_real - cos) for bonafide rows, alpha (cos - m_fake)
    otherwise, and its dL/dcos (softplus' = sigmoid)."""
    z = alpha * tl.where(bona, m_real - cos, cos - m_fake)
    return row_w * _softplus(z), row_w * tl.sigmoid(z) * alpha * tl.where(bona, -1.0, 1.0)


@triton.jit
def _focal(nll, gamma):
    """(1 - p_y)^gamma with p_y = e^-nll; 0^0 = 1."""
    q = tl.maximum(1.0 - tl.exp(-nll), 0.0)
    return tl.where(q > 0, tl.exp(gamma * tl.log(tl.where(q > 0, q, 1.0))), tl.where(gamma == 0, 1.0, 0.0))


@triton.jit
def _row_targets(T_ptr, CW_ptr, rows, row_mask, ignore_index, c_offset, n_targets, n_total, HAS_CW: tl.constexpr):
    """Targets as column indices of this weight (-1 matches no column: ignored, out of range, or, when the classes are
    sharded, held by another rank; `c_offset` is this weight's first class), the kept-row mask, and each row's class
    weight (0 if ignored; CW indexed like the columns). A target outside [0, n_total) (all ranks' classes) that is not
    ignore_index gets a NaN row weight, so its row's loss is NaN when value checks are off: no sync, no device assert.
    """
    t = tl.load(T_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (t != ignore_index)
    t_local = t - c_offset
    t_safe = tl.where(valid & (t_local >= 0) & (t_local < n_targets), t_local, -1)
    if HAS_CW:
        row_w = tl.load(CW_ptr + t_safe, mask=t_safe >= 0, other=0.0)
    else:
        row_w = tl.where(t_safe >= 0, 1.0, 0.0)
    return t_safe, valid, tl.where(valid & ((t < 0) | (t >= n_total)), float("nan"), row_w)


@triton.jit
def _bias(BIAS_ptr, cols, col_mask, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    if HAS_BIAS:
        return tl.load(BIAS_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
    else:
        return tl.zeros((BLOCK_C,), ACC_DTYPE)


@triton.jit
def _class_weights(CW_ptr, cols, col_mask, HAS_CW: tl.constexpr):
    if HAS_CW:
        return tl.load(CW_ptr + cols, mask=col_mask, other=0.0)
    else:
        return tl.where(col_mask, 1.0, 0.0)


@triton.jit
def _dw_finish(acc_w, csum, rw, w, MARGIN: tl.constexpr):
    """dW_c = rw_c (x_hat^T dcos)_c - (sum_i dcos_ic cos_ic) rw_c^2 w_c,
    from d cos/d w_c = rw_c (x_hat - cos_c w_hat_c).

    CrossEntropy's logits are linear: dW = x^T dlogits as accumulated.
    """
    if MARGIN == MARGIN_NONE:
        return acc_w
    else:
        return acc_w * rw[None, :] - (csum * rw * rw)[None, :] * w


@triton.jit
def _dx_coef(rx, ssum, xsum, MARGIN: tl.constexpr):
    """The per-row factor of x in dx (see `_dx_finish`): -(sum_c dcos_c cos_c) rx^2, ASoftmax adding
    (sum_c dL/dl_c l_c) rx^2."""
    if MARGIN == MARGIN_ANGULAR:
        return (xsum - ssum) * rx * rx
    else:
        return -ssum * rx * rx


@triton.jit
def _dx_finish(acc_x, x, rx, ssum, xsum, MARGIN: tl.constexpr):
    """dx = rx dcos @ W_hat^T - (sum_c dcos_c cos_c) rx^2 x, from d cos_c/dx = rx (w_hat_c - cos_c x_hat);
    ASoftmax adds (sum_c dL/dl_c l_c) rx^2 x since its logits scale with |x| and d|x|/dx = x rx."""
    if MARGIN == MARGIN_NONE:
        return acc_x
    else:
        return acc_x * rx[:, None] + _dx_coef(rx, ssum, xsum, MARGIN=MARGIN)[:, None] * x


@triton.jit
def _store_stats(STATS_ptr, rows, row_mask, B, loss, row_w, lse, coef_p, coef_t):
    tl.store(STATS_ptr + STAT_LOSS * B + rows, loss, mask=row_mask)
    tl.store(STATS_ptr + STAT_ROWW * B + rows, row_w, mask=row_mask)
    tl.store(STATS_ptr + STAT_LSE * B + rows, lse, mask=row_mask)
    tl.store(STATS_ptr + STAT_COEF_P * B + rows, coef_p, mask=row_mask)
    tl.store(STATS_ptr + STAT_COEF_T * B + rows, coef_t, mask=row_mask)


@triton.jit
def _softmax_epilogue(m_i, l_i, tgt, smooth_sum, total_cw, row_w, valid, eps, gamma, C, MARGIN: tl.constexpr,
                      ACC_DTYPE: tl.constexpr):
    """Row loss, log-sum-exp and gradient coefficients from a row's softmax statistics over all C classes.

    m_i, l_i: running max and sum of exp(logit - m_i); tgt: the target logit; smooth_sum: sum_c cw_c logit_c;
    total_cw: sum_c cw_c. Returns loss, lse, coef_p, coef_t (see the module docstring).
    """
    lse = m_i + tl.log(l_i)
    nll = lse - tgt
    coef_t = (1.0 - eps) * row_w
    if MARGIN == MARGIN_ANGULAR:
        coef_t = coef_t * _focal(nll, gamma)  # the focal factor carries no gradient
    smooth = valid.to(ACC_DTYPE) * eps / C
    # torch's smoothing: eps/C sum_c cw_c (-log p_c) = eps/C (sum_c cw_c lse - sum_c cw_c logit_c)
    loss = coef_t * nll + smooth * (total_cw * lse - smooth_sum)
    return loss, lse, coef_t + smooth * total_cw, coef_t


@triton.jit
def _grad_tile(X_ptr, W_ptr, BIAS_ptr, CW_ptr, rows, row_mask, cols, col_mask, t_safe, valid, lse, coef_p, coef_t,
               g, lam, D, n_smooth, stride_x_row, stride_x_col, stride_w_d, stride_w_c, s, m, eps,
               MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, DOT_DTYPE: tl.constexpr,
               ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute one logit tile and return dL/dcos (scaled by g), cos, rx, rw and the rows' sum of dL/dl_c l_c.
    n_smooth: the class count of label smoothing's eps / C (all ranks' classes when they are sharded)."""
    acc, xsq, wsq = _dot_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col, stride_w_d,
                              stride_w_c, DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION,
                              BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    bias = _bias(BIAS_ptr, cols, col_mask, HAS_BIAS=HAS_BIAS, ACC_DTYPE=ACC_DTYPE, BLOCK_C=BLOCK_C)
    is_target = cols[None, :] == t_safe[:, None]
    logits, cos, xn, rx, rw = _logit_tile(acc, xsq, wsq, bias, is_target, col_mask, lam, s, m, MARGIN=MARGIN)
    dcos, xsum = _grad_of_logits(logits, cos, xn, is_target, cols, col_mask, CW_ptr, valid, lse, coef_p, coef_t, g, lam,
                                 n_smooth, s, m, eps=eps, MARGIN=MARGIN, HAS_CW=HAS_CW, DOT_DTYPE=DOT_DTYPE,
                                 ACC_DTYPE=ACC_DTYPE)
    return dcos, cos, rx, rw, xsum


@triton.jit
def _grad_of_logits(logits, cos, xn, is_target, cols, col_mask, CW_ptr, valid, lse, coef_p, coef_t, g, lam, n_smooth,
                    s, m, eps, MARGIN: tl.constexpr, HAS_CW: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    ACC_DTYPE: tl.constexpr):
    """dL/dcos of a recomputed tile (scaled by g, rounded to DOT_DTYPE) and the rows' sum of dL/dl_c l_c; every
    loss but OCSoftmax (whose backward is the small-head kernels')."""
    cw = _class_weights(CW_ptr, cols, col_mask, HAS_CW=HAS_CW).to(ACC_DTYPE)
    smooth = valid.to(ACC_DTYPE) * eps / n_smooth
    dcos, dl = _dcos_tile(logits, cos, xn, is_target, cw, lse, coef_p, coef_t, smooth, g, lam, s, m, MARGIN=MARGIN)
    xsum = tl.sum(dl * tl.where(col_mask[None, :], logits, 0.0), 1)
    # the dots take dcos in DOT_DTYPE; rounding it once here keeps the cos-correction sums consistent with them
    return dcos.to(DOT_DTYPE).to(ACC_DTYPE), xsum
