"""Triton kernels of the small-head path (C <= 16 classes: the deepfake heads C = 1 and 2), launched by `small_head`.

With so few classes a `tl.dot` would pad C to 16 columns and do up to 16x the useful work, so the cosines come from a
row reduction instead: x and w tiles multiplied by broadcasting and summed over K, the classes padded only to BLOCK_C
= next_power_of_2(C). One training step is two launches:

* forward (grid: row blocks) reads x once and writes, per row, SAVED [C + 1, B] (one row per coefficient, the
  batch along it): the unit-upstream-gradient coefficients a_ic = dL/dcos_ic rx_i rw_c (CrossEntropy:
  dL/dlogit_ic) and b_i = `_dx_coef` (0 for CrossEntropy). With e_ic = dL/dcos_ic cos_ic rw_c^2 and upstream
  gradient g_i,
      dX_i = g_i (sum_c a_ic w_c + b_i x_i),     P_c = sum_i g_i a_ic x_i,
      dW_c = P_c - w_c sum_i g_i e_ic  (dcos_ic / dw_c = rx_i rw_c x_i - cos_ic rw_c^2 w_c),
      d bias = sum_i g_i a_ic.
  'sum' / 'mean' (one g for every row): the batch reduction runs inside the launch (`reduce_rows`): each program's
  sums of the loss, the row weight and (every loss but CrossEntropy) e_ic over its rows, so no per-row loss, row
  weight or e is written. 'none': the row losses and row weights [B] and e as C more rows of SAVED [2C + 1, B];
* backward (grid: row groups x K slices, about 2 x SM-count programs; a row group owns a contiguous range of row
  blocks) reads x once, writes dX once and each row group's fp32 partial of dW (cosine term included) in the
  weight's own layout, [D, C] or CrossEntropy's [C, D], then d bias [C]; the partials are summed afterwards in
  group order (deterministic, no atomics): one torch op. A single row group (small batches) writes dW itself, in
  the weight's dtype. A program keeps its K slice of w and of P in registers across its rows.

Notation as in `margin_ce`; the per-loss maths is `tiles.py`'s.
"""

import triton
import triton.language as tl

from .common import has, jit_rows
from .reduce_rows import WS_SCALE, WS_TOTALS, _reduce_sums
from .tiles import (MARGIN_NONE, MARGIN_ONE_CLASS, _bias, _class_weights, _dcos_tile, _dx_coef,
                    _load_lam, _logit_tile, _one_class, _row_targets, _softmax_epilogue)


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


