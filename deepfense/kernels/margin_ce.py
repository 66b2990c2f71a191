"""One Triton kernel family for the four losses: cosine (or linear) logits, target-column margin, online log-sum-exp.

Notation per row i and class c: x_i [D], w_c the c-th column of the [D, C] weight, rx = 1/|x|, rw = 1/|w_c| (zero for
zero vectors), cos = clamp(x.w_c rx rw, -1, 1). The loss is selected by the `MARGIN` constexpr
(`deepfense.params.Margin`), every loss but OCSoftmax (one centre: the small-head kernels serve it); the tile-level
maths lives in `tiles.py`.

Per-row statistics written by the forward (fp32, or fp64 for fp64 inputs), one row each of STATS [5, B]:
    LOSS   the row's loss (class weight, focal factor and smoothing included),
    ROWW   the row's class weight (0 for ignored rows), the denominator of reduction='mean',
    LSE    log-sum-exp of the row's logits,
    COEF_P, COEF_T: dL/dlogit_c = COEF_P p_c - COEF_T [c == y] - eps/C cw_c (unit upstream gradient).
STATS heads a workspace that also carries the batch reduction, done in the forward's launch (`reduce_rows.py`).
Backward kernels recompute the logit tiles and read these, so neither pass allocates anything of size B x C.
"""

import triton
import triton.language as tl

from .common import has, jit_rows
from .reduce_rows import _grad_scale, _reduce_rows
from .tiles import (STAT_LSE, STAT_COEF_P, STAT_COEF_T, MARGIN_NONE, _bias, _class_weights, _dot_tile, _dw_finish,
                    _dx_finish, _grad_tile, _load_lam, _logit_tile, _row_targets, _softmax_epilogue, _store_stats,
                    _cos_logits)
from .sub_center import _sub_cos_tile, _sub_grad_tile, _winner_rw

# the optional inputs: absent tensors are None, their flags follow
_OPTIONAL_INPUTS = triton.heuristics({"HAS_BIAS": has("BIAS_ptr"), "HAS_CW": has("CW_ptr")})


