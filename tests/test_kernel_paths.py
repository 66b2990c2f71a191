"""Every launch path the GPU plan can choose, run on CPU: the launchers use an H200's plan (DEEPFENSE_TILES=gpu,
DEEPFENSE_SM_COUNT=132) in the Triton interpreter, each test records the kernels actually launched, asserts that they
are the path it is named for, and checks the loss and gradients against the float64 oracle (`assert_close_to_gold`).

Paths (deepfense/kernels/plan.py): the small head (C <= 16); the large head with the whole class dimension in one
forward tile (17 <= C <= 64), its dW summed in the forward by one program (B <= 64) or by several programs whose
partials are scaled afterwards (B > 64), with or without the fused dX (DEEPFENSE_FUSE_DX=1); class splits (C > 64)
with their combine launch and split dX / dW partials; sub-centres (never fused, one dW program per sub-centre).
"""

from __future__ import annotations

import pytest
import torch
from triton.runtime import interpreter as I

from backend_cases import DEVICE, assert_close_to_gold, make_case, options

if DEVICE == "cuda":
    pytest.skip("the launch recorder instruments the Triton interpreter", allow_module_level=True)

FWD, COMBINE = "_margin_ce_fwd_kernel", "_margin_ce_combine_kernel"
DX, DW = "_margin_ce_bwd_dx_kernel", "_margin_ce_bwd_dw_kernel"
SMALL_FWD, SMALL_BWD = "_small_head_fwd_kernel", "_small_head_bwd_kernel"


@pytest.fixture
def launched(monkeypatch):
    """The H200 plan, and the (kernel, grid) of every launch the interpreter runs while the test does."""
    monkeypatch.setenv("DEEPFENSE_TILES", "gpu")
    monkeypatch.setenv("DEEPFENSE_SM_COUNT", "132")
    seen = []
    real = I.GridExecutor.__call__

    def record(executor, *args, **kwargs):
        grid = executor.grid if not callable(executor.grid) else ()
        seen.append((executor.fn.__name__, tuple(int(g) for g in grid)))
        return real(executor, *args, **kwargs)

    monkeypatch.setattr(I.GridExecutor, "__call__", record)
    return seen


def _grids(seen, kernel):
    return [grid for name, grid in seen if name == kernel]


def _programs(grid):
    n = 1
    for g in grid:
        n *= g
    return n


def _check(loss, B, D, C, reduction, seen, seed=0, **case_kw):
    """Run the step through assert_close_to_gold (the fast run is the only one that launches kernels)."""
    case = make_case(loss, B, D, C, torch.float32, seed=seed, class_weights=True, ignore_some=True, **case_kw)
    opts = options(loss, reduction=reduction, smoothing=0.1)
    if case_kw.get("sub_centers", 1) > 1:
        opts["sub_centers"] = case_kw["sub_centers"]
    # CrossEntropy's linear logits are unbounded (see test_work_budgets.test_gpu_plan_matches_reference)
    assert_close_to_gold(loss, case, "triton", opts, torch.float32, atol_scale=2.0 if loss == "ce" else 1.0)
    return [name for name, _ in seen]


HEAVY = pytest.mark.exhaustive  # the same path again for another loss: CI runs it, the quick command does not


def _losses(*quick, heavy=("am", "a", "ce", "arc")):
    return [pytest.param(loss, marks=() if loss in quick else HEAVY) for loss in heavy]


# B = 600, D = 16: 128-row forward programs (C <= 4) and x large enough against the fp32 dW partials that the
# backward takes several row groups
@pytest.mark.parametrize("loss,C", [("am", 3), ("oc", 1), pytest.param("ce", 2, marks=HEAVY)])
def test_small_head(launched, loss, C):
    """C <= 16: two launches, several forward programs (one row per thread) and several backward row groups."""
    kernels = _check(loss, 600, 16, C, "mean", launched)
    assert set(kernels) == {SMALL_FWD, SMALL_BWD}, kernels
    assert _programs(_grids(launched, SMALL_FWD)[0]) > 1 and _programs(_grids(launched, SMALL_BWD)[0]) > 1, launched


