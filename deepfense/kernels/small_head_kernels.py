"""Triton kernels of the small-head path (C <= 16 classes: the deepfake heads C = 1 and 2), launched by `small_head`.

With so few classes a `tl.dot` would pad C to 16 columns and do up to 16x the useful work, so the cosines come from a
row reduction instead: x and w tiles multiplied by broadcasting and summed over K, the classes padded only to BLOCK_C
= next_power_of_2(C). One training step is two launches:

* forward (grid: row blocks) reads x once and writes, per row, the loss, the row weight and SAVED [2C + 1, B]
  ([C + 1, B] for CrossEntropy; one row per coefficient, the batch along it): the unit-upstream-gradient
  coefficients a_ic = dL/dcos_ic rx_i rw_c (CrossEntropy: dL/dlogit_ic), b_i = `_dx_coef` (0 for CrossEntropy)
  and e_ic = dL/dcos_ic cos_ic rw_c^2, so that with upstream gradient g_i
      dX_i = g_i (sum_c a_ic w_c + b_i x_i),     P_c = sum_i g_i a_ic x_i,
      dW_c = P_c - w_c sum_i g_i e_ic  (dcos_ic / dw_c = rx_i rw_c x_i - cos_ic rw_c^2 w_c),
      d bias = sum_i g_i a_ic;
  for 'sum' / 'mean' the three are rows of one buffer that the launcher sums by rows (the loss, the row-weight
  sum and, for one upstream gradient g, sum_i e_ic);
* backward (grid: about 2 x SM-count persistent programs, each owning a contiguous range of row blocks) reads x once,
  writes dX once and its fp32 partial of dW (cosine term included) in the weight's own layout, [D, C] or
  CrossEntropy's [C, D], then d bias [C]; the partials are summed afterwards in program order (deterministic, no
  atomics): one torch op. It loops over K outside its row blocks, so a K slice of P stays in registers.

Notation as in `margin_ce`; the per-loss maths is `tiles.py`'s.
"""

import triton
import triton.language as tl

from .margin_ce import _ROW_ARGS
from .tiles import (MARGIN_NONE, MARGIN_ONE_CLASS, _bias, _class_weights, _dcos_tile, _dx_coef,
                    _load_lam, _logit_tile, _one_class, _row_targets, _softmax_epilogue)