@triton.heuristics({"HAS_BIAS": has("BIAS_ptr"), "HAS_CW": has("CW_ptr"), "REDUCED": has("WS_ptr")})
@jit_rows
def _small_head_fwd_kernel(
        X_ptr, W_ptr, BIAS_ptr, T_ptr, CW_ptr, LAM_ptr, LOSS_ptr, ROWW_ptr, SAVED_ptr, WS_ptr,
        B, D, C, n_targets, reduce,
        stride_x_row, stride_x_col, stride_w_d, stride_w_c,
        s, m, gamma, m_real, m_fake, alpha, eps, ignore_index, bonafide,
        MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, REDUCED: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, SUM_BLOCK: tl.constexpr):
    """Loss and backward coefficients of BLOCK_B rows; grid: (row blocks,).

    Pointers: X [B, D], W [D, C] (any strides), BIAS [C] or None, T [B] int, CW [C] (OCSoftmax [2]) or None, LAM [1]
    or None (`tiles._load_lam`); writes SAVED [C + 1, B] (see the module docstring), ACC_DTYPE. REDUCED (WS given;
    reduce 1 'sum', 2 'mean'): LOSS [] the loss, WS the reduction's workspace (`reduce_rows.sums_size(n_sum,
    programs)`, zeroed; sums: the loss, the row weight, then e's C column sums but for CrossEntropy), through
    SUM_BLOCK >= n_sum lanes; ROWW None. Else LOSS and ROWW [B] the row losses and weights, and SAVED [2C + 1, B]
    holds e in its last C rows (not for CrossEntropy). Sizes: n_targets the target range (C; OCSoftmax 2).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # 64-bit: rows * stride can pass 2^31
    row_mask = rows < B
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    # an out-of-range target gets a NaN row weight: a NaN row loss and gradient, no sync or device assert
    t_safe, valid, row_w = _row_targets(T_ptr, CW_ptr, rows, row_mask, ignore_index, 0, n_targets, n_targets,
                                        HAS_CW=HAS_CW)
    lam = _load_lam(LAM_ptr, rows, row_mask, B, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
    acc, xsq, wsq = _row_dot(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col, stride_w_d,
                             stride_w_c, ACC_DTYPE=ACC_DTYPE, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    bias = _bias(BIAS_ptr, cols, col_mask, HAS_BIAS=HAS_BIAS, ACC_DTYPE=ACC_DTYPE, BLOCK_C=BLOCK_C)
    is_target = cols[None, :] == t_safe[:, None]
    logits, cos, xn, rx, rw = _logit_tile(acc, xsq, wsq, bias, is_target, col_mask, lam, s, m, MARGIN=MARGIN)
    if MARGIN == MARGIN_ONE_CLASS:
        loss, dcos_y = _one_class(tl.sum(tl.where(col_mask[None, :], cos, 0.0), 1), t_safe == bonafide, row_w,
                                  m_real, m_fake, alpha)
        dcos = tl.where(col_mask[None, :], dcos_y[:, None], 0.0)
        xsum = tl.zeros_like(loss)
    else:
        m_i = tl.max(logits, 1)
        l_i = tl.sum(tl.exp(logits - m_i[:, None]), 1)
        tgt = tl.sum(tl.where(is_target, logits, 0.0), 1)
        cw = _class_weights(CW_ptr, cols, col_mask, HAS_CW=HAS_CW).to(ACC_DTYPE)
        finite = tl.where(col_mask[None, :], logits, 0.0)  # padded columns hold -inf
        loss, lse, coef_p, coef_t = _softmax_epilogue(m_i, l_i, tgt, tl.sum(finite * cw[None, :], 1), tl.sum(cw, 0),
                                                      row_w, valid, eps, gamma, C, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
        smooth = valid.to(ACC_DTYPE) * eps / C
        dcos, dl = _dcos_tile(logits, cos, xn, is_target, cw, lse, coef_p, coef_t, smooth,
                              tl.full((BLOCK_B,), 1.0, ACC_DTYPE), lam, s, m, MARGIN=MARGIN)
        xsum = tl.sum(dl * finite, 1)
    saved = SAVED_ptr + rows
    tile_mask = row_mask[:, None] & col_mask[None, :]
    if MARGIN == MARGIN_NONE:
        tl.store(saved[:, None] + cols[None, :] * B, dcos, mask=tile_mask)
        tl.store(saved + C * B, tl.zeros_like(loss), mask=row_mask)
    else:
        tl.store(saved[:, None] + cols[None, :] * B, dcos * rx[:, None] * rw[None, :], mask=tile_mask)
        tl.store(saved + C * B, _dx_coef(rx, tl.sum(dcos * cos, 1), xsum, MARGIN=MARGIN), mask=row_mask)
    if REDUCED:
        j = tl.arange(0, SUM_BLOCK)
        row_sums = tl.where(j == 0, tl.sum(tl.where(row_mask, loss, 0.0), 0),
                            tl.sum(tl.where(row_mask, row_w, 0.0), 0))
        sums = tl.where(j < 2, row_sums, 0.0)
        n_sum = 2
        if MARGIN != MARGIN_NONE:  # e's column sums, in the lanes after the loss and the row weight
            e = tl.sum(tl.where(tile_mask, dcos * cos * (rw * rw)[None, :], 0.0), 0)
            sums += tl.sum(tl.where(j[:, None] == cols[None, :] + 2, e[None, :], 0.0), 1)
            n_sum = 2 + C
        _reduce_sums(WS_ptr, LOSS_ptr, pid, sums, n_sum, reduce, ACC_DTYPE=ACC_DTYPE, SUM_BLOCK=SUM_BLOCK)
    else:
        tl.store(LOSS_ptr + rows, loss, mask=row_mask)
        tl.store(ROWW_ptr + rows, row_w, mask=row_mask)
        if MARGIN != MARGIN_NONE:
            tl.store(saved[:, None] + (C + 1 + cols[None, :]) * B, dcos * cos * (rw * rw)[None, :], mask=tile_mask)


@triton.heuristics({"REDUCED": has("WS_ptr"), "NEED_DX": has("DX_ptr"), "NEED_DW": has("PART_ptr")})
@jit_rows
def _small_head_bwd_kernel(
        X_ptr, W_ptr, SAVED_ptr, G_ptr, WS_ptr, DX_ptr, PART_ptr,
        B, D, C, blocks_per_prog,
        stride_x_row, stride_x_col, stride_w_d, stride_w_c, stride_g, stride_p_d, stride_p_c,
        HAS_XCOEF: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCED: tl.constexpr, NEED_DX: tl.constexpr,
        NEED_DW: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """dX and this row group's partial P (and d bias) over its `blocks_per_prog` row blocks, one K slice of BLOCK_K
    features; grid: (row groups, K slices).

    Pointers: X [B, D], W [D, C] (any strides), SAVED [n_saved, B] from the forward, G the upstream gradient:
    REDUCED (WS given: 'sum', 'mean') one value for every row, times the scale in the forward's workspace WS, whose
    totals give dW's cosine term sum_i e_ic (program 0 subtracts it); else G [B] per row (any stride) and WS None.
    NEED_DX: writes DX [B, D] (contiguous, X's dtype); None when dX is not needed. NEED_DW: writes PART[group]:
    dW's partial [D, C] with strides (stride_p_d, stride_p_c) (the weight's layout), then d bias [C] at D * C, in
    PART's dtype (ACC_DTYPE; a single program writes dW itself, in the weight's dtype when there is no bias); None
    when no weight gradient is needed. HAS_XCOEF: dX has the b_i x_i term and dW the cosine term (every loss but
    CrossEntropy); the partials then hold P_c - w_c q_c with this group's q_c = sum_i g_i e_ic, so their sum is dW
    itself.
    """
    pid = tl.program_id(0)
    rb_begin = pid * blocks_per_prog
    rb_end = tl.minimum(rb_begin + blocks_per_prog, tl.cdiv(B, BLOCK_B))
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < D
    if NEED_DW:  # PART is None without it
        part = PART_ptr + pid.to(tl.int64) * (D + 1 if HAS_BIAS else D) * C
    g_all = tl.zeros((), ACC_DTYPE)
    if REDUCED:  # one upstream gradient for every row, times the reduction's scale: loaded once
        g_all = tl.load(G_ptr).to(ACC_DTYPE) * tl.load(WS_ptr + WS_SCALE)
    q = tl.zeros((BLOCK_C,), ACC_DTYPE)
    if NEED_DW and HAS_XCOEF and REDUCED:  # the whole batch's cosine term, from the forward's totals, in group 0
        q = tl.load(WS_ptr + WS_TOTALS + cols, mask=col_mask & (cols * 0 + pid == 0), other=0.0) * g_all
    elif NEED_DW and HAS_XCOEF:  # dW's cosine term of this group's rows: O(rows x C)
        for rb in range(rb_begin, rb_end):
            rows = (rb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
            row_mask = rows < B
            g = tl.load(G_ptr + rows * stride_g, mask=row_mask, other=0.0).to(ACC_DTYPE)
            e = tl.load(SAVED_ptr + rows[None, :] + (C + 1 + cols[:, None]) * B,
                        mask=col_mask[:, None] & row_mask[None, :], other=0.0)
            q += tl.sum(e * g[None, :], 1)
    # product tiles [BLOCK_C, BLOCK_B, BLOCK_K], K last (spread over the threads): both sums (over C for dX, over
    # the rows for P) stay within a thread, and each thread holds distinct x elements; this K slice of w and of P
    # stays in registers across the group's rows
    w = tl.load(W_ptr + ks[None, :] * stride_w_d + cols[:, None] * stride_w_c,
                mask=col_mask[:, None] & kmask[None, :], other=0.0).to(ACC_DTYPE)  # [BLOCK_C, BLOCK_K]
    p_acc = tl.zeros((BLOCK_C, BLOCK_K), ACC_DTYPE)
    db = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for rb in range(rb_begin, rb_end):
        rows = (rb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)  # row < B < 2^31; row * stride may not be
        row_mask = rows < B
        if REDUCED:
            g = tl.zeros((BLOCK_B,), ACC_DTYPE) + g_all
        else:
            g = tl.load(G_ptr + rows * stride_g, mask=row_mask, other=0.0).to(ACC_DTYPE)
        saved = SAVED_ptr + rows
        a = tl.load(saved[None, :] + cols[:, None] * B, mask=col_mask[:, None] & row_mask[None, :],
                    other=0.0) * g[None, :]  # [BLOCK_C, BLOCK_B]
        xmask = row_mask[:, None] & kmask[None, :]
        if NEED_DW or HAS_XCOEF:
            x = tl.load(X_ptr + rows[:, None] * stride_x_row + ks[None, :] * stride_x_col, mask=xmask,
                        other=0.0).to(ACC_DTYPE)
        if NEED_DX:
            dx = tl.sum(a[:, :, None] * w[:, None, :], 0)
            if HAS_XCOEF:
                dx += (tl.load(saved + C * B, mask=row_mask, other=0.0) * g)[:, None] * x
            tl.store(DX_ptr + rows[:, None] * D + ks[None, :], dx.to(DX_ptr.dtype.element_ty), mask=xmask)
        if NEED_DW:
            p_acc += tl.sum(a[:, :, None] * x[None, :, :], 1)
            if HAS_BIAS:
                db += tl.sum(a, 1)
    if NEED_DW:
        if HAS_XCOEF:
            p_acc -= w * q[:, None]
        tl.store(part + ks[None, :] * stride_p_d + cols[:, None] * stride_p_c, p_acc.to(PART_ptr.dtype.element_ty),
                 mask=col_mask[:, None] & kmask[None, :])
        if HAS_BIAS:  # the first K slice's
            tl.store(part + D * C + cols, db.to(PART_ptr.dtype.element_ty),
                     mask=col_mask & (cols * 0 + tl.program_id(1) == 0))
