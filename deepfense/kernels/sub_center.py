"""Sub-centre helpers of the fused kernels (`margin_ce.py`): K = SUB weight columns per class, a class's K adjacent.

The weight is [D, C*K]; class c's columns are c*K + k. A class tile loads, for each k, the columns c*K + k of its
classes (stride K * stride_w_c), so the class cosine max(cos_k) and the winning k are kept per (row, class) in
registers: no [B, C*K] (nor [B, C]) buffer. The winner is the first k on ties and any NaN cosine (the first one)
wins, as torch's `max` picks, so the gradient goes to the column the reference and the torch backend pick.
"""

import triton
import triton.language as tl

from .tiles import _clamp_cos, _cos_logits, _dot_tile, _grad_of_logits, _recip_norm


@triton.jit
def _sub_cos_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col, stride_w_d, stride_w_c,
                  SUB: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Class cosines of a tile: cos [BLOCK_B, BLOCK_C] = max_k clamp(x_hat . w_hat[:, c*SUB + k]), the winning k
    (int32, same shape), the winner's 1/|w| (same shape) and the rows' squared norms xsq [BLOCK_B]; cols are class
    indices, stride_w_c the weight's column stride."""
    best = tl.full((BLOCK_B, BLOCK_C), float("-inf"), ACC_DTYPE)
    rw_win = tl.zeros((BLOCK_B, BLOCK_C), ACC_DTYPE)
    win = tl.zeros((BLOCK_B, BLOCK_C), tl.int32)
    xsq = tl.zeros((BLOCK_B,), ACC_DTYPE)
    for k in range(SUB):  # a loop, not unrolled: one sub-centre's dot live at a time
        acc, xsq, wsq = _dot_tile(X_ptr, W_ptr + k * stride_w_c, rows, cols, row_mask, col_mask, D, stride_x_row,
                                  stride_x_col, stride_w_d, stride_w_c * SUB, DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE,
                                  PRECISION=PRECISION, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
        rw = _recip_norm(wsq)
        cos = _clamp_cos(acc * _recip_norm(xsq)[:, None] * rw[None, :])
        take = (cos > best) | ((cos != cos) & (best == best))  # strictly larger (first wins ties), or the first NaN
        best = tl.where(take, cos, best)
        rw_win = tl.where(take, rw[None, :], rw_win)
        win = tl.where(take, k, win)
    return best, win, rw_win, xsq


@triton.jit
def _sub_grad_tile(X_ptr, W_ptr, CW_ptr, rows, row_mask, cols, col_mask, t_safe, valid, lse, coef_p, coef_t, g, lam,
                   D, n_smooth, stride_x_row, stride_x_col, stride_w_d, stride_w_c, s, m, eps,
                   MARGIN: tl.constexpr, HAS_CW: tl.constexpr, SUB: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """`tiles._grad_tile` over class cosines: dL/dcos of the classes [BLOCK_B, BLOCK_C] (scaled by g), cos, rx, the
    winner's 1/|w| and index (see `_sub_cos_tile`) and the rows' sum of dL/dl_c l_c."""
    cos, win, rw_win, xsq = _sub_cos_tile(X_ptr, W_ptr, rows, cols, row_mask, col_mask, D, stride_x_row, stride_x_col,
                                          stride_w_d, stride_w_c, SUB=SUB, DOT_DTYPE=DOT_DTYPE, ACC_DTYPE=ACC_DTYPE,
                                          PRECISION=PRECISION, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K)
    is_target = cols[None, :] == t_safe[:, None]
    xn = tl.sqrt(xsq)
    logits = _cos_logits(cos, xn, is_target, col_mask, lam, s, m, MARGIN=MARGIN)
    dcos, xsum = _grad_of_logits(logits, cos, xn, is_target, cols, col_mask, CW_ptr, valid, lse, coef_p, coef_t, g, lam,
                                 n_smooth, s, m, eps=eps, MARGIN=MARGIN, HAS_CW=HAS_CW, DOT_DTYPE=DOT_DTYPE,
                                 ACC_DTYPE=ACC_DTYPE)
    return dcos, cos, _recip_norm(xsq), rw_win, win, xsum


@triton.jit
def _winner_rw(rw_win, win, k):
    """1/|w| [BLOCK_C] of sub-centre k of each class, from the rows that it won (0 where it won no row: its
    gradient is then zero)."""
    return tl.max(tl.where(win == k, rw_win, 0.0), 0)

