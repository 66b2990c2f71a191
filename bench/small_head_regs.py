"""Registers, spills and stack of the small-head kernels compiled for sm_90 at their planned tiles and warps.

Each variant (loss x C x dtype, forward and backward) is compiled through Triton's NVIDIA pipeline as a launch of the
H200 plan at B = 65536, D = 1024 would be (contiguous x, pointers and strides specialised the same way), and ptxas's
own `-v` report of that compile is read. No GPU needed. A stopgap until bench/compile_check.py covers these kernels.
Run: `python bench/small_head_regs.py [label filter]`; exit 1 on any spill or on more than 128 registers (the limit
for 25% occupancy at 4 warps).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's functions cannot be compiled: start over without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepfense.kernels import small_head_kernels as K  # noqa: E402
from deepfense.kernels.small_head import plan_small  # noqa: E402
from deepfense.params import Margin  # noqa: E402

FLOATS = {"s", "m", "gamma", "m_real", "m_fake", "alpha", "eps"}
ACC_POINTERS = {"LOSS_ptr", "ROWW_ptr", "SAVED_ptr", "G_ptr", "PART_ptr", "BIAS_ptr", "CW_ptr", "LAM_ptr", "WS_ptr"}
NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _signature(kernel, constexprs, x_ty, values):
    sig, attrs, const = {}, {}, dict(constexprs)
    skip = {p.name for p in kernel.params if p.do_not_specialize}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        desc = ""
        if name.endswith("_ptr"):
            sig[name], desc = ("*i64" if name == "T_ptr" else "*fp32" if name in ACC_POINTERS else "*" + x_ty), "D"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in values and name not in skip:
            ty, desc = native_specialize_impl(BaseBackend, values[name], False, True, True)
            if ty == "constexpr":  # an argument equal to 1 becomes a constant, as at a launch
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name] = ty
        else:
            sig[name] = "i32"
        if desc == "D":
            attrs[(i,)] = BaseBackend.parse_attr("D")
    return sig, attrs, const


def usage(kernel, constexprs, x_ty, values, launch):
    """(registers, spill store bytes, spill load bytes, stack bytes) from ptxas -v of this compile."""
    sig, attrs, const = _signature(kernel, constexprs, x_ty, values)
    knobs = triton.knobs
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), int(stack.group(1))


def main(only: str = "") -> int:
    B, D, bad = 65536, 1024, 0
    print(f"triton {triton.__version__}, sm_90, B={B} D={D}, n_sm=132")
    for dtype in NAMES:
        for C in (1, 2, 3, 8, 16):
            for margin in Margin:
                label = f"{margin.name.lower()}-C{C}-{NAMES[dtype]}"
                if (margin == Margin.ONE_CLASS and C != 1) or only not in label:
                    continue
                ce = margin == Margin.NONE
                values = dict(B=B, D=D, C=C, stride_x_row=D, stride_x_col=1, stride_w_d=1 if ce else C,
                              stride_w_c=D if ce else 1, stride_g=0)
                fwd, bwd = plan_small(margin, B, D, C, dtype, dtype, n_sm=132)
                flags = (dict(MARGIN=int(margin), HAS_BIAS=ce, HAS_CW=True, REDUCED=True),  # reduction 'mean'
                         dict(HAS_XCOEF=not ce, REDUCED=True, HAS_BIAS=ce, NEED_DX=True, NEED_DW=True))
                for kernel, launch, flag in ((K._small_head_fwd_kernel, fwd, flags[0]),
                                             (K._small_head_bwd_kernel, bwd, flags[1])):
                    regs, st, ld, stack = usage(kernel, dict(flag, ACC_DTYPE=tl.float32, **launch.meta),
                                                NAMES[dtype], values, launch)
                    bad += st > 0 or ld > 0 or regs > 128
                    print(f"{launch.kernel[12:15]} {label:20s} grid {str(launch.grid):10s} warps {launch.num_warps} "
                          f"{launch.meta}: {regs} registers, spill {st}/{ld} bytes, stack {stack}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
