"""Counted work per launch of a training step, and the roofline time it implies on an H200.

`python -m deepfense bench --plan` prints, for each launch of the plan (deepfense/benchmark/launches.py): kernel,
grid, programs, warps, the `tl.dot` FLOPs it executes (tile padding included; the small-head kernels' broadcast
products on the FMA units), the bytes it loads and stores (masked elements excluded; every load counted, so a tile
re-read from L2 counts again), all from deepfense/benchmark/work.py, and the roofline time
max(dot FLOPs / (peak FLOP/s x min(1, programs / SMs)), unique bytes / HBM bandwidth), where the unique bytes read
each input element and write each output element once. That time is a bound from counts, not a measurement: it
assumes the dots run at the tensor cores' (for IEEE fp32, the FMA units') peak on every SM that has a program, and
the unique bytes stream at full HBM bandwidth; it ignores latency, occupancy and launch overhead (a few µs each).
The table also gives the time if every issued load came from HBM (no L2 reuse). On CUDA, `bench` adds measured
per-kernel times and the achieved rates (`roofline_lines`).

H200 SXM figures (dense, no sparsity): HBM3e 4.8 TB/s (NVIDIA H200 product page); tensor-core bf16/fp16 989.4,
tf32 494.7 TFLOP/s and FP32 (FFMA) 66.9 TFLOP/s, the H100 SXM5 numbers from NVIDIA's Hopper architecture whitepaper
(the H200 has the same GH100 compute at the same clocks). tf32x3 runs three tf32 dots per fp32 dot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from .launches import Step, step_launches
from .work import ITEM, SMALL_KERNELS, Work, launch_work, partial_sum_bytes

H200 = {"name": "H200 SXM", "hbm_Bps": 4.8e12, "bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12,
        "fp32": 66.9e12}


def dot_peak(dtype: str, precision: str, device=H200, kernel: str = "") -> float:
    """Dot FLOP/s the kernel's dots can reach: tensor cores for 16-bit and tf32, a third of tf32 for tf32x3 (three
    dots per dot), the FMA units for IEEE fp32 and for the small-head kernels (fp32 broadcast products, no tl.dot)."""
    if kernel in SMALL_KERNELS:
        return device["fp32"]
    if dtype in ("bf16", "fp16"):
        return device[dtype]
    return {"ieee": device["fp32"], "tf32": device["tf32"], "tf32x3": device["tf32"] / 3}[precision]


@dataclass
class Line:
    """A launch, its work, the roofline bound (dots at peak, the unique bytes at HBM bandwidth), what limits it, and
    the time if every issued byte came from HBM (re-reads that hit L2 make the truth lower)."""

    launch: object
    work: Optional[Work]  # None: no work model for the kernel
    predicted_s: float
    bound: str
    all_hbm_s: float


def plan_lines(step: Step, sm_count: int = 132, device=H200) -> List[Line]:
    """Each launch of `step` with its counted work and roofline-predicted time on `device`."""
    out = []
    plan = step_launches(step, sm_count)
    for launch in plan:
        try:
            w = launch_work(launch, step, plan)
        except KeyError:  # a kernel this module has no work model for: listed, not guessed
            out.append(Line(launch, None, float("nan"), "no work model", float("nan")))
            continue
        # a program runs on one SM: fewer programs than SMs leave the other SMs' tensor cores idle
        peak = dot_peak(step.dtype, _precision(launch, step), device, launch.kernel)
        t_dot = w.dot_flops / (peak * min(1.0, launch.programs / sm_count))
        t_mem = w.unique_bytes / device["hbm_Bps"]
        out.append(Line(launch, w, max(t_dot, t_mem), "compute" if t_dot > t_mem else "memory",
                        max(t_dot, w.bytes / device["hbm_Bps"])))
    return out


def format_plan(step: Step, sm_count: int = 132, device=H200) -> str:
    """The `bench --plan` table for one step."""
    lines = plan_lines(step, sm_count, device)
    head = (f"{step.label}: launch plan for {sm_count} SMs; counted work per launch and the {device['name']} roofline "
            f"time it implies (a bound from counts, not a measurement)")
    rows = [head, "| kernel | grid | programs | warps | stages | dot GFLOP | MB loaded | MB stored | MB unique | "
                  "bound by | roofline µs | µs, all loads from HBM |", "|---" * 12 + "|"]
    for ln in lines:
        k, w = ln.launch, ln.work
        if w is None:
            rows.append(f"| {k.kernel} | {tuple(k.grid)} | {k.programs} | {k.num_warps} | {k.num_stages} | "
                        + " | ".join(["?"] * 4) + " | no work model | ? | ? |")
            continue
        rows.append(f"| {k.kernel} | {tuple(k.grid)} | {k.programs} | {k.num_warps} | {k.num_stages} | "
                    f"{w.dot_flops / 1e9:.3g} | {w.bytes_read / 1e6:.4g} | {w.bytes_written / 1e6:.4g} | "
                    f"{w.unique_bytes / 1e6:.4g} | {ln.bound} | {ln.predicted_s * 1e6:.3g} | "
                    f"{ln.all_hbm_s * 1e6:.3g} |")
    total = sum(ln.predicted_s for ln in lines)
    worst = sum(ln.all_hbm_s for ln in lines)
    minimal = _minimal_bytes(step) / device["hbm_Bps"]
    rows.append(f"total: roofline {total * 1e6:.3g} µs ({worst * 1e6:.3g} µs if every load came from HBM); the "
                f"step's memory floor (read x and W, write dX and dW once) {minimal * 1e6:.3g} µs")
    post = partial_sum_bytes(step, step_launches(step, sm_count))
    if post:
        rows.append(f"after the kernels, torch sums the split partials: about {post / 1e6:.4g} MB, "
                    f"{post / device['hbm_Bps'] * 1e6:.3g} µs at HBM bandwidth (not in the total above)")
    return "\n".join(rows)


def _precision(launch, step: Step) -> str:
    """The dots' input_precision: the launch's, else the launchers' fp32 choice (plan.FP32_PRECISION) for fp32."""
    if "PRECISION" in launch.meta:
        return launch.meta["PRECISION"]
    if step.dtype != "fp32":
        return "ieee"  # unused: 16-bit dots run on the tensor cores
    from ..kernels import plan
    return plan.FP32_PRECISION


