"""Compile the sub-centre kernel variants (SUB = K > 1) of the speaker and face heads for an NVIDIA GPU without a GPU,
and read registers and spills as `bench/compile_check.py` does (its readers; its representative steps have K = 1).

    python3 bench/compile_check_subcenters.py [--arch 90] [--k 2,3,4] [--dtypes bf16,fp32] [--only bwd_dx]

Exit status 1 when a variant spills, 2 when one fails to compile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import compile_check as cc  # noqa: E402
from deepfense.benchmark.launches import H200_SMS, Step  # noqa: E402
from deepfense.kernels import margin_ce, plan as P  # noqa: E402
from deepfense.params import Margin  # noqa: E402

SHAPES = {"speaker": (256, 192, 5994), "face": (1024, 512, 1_000_000)}  # B, D, classes (the weight has classes * K)
LOSSES = {"AMSoftmax": Margin.ADDITIVE, "ArcFace": Margin.COMBINED}
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--k", default="3", help="comma list of sub-centre counts K > 1")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma list of input dtypes (bf16, fp16, fp32)")
    ap.add_argument("--only", default="", help="substring filter on the variant labels")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    broken = spilled = 0
    print(f"{'':5s} {'variant':44s} {'regs':>4s} {'spill st/ld B':>13s} {'stack':>6s} {'STL/LDL':>9s}")
    for dtype in args.dtypes.split(","):
        for family, (B, D, C) in SHAPES.items():
            for loss, margin in LOSSES.items():
                for k in (int(v) for v in args.k.split(",")):
                    step = Step("AMSoftmax", B, D, C, dtype)  # its step defaults; MARGIN and SUB set below
                    for launch in P.plan(margin, B, D, C, TORCH[dtype], TORCH[dtype], n_sm=H200_SMS, gpu=True, sub=k):
                        short = launch.kernel.replace("_margin_ce_", "").replace("_kernel", "")
                        label = f"{short}-{loss}-{family}-{dtype}-K{k}-{launch.num_warps}w"
                        if short == "combine" or args.only not in label:
                            continue  # the combine kernel has no sub-centre code
                        kernel = getattr(margin_ce, launch.kernel)
                        const = dict(cc._constexprs(launch.meta, kernel, step), MARGIN=int(margin), SUB=k)
                        values = dict(cc._arg_values(step), stride_w_d=C * k, stride_dw_d=C * k)
                        t0 = time.perf_counter()
                        try:
                            sig, attrs, const2 = cc._signature(kernel, const, dtype, values)
                            _, u = cc.compile_and_read(ASTSource(fn=kernel, signature=sig, constexprs=const2,
                                                                 attrs=attrs), target,
                                                       {"num_warps": launch.num_warps,
                                                        "num_stages": launch.num_stages})
                        except Exception as exc:  # report every variant, then fail
                            broken += 1
                            print(f"FAIL  {label:44s} {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
                            continue
                        spilled += u.spills
                        status = "SPILL" if u.spills else "ok*" if u.stack else "ok"
                        print(f"{status:5s} {label:44s} {u.regs:4d} {u.spill_stores:6d}/{u.spill_loads:<6d} "
                              f"{u.stack:6d} {u.stl:4d}/{u.ldl:<4d} {time.perf_counter() - t0:5.1f}s", flush=True)
    print(f"{broken} failed to compile, {spilled} spilled")
    return 2 if broken else 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
