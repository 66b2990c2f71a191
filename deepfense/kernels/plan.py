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

# triton.jit reads TRITON_INTERPRET when the kernels are decorated; the plan follows the same switch.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