def _minimal_bytes(step: Step) -> int:
    C = 1 if step.loss == "OCSoftmax" else step.C
    return 2 * (step.B * step.D + step.D * C) * ITEM[step.dtype] + 8 * step.B


def roofline_lines(step: Step, kernel_s: Optional[Dict[str, float]], sm_count: int = 132,
                   device=H200) -> List[str]:
    """One line per launch: achieved TB/s and TFLOP/s and the % of `device`'s peaks, from `kernel_s` (measured
    seconds per training step of each kernel, `kernel_times`). A launch with no measurement is labelled unmeasured."""
    out = []
    for ln in plan_lines(step, sm_count, device):
        k = ln.launch
        t = (kernel_s or {}).get(k.kernel)
        head = f"roofline {step.label} {k.kernel} {tuple(k.grid)}: predicted {ln.predicted_s * 1e6:.3g} µs"
        if ln.work is None:
            out.append(f"{head}, no work model for this kernel")
            continue
        if not t:
            out.append(f"{head}, unmeasured")
            continue
        tbps, tflops = ln.work.bytes / t / 1e12, ln.work.dot_flops / t / 1e12
        peak = dot_peak(step.dtype, _precision(k, step), device, k.kernel)
        out.append(f"{head}, measured {t * 1e6:.3g} µs: {tbps:.3g} TB/s = {tbps * 1e12 / device['hbm_Bps']:.1%} of "
                   f"HBM, {tflops:.3g} TFLOP/s = {tflops * 1e12 / peak:.1%} of the dot peak")
    return out


def kernel_times(averages, steps: int) -> Dict[str, float]:
    """Seconds per step of each Triton kernel, from a torch.profiler `key_averages()` over `steps` steps."""
    out = {}
    for avg in averages:
        us = getattr(avg, "self_device_time_total", None)
        if us is None:
            us = getattr(avg, "self_cuda_time_total", 0)
        if avg.key.endswith("_kernel") and us:
            out[avg.key] = out.get(avg.key, 0.0) + us * 1e-6 / steps
    return out


def measure_kernels(case, device: str = "cuda", steps: int = 5) -> Dict[str, float]:
    """Profile `steps` fused training steps of `case` (deepfense provider) on CUDA; `kernel_times` of them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .cases import make_inputs
    from .providers import REGISTRY
    fn = REGISTRY["deepfense"].build(case)
    (x, w, t), = make_inputs(case, device)
    for _ in range(2):  # compile and warm up outside the profile
        x.grad = w.grad = None
        fn(x, w, t).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            x.grad = w.grad = None
            fn(x, w, t).backward()
        torch.cuda.synchronize()
    return kernel_times(prof.key_averages(), steps)


def step_of(case) -> Step:
    return Step(case.loss, case.B, case.D, case.C, case.dtype, bias=False)  # the benchmark passes no bias
