"""The batch reduction of the fused loss kernels, done inside the forward (or combine) launch.

The forward's STATS [5, B] (see `margin_ce`) heads a workspace of `ws_size(B, n_prog)` elements: after the rows, the
backward's upstream-gradient scale (1 / the mean's denominator, else 1), a ticket counter the launcher zeroes, and
each program's sums of its rows' loss and row weight, which the program that finishes last adds up in program order.
So reduction='sum' / 'mean' cost no torch op and stay deterministic; the backward kernels read the scale.
"""

import triton
import triton.language as tl

from .tiles import N_STATS

# the workspace after the STATS rows (see the module docstring); `reduce`: 0 none, 1 sum, 2 mean
WS_SCALE: tl.constexpr = tl.constexpr(0)
WS_TICKET: tl.constexpr = tl.constexpr(1)
WS_PARTS: tl.constexpr = tl.constexpr(2)
N_STATS_C: tl.constexpr = tl.constexpr(N_STATS)
REDUCE_BLOCK: tl.constexpr = tl.constexpr(1024)


def ws_size(B: int, n_prog: int) -> int:
    """Elements of the forward's workspace: STATS [5, B], the gradient scale, the ticket, 2 sums per program."""
    return N_STATS * B + WS_PARTS + 2 * n_prog


@triton.jit
def _reduce_rows(STATS_ptr, RED_ptr, pid, row_mask, B, loss, row_w, reduce, ACC_DTYPE: tl.constexpr):
    """reduction='sum' (reduce 1) or 'mean' (2) inside the launch: this program stores its rows' loss and row-weight
    sums; the program that takes the last ticket (a counter the launcher zeroed) adds every program's sums in program
    order (deterministic) and writes the loss RED [] and the backward's gradient scale (mean: 1 / sum of row weights,
    0 rows kept: loss 0; else 1). reduce 0: program 0 writes the scale 1. Returns the scale (1 but in the last
    program)."""
    ws = STATS_ptr + (N_STATS_C * B.to(tl.int64))  # 64-bit: 5 B can pass 2^31
    scale = tl.full((), 1.0, ACC_DTYPE)
    if reduce == 0:
        if pid == 0:
            tl.store(ws + WS_SCALE, tl.full((), 1.0, ACC_DTYPE))
    else:
        n_prog = tl.num_programs(0)
        tl.store(ws + WS_PARTS + pid, tl.sum(tl.where(row_mask, loss, 0.0), 0))
        tl.store(ws + WS_PARTS + n_prog + pid, tl.sum(tl.where(row_mask, row_w, 0.0), 0))
        tl.debug_barrier()  # every thread's stores come before the ticket, whose release publishes them GPU-wide
        ticket = tl.atomic_add(ws + WS_TICKET, 1.0, sem="acq_rel", scope="gpu")
        if ticket == n_prog - 1:
            total = tl.zeros((REDUCE_BLOCK,), ACC_DTYPE)
            den = tl.zeros((REDUCE_BLOCK,), ACC_DTYPE)
            for p0 in range(0, n_prog, REDUCE_BLOCK):
                idx = p0 + tl.arange(0, REDUCE_BLOCK)
                total += tl.load(ws + WS_PARTS + idx, mask=idx < n_prog, other=0.0, cache_modifier=".cg")
                den += tl.load(ws + WS_PARTS + n_prog + idx, mask=idx < n_prog, other=0.0, cache_modifier=".cg")
            total = tl.sum(total, 0)
            den = tl.sum(den, 0)
            den = tl.where(reduce == 2, tl.where(den > 0, den, 1.0), 1.0)  # a NaN den: the loss is NaN already
            scale = 1.0 / den
            tl.store(RED_ptr, total / den)
            tl.store(ws + WS_SCALE, scale)
    return scale


@triton.jit
def _grad_scale(STATS_ptr, B):
    """The reduction's factor of the upstream gradient, from the workspace after STATS (see `_reduce_rows`)."""
    return tl.load(STATS_ptr + (N_STATS_C * B.to(tl.int64) + WS_SCALE))