@_OPTIONAL_INPUTS
@jit_rows
def _margin_ce_fwd_kernel(
        X_ptr, W_ptr, BIAS_ptr, T_ptr, CW_ptr, LAM_ptr, STATS_ptr, PART_ptr, DX_ptr, DWP_ptr, RED_ptr,
        B, D, C, n_targets, c_offset, n_total, tiles_per_split, reduce,
        stride_x_row, stride_x_col, stride_w_d, stride_w_c, stride_dwp_d, stride_dwp_c,
        s, m, gamma, eps, ignore_index,
        MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, SPLIT: tl.constexpr,
        FUSE_DX: tl.constexpr, FUSE_DW: tl.constexpr, SUB: tl.constexpr, DOT_DTYPE: tl.constexpr,
        ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row loss statistics of BLOCK_B rows, looping over class tiles with an online log-sum-exp; every loss but
    OCSoftmax (one centre: the small-head kernels serve it).

    Pointers: X [B, D]; W [D, C] (any strides; [D, C*SUB] with SUB > 1 sub-centres per class, see `sub_center`);
    BIAS [C] or None; T [B] int; CW [C] or None; LAM (`tiles._load_lam`) or None; STATS: the workspace, STATS
    [5, B] then the reduction's (`_reduce_rows`), None with SPLIT; PART [5, n_splits, B] with SPLIT, else None;
    DX [B, D] (contiguous) with FUSE_DX, else None; DWP [programs, D + 1, C] with FUSE_DW, else None; RED the
    reduced loss [] ('sum' / 'mean'; not written for reduce 0), None with SPLIT.
    Sizes: B, D, C; n_targets: C, unspecialised (`common.ROW_ARGS`: with C in its place the backward kernels'
    registers moved by -3..+5 on sm_90); c_offset, n_total: this weight's first class and all ranks' class count;
    tiles_per_split; reduce (`common.REDUCE`). Strides: x's, w's (over D and over the columns) and DWP's.
    Scalars: the loss options.
    With FUSE_DX / FUSE_DW (the whole class dimension is one tile) it also writes the unit-gradient dX and this
    program's dW partial DWP[pid] (row D: d bias), so backward reads no x.
    With SPLIT (grid axis 1 splits the classes, `tiles_per_split` tiles each, for parallelism when rows are few) it
    writes the split's softmax statistics to PART for `_margin_ce_combine_kernel` instead.
    """
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows * stride can pass 2^31
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    t_safe, valid, row_w = _row_targets(T_ptr, CW_ptr, rows, row_mask, ignore_index, c_offset, n_targets, n_total,
                                        HAS_CW=HAS_CW)
    lam = _load_lam(LAM_ptr, rows, row_mask, B, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
    m_i = tl.full((BLOCK_B,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_B,), ACC_DTYPE)
    tgt = tl.where(row_w == row_w, 0.0, float("nan")).to(ACC_DTYPE)  # a bad target's NaN reaches the partials
    smooth_sum = tl.zeros((BLOCK_B,), ACC_DTYPE)
    cw_sum = tl.zeros((BLOCK_C,), ACC_DTYPE)
    split = tl.program_id(1)
    c_begin = split * tiles_per_split * BLOCK_C
    for c0 in range(c_begin, tl.minimum(C, c_begin + tiles_per_split * BLOCK_C), BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        if SUB == 1:
            acc, xsq, wsq = _dot_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col,
                                      stride_w_d, stride_w_c, DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE,
                                      PRECISION=PRECISION, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
            bias = _bias(BIAS_ptr, cols, col_mask, HAS_BIAS=HAS_BIAS, ACC_DTYPE=ACC_DTYPE, BLOCK_C=BLOCK_C)
            is_target = cols[None, :] == t_safe[:, None]
            logits, _, _, _, _ = _logit_tile(acc, xsq, wsq, bias, is_target, col_mask, lam, s, m, MARGIN=MARGIN)
        else:
            is_target = cols[None, :] == t_safe[:, None]
            cos, _, _, xsq = _sub_cos_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col,
                                           stride_w_d, stride_w_c, SUB=SUB, DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE,
                                           PRECISION=PRECISION, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
            logits = _cos_logits(cos, tl.sqrt(xsq), is_target, col_mask, lam, s, m, MARGIN=MARGIN)
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
        m_i = m_new
        tgt += tl.sum(tl.where(is_target, logits, 0.0), 1)
        cw = _class_weights(CW_ptr, cols, col_mask, HAS_CW=HAS_CW).to(ACC_DTYPE)
        smooth_sum += tl.sum(tl.where(col_mask[None, :], logits, 0.0) * cw[None, :], 1)
        cw_sum += cw
    if SPLIT:
        part = PART_ptr + split.to(tl.int64) * B + rows
        n_part = tl.num_programs(1).to(tl.int64) * B
        tl.store(part, m_i, mask=row_mask)
        tl.store(part + n_part, l_i, mask=row_mask)
        tl.store(part + 2 * n_part, tgt, mask=row_mask)
        tl.store(part + 3 * n_part, smooth_sum, mask=row_mask)
        tl.store(part + 4 * n_part, tl.zeros_like(m_i) + tl.sum(cw_sum, 0), mask=row_mask)
    else:
        loss, lse, coef_p, coef_t = _softmax_epilogue(m_i, l_i, tgt, smooth_sum, tl.sum(cw_sum, 0), row_w, valid, eps,
                                                      gamma, C, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
    g_unit = 1.0
    if not SPLIT:
        _store_stats(STATS_ptr, rows, row_mask, B, loss, row_w, lse, coef_p, coef_t)
        g_unit = _reduce_rows(STATS_ptr, RED_ptr, pid, row_mask, B, loss, row_w, reduce, ACC_DTYPE=ACC_DTYPE)
    if FUSE_DX or FUSE_DW:  # one program: its unit gradients already carry the reduction's scale
        g_unit = tl.where(tl.num_programs(0) == 1, g_unit, 1.0)
        _fused_grads(X_ptr, W_ptr, BIAS_ptr, CW_ptr, DX_ptr, DWP_ptr, pid, rows, row_mask, t_safe, valid, lse, coef_p,
                     coef_t, g_unit, lam, D=D, C=C, stride_x_row=stride_x_row, stride_x_col=stride_x_col,
                     stride_w_d=stride_w_d, stride_w_c=stride_w_c, stride_dwp_d=stride_dwp_d, stride_dwp_c=stride_dwp_c,
                     s=s, m=m, eps=eps, MARGIN=MARGIN, HAS_BIAS=HAS_BIAS, HAS_CW=HAS_CW, FUSE_DX=FUSE_DX,
                     FUSE_DW=FUSE_DW, DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION, BLOCK_B=BLOCK_B,
                     BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)


@triton.heuristics({"HAS_CW": has("CW_ptr")})
@jit_rows
def _margin_ce_combine_kernel(
        T_ptr, CW_ptr, PART_ptr, STATS_ptr, RED_ptr,
        B, C, n_targets, c_offset, n_total, n_splits, n_part, reduce,
        gamma, eps, ignore_index,
        MARGIN: tl.constexpr, HAS_CW: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr):
    """Merge the class splits' statistics PART [5, n_splits, B] (n_part = n_splits * B; in split order:
    deterministic) into STATS [5, B] (the forward's workspace); the reduction as in the forward (`_reduce_rows`):
    RED the reduced loss []. T [B] int, CW [C] or None; sizes, scalars and flags as the forward's."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    _, valid, row_w = _row_targets(T_ptr, CW_ptr, rows, row_mask, ignore_index, c_offset, n_targets, n_total,
                                   HAS_CW=HAS_CW)
    m_i = tl.full((BLOCK_B,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_B,), ACC_DTYPE)
    tgt = tl.zeros((BLOCK_B,), ACC_DTYPE)
    smooth_sum = tl.zeros((BLOCK_B,), ACC_DTYPE)
    total_cw = tl.zeros((BLOCK_B,), ACC_DTYPE)
    for split in range(0, n_splits):
        part = PART_ptr + split * B + rows
        m_s = tl.load(part, mask=row_mask, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        l_s = tl.load(part + n_part, mask=row_mask, other=1.0)  # padded rows: a harmless log(1)
        l_i = l_i * tl.exp(m_i - m_new) + l_s * tl.exp(m_s - m_new)
        m_i = m_new
        tgt += tl.load(part + 2 * n_part, mask=row_mask, other=0.0)
        smooth_sum += tl.load(part + 3 * n_part, mask=row_mask, other=0.0)
        total_cw += tl.load(part + 4 * n_part, mask=row_mask, other=0.0)
    loss, lse, coef_p, coef_t = _softmax_epilogue(m_i, l_i, tgt, smooth_sum, total_cw, row_w, valid, eps, gamma, C,
                                                  MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
    _store_stats(STATS_ptr, rows, row_mask, B, loss, row_w, lse, coef_p, coef_t)
    _reduce_rows(STATS_ptr, RED_ptr, pid, row_mask, B, loss, row_w, reduce, ACC_DTYPE=ACC_DTYPE)


@triton.jit
def _fused_grads(X_ptr, W_ptr, BIAS_ptr, CW_ptr, DX_ptr, DWP_ptr, pid, rows, row_mask, t_safe, valid, lse, coef_p,
                 coef_t, g_unit, lam, D, C, stride_x_row, stride_x_col, stride_w_d, stride_w_c, stride_dwp_d,
                 stride_dwp_c, s, m, eps,
                 MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, FUSE_DX: tl.constexpr,
                 FUSE_DW: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """dX rows and this program's dW partial (its [D, C] in the weight's layout, then d bias [C]) at upstream
    gradient g_unit per row, when all C classes fit one tile."""
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    g = tl.where(row_mask, g_unit, 0.0).to(ACC_DTYPE)
    dcos, cos, rx, rw, xsum = _grad_tile(X_ptr, W_ptr, BIAS_ptr, CW_ptr, rows, row_mask, cols, col_mask, t_safe, valid,
                                         lse, coef_p, coef_t, g, lam, D, n_smooth=C, stride_x_row=stride_x_row,
                                         stride_x_col=stride_x_col, stride_w_d=stride_w_d, stride_w_c=stride_w_c, s=s,
                                         m=m, eps=eps, MARGIN=MARGIN, HAS_BIAS=HAS_BIAS, HAS_CW=HAS_CW,
                                         DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION, BLOCK_B=BLOCK_B,
                                         BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    ssum = tl.sum(dcos * cos, 1)
    csum = tl.sum(dcos, 0) if MARGIN == MARGIN_NONE else tl.sum(dcos * cos, 0)  # d bias, or the dW cos term
    if FUSE_DW:  # partials with C columns: their sum over programs is the contiguous [D + 1, C]
        DWP_ptr += pid * (D + 1) * C
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(X_ptr + rows[:, None] * stride_x_row + ks[None, :] * stride_x_col,
                    mask=row_mask[:, None] & kmask[None, :], other=0.0).to(ACC_DTYPE)
        w = tl.load(W_ptr + ks[:, None] * stride_w_d + cols[None, :] * stride_w_c,
                    mask=kmask[:, None] & col_mask[None, :], other=0.0).to(ACC_DTYPE)
        if FUSE_DX:
            w_hat = w if MARGIN == MARGIN_NONE else w * rw[None, :]
            acc_x = tl.dot(dcos.to(DOT_DTYPE), tl.trans(w_hat).to(DOT_DTYPE), input_precision=PRECISION,
                           out_dtype=ACC_DTYPE)
            dx = _dx_finish(acc_x, x, rx, ssum, xsum, MARGIN=MARGIN)
            tl.store(DX_ptr + rows[:, None] * D + ks[None, :], dx.to(DX_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & kmask[None, :])
        if FUSE_DW:
            xs = x if MARGIN == MARGIN_NONE else x * rx[:, None]
            acc_w = tl.dot(tl.trans(xs).to(DOT_DTYPE), dcos.to(DOT_DTYPE), input_precision=PRECISION,
                           out_dtype=ACC_DTYPE)
            tl.store(DWP_ptr + ks[:, None] * stride_dwp_d + cols[None, :] * stride_dwp_c,
                     _dw_finish(acc_w, csum, rw, w, MARGIN=MARGIN),
                     mask=kmask[:, None] & col_mask[None, :])
    if FUSE_DW:
        tl.store(DWP_ptr + D * C + cols, csum, mask=col_mask)


@_OPTIONAL_INPUTS
@jit_rows
def _margin_ce_bwd_dx_kernel(
        X_ptr, W_ptr, BIAS_ptr, T_ptr, CW_ptr, LAM_ptr, STATS_ptr, G_ptr, DX_ptr,
        B, D, C, n_targets, c_offset, n_smooth, tiles_per_split,
        stride_x_row, stride_x_col, stride_w_d, stride_w_c, stride_g, stride_dx_split, stride_dx_row,
        s, m, eps, ignore_index,
        MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, HAS_TAIL: tl.constexpr,
        SUB: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
        BLOCK_DT: tl.constexpr):
    """dX[rows, d-slice] = sum over class tiles of recomputed dL/dcos tiles times W^T.

    Pointers: X, W, BIAS, T, CW, LAM as the forward's; STATS the forward's workspace (or `ops.saved_stats`); G [B]
    the upstream gradient per row (stride_g 0 for a scalar); DX [B, D] (X's dtype), or with several class splits
    fp32 partials [splits, B, D]. Sizes: n_smooth the class count of label smoothing's eps / C (all ranks'
    classes when they are sharded). Grid: (D / BLOCK_DO, row blocks, class splits); each class split writes its own
    partial DX[split] (summed afterwards in split order). No atomics: deterministic. The feature chunk is the fastest
    grid axis, so a row block's chunks run together and share its x tiles through L2.
    HAS_TAIL: each feature chunk is BLOCK_DO + BLOCK_DT wide, its last BLOCK_DT features in a second accumulator, so
    D = 192 is 128 + 64 rather than 256 padded, and fp32 D = 1024 two chunks of 256 + 256. SUB > 1: C classes of SUB
    sub-centres each, W [D, C*SUB] (see `sub_center`)."""
    pid = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    d0 = tl.program_id(0).to(tl.int64) * (BLOCK_DO + BLOCK_DT if HAS_TAIL else BLOCK_DO)
    ds = d0 + tl.arange(0, BLOCK_DO)
    t_safe, valid, _ = _row_targets(T_ptr, CW_ptr, rows, row_mask, ignore_index, c_offset, n_targets, n_targets,
                                    HAS_CW=HAS_CW)
    lam = _load_lam(LAM_ptr, rows, row_mask, B, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
    lse = tl.load(STATS_ptr + STAT_LSE * B + rows, mask=row_mask, other=0.0)
    coef_p = tl.load(STATS_ptr + STAT_COEF_P * B + rows, mask=row_mask, other=0.0)
    coef_t = tl.load(STATS_ptr + STAT_COEF_T * B + rows, mask=row_mask, other=0.0)
    g = tl.load(G_ptr + rows * stride_g, mask=row_mask, other=0.0).to(ACC_DTYPE) * _grad_scale(STATS_ptr, B)
    acc_x = tl.zeros((BLOCK_B, BLOCK_DO), ACC_DTYPE)
    ds_t = d0 + BLOCK_DO + tl.arange(0, BLOCK_DT)
    acc_t = tl.zeros((BLOCK_B, BLOCK_DT), ACC_DTYPE)
    ssum = tl.zeros((BLOCK_B,), ACC_DTYPE)
    xsum = tl.zeros((BLOCK_B,), ACC_DTYPE)
    rx = tl.zeros((BLOCK_B,), ACC_DTYPE)
    c_begin = tl.program_id(2) * tiles_per_split * BLOCK_C
    for c0 in range(c_begin, tl.minimum(C, c_begin + tiles_per_split * BLOCK_C), BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        if SUB == 1:
            dcos, cos, rx, rw, xs = _grad_tile(X_ptr, W_ptr, BIAS_ptr, CW_ptr, rows, row_mask, cols, col_mask, t_safe,
                                               valid, lse, coef_p, coef_t, g, lam, D, n_smooth=n_smooth,
                                               stride_x_row=stride_x_row, stride_x_col=stride_x_col,
                                               stride_w_d=stride_w_d, stride_w_c=stride_w_c, s=s, m=m, eps=eps,
                                               MARGIN=MARGIN, HAS_BIAS=HAS_BIAS, HAS_CW=HAS_CW, DOT_DTYPE=DOT_DTYPE,
                                               ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION, BLOCK_B=BLOCK_B,
                                               BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
            ssum += tl.sum(dcos * cos, 1)
            xsum += xs
            acc_x = _dx_acc(W_ptr, dcos, rw, ds, cols, col_mask, acc_x, D, stride_w_d, stride_w_c, MARGIN=MARGIN,
                            DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION)
            if HAS_TAIL:
                acc_t = _dx_acc(W_ptr, dcos, rw, ds_t, cols, col_mask, acc_t, D, stride_w_d, stride_w_c, MARGIN=MARGIN,
                                DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION)
        else:
            dcos, cos, rx, rw_win, win, xs = _sub_grad_tile(X_ptr, W_ptr, CW_ptr, rows, row_mask, cols, col_mask,
                                                            t_safe, valid, lse, coef_p, coef_t, g, lam, D, n_smooth,
                                                            stride_x_row=stride_x_row, stride_x_col=stride_x_col,
                                                            stride_w_d=stride_w_d, stride_w_c=stride_w_c, s=s, m=m,
                                                            eps=eps, MARGIN=MARGIN, HAS_CW=HAS_CW, SUB=SUB,
                                                            DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE,
                                                            PRECISION=PRECISION, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C,
                                                            BLOCK_K=BLOCK_K)
            ssum += tl.sum(dcos * cos, 1)
            xsum += xs
            dcos = dcos * rw_win  # the winner's 1/|w| folded in (one tile fewer live): the dots take raw columns
            acc_x = _sub_dx_acc(W_ptr, dcos, win, ds, cols, col_mask, acc_x, D, stride_w_d, stride_w_c, SUB=SUB,
                                DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION)
            if HAS_TAIL:
                acc_t = _sub_dx_acc(W_ptr, dcos, win, ds_t, cols, col_mask, acc_t, D, stride_w_d, stride_w_c, SUB=SUB,
                                    DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION)
    DX_ptr += tl.program_id(2).to(tl.int64) * stride_dx_split
    _dx_store(X_ptr, DX_ptr, acc_x, rows, row_mask, ds, rx, ssum, xsum, D, stride_x_row, stride_x_col, stride_dx_row,
              MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
    if HAS_TAIL:
        _dx_store(X_ptr, DX_ptr, acc_t, rows, row_mask, ds_t, rx, ssum, xsum, D, stride_x_row, stride_x_col,
                  stride_dx_row, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)


@triton.jit
def _dx_acc(W_ptr, dcos, rw, ds, cols, col_mask, acc, D, stride_w_d, stride_w_c, MARGIN: tl.constexpr,
            DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_B, len(ds)] += dcos @ W_hat[ds, cols]^T."""
    w = tl.load(W_ptr + ds[:, None] * stride_w_d + cols[None, :] * stride_w_c,
                mask=(ds < D)[:, None] & col_mask[None, :], other=0.0).to(ACC_DTYPE)
    w_hat = w if MARGIN == MARGIN_NONE else w * rw[None, :]
    return tl.dot(dcos.to(DOT_DTYPE), tl.trans(w_hat.to(DOT_DTYPE)), acc, input_precision=PRECISION,
                  out_dtype=ACC_DTYPE)


@triton.jit
def _sub_dx_acc(W_ptr, dcos_w, win, ds, cols, col_mask, acc, D, stride_w_d, stride_w_c, SUB: tl.constexpr,
                DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc += sum_k (dcos_w [win == k]) @ W[ds, cols*SUB + k]^T: each (row, class) gradient goes to its winning
    sub-centre only. dcos_w: dL/dcos times the winner's 1/|w|, win: the winning k (`sub_center._sub_grad_tile`)."""
    # a loop, not unrolled: one column tile live at a time; MARGIN_NONE: the raw columns (1/|w| is in dcos_w)
    for k in range(SUB):
        acc = _dx_acc(W_ptr + k * stride_w_c, tl.where(win == k, dcos_w, 0.0), 0.0, ds, cols, col_mask, acc, D,
                      stride_w_d, stride_w_c * SUB, MARGIN=MARGIN_NONE, DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE,
                      PRECISION=PRECISION)
    return acc


@triton.jit
def _dx_store(X_ptr, DX_ptr, acc, rows, row_mask, ds, rx, ssum, xsum, D, stride_x_row, stride_x_col, stride_dx_row,
              MARGIN: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Finish and store dX[rows, ds] from its accumulated product (see `_dx_finish`)."""
    mask = row_mask[:, None] & (ds < D)[None, :]
    x = tl.load(X_ptr + rows[:, None] * stride_x_row + ds[None, :] * stride_x_col, mask=mask, other=0.0)
    dx = _dx_finish(acc, x.to(ACC_DTYPE), rx, ssum, xsum, MARGIN=MARGIN)
    tl.store(DX_ptr + rows[:, None] * stride_dx_row + ds[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask)


@_OPTIONAL_INPUTS
@jit_rows
def _margin_ce_bwd_dw_kernel(
        X_ptr, W_ptr, BIAS_ptr, T_ptr, CW_ptr, LAM_ptr, STATS_ptr, G_ptr, DW_ptr, DB_ptr,
        B, D, C, n_targets, c_offset, n_smooth, tiles_per_split,
        stride_x_row, stride_x_col, stride_w_d, stride_w_c, stride_g, stride_dw_split, stride_dw_d, stride_dw_c,
        s, m, eps, ignore_index,
        MARGIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CW: tl.constexpr, HAS_TAIL: tl.constexpr,
        SUB: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
        BLOCK_DT: tl.constexpr):
    """dW[d-slice, class block] (and d bias) over the rows of one row split, in fp32.

    Pointers: X, W, BIAS, T, CW, LAM, STATS and G as the dX kernel's; DW in the weight's layout and dtype, or with
    several row splits fp32 partials [splits, D, C*SUB] ([splits, C, D] for fc.weight); DB [C] (partials
    [splits, C]) with a bias, else None.
    Grid: (D / BLOCK_DO, class blocks, row splits). Each program owns its output tile, so every sum runs in a fixed
    order: deterministic. HAS_TAIL: a second accumulator for features [BLOCK_DO, BLOCK_DO + BLOCK_DT), as in dX.
    SUB > 1 (W [D, C*SUB], see `sub_center`): grid axis 1 is class block x sub-centre k; the program writes the
    columns cols*SUB + k, recomputing the class cosines over all SUB sub-centres to know which rows k won."""
    k = tl.program_id(1) % SUB
    cols = (tl.program_id(1) // SUB).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    pid_d = tl.program_id(0)
    ds = pid_d.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    acc_w = tl.zeros((BLOCK_DO, BLOCK_C), ACC_DTYPE)
    ds_t = BLOCK_DO + tl.arange(0, BLOCK_DT)
    acc_t = tl.zeros((BLOCK_DT, BLOCK_C), ACC_DTYPE)
    csum = tl.zeros((BLOCK_C,), ACC_DTYPE)
    rw = tl.zeros((BLOCK_C,), ACC_DTYPE)
    g_scale = _grad_scale(STATS_ptr, B)
    split = tl.program_id(2).to(tl.int64)
    r_begin = split * tiles_per_split * BLOCK_B
    for r0 in range(r_begin, tl.minimum(B, r_begin + tiles_per_split * BLOCK_B), BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < B
        t_safe, valid, _ = _row_targets(T_ptr, CW_ptr, rows, row_mask, ignore_index, c_offset, n_targets, n_targets,
                                        HAS_CW=HAS_CW)
        lam = _load_lam(LAM_ptr, rows, row_mask, B, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
        lse = tl.load(STATS_ptr + STAT_LSE * B + rows, mask=row_mask, other=0.0)
        coef_p = tl.load(STATS_ptr + STAT_COEF_P * B + rows, mask=row_mask, other=0.0)
        coef_t = tl.load(STATS_ptr + STAT_COEF_T * B + rows, mask=row_mask, other=0.0)
        g = tl.load(G_ptr + rows * stride_g, mask=row_mask, other=0.0).to(ACC_DTYPE) * g_scale
        if SUB == 1:
            dcos, cos, rx, rw, _ = _grad_tile(X_ptr, W_ptr, BIAS_ptr, CW_ptr, rows, row_mask, cols, col_mask, t_safe,
                                              valid, lse, coef_p, coef_t, g, lam, D, n_smooth=n_smooth,
                                              stride_x_row=stride_x_row, stride_x_col=stride_x_col,
                                              stride_w_d=stride_w_d, stride_w_c=stride_w_c, s=s, m=m, eps=eps,
                                              MARGIN=MARGIN, HAS_BIAS=HAS_BIAS, HAS_CW=HAS_CW, DOT_DTYPE=DOT_DTYPE,
                                              ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION, BLOCK_B=BLOCK_B,
                                              BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
        else:
            dcos, cos, rx, rw_win, win, _ = _sub_grad_tile(X_ptr, W_ptr, CW_ptr, rows, row_mask, cols, col_mask, t_safe,
                                                           valid, lse, coef_p, coef_t, g, lam, D, n_smooth,
                                                           stride_x_row=stride_x_row, stride_x_col=stride_x_col,
                                                           stride_w_d=stride_w_d, stride_w_c=stride_w_c, s=s, m=m,
                                                           eps=eps, MARGIN=MARGIN, HAS_CW=HAS_CW, SUB=SUB,
                                                           DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE,
                                                           PRECISION=PRECISION, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C,
                                                           BLOCK_K=BLOCK_K)
            dcos = tl.where(win == k, dcos, 0.0)  # the rows whose class gradient goes to sub-centre k
            rw = tl.maximum(rw, _winner_rw(rw_win, win, k))
        acc_w = _dw_acc(X_ptr, dcos, rx, rows, row_mask, ds, acc_w, D, stride_x_row, stride_x_col, MARGIN=MARGIN,
                        DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION)
        if HAS_TAIL:
            acc_t = _dw_acc(X_ptr, dcos, rx, rows, row_mask, ds_t, acc_t, D, stride_x_row, stride_x_col, MARGIN=MARGIN,
                            DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE, PRECISION=PRECISION)
        csum += tl.sum(dcos, 0) if MARGIN == MARGIN_NONE else tl.sum(dcos * cos, 0)
    DW_ptr += split * stride_dw_split
    if SUB > 1:
        DW_ptr += k * stride_dw_c
        W_ptr += k * stride_w_c
    _dw_store(W_ptr, DW_ptr, acc_w, csum, rw, ds, cols, col_mask, D, stride_w_d, stride_w_c * SUB, stride_dw_d,
              stride_dw_c * SUB, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
    if HAS_TAIL:
        _dw_store(W_ptr, DW_ptr, acc_t, csum, rw, ds_t, cols, col_mask, D, stride_w_d, stride_w_c * SUB, stride_dw_d,
                  stride_dw_c * SUB, MARGIN=MARGIN, ACC_DTYPE=ACC_DTYPE)
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(DB_ptr + split * C + cols, csum.to(DB_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _dw_acc(X_ptr, dcos, rx, rows, row_mask, ds, acc, D, stride_x_row, stride_x_col, MARGIN: tl.constexpr,
            DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc [len(ds), BLOCK_C] += X_hat[rows, ds]^T @ dcos (X itself for CrossEntropy)."""
    x = tl.load(X_ptr + rows[:, None] * stride_x_row + ds[None, :] * stride_x_col,
                mask=row_mask[:, None] & (ds < D)[None, :], other=0.0).to(ACC_DTYPE)
    xs = x if MARGIN == MARGIN_NONE else x * rx[:, None]
    return tl.dot(tl.trans(xs).to(DOT_DTYPE), dcos.to(DOT_DTYPE), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _dw_store(W_ptr, DW_ptr, acc, csum, rw, ds, cols, col_mask, D, stride_w_d, stride_w_c, stride_dw_d, stride_dw_c,
              MARGIN: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Finish and store dW[ds, cols] from its accumulated product (see `_dw_finish`)."""
    mask = (ds < D)[:, None] & col_mask[None, :]
    w = tl.load(W_ptr + ds[:, None] * stride_w_d + cols[None, :] * stride_w_c, mask=mask, other=0.0)
    dw = _dw_finish(acc, csum, rw, w.to(ACC_DTYPE), MARGIN=MARGIN)
    tl.store(DW_ptr + ds[:, None] * stride_dw_d + cols[None, :] * stride_dw_c, dw.to(DW_ptr.dtype.element_ty),
             mask=mask)
