"""The batch reduction of the fused loss kernels, done inside a forward (or combine) launch: no torch op.

Every program of the launch stores its rows' sums (the loss, the row weight, then any further per-batch sums the
backward needs: the small heads' dW cosine terms) in a workspace whose ticket counter the launcher zeroed; the
program that takes the last ticket adds them up in program order (deterministic) and writes the loss, the backward's
upstream-gradient scale (1 / the mean's denominator, else 1) and the totals of the further sums. Workspace layout
(`sums_size`): [scale, ticket, totals of the further n_sum - 2 sums, each program's n_sum sums].

The large heads' workspace starts after the forward's STATS [5, B] (see `margin_ce`), `ws_size(B, n_prog)` in all.
"""

import triton
import triton.language as tl

from .tiles import N_STATS

# the workspace (see the module docstring); `reduce`: 0 none, 1 sum, 2 mean
WS_SCALE: tl.constexpr = tl.constexpr(0)
WS_TICKET: tl.constexpr = tl.constexpr(1)
WS_TOTALS: tl.constexpr = tl.constexpr(2)
N_STATS_C: tl.constexpr = tl.constexpr(N_STATS)
REDUCE_ELEMS: tl.constexpr = tl.constexpr(2048)  # the last program's tile: programs x sums, 16 per thread at 4 warps


def sums_size(n_sum: int, n_prog: int) -> int:
    """Elements of a reduction workspace for n_sum sums (loss, row weight, ...) of n_prog programs."""
    return n_sum + n_sum * n_prog


def ws_size(B: int, n_prog: int) -> int:
    """Elements of the large heads' forward workspace: STATS [5, B], then the reduction's of 2 sums."""
    return N_STATS * B + sums_size(2, n_prog)


@triton.jit
def _reduce_sums(WS_ptr, RED_ptr, pid, sums, n_sum, reduce, ACC_DTYPE: tl.constexpr, SUM_BLOCK: tl.constexpr):
    """reduction='sum' (reduce 1) or 'mean' (2) of this program's `sums` [SUM_BLOCK] (loss, row weight, then
    n_sum - 2 further sums) over the launch's programs (see the module docstring): the last program writes the loss
    RED [] (mean: the loss sum / the row-weight sum; no row kept: 0), the gradient scale (mean: 1 / the row-weight
    sum, else 1) and the further totals. reduce 0: program 0 writes the scale 1. Returns the scale (1 but in the last
    program)."""
    scale = tl.full((), 1.0, ACC_DTYPE)
    if reduce == 0:
        if pid == 0:
            tl.store(WS_ptr + WS_SCALE, tl.full((), 1.0, ACC_DTYPE))
    else:
        j = tl.arange(0, SUM_BLOCK)
        parts = WS_ptr + n_sum  # after the scale, the ticket and the n_sum - 2 totals
        tl.store(parts + pid * n_sum + j, sums, mask=j < n_sum)
        tl.debug_barrier()  # every thread's stores come before the ticket, whose release publishes them GPU-wide
        ticket = tl.atomic_add(WS_ptr + WS_TICKET, 1.0, sem="acq_rel", scope="gpu")
        n_prog = tl.num_programs(0)
        if ticket == n_prog - 1:
            P_BLOCK: tl.constexpr = REDUCE_ELEMS // SUM_BLOCK
            acc = tl.zeros((P_BLOCK, SUM_BLOCK), ACC_DTYPE)
            for p0 in range(0, n_prog, P_BLOCK):
                p = p0 + tl.arange(0, P_BLOCK)
                acc += tl.load(parts + p[:, None] * n_sum + j[None, :], mask=(p[:, None] < n_prog) & (j < n_sum),
                               other=0.0, cache_modifier=".cg")
            total = tl.sum(acc, 0)
            den = tl.sum(tl.where(j == 1, total, 0.0), 0)
            den = tl.where(reduce == 2, tl.where(den > 0, den, 1.0), 1.0)  # a NaN den: the loss is NaN already
            scale = 1.0 / den
            tl.store(RED_ptr, tl.sum(tl.where(j == 0, total, 0.0), 0) / den)
            tl.store(WS_ptr + WS_SCALE, scale)
            tl.store(WS_ptr + j, total, mask=(j >= WS_TOTALS) & (j < n_sum))
    return scale


@triton.jit
def _reduce_rows(STATS_ptr, RED_ptr, pid, row_mask, B, loss, row_w, reduce, ACC_DTYPE: tl.constexpr):
    """The large heads' reduction: this program's rows' loss and row-weight sums through `_reduce_sums`, in the
    workspace after STATS [5, B]. Returns the scale (1 but in the last program)."""
    ws = STATS_ptr + (N_STATS_C * B.to(tl.int64))  # 64-bit: 5 B can pass 2^31
    j = tl.arange(0, 2)
    sums = tl.where(j == 0, tl.sum(tl.where(row_mask, loss, 0.0), 0), tl.sum(tl.where(row_mask, row_w, 0.0), 0))
    return _reduce_sums(ws, RED_ptr, pid, sums, 2, reduce, ACC_DTYPE=ACC_DTYPE, SUM_BLOCK=2)


@triton.jit
def _grad_scale(STATS_ptr, B):
    """The reduction's factor of the upstream gradient, from the workspace after STATS (see `_reduce_rows`)."""
    return tl.load(STATS_ptr + (N_STATS_C * B.to(tl.int64) + WS_SCALE))
