"""The launches of one fused training step (forward + backward), read from the launch plan without a GPU.

Shared by `python -m deepfense bench --plan` (deepfense/benchmark/roofline.py) and bench/compile_check.py, so the
roofline and the register check look at exactly the kernels, tiles, warps and stages the launchers use.

A training step here is: reduction='mean', no class weights, CrossEntropy with its bias, every input requiring grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from ..kernels import plan as _plan
from ..params import Margin

# loss name (as in deepfense.benchmark.cases.LOSSES) -> the kernels' MARGIN
MARGINS = {"AMSoftmax": Margin.ADDITIVE, "ASoftmax": Margin.ANGULAR, "OCSoftmax": Margin.ONE_CLASS,
           "CrossEntropy": Margin.NONE, "ArcFace": Margin.COMBINED}
H200_SMS = 132


@dataclass(frozen=True)
class Step:
    """One training step's shape. dtype: 'bf16', 'fp16' or 'fp32' (x and W alike); bias: CrossEntropy's fc.bias
    (the module has one; the benchmark's cases do not)."""

    loss: str
    B: int
    D: int
    C: int
    dtype: str = "bf16"
    bias: bool = True

    @property
    def has_bias(self) -> bool:
        return self.loss == "CrossEntropy" and self.bias

    @property
    def label(self) -> str:
        return f"{self.loss} B={self.B} D={self.D} C={self.C} {self.dtype}"


def step_launches(step: Step, sm_count: int = H200_SMS) -> List[_plan.Launch]:
    """Every launch of `step` on a GPU with `sm_count` multiprocessors, in order, from `deepfense.kernels.plan.plan`
    (large heads: fwd, [combine], dX, [dW]; C <= SMALL_C: the small-head forward and backward)."""
    return list(_plan.plan(**_plan_args(step, sm_count)))


def _plan_args(step: Step, sm_count: int) -> dict:
    """`deepfense.kernels.plan.plan`'s arguments for `step` on a GPU (its GPU tiles, even under the interpreter)."""
    import torch
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[step.dtype]
    return dict(margin=MARGINS[step.loss], B=step.B, D=step.D, C=1 if step.loss == "OCSoftmax" else step.C,
                x_dtype=dt, w_dtype=dt, n_sm=sm_count, need_dx=True, need_dw=True, uniform_grad=True, gpu=True)


# Representative training steps: deepfake, speaker and face heads, and a large head at D = 1024 (where fp32
# splits the feature chunk in halves), each loss (ArcFace: CombinedMargin's kernels), bf16 and fp32.
def representative_steps(dtypes=("bf16", "fp32")) -> List[Step]:
    shapes = {"deepfake": (65536, 1024, 2), "speaker": (256, 192, 5994), "face": (1024, 512, 1_000_000),
              "wide": (1024, 1024, 8192)}
    out = []
    for dtype in dtypes:
        for family, (B, D, C) in shapes.items():
            for loss in MARGINS:
                if loss == "OCSoftmax" and family != "deepfake":
                    continue  # one centre: the class count does not change its launches
                out.append(Step(loss, B, D, C, dtype))
    return out