@pytest.mark.parametrize("loss", _losses("am"))
def test_one_forward_program_sums_dw(launched, loss):
    """17 <= C <= 64, B <= 64: one forward program holds every row and writes dW itself; dX is its own launch."""
    kernels = _check(loss, 40, 40, 30, "mean", launched)
    assert kernels == [FWD, DX], kernels
    assert _grids(launched, FWD) == [(1, 1)], launched


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", _losses("am", "ce"))
def test_several_forward_programs_sum_dw_partials(launched, loss, reduction):
    """17 <= C <= 64, B > 64: each forward program writes a dW partial, summed and then scaled by the reduction."""
    kernels = _check(loss, 130, 40, 30, reduction, launched)
    assert kernels == [FWD, DX], kernels
    assert _grids(launched, FWD) == [(3, 1)], launched


@pytest.mark.parametrize("B", [40, 130], ids=["one-program", "several-programs"])
def test_fused_dx(launched, monkeypatch, B):
    """DEEPFENSE_FUSE_DX=1: the one-tile forward writes dX and dW; the step is that one launch."""
    monkeypatch.setenv("DEEPFENSE_FUSE_DX", "1")
    kernels = _check("am", B, 40, 30, "mean", launched)
    assert kernels == [FWD], kernels
    assert _grids(launched, FWD) == [(1 if B <= 64 else 3, 1)], launched


@pytest.mark.parametrize("loss", _losses("am"))
def test_class_splits(launched, loss):
    """C > 64 with two row blocks: the classes split over programs (the combine launch merges the forward's
    statistics; dX and dW sum their split partials); per-row upstream gradients, so nothing is fused."""
    kernels = _check(loss, 70, 40, 150, "none", launched)
    assert kernels == [FWD, COMBINE, DX, DW], kernels
    fwd, dx, dw = (_grids(launched, k)[0] for k in (FWD, DX, DW))
    assert fwd[0] == 2 and fwd[1] > 1 and dx[2] > 1 and dw[2] > 1, launched


@pytest.mark.parametrize("loss,K", [("am", 2), pytest.param("arc", 3, marks=HEAVY)])
def test_sub_centres(launched, loss, K):
    """Sub-centres: the large-head kernels even for C <= 16, no one-tile fusion, one dW class block per sub-centre."""
    kernels = _check(loss, 70, 40, 10, "mean", launched, sub_centers=K)
    assert kernels == [FWD, DX, DW], kernels
    assert _grids(launched, DW)[0][1] == K, launched


def _sharded_worker(rank, world, store, seen_path):
    """One rank of the class-parallel kernel cases (tests/test_distributed.py) under the H200 plan, recording the
    kernels this rank launches."""
    import test_distributed as TD
    from deepfense.kernels import plan as P
    assert P.gpu_tiles() and P.sm_count(None) == 132
    seen = []
    real = I.GridExecutor.__call__

    def record(executor, *args, **kwargs):
        seen.append(executor.fn.__name__)
        return real(executor, *args, **kwargs)

    I.GridExecutor.__call__ = record
    try:
        TD.dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            TD._kernel_cases(rank, world, "cpu")
        finally:
            TD.dist.destroy_process_group()
    finally:
        I.GridExecutor.__call__ = real
    with open(f"{seen_path}.{rank}", "w") as f:
        f.write("\n".join(seen))


@pytest.mark.exhaustive
def test_sharded(launched, tmp_path):
    """The class-parallel path (each rank's classes, statistics merged across 2 gloo ranks) on the kernels under the
    H200 plan: every rank's loss, dX rows and dW columns equal the single-process float64 reference (1e-6)."""
    import torch.multiprocessing as mp
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "seen")), nprocs=2, join=True)
    for rank in range(2):
        kernels = set((tmp_path / f"seen.{rank}").read_text().split())
        assert kernels == {FWD, DX, DW}, kernels  # partial statistics (one split per rank), then the backward
