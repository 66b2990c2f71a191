"""Work budgets of a training step on the GPU launch plan (DEEPFENSE_TILES=gpu, DEEPFENSE_SM_COUNT=132: an H200's
plan, run in the interpreter and counted by tests/work_counter.py), and plan-only parallelism at full size.

Large heads (C > SMALL_C): at most 3 launches plus a combine where the classes are split; executed tl.dot work at most
5 GEMM-equivalents (B x D x C multiply-adds) for D <= 512 and 6 for D = 1024. The shapes are multiples of the tiles,
so padding adds nothing and the budgets are exact; `count_step` on unaligned shapes reports the padding on top.
"""

import pytest
import torch

from backend_cases import DEVICE, assert_close_to_gold, make_case, options
from deepfense.kernels import plan as P
from deepfense.params import Margin

if DEVICE == "cuda":
    pytest.skip("the work counter instruments the Triton interpreter", allow_module_level=True)

N_SM = 132
COMBINE = "_margin_ce_combine_kernel"


@pytest.fixture
def h200_plan(monkeypatch):
    monkeypatch.setenv("DEEPFENSE_TILES", "gpu")
    monkeypatch.setenv("DEEPFENSE_SM_COUNT", str(N_SM))


@pytest.mark.parametrize("loss,B,D,C,budget", [
    ("am", 64, 128, 1024, 5.0),  # D <= 512: forward 1, dX 2 (recompute once over the whole D + accumulate), dW 2
    ("ce", 64, 128, 1024, 5.0),
    ("arc", 64, 128, 1024, 5.0),  # ArcFace: the margin maths is per row, the budgets are the same
    ("am", 64, 192, 1024, 5.0),  # D = 192 = 128 + 64: a main and a tail accumulator, no padding to 256
    ("a", 64, 1024, 128, 6.0),  # D = 1024: the feature chunk still holds all of D (BLOCK_B = 16 keeps it small)
])
def test_large_head_launches_and_dot_work(h200_plan, loss, B, D, C, budget):
    from work_counter import count_step
    wc, s = count_step(loss, B, D, C)
    kernels = [k for k, _ in s["grids"]]
    assert len([k for k in kernels if k != COMBINE]) <= 3, s["grids"]
    assert kernels.count(COMBINE) <= 1
    assert s["gemm"] <= budget + 1e-9, (s["gemm"], wc.table())
    assert s["gemm"] >= 3.0, s  # forward, dX and dW each do at least one GEMM: a counter reading 0 fails here
    margin = {"am": Margin.ADDITIVE, "a": Margin.ANGULAR, "arc": Margin.COMBINED}.get(loss, Margin.NONE)
    planned = P.plan(margin, B, D, C, torch.float32, torch.float32, n_sm=N_SM, gpu=True)
    assert s["grids"] == [(item.kernel, item.grid) for item in planned]  # the launchers ran exactly the plan


@pytest.mark.parametrize("loss", ["am", "a", "ce", "arc"])
def test_gpu_plan_matches_reference(h200_plan, loss):
    """The GPU plan's code paths (whole-D feature chunks with masked tails, class-split forward and dX, row-split
    dW) on an unaligned shape, against the float64 reference."""
    case = make_case(loss, 70, 40, 150, torch.float32, seed=3, class_weights=True, ignore_some=True)
    # CrossEntropy's linear logits reach ~30 here (row losses up to 84 with the class weights): fp32's rounding of
    # the logits alone moves dX by ~1e-5 relative, a floor torch's elementwise error does not show everywhere (on
    # an AMD EPYC 2 of 2800 dX elements passed 1e-5 (1 + |g|) by up to 6e-6; the kernels' worst relative error is
    # 2.1x torch's); the margin losses' cosines are bounded
    assert_close_to_gold(loss, case, "triton", options(loss, reduction="none", smoothing=0.1), torch.float32,
                         atol_scale=2.0 if loss == "ce" else 1.0)


def test_gpu_plan_fp32_halves_a_wide_feature_chunk(h200_plan):
    """fp32 with D >= 512 accumulates the whole D as two halves (main + tail, so tf32x3 fits the registers without
    spills): against the float64 reference."""
    launches = P.plan(Margin.ANGULAR, 20, 512, 40, torch.float32, torch.float32, n_sm=N_SM, gpu=True)
    backward = [item.meta for item in launches if "bwd" in item.kernel]
    assert backward and all(m["HAS_TAIL"] and m["BLOCK_DO"] == m["BLOCK_DT"] == 256 for m in backward), backward
    case = make_case("a", 20, 512, 40, torch.float32, seed=5, class_weights=True, ignore_some=True)
    assert_close_to_gold("a", case, "triton", options("a", reduction="none", smoothing=0.1), torch.float32)


def test_gpu_plan_fp32_chunks_dx_of_a_wide_d(h200_plan):
    """fp32 at D = 1024: dX takes two 512-wide feature chunks of 256 + 256 (main and tail accumulators) instead of two
    512-wide halves in one program (they spill 240-980 B on sm_90, tf32x3 and IEEE); dW keeps the halves. Against the
    float64 reference."""
    launches = P.plan(Margin.ADDITIVE, 8, 1024, 70, torch.float32, torch.float32, n_sm=N_SM, gpu=True)
    dx, dw = (next(item for item in launches if item.kernel == k) for k in ("_margin_ce_bwd_dx_kernel",
                                                                            "_margin_ce_bwd_dw_kernel"))
    assert dx.grid[0] == 2 and dx.meta["HAS_TAIL"] and dx.meta["BLOCK_DO"] == dx.meta["BLOCK_DT"] == 256, dx
    assert dw.grid[0] == 1 and dw.meta["HAS_TAIL"] and dw.meta["BLOCK_DO"] == dw.meta["BLOCK_DT"] == 512, dw
    case = make_case("am", 8, 1024, 70, torch.float32, seed=6, ignore_some=True)  # two class tiles: no fusion
    assert_close_to_gold("am", case, "triton", options("am", reduction="none", smoothing=0.1), torch.float32)


@pytest.mark.parametrize("margin,B,D,C", [
    (Margin.ADDITIVE, 256, 192, 5994),  # a speaker head
    (Margin.NONE, 1024, 512, 10 ** 6),  # a face head
    (Margin.ADDITIVE, 65536, 1024, 2),  # a deepfake head at a large batch (the small-head path)
    (Margin.ONE_CLASS, 65536, 1024, 1),
    (Margin.NONE, 256, 512, 8192),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_every_heavy_launch_fills_the_gpu(margin, B, D, C, dtype):
    """Every launch doing O(B x D) work or more has at least 2 x SM-count programs (the combine of class-split
    statistics does O(B x splits) and is exempt). Read from the plan alone: no run needed."""
    launches = P.plan(margin, B, D, C, dtype, dtype, n_sm=N_SM, gpu=True)
    assert launches
    for item in launches:
        if item.kernel != COMBINE:
            assert item.programs >= 2 * N_SM, (item.kernel, item.grid)