def _jit(fn):
    """triton.jit leaving the row counts unspecialised (batch sizes change: no recompiles), as margin_ce's kernels."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    rows = ["blocks_per_prog", "roww_off", "saved_off", "stride_s"]
    return triton.jit(do_not_specialize=[a for a in _ROW_ARGS + rows if a in names])(fn)


@triton.jit
def _row_dot(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col, stride_w_d, stride_w_c,
             ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """x_rows . w_cols over all of D by broadcast-multiply and sum (no tl.dot padding), with the squared norms.

    The product tile is [BLOCK_C, BLOCK_K, BLOCK_B] with the rows last: Triton spreads the last dimension over the
    threads, so each thread sums its own row over K in registers and the per-row epilogue holds one row per thread
    instead of a copy per K lane (which cost 2-8x the registers). Returns acc [BLOCK_B, BLOCK_C], xsq [BLOCK_B],
    wsq [BLOCK_C], all ACC_DTYPE.
    """
    acc = tl.zeros((BLOCK_C, BLOCK_B), dtype=ACC_DTYPE)
    xsq = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
    wsq = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(X_ptr + rows[None, :] * stride_x_row + ks[:, None] * stride_x_col,
                    mask=kmask[:, None] & row_mask[None, :], other=0.0).to(ACC_DTYPE)  # [BLOCK_K, BLOCK_B]
        w = tl.load(W_ptr + ks[None, :] * stride_w_d + cols[:, None] * stride_w_c,
                    mask=col_mask[:, None] & kmask[None, :], other=0.0).to(ACC_DTYPE)  # [BLOCK_C, BLOCK_K]
        acc += tl.sum(w[:, :, None] * x[None, :, :], 1)
        xsq += tl.sum(x * x, 0)
        wsq += tl.sum(w * w, 1)
    return tl.trans(acc), xsq, wsq


@_jit
def _small_head_fwd_kernel(
        X_ptr, W_ptr, BIAS_ptr, T_ptr, CW_ptr, LAM_ptr, LOSS_ptr, ROWW_ptr, SAVED_ptr,
        B, D, C, n_targets, n_saved, roww_off, saved_off, stride_s, pad_w, stride_x_row, stride_x_col, stride_w_d,
        stride_w_c, s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide,
        MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, ACC_DTYPE: tl.constexpr,
        PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Loss, row weight and backward coefficients of BLOCK_B rows; grid: (row blocks,).

    X [B, D], W [D, C] (any strides), BIAS [C], T [B] int, CW [C] (OCSoftmax [2]), LAM [1].
    Writes LOSS [B], ROWW [B] (at ROWW_ptr + roww_off) and SAVED [n_saved, B] (at SAVED_ptr + saved_off, rows
    stride_s apart; see the module docstring), ACC_DTYPE. PAD ('sum', 'mean'): the three are rows of one buffer
    [2 + n_saved, B + 1] (LOSS_ptr its start, stride_s = B + 1); program 0 also writes its column B: loss 0, row
    weight pad_w (a tiny weight, so that the sum never divides by zero) and zero coefficients, so that the launcher
    sums whole rows of it with one op.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # 64-bit: rows * stride can pass 2^31
    row_mask = rows < B
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    # an out-of-range target gets a NaN row weight: a NaN row loss and gradient, no sync or device assert
    t_safe, valid, row_w = _row_targets(T_ptr, CW_ptr, rows, row_mask, ignore_index, 0, n_targets, n_targets, HAS_CW)
    lam = _load_lam(LAM_ptr, MARGIN, ACC_DTYPE)
    acc, xsq, wsq = _row_dot(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col,
                             stride_w_d, stride_w_c, ACC_DTYPE, BLOCK_B, BLOCK_C, BLOCK_K)
    bias = _bias(BIAS_ptr, cols, col_mask, HAS_BIAS, ACC_DTYPE, BLOCK_C)
    is_target = cols[None, :] == t_safe[:, None]
    logits, cos, xn, rx, rw = _logit_tile(acc, xsq, wsq, bias, is_target, col_mask, lam, s, m, MARGIN)
    if MARGIN == MARGIN_ONE_CLASS:
        loss, dcos_y = _one_class(tl.sum(tl.where(col_mask[None, :], cos, 0.0), 1), t_safe == bonafide, row_w,
                                  m_real, m_fake, alpha)
        dcos = tl.where(col_mask[None, :], dcos_y[:, None], 0.0)
        xsum = tl.zeros_like(loss)
    else:
        m_i = tl.max(logits, 1)
        l_i = tl.sum(tl.exp(logits - m_i[:, None]), 1)
        tgt = tl.sum(tl.where(is_target, logits, 0.0), 1)
        cw = _class_weights(CW_ptr, cols, col_mask, HAS_CW).to(ACC_DTYPE)
        finite = tl.where(col_mask[None, :], logits, 0.0)  # padded columns hold -inf
        loss, lse, coef_p, coef_t = _softmax_epilogue(m_i, l_i, tgt, tl.sum(finite * cw[None, :], 1), tl.sum(cw, 0),
                                                      row_w, valid, eps, gamma, C, MARGIN, ACC_DTYPE)
        smooth = valid.to(ACC_DTYPE) * eps / C
        dcos, dl = _dcos_tile(logits, cos, xn, is_target, cw, lse, coef_p, coef_t, smooth,
                              tl.full((BLOCK_B,), 1.0, ACC_DTYPE), lam, s, m, MARGIN)
        xsum = tl.sum(dl * finite, 1)
    tl.store(LOSS_ptr + rows, loss, mask=row_mask)
    tl.store(ROWW_ptr + roww_off + rows, row_w, mask=row_mask)
    if PAD:
        pad = tl.arange(0, 8 * BLOCK_C)  # >= 2 + n_saved = 2C + 3 rows
        tl.store(LOSS_ptr + pad * stride_s + B, tl.where(pad == 1, pad_w, 0.0).to(ACC_DTYPE),
                 mask=(pad < 2 + n_saved) & (pad * 0 + tl.program_id(0) == 0))
    saved = SAVED_ptr + saved_off + rows
    tile_mask = row_mask[:, None] & col_mask[None, :]
    if MARGIN == MARGIN_NONE:
        tl.store(saved[:, None] + cols[None, :] * stride_s, dcos, mask=tile_mask)
        tl.store(saved + C * stride_s, tl.zeros_like(loss), mask=row_mask)
    else:
        tl.store(saved[:, None] + cols[None, :] * stride_s, dcos * rx[:, None] * rw[None, :], mask=tile_mask)
        tl.store(saved + C * stride_s, _dx_coef(rx, tl.sum(dcos * cos, 1), xsum, MARGIN), mask=row_mask)
        tl.store(saved[:, None] + (C + 1 + cols[None, :]) * stride_s, dcos * cos * (rw * rw)[None, :],
                 mask=tile_mask)


@_jit
def _small_head_bwd_kernel(
        X_ptr, W_ptr, SAVED_ptr, G_ptr, DEN_ptr, DX_ptr, PART_ptr,
        B, D, C, saved_off, stride_s, blocks_per_prog, stride_x_row, stride_x_col, stride_w_d, stride_w_c, stride_g,
        stride_p_d, stride_p_c, is_mean,
        HAS_XCOEF: tl.constexpr, HAS_DEN: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DX: tl.constexpr,
        NEED_DW: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_C: tl.constexpr):
    """dX and this program's partial P (and d bias) over its `blocks_per_prog` row blocks; grid: (programs,).

    X [B, D], W [D, C] (any strides), SAVED [n_saved, B] from the forward (at SAVED_ptr + saved_off, rows stride_s
    apart), G [B] the upstream gradient per row (any stride). HAS_DEN ('sum', 'mean'): G is one value for every
    row and DEN the forward's buffer row sums [2 + n_saved]; G is divided by DEN[1] (the row-weight sum) when
    is_mean, and dW's cosine term takes sum_i e_ic from DEN (program 0 subtracts it). Writes DX [B, D] (contiguous,
    X's dtype) and PART[pid]: dW's partial [D, C] with strides (stride_p_d, stride_p_c) (the weight's layout), then
    d bias [C] at D * C (ACC_DTYPE). HAS_XCOEF: dX has the b_i x_i term and dW the cosine term (every loss but
    CrossEntropy); the partials then hold P_c - w_c q_c with this program's q_c = sum_i g_i e_ic, so their sum is dW
    itself.
    """
    pid = tl.program_id(0)
    rb_begin = pid * blocks_per_prog
    rb_end = tl.minimum(rb_begin + blocks_per_prog, tl.cdiv(B, BLOCK_B))
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    part = PART_ptr + pid.to(tl.int64) * (D + 1 if HAS_BIAS else D) * C
    SAVED_ptr += saved_off
    den = tl.full((1,), 1.0, ACC_DTYPE)
    if HAS_DEN:
        den = tl.where(is_mean != 0, tl.load(DEN_ptr + 1 + tl.arange(0, 1)).to(ACC_DTYPE), 1.0)
    db = tl.zeros((BLOCK_C,), ACC_DTYPE)
    q = tl.zeros((BLOCK_C,), ACC_DTYPE)
    if NEED_DW and HAS_XCOEF and HAS_DEN:  # one gradient for all rows: the whole batch's term, from program 0
        q = tl.load(DEN_ptr + C + 3 + cols, mask=col_mask & (cols * 0 + pid == 0), other=0.0).to(ACC_DTYPE)
        q *= tl.load(G_ptr).to(ACC_DTYPE) / den
    elif NEED_DW and HAS_XCOEF:  # dW's cosine term of this program's rows: O(rows x C), read once
        for rb in range(rb_begin, rb_end):
            rows = (rb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
            row_mask = rows < B
            g = tl.load(G_ptr + rows * stride_g, mask=row_mask, other=0.0).to(ACC_DTYPE) / den
            e = tl.load(SAVED_ptr + rows[None, :] + (C + 1 + cols[:, None]) * stride_s,
                        mask=col_mask[:, None] & row_mask[None, :], other=0.0)
            q += tl.sum(e * g[None, :], 1)
    # product tiles [BLOCK_C, BLOCK_B, BLOCK_K], K last (spread over the threads): both sums (over C for dX, over
    # the rows for P) stay within a thread, and each thread holds distinct x elements
    for k0 in range(0, D, BLOCK_K):  # K outside the rows: this K slice of P stays in registers
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        w = tl.load(W_ptr + ks[None, :] * stride_w_d + cols[:, None] * stride_w_c,
                    mask=col_mask[:, None] & kmask[None, :], other=0.0).to(ACC_DTYPE)  # [BLOCK_C, BLOCK_K]
        p_acc = tl.zeros((BLOCK_C, BLOCK_K), ACC_DTYPE)
        db = tl.zeros((BLOCK_C,), ACC_DTYPE)
        for rb in range(rb_begin, rb_end):
            rows = (rb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # row < B < 2^31; row * stride may not be
            row_mask = rows < B
            g = tl.load(G_ptr + rows * stride_g, mask=row_mask, other=0.0).to(ACC_DTYPE) / den
            saved = SAVED_ptr + rows
            a = tl.load(saved[None, :] + cols[:, None] * stride_s, mask=col_mask[:, None] & row_mask[None, :],
                        other=0.0) * g[None, :]  # [BLOCK_C, BLOCK_B]
            xmask = row_mask[:, None] & kmask[None, :]
            if NEED_DW or HAS_XCOEF:
                x = tl.load(X_ptr + rows[:, None] * stride_x_row + ks[None, :] * stride_x_col, mask=xmask,
                            other=0.0).to(ACC_DTYPE)
            if NEED_DX:
                dx = tl.sum(a[:, :, None] * w[:, None, :], 0)
                if HAS_XCOEF:
                    dx += (tl.load(saved + C * stride_s, mask=row_mask, other=0.0) * g)[:, None] * x
                tl.store(DX_ptr + rows[:, None] * D + ks[None, :], dx.to(DX_ptr.dtype.element_ty), mask=xmask)
            if NEED_DW:
                p_acc += tl.sum(a[:, :, None] * x[None, :, :], 1)
                if HAS_BIAS:
                    db += tl.sum(a, 1)
        if NEED_DW:
            if HAS_XCOEF:
                p_acc -= w * q[:, None]
            tl.store(part + ks[None, :] * stride_p_d + cols[:, None] * stride_p_c, p_acc,
                     mask=col_mask[:, None] & kmask[None, :])
    if NEED_DW and HAS_BIAS:
        tl.store(part + D * C + cols, db, mask=col_mask)
