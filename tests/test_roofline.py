"""`bench --plan` and the roofline (deepfense/benchmark/roofline.py, work.py): the work it computes from a launch's grid
and meta equals, exactly, what the kernels do in the Triton interpreter as tests/work_counter.py counts it (executed
multiply-adds incl. padding, bytes loaded and stored), on the GPU launch plan (DEEPFENSE_TILES=gpu,
DEEPFENSE_SM_COUNT=132: an H200's); and the CUDA-only roofline lines' arithmetic, from a fake profile.

Shapes are small but make every loop run more than once and end ragged: B = 70 (two 64-row blocks, the second 6
rows), C = 150 (three 64-class tiles, split three ways in the forward and dX, rows split in dW), D = 192 (one
128-wide main chunk plus a 64-wide tail in the backward, three K steps) or 160 / 40 (ragged K steps)."""

import os

import pytest
import torch

from deepfense.benchmark import cli
from deepfense.benchmark.launches import Step, step_launches
from deepfense.benchmark.roofline import kernel_times, roofline_lines
from deepfense.benchmark.work import launch_work
from deepfense.kernels import plan as P

LOSS = {"am": "AMSoftmax", "a": "ASoftmax", "oc": "OCSoftmax", "ce": "CrossEntropy"}
DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@pytest.fixture
def h200_plan(monkeypatch):
    monkeypatch.setenv("DEEPFENSE_TILES", "gpu")
    monkeypatch.setenv("DEEPFENSE_SM_COUNT", "132")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts in the Triton interpreter")
@pytest.mark.parametrize("loss,B,D,C,dtype,splits", [
    ("am", 70, 192, 150, torch.float32, None),  # class splits, the combine, dX/dW with a tail accumulator
    ("a", 70, 192, 150, torch.float32, None),  # lambda loaded per program
    ("ce", 70, 160, 150, torch.float32, None),  # with a bias; ragged K, no tail (160 = 128 + 32)
    ("ce", 70, 192, 150, torch.bfloat16, None),  # 16-bit x, W, dX and dW
    ("am", 70, 192, 150, torch.float32, 1),  # forced: no splits, no combine, dX / dW stored in x's / w's dtype
    ("am", 70, 128, 40, torch.float32, None),  # one class tile: dW partials fused into the forward
    ("oc", 70, 40, 1, torch.float32, None),  # the small-head path: one centre
    ("am", 70, 40, 2, torch.bfloat16, None),  # the deepfake head
    ("ce", 70, 40, 3, torch.float32, None),  # small head with a bias, no x coefficient
    ("a", 70, 40, 5, torch.float32, None),
    ("ce", 70, 40, 8, torch.bfloat16, None),  # 8 classes: the 16-warp tiles (a 512-row forward block)
], ids=str)
def test_counted_work_matches_the_kernels(h200_plan, monkeypatch, loss, B, D, C, dtype, splits):
    from backend_cases import FUNCS, make_case, options
    from work_counter import WorkCounter
    monkeypatch.setattr(P, "FORCE_SPLITS", splits)
    case = make_case(loss, B, D, C, dtype, seed=0)
    x, w = case["x"].requires_grad_(), case["w"].requires_grad_()
    bias = dict(bias=case["bias"].requires_grad_()) if loss == "ce" else {}
    with WorkCounter() as wc:
        FUNCS[loss](x, w, case["t"], backend="triton", **bias, **options(loss)).backward()
    step = Step(LOSS[loss], B, D, C, DTYPE[dtype], bias=loss == "ce")
    plan = step_launches(step)
    assert wc.grids() == [(item.kernel, item.grid) for item in plan]  # the launchers ran exactly this plan
    for item, rec in zip(plan, wc.launches):
        work = launch_work(item, step, plan)
        got = (rec.macs, sum(rec.loaded.values()), sum(rec.stored.values()))
        assert (work.macs, work.bytes_read, work.bytes_written) == got, (item.kernel, rec.loaded, rec.stored)
        assert 0 < work.unique_bytes <= work.bytes
    assert sum(launch_work(item, step, plan).macs for item in plan) >= 2 * B * D * C  # a counter reading 0 fails


class _Avg:
    def __init__(self, key, us):
        self.key, self.self_device_time_total = key, us


def test_roofline_lines_from_a_fake_profile():
    # GPU-only path exercised with made-up kernel times (not a measurement): 2 steps profiled
    step = Step("AMSoftmax", 256, 192, 5994, "bf16")
    plan = step_launches(step)
    work = launch_work(plan[0], step, plan)
    avgs = [_Avg("_margin_ce_fwd_kernel", 40.0), _Avg("_margin_ce_bwd_dx_kernel", 60.0), _Avg("aten::mm", 99.0)]
    times = kernel_times(avgs, steps=2)
    assert times == pytest.approx({"_margin_ce_fwd_kernel": 20e-6, "_margin_ce_bwd_dx_kernel": 30e-6})
    lines = roofline_lines(step, {"_margin_ce_fwd_kernel": 20e-6, "_margin_ce_bwd_dx_kernel": 30e-6})
    fwd = next(ln for ln in lines if "_margin_ce_fwd_kernel" in ln)
    assert f"{work.bytes / 20e-6 / 1e12:.3g} TB/s" in fwd
    assert f"{work.dot_flops / 20e-6 / 989.4e12:.1%} of the dot peak" in fwd
    assert any("_margin_ce_bwd_dw_kernel" in ln and ln.endswith("unmeasured") for ln in lines)


def test_bench_plan_prints_every_launch(capsys):
    assert cli.main(["bench", "--plan", "--losses", "AMSoftmax", "--B", "256", "--D", "192", "--C", "5994",
                     "--dtypes", "bf16"]) == 0
    out = capsys.readouterr().out
    for kernel in ("_margin_ce_fwd_kernel", "_margin_ce_bwd_dx_kernel", "_margin_ce_bwd_dw_kernel"):
        assert f"| {kernel} |" in out
    assert "not a measurement" in out and "roofline" in out and "no work model" not in out
    assert "torch sums the split partials: about 48.89 MB" in out  # 94 dX splits + 4 dW splits (see work.py)


@pytest.mark.parametrize("loss,B,D,C", [("AMSoftmax", 65536, 1024, 2), ("OCSoftmax", 65536, 1024, 1),
                                        ("AMSoftmax", 256, 192, 5994), ("CrossEntropy", 1024, 512, 10 ** 6)])
def test_every_planned_launch_has_a_work_model(loss, B, D, C):
    """The issue's shapes, planned for an H200: every launch is modelled (no '?' rows) and the step does at least
    its useful multiply-adds (3 B D C: forward, dX, dW)."""
    step = Step(loss, B, D, C, "bf16")
    plan = step_launches(step)
    macs = sum(launch_work(item, step, plan).macs for item in plan)
    assert macs >= 3 * B * D * C
