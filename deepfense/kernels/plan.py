"""The launch plan: every Triton launch of a training step (kernel, grid, tiles, warps, stages), decided in one place.

The launchers read their tile sizes, warps, stages and class splits from `plan(...)`; the tests and the benchmark
read the same object to count work without a GPU. Under the interpreter the small test tiles are used unless
DEEPFENSE_TILES=gpu, which (with DEEPFENSE_SM_COUNT, e.g. 132 for an H200) makes the launchers use exactly the plan a
GPU would get, so the GPU code paths run in CI on small shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import triton

from ..params import SMALL_HEAD_CLASSES, Margin
from .common import INTERPRET


@dataclass(frozen=True)
class Launch:
    """One kernel launch.

    Attributes:
        kernel: the kernel's name (e.g. '_margin_ce_fwd_kernel').
        grid: the launch grid.
        num_warps, num_stages: Triton launch options.
        meta: the constexpr tile sizes and flags that shape the code (BLOCK_B, BLOCK_C, ...).
    """

    kernel: str
    grid: Tuple[int, ...]
    num_warps: int = 4
    num_stages: int = 2
    meta: Dict[str, object] = field(default_factory=dict)

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


def gpu_tiles() -> bool:
    """True when the launchers use the GPU tile plan: always off the interpreter, and under it with DEEPFENSE_TILES=gpu."""
    return not INTERPRET or os.environ.get("DEEPFENSE_TILES", "") == "gpu"


def sm_count(device: Optional[torch.device]) -> int:
    """Multiprocessors of `device` (DEEPFENSE_SM_COUNT overrides it, e.g. 132 to plan for an H200 without one)."""
    forced = os.environ.get("DEEPFENSE_SM_COUNT")
    if forced:
        return int(forced)
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# fp32 inputs: the dots' input_precision, chosen by measurement (bench/precision_study.py, docs/kernels.md "fp32 dot
# precision"): tf32x3 (three tf32 tensor-core dots) meets the error rule as well as IEEE fp32, which runs on the FMA
# units; plain tf32 fails it (s = 30..64 turns its ~1e-3 operand rounding into 0.01-0.03 logit error).
# DEEPFENSE_FP32_PRECISION=ieee|tf32x3|tf32 overrides it; the plan's fp32 tiles depend on it (IEEE dots hold their
# operands in registers). 16-bit inputs use the tensor cores with fp32 accumulation.
FP32_PRECISION = os.environ.get("DEEPFENSE_FP32_PRECISION", "tf32x3")
if FP32_PRECISION not in ("ieee", "tf32x3", "tf32"):
    raise ValueError(f"DEEPFENSE_FP32_PRECISION must be ieee, tf32x3 or tf32, got {FP32_PRECISION!r}")

# Heads with at most this many classes take the small-head path (`small_head.py`): a row reduction, no dot padding.
# The one class-count cutoff of the kernels (and of any path that mirrors their choice).
SMALL_C = SMALL_HEAD_CLASSES  # the small-head kernels serve heads this narrow
# Tests set this to force the class splits under the interpreter tiles; None lets the plan decide.
FORCE_SPLITS: Optional[int] = None
# fp32 accumulator elements a backward program holds across its class (or row) loop: [BLOCK_B, D] in dX,
# [D, BLOCK_C] in dW; 16384 is 64 registers a thread at 8 warps, which leaves room for the tiles it multiplies.
_ACC_ELEMS = 16384
_MAX_DO = 1024  # wider D is split into feature chunks (each recomputes the logits)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(n_tiles: int, n_other: int, n_sm: int, gpu: bool) -> Tuple[int, int]:
    """(splits, tiles per split) of a loop over `n_tiles` tiles: split while the launch's other programs `n_other`
    times the splits stay under 2 x SMs (floor division, so the splits reach the target)."""
    if FORCE_SPLITS is not None:
        wanted = FORCE_SPLITS
    elif not gpu or n_other >= 2 * n_sm:
        wanted = 1
    else:
        wanted = _cdiv(2 * n_sm, max(1, n_other))
    per = max(1, n_tiles // max(1, min(wanted, n_tiles)))
    return _cdiv(n_tiles, per), per


def fuse_dx_default() -> bool:
    """DEEPFENSE_FUSE_DX=1: one-tile forwards also write the unit-gradient dX (opt-in: more memory traffic)."""
    return os.environ.get("DEEPFENSE_FUSE_DX", "0") == "1"


def plan(margin, B: int, D: int, C: int, x_dtype: torch.dtype, w_dtype: torch.dtype, *, n_sm: int,
         need_dx: bool = True, need_dw: bool = True, uniform_grad: bool = True, deterministic: bool = True,
         gpu: Optional[bool] = None, fuse_dx: Optional[bool] = None, small: bool = True,
         sub: int = 1, fp32_precision: Optional[str] = None) -> Tuple[Launch, ...]:
    """Every launch of one training step (forward, then backward), in launch order.

    Args: margin (`deepfense.params.Margin`), B, D, C the shapes (C: this weight's columns), x/w dtypes, n_sm the
    device's multiprocessors; need_dx/need_dw which gradients the step needs; uniform_grad: every row gets the same
    upstream gradient (reduction 'mean'/'sum'), so a one-tile forward can sum dW before it is known; deterministic:
    no floating-point atomics, every sum in a fixed order (the only mode today; the batch reduction's ticket is an
    integer-valued counter); gpu: the GPU tiles (default `gpu_tiles()`), else small interpreter tiles;
    small: C <= SMALL_C takes the small-head path (`plan_small`); sub: sub-centres per class (the weight
    has C * sub columns; sub > 1 never takes the small-head path nor the one-tile fused gradients, and its dW grid
    has one program per class block and sub-centre); fp32_precision: the fp32 dots' input_precision (default
    FP32_PRECISION).

    Large heads: `_margin_ce_fwd_kernel` (row blocks x class splits; one-tile heads also write dW partials),
    `_margin_ce_combine_kernel` when the classes are split, `_margin_ce_bwd_dx_kernel` (feature chunks x row blocks x
    class splits, each recomputing the logits once over the whole D), `_margin_ce_bwd_dw_kernel` (feature chunks x
    class blocks x row splits; a D between powers of two is one main chunk plus a tail, e.g. 192 = 128 + 64, rather than
    256 padded). Splits are chosen so that every launch has about 2 x n_sm programs; split partials
    are summed in split order. Launch.meta holds the constexprs (UPPER case) and the split counts (lower case).
    """
    del deterministic  # no floating-point atomic sums anywhere yet
    gpu = gpu_tiles() if gpu is None else gpu
    margin = int(margin)
    if small and uses_small_head(C, sub):
        return plan_small(margin, B, D, C, x_dtype, w_dtype, n_sm=n_sm, need_dx=need_dx, need_dw=need_dw, gpu=gpu)
    if margin == int(Margin.ONE_CLASS):  # one centre: the small-head kernels serve OCSoftmax (`ops.large_head_loss`)
        raise ValueError("OCSoftmax runs on the small-head kernels; the large-head plan has no one-class launch")
    if gpu:
        # fp32 inputs: tf32x3 dots split every operand into high and low halves, so the K slices, the backward's
        # accumulators and dX's class tiles shrink, the forward takes 8 warps and a whole D >= 512 is two halves (main
        # + tail; 16-bit inputs from D = 1024; fp32 dX from D = 1024 two chunks); IEEE dots hold their operand tiles
        # in registers, so their K slices are 16 wide: every variant then fits 255 registers without a spill
        # (bench/compile_check.py)
        fp32 = torch.float32 in (x_dtype, w_dtype)
        ieee = fp32 and (fp32_precision or FP32_PRECISION) == "ieee"
        bb_f, bk = 64, (16 if ieee else 32 if fp32 else 64)
        bc_f = max(16, min(_pow2(C), 64))
        d_pad = max(16, _pow2(D))
        do = min(d_pad, _MAX_DO)
        # one chunk of a D between powers of two: a power-of-two main part and a short tail (192 = 128 + 64)
        main = max(16, _pow2(D) // 2) if d_pad > D else d_pad
        tail = max(16, _pow2(D - main)) if D > main else 0
        if do == d_pad and tail and main + tail < d_pad:
            do = main
        if tail == 0 and do == D >= (512 if fp32 else 1024):  # two half-width dX dots (main + tail), not one wide
            do = main = tail = D // 2
        # fp32 at D >= 1024: dX's halves become two feature chunks of quarter + quarter (each chunk recomputes the
        # logits: one more GEMM-equivalent, 6 in all), else its two [16, 512] accumulators spill 240-980 B;
        # sub-centres from D = 512 (below, 16-bit inputs too: the face head's dX spilled 48-152 B)
        chunk_dx = fp32 and do == main == tail >= (256 if sub > 1 else 512)
        span = main + tail if do == main and tail else do  # the features one backward program accumulates
        acc = _ACC_ELEMS // 2 if fp32 else _ACC_ELEMS
        narrow = max(16, min(64, _pow2(acc // span + 1) // 2))  # the tile side that meets the whole feature chunk
        # ASoftmax's psi and ArcFace's cos(m1 theta + m2) keep more per-logit values live: narrower class tiles in dX
        bc_x = min(narrow, bc_f, 32 if margin in (2, 4) else 64, 16 if fp32 else 64)
        bb_x, bc_w, bb_w, warps_b = narrow, min(narrow, bc_f), narrow, 8
        if sub > 1:  # the winner and its 1/|w| per (row, class) stay live too: narrower class tiles
            bc_x, bc_w = max(16, bc_x // 2), max(16, bc_w // 2)
        warps_f = 8 if fp32 else 4
        # IEEE dots' operand tiles in registers: 3 forward stages took ArcFace's face forward to an 8-B spill
        stages_f = 2 if ieee else 3
    else:  # small tiles, so small test shapes still run several row / class / feature tiles
        bb_f = bk = bc_f = do = bb_x = bc_x = bc_w = bb_w = 16
        chunk_dx = False
        warps_b, warps_f, main, tail, stages_f = 4, 4, 16, 0, 3
    single = C <= bc_f and sub == 1
    fuse_dx = (fuse_dx_default() if fuse_dx is None else fuse_dx) and single and need_dx
    fuse_dw = single and need_dw and uniform_grad
    n_rows = _cdiv(max(B, 1), bb_f)
    n_splits, per = (1, 1) if single else _split(_cdiv(C, bc_f), n_rows, n_sm, gpu)
    fwd = Launch("_margin_ce_fwd_kernel", (n_rows, n_splits), warps_f, stages_f,
                 dict(BLOCK_B=bb_f, BLOCK_C=bc_f, BLOCK_K=bk, SPLIT=n_splits > 1, FUSE_DX=fuse_dx, FUSE_DW=fuse_dw,
                      n_splits=n_splits, tiles_per_split=per))
    out = [fwd]
    if n_splits > 1:
        out.append(Launch("_margin_ce_combine_kernel", (n_rows,), 4, 3, dict(BLOCK_B=bb_f)))
    if B == 0:
        return tuple(out)
    has_tail = do == main and tail > 0 and main + tail >= D
    n_do = 1 if has_tail else _cdiv(D, do)
    blocks = dict(BLOCK_K=bk, BLOCK_DO=do, HAS_TAIL=has_tail, BLOCK_DT=tail if has_tail else 16)
    if need_dx and not fuse_dx:
        n_rb, n_dx = _cdiv(B, bb_x), (2 if chunk_dx else n_do)
        blocks_x = dict(blocks, BLOCK_DO=main // 2, BLOCK_DT=main // 2) if chunk_dx else blocks
        if gpu and sub > 1 and not chunk_dx and not has_tail and do >= 512:  # two feature chunks per chunk
            n_dx, blocks_x = 2 * n_do, dict(blocks, BLOCK_DO=do // 2)
        splits, per = _split(_cdiv(C, bc_x), n_rb * n_dx, n_sm, gpu)
        out.append(Launch("_margin_ce_bwd_dx_kernel", (n_dx, n_rb, splits), warps_b, 2,
                          dict(BLOCK_B=bb_x, BLOCK_C=bc_x, **blocks_x, n_splits=splits, tiles_per_split=per)))
    if need_dw and not fuse_dw:
        n_cb = _cdiv(C, bc_w) * sub
        splits, per = _split(_cdiv(B, bb_w), n_cb * n_do, n_sm, gpu)
        # ASoftmax's and ArcFace's margin maths beside a whole D >= 1024 of fp32 accumulators: 16-wide K slices, and
        # for ArcFace one pipeline stage (either alone still spilled 8-16 B at 255 registers: bench/compile_check.py)
        wide = gpu and chunk_dx and margin in (2, 4)
        blocks_w = dict(blocks, BLOCK_K=16) if wide else blocks
        out.append(Launch("_margin_ce_bwd_dw_kernel", (n_do, n_cb, splits), warps_b, 1 if wide and margin == 4 else 2,
                          dict(BLOCK_B=bb_w, BLOCK_C=bc_w, **blocks_w, n_splits=splits, tiles_per_split=per)))
    return tuple(out)


def uses_small_head(C: int, sub: int = 1, one_class: bool = False) -> bool:
    """Whether a head of C classes (sub sub-centres each) runs on the small-head kernels rather than the large-head
    ones: C <= SMALL_C without sub-centres (the small-head kernels have none), and OCSoftmax always (the large-head
    kernels have no one-class path)."""
    return one_class or SMALL_HEADS and sub == 1 and C <= SMALL_C


# Tests turn this off to run heads with C <= SMALL_C through the large-head kernels (their one-tile fused path).
SMALL_HEADS = True


# ---- the small-head path (`small_head.py`) -------------------------------------------------------------------------

# Elements of the broadcast product tile (BLOCK_B x BLOCK_K x BLOCK_C) per program: 32 per thread at 4 warps keeps
# the kernels below 128 registers (25% occupancy on sm_90) without spills; fp64 takes two registers per element.
_TILE_ELEMS = {4: 4096, 8: 2048}
# The backward's row groups write fp32 dW partials [D, C] that are read back once: at most 1/32 of x's bytes.
_PARTIAL_SHARE = 32


def plan_small(margin, B: int, D: int, C: int, x_dtype: torch.dtype, w_dtype: torch.dtype, *, n_sm: int,
               need_dx: bool = True, need_dw: bool = True, gpu: bool = True) -> Tuple[Launch, ...]:
    """Every launch of one training step of the small-head path: the forward, then (if a gradient is needed and
    B > 0) the backward.

    Args: margin (`Margin`, unused by the tiles today), B, D, C (<= SMALL_C) the shapes, x/w dtypes, n_sm the device's
    multiprocessors. gpu=False gives small interpreter tiles, so small tests run several row blocks and K chunks.
    Forward: one program per BLOCK_B rows (one row per thread), K chunks of BLOCK_K.
    Backward: grid (row groups, K slices of BLOCK_K), about 2 x n_sm programs; each row group writes one dW partial,
    so there are at most as many as keep the partials within 1/32 of x's bytes, and each K slice re-reads the
    per-row coefficients, so the slices are as wide as the registers allow (up to 64 features per thread).
    """
    del margin
    bc = triton.next_power_of_2(C)
    acc_bytes = 8 if torch.float64 in (x_dtype, w_dtype) else 4
    warps = 4
    if gpu:
        # 8 or more classes: 8 warps and twice the rows (forward) or features (backward) per program, the same
        # registers per thread; the forward then re-reads w for half as many rows, the backward its per-row
        # coefficients for half as many K chunks (the small heads' bytes budget at C = 8)
        warps = 16 if bc >= 8 else 4
        elems = _TILE_ELEMS[acc_bytes] * warps // 4
        # at most 64 bytes of its row per thread per K step: 32 fp32 values took 130-150 registers
        x_bytes_el = torch.finfo(x_dtype).bits // 8
        bb_f = 32 * warps  # one row per thread
        bk_f = max(1, min(triton.next_power_of_2(D), elems // (bc * bb_f), 64 // x_bytes_el))
        # the backward keeps x, dX and two products per element: half the forward's tile (4096 took 140-250 regs)
        bk_b = min(triton.next_power_of_2(D), 64 * warps, elems // 2 // bc)
        bb_b = min(64, max(1, elems // 2 // (bk_b * bc)))
        groups = triton.cdiv(2 * n_sm, triton.cdiv(D, bk_b))
        if need_dw:
            x_bytes = B * D * x_bytes_el
            groups = min(groups, max(1, x_bytes // (_PARTIAL_SHARE * 2 * acc_bytes * (D + 1) * C)))
        # fewer programs than SMs: narrower K slices (down to 512 features) for more programs, at the cost of one
        # more read of the per-row coefficients per slice
        while groups * triton.cdiv(D, bk_b) < n_sm and bk_b >= 1024 and groups < triton.cdiv(B, bb_b):
            bk_b //= 2
            bb_b = min(64, max(1, elems // 2 // (bk_b * bc)))
    else:
        bk_f, bb_f, bk_b, bb_b, groups = 4, 4, 8, 2, 3
    fwd = Launch("_small_head_fwd_kernel", (triton.cdiv(B, bb_f),), warps, 2,
                 dict(BLOCK_B=bb_f, BLOCK_K=bk_f, BLOCK_C=bc, SUM_BLOCK=triton.next_power_of_2(bc + 2)))
    if B == 0 or not (need_dx or need_dw):
        return (fwd,)
    n_blocks = triton.cdiv(B, bb_b)
    per_group = max(1, n_blocks // groups)
    bwd = Launch("_small_head_bwd_kernel", (triton.cdiv(n_blocks, per_group), triton.cdiv(D, bk_b)), warps, 2,
                 dict(BLOCK_B=bb_b, BLOCK_K=bk_b, BLOCK_C=bc))
    return fwd, bwd


def launch(launches: Tuple[Launch, ...], kernel: str) -> Optional[Launch]:
    """The launch of `kernel` in a plan, or None."""
    for item in launches:
        if item.kernel == kernel:
            return item
    return None


def constexprs(item: Launch) -> Dict[str, object]:
    """The launch's constexpr meta (UPPER-case keys) and its warps and stages, as launch keyword arguments."""
    out = {k: v for k, v in item.meta.items() if k.isupper()}
    out.update(num_warps=item.num_warps, num_stages=item.num_stages)
    return out
