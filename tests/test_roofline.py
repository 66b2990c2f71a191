"""`bench --plan` and the roofline (deepfense/benchmark/roofline.py): the work it computes from a launch's tiles and
grid equals what the kernels do in the Triton interpreter, counted as they run; and the CUDA-only roofline lines'
arithmetic, from a fake profile.

The interpreter runs the GPU tile plan (64-row, 64-class, 64-feature tiles, 128-wide feature slices) on shapes
chosen so that every loop runs more than once and ends ragged: B = 70 (two row blocks, the second 6 rows),
D = 160 (three K steps, two feature slices), C = 150 (three class tiles)."""

import os

import numpy as np
import pytest
import torch

from deepfense.benchmark import cli
from deepfense.benchmark.launches import Step, step_launches
from deepfense.benchmark.roofline import kernel_times, launch_work, roofline_lines
from deepfense.kernels.plan import Launch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts in the Triton interpreter")


@pytest.fixture
def counted(monkeypatch):
    """Run the launchers with GPU tiles in the interpreter, recording each launch and what it executes: tl.dot
    FLOPs (2 M N K, padding included) and bytes loaded / stored (masked-off elements excluded)."""
    from triton.runtime import interpreter as I

    from deepfense.kernels import ops
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        rec = {"kernel": self.fn.__name__, "grid": tuple(grid) + (1,) * (3 - len(grid)), "meta": kwargs,
               "flops": 0, "read": 0, "written": 0}
        launches.append(rec)
        return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def dot(self, a, b, d, *rest):
        launches[-1]["flops"] += 2 * a.data.shape[0] * a.data.shape[1] * b.data.shape[1]
        return orig_dot(self, a, b, d, *rest)

    def load(self, ptrs, mask, other, *rest):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        launches[-1]["read"] += int(np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape))) * size
        return orig_load(self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        launches[-1]["written"] += int(np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape))) * size
        return orig_store(self, ptrs, value, mask, *rest)

    orig_run, orig_dot = I.InterpretedFunction.run, I.InterpreterBuilder.create_dot
    orig_load, orig_store = I.InterpreterBuilder.create_masked_load, I.InterpreterBuilder.create_masked_store
    monkeypatch.setattr(I.InterpretedFunction, "run", run)
    monkeypatch.setattr(I.InterpreterBuilder, "create_dot", dot)
    monkeypatch.setattr(I.InterpreterBuilder, "create_masked_load", load)
    monkeypatch.setattr(I.InterpreterBuilder, "create_masked_store", store)
    monkeypatch.setenv("DEEPFENSE_TILES", "gpu")  # the launch plan's switch to the GPU tiles in the interpreter
    monkeypatch.setenv("DEEPFENSE_SM_COUNT", "132")
    if hasattr(ops, "_blocks"):  # launchers from before the launch plan pick their tiles in ops._blocks
        interp_blocks = ops._blocks

        def gpu_blocks(D, C, margin):  # the launchers' GPU tiles (their interpreter switch off for this call)
            monkeypatch.setattr(ops, "INTERPRET", False)
            try:
                return interp_blocks(D, C, margin)
            finally:
                monkeypatch.setattr(ops, "INTERPRET", True)

        monkeypatch.setattr(ops, "_blocks", gpu_blocks)
    return launches


def _train_step(loss, B, D, C):
    """fwd + bwd of the benchmark's case (fp32, no bias) through the fused kernels."""
    from deepfense.benchmark.cases import LOSSES, Case, make_inputs
    (x, w, t), = make_inputs(Case(loss, B, D, 1 if loss == "OCSoftmax" else C, "fp32"), "cpu")
    spec = LOSSES[loss]
    spec.functional(x, w, t, backend="triton", **spec.options).backward()  # w in the functional API's layout


# every loss with the plan's class splits (one here); AMSoftmax also with two forced splits (the combine kernel and
# the split dX partials)
@pytest.mark.parametrize("loss,splits", [("AMSoftmax", None), ("ASoftmax", None), ("OCSoftmax", None),
                                         ("CrossEntropy", None), ("AMSoftmax", 2)])
def test_counted_work_matches_the_kernels(counted, loss, splits, monkeypatch):
    from deepfense.kernels import ops, plan
    if hasattr(plan, "plan"):
        pytest.skip("the roofline's work model predates the launch plan's redesigned kernels (kernels.plan.plan)")
    monkeypatch.setattr(ops, "FORCE_SPLITS", splits)
    B, D, C = 70, 160, 150
    _train_step(loss, B, D, C)
    step = Step(loss, B, D, C, "fp32", bias=False)
    assert counted, "no launch recorded"
    if splits is None:  # the plan's launches are the launchers' (kernels and grids)
        planned = [(l.kernel, tuple(l.grid) + (1,) * (3 - len(l.grid))) for l in step_launches(step)]
        assert planned == [(r["kernel"], r["grid"]) for r in counted]
    fwd_splits = next(r for r in counted if r["kernel"] == "_margin_ce_fwd_kernel")["grid"][1]
    for rec in counted:
        # the combine's work depends on the forward's split count, which its own launch does not carry
        meta = dict(rec["meta"], SPLITS=fwd_splits) if rec["kernel"] == "_margin_ce_combine_kernel" else rec["meta"]
        work = launch_work(Launch(rec["kernel"], rec["grid"], meta=meta), step)
        got = (rec["flops"], rec["read"], rec["written"])
        assert (work.dot_flops, work.bytes_read, work.bytes_written) == got, (rec["kernel"], rec["grid"])
        assert work.unique_bytes <= work.bytes


class _Avg:
    def __init__(self, key, us):
        self.key, self.self_device_time_total = key, us


def test_roofline_lines_from_a_fake_profile():
    # GPU-only path exercised with made-up kernel times (not a measurement): 2 steps profiled
    step = Step("AMSoftmax", 256, 192, 5994, "bf16")
    try:
        work = launch_work(step_launches(step)[0], step)
    except KeyError as exc:
        pytest.skip(f"{exc}: the roofline's work model predates the launch plan's kernels")
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
    assert "not a measurement" in out and "roofline" in out
