"""Counted work of each launch of a training step, from the launch plan's records alone (grid and meta).

One function per kernel, following its loads, stores and dots line by line (deepfense/kernels/margin_ce.py,
small_head_kernels.py): multiply-adds as executed (tile padding included: every dot is BLOCK x BLOCK x BLOCK on
every program, and the small-head kernels' broadcast products are [BLOCK_C, BLOCK_B, BLOCK_K] tiles), bytes loaded
and stored (masked-off elements excluded, every load counted, so a tile re-read from L2 counts again), and the
unique bytes (each input element read once, each output element written once: the HBM floor). The tile rules are
not repeated here: everything comes from `Launch.grid` and `Launch.meta`. tests/test_roofline.py checks these
counts equal tests/work_counter.py's interpreter counts exactly.

Training step as in `launches.Step`: reduction='mean' (the upstream gradient is one fp32 [] read per row, stride 0,
times the reduction's scale read once per program), no class weights, int64 targets, accumulators fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from triton import cdiv

ITEM = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
ACC, TGT = 4, 8  # fp32 statistics / partials / upstream gradient; int64 targets
N_STATS = 5
SMALL_KERNELS = ("_small_head_fwd_kernel", "_small_head_bwd_kernel")  # broadcast products on the FMA units


@dataclass(frozen=True)
class Work:
    """Counted work of one launch: multiply-adds executed (padding included), bytes loaded and stored."""

    macs: int
    bytes_read: int
    bytes_written: int
    unique_bytes: int = 0

    @property
    def dot_flops(self) -> int:
        return 2 * self.macs

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def launch_work(launch, step, plan=()) -> Work:
    """Work of `launch` (a `deepfense.kernels.plan.Launch`) in `step` (`launches.Step`); `plan`: the step's other
    launches (the combine reads the forward's split count from it). KeyError for a kernel with no model."""
    fn = _MODELS.get(launch.kernel)
    if fn is None:
        raise KeyError(f"no work model for kernel {launch.kernel}")
    return fn(launch, step, _Shape(step), tuple(plan))


class _Shape:
    def __init__(self, step):
        self.B, self.D = step.B, step.D
        self.C = 1 if step.loss == "OCSoftmax" else step.C
        self.xi = self.wi = ITEM[step.dtype]
        self.bi = ITEM[step.dtype] if step.has_bias else 0  # bias bytes per class
        self.lam = ACC if step.loss == "ASoftmax" else 0  # lambda, loaded once per program
        self.xcoef = step.loss != "CrossEntropy"


def _fwd(l, step, s, plan) -> Work:
    m, (n_rows, n_splits) = l.meta, l.grid
    bb, bc, bk = m["BLOCK_B"], m["BLOCK_C"], m["BLOCK_K"]
    tiles, logit = cdiv(s.C, bc), cdiv(s.D, bk) * bb * bc * bk  # one [BLOCK_B, BLOCK_C] logit tile over all of D
    passes = 1 + bool(m["FUSE_DX"] or m["FUSE_DW"])  # a one-tile head recomputes its tile for the fused gradients
    tile_read = tiles * s.B * s.D * s.xi + n_rows * s.C * (s.D * s.wi + s.bi)
    read = passes * tile_read + n_splits * s.B * TGT + l.programs * s.lam
    written = N_STATS * s.B * ACC * n_splits
    if n_splits == 1:  # the batch reduction (kernels/reduce_rows.py); with class splits the combine does it
        read, written = read + _reduce_io(n_rows)[0], written + _reduce_io(n_rows)[1]
    macs = n_rows * tiles * logit * passes
    if passes == 2:  # _fused_grads' K loop: x and w again, the dX and / or dW dots
        read += s.B * s.D * s.xi + n_rows * s.D * s.C * s.wi
        macs += n_rows * logit * (bool(m["FUSE_DX"]) + bool(m["FUSE_DW"]))
        written += (s.B * s.D * ACC if m["FUSE_DX"] else 0) + (n_rows * (s.D + 1) * s.C * ACC if m["FUSE_DW"] else 0)
    unique = s.B * s.D * s.xi + s.C * (s.D * s.wi + s.bi) + s.B * TGT + written
    return Work(macs, read, written, min(unique, read + written))


def _combine(l, step, s, plan) -> Work:
    fwd = next((p for p in plan if p.kernel == "_margin_ce_fwd_kernel"), None)
    if fwd is None:
        raise ValueError("the combine's work needs the step's plan (its forward's split count): pass plan=")
    n_splits = fwd.meta["n_splits"]
    read, written = s.B * (TGT + N_STATS * n_splits * ACC), N_STATS * s.B * ACC
    read, written = read + _reduce_io(l.grid[0])[0], written + _reduce_io(l.grid[0])[1]
    return Work(0, read, written, read + written)


def _reduce_io(n_prog: int, n_sum: int = 2):
    """(read, written) bytes of `reduce_rows._reduce_sums` for reduction='mean': each program stores its n_sum sums
    (the loss, the row weight, then the small heads' cosine-term sums), the last one reads them all and writes the
    loss, the backward's gradient scale and the n_sum - 2 further totals."""
    return n_sum * n_prog * ACC, n_sum * n_prog * ACC + n_sum * ACC


def _chunks(m):
    """(feature chunk width, tail width) of a backward kernel's meta: the dot sizes per chunk."""
    return m["BLOCK_DO"], m["BLOCK_DT"] if m["HAS_TAIL"] else 0


BWD_ROW_BYTES = TGT + 3 * ACC + ACC  # what a backward kernel reads per row: target, lse / coef_p / coef_t, gradient


def _bwd_unique(s, written) -> int:
    """Bytes a backward kernel touches at least once: x, W (and bias), the per-row statistics and its output."""
    return s.B * s.D * s.xi + s.C * (s.D * s.wi + s.bi) + s.B * BWD_ROW_BYTES + written


def _bwd_dx(l, step, s, plan) -> Work:
    m, (n_do, n_rb, n_splits) = l.meta, l.grid
    bb, bc, bk = m["BLOCK_B"], m["BLOCK_C"], m["BLOCK_K"]
    do, dt = _chunks(m)
    tiles = cdiv(s.C, bc)
    macs = n_do * n_rb * tiles * bb * bc * (cdiv(s.D, bk) * bk + do + dt)
    per_row = BWD_ROW_BYTES
    read = (n_do * n_splits * s.B * per_row + l.programs * (s.lam + ACC)  # lambda, the gradient scale
            + n_do * (tiles * s.B * s.D * s.xi + n_rb * s.C * (s.D * s.wi + s.bi))  # the recomputed logit tiles
            + n_rb * s.D * s.C * s.wi  # W[feature chunk, class tile] for the dX dot
            + n_splits * s.B * s.D * s.xi)  # x for the finish
    written = n_splits * s.B * s.D * (s.xi if n_splits == 1 else ACC)
    return Work(macs, read, written, min(_bwd_unique(s, written), read + written))


def _bwd_dw(l, step, s, plan) -> Work:
    m, (n_do, n_cb, n_splits) = l.meta, l.grid
    bb, bc, bk = m["BLOCK_B"], m["BLOCK_C"], m["BLOCK_K"]
    do, dt = _chunks(m)
    n_rb = cdiv(s.B, bb)
    macs = n_do * n_cb * n_rb * bb * bc * (cdiv(s.D, bk) * bk + do + dt)
    per_row = BWD_ROW_BYTES
    read = (n_do * n_cb * s.B * per_row + l.programs * (s.lam + ACC)  # lambda, the gradient scale
            + n_do * (n_cb * s.B * s.D * s.xi + n_rb * s.C * (s.D * s.wi + s.bi))  # the recomputed logit tiles
            + n_cb * s.B * s.D * s.xi  # x[rows, feature chunk] for the dW dot
            + n_splits * s.D * s.C * s.wi)  # w for the finish
    written = n_splits * s.D * s.C * (s.wi if n_splits == 1 else ACC) + (n_splits * s.C * ACC if s.bi else 0)
    return Work(macs, read, written, min(_bwd_unique(s, written), read + written))


def _small_fwd(l, step, s, plan) -> Work:
    m, (n_prog,) = l.meta, l.grid
    bb, bk, bc = m["BLOCK_B"], m["BLOCK_K"], m["BLOCK_C"]
    macs = n_prog * cdiv(s.D, bk) * bc * bk * bb
    red_read, red_written = _reduce_io(n_prog, 2 + s.xcoef * s.C)  # the loss, the row weight, e's column sums
    read = s.B * (s.D * s.xi + TGT) + n_prog * (s.C * (s.D * s.wi + s.bi) + s.lam) + red_read
    written = s.B * (s.C + 1) * ACC + red_written  # the coefficients a, b
    unique = s.B * (s.D * s.xi + TGT) + s.C * (s.D * s.wi + s.bi) + written
    return Work(macs, read, written, min(unique, read + written))


def _small_bwd(l, step, s, plan) -> Work:
    m, (n_groups, n_k) = l.meta, l.grid
    bb, bk, bc = m["BLOCK_B"], m["BLOCK_K"], m["BLOCK_C"]
    macs = 2 * cdiv(s.B, bb) * n_k * bc * bb * bk  # the dX and the dW partial products, per row block and K slice
    per_row = ACC * (s.C + s.xcoef)  # the coefficients a (and b): once per K slice
    # per program: the upstream gradient and the reduction's scale; row group 0: the cosine term's totals (not CE)
    once = 2 * l.programs * ACC + n_k * s.xcoef * s.C * ACC
    read = n_groups * s.C * s.D * s.wi + n_k * s.B * per_row + once + s.B * s.D * s.xi
    # dX, then dW (and d bias): one row group writes them in w's dtype, several write fp32 partials
    dw_item = s.wi if n_groups == 1 else ACC
    written = s.B * s.D * s.xi + n_groups * s.C * (s.D + bool(s.bi)) * dw_item
    unique = s.C * s.D * s.wi + s.B * per_row + s.xcoef * s.C * ACC + s.B * s.D * s.xi + 2 * ACC + written
    return Work(macs, read, written, min(unique, read + written))


_MODELS = {"_margin_ce_fwd_kernel": _fwd, "_margin_ce_combine_kernel": _combine,
           "_margin_ce_bwd_dx_kernel": _bwd_dx, "_margin_ce_bwd_dw_kernel": _bwd_dw,
           "_small_head_fwd_kernel": _small_fwd, "_small_head_bwd_kernel": _small_bwd}


def partial_sum_bytes(step, plan) -> int:
    """Bytes the launchers' torch ops move after the kernels to sum split partials (an estimate from the tensors'
    sizes, not counted by the interpreter): dX partials [splits, B, D] fp32 summed and cast, dW partials
    [splits, D, C] (d bias [splits, C]) summed and copied, the one-tile forward's dW partials [row blocks, D + 1, C],
    the small head's backward partials [programs, D (+1), C] (cosine term included) summed, then cast (a single
    program writes dW itself)."""
    s, total = _Shape(step), 0
    for item in plan:
        m, k = item.meta, item.kernel
        if k == "_margin_ce_bwd_dx_kernel" and m["n_splits"] > 1:
            total += (m["n_splits"] + 2) * s.B * s.D * ACC + s.B * s.D * s.xi
        elif k == "_margin_ce_bwd_dw_kernel" and m["n_splits"] > 1:
            total += (m["n_splits"] + 2) * (s.D * s.C + (s.C if s.bi else 0)) * ACC + s.D * s.C * s.wi
        elif k == "_margin_ce_fwd_kernel" and m["FUSE_DW"]:
            total += (item.grid[0] + 1) * (s.D + 1) * s.C * ACC
        elif k == "_small_head_bwd_kernel" and item.grid[0] > 1:  # the partials summed, then cast to w's dtype
            rows = s.D + bool(s.bi)
            total += (item.grid[0] + 1) * rows * s.C * ACC + (rows * s.C * (ACC + s.wi) if s.wi != ACC else 0)
    return total
