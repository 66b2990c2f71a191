"""Compile every fused-kernel variant for an NVIDIA GPU target without a GPU, and report registers and spills.

The Triton interpreter that runs the kernels in CI is lenient where the GPU compiler is not (tl.dot minimum sizes,
power-of-two blocks, dtype rules), so this lowers each variant through Triton's full NVIDIA pipeline to a cubin with
the ptxas that ships in the triton wheel (cuobjdump, also shipped, reads registers and spills from the cubin). Run: `python bench/compile_check.py [--arch 90]` (exit 1 on any failure);
tests/test_gpu_compile.py runs it in CI. Needs TRITON_INTERPRET unset (it re-execs itself without it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's functions cannot be compiled: start over without it
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepfense.kernels import margin_ce as K  # noqa: E402
from deepfense.kernels.ops import FP32_PRECISION  # noqa: E402
from deepfense.params import Margin  # noqa: E402

FLOATS = {"s", "m", "gamma", "m_real", "m_fake", "alpha", "eps"}
ACC_POINTERS = {"STATS_ptr", "PART_ptr", "DWP_ptr", "G_ptr", "BIAS_ptr", "CW_ptr", "LAM_ptr", "DB_ptr"}


def _signature(kernel, constexprs, x_ty, w_ty, dx_ty):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ("*fp32" if name in ACC_POINTERS else "*i64" if name == "T_ptr" else "*" + x_ty if
                         name == "X_ptr" else "*" + w_ty if name in ("W_ptr", "DW_ptr") else "*" + dx_ty)
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def variants():
    """(label, kernel, constexprs, x dtype, w dtype, dX dtype) for every code shape the launchers produce on a GPU."""
    out = []
    for margin in Margin:
        for dt in ("bf16", "fp32"):
            dot = {"bf16": tl.bfloat16, "fp32": tl.float32}[dt]
            block_c = 16 if margin == Margin.ONE_CLASS else 64
            meta = dict(MARGIN=int(margin), HAS_BIAS=margin == Margin.NONE, HAS_CW=True, DOT_DTYPE=dot,
                        ACC_DTYPE=tl.float32, PRECISION=FP32_PRECISION, BLOCK_B=64, BLOCK_K=64)
            tag = f"{margin.name.lower()}-{dt}"
            fused = dict(meta, BLOCK_C=16, SPLIT=False, FUSE_DX=True, FUSE_DW=True)
            out.append((f"fwd-fused-{tag}", K._margin_ce_fwd_kernel, fused, dt, dt, dt))
            if margin == Margin.ONE_CLASS:
                continue  # one class: always the fused single-tile forward
            for split in (False, True):
                fwd = dict(meta, BLOCK_C=block_c, SPLIT=split, FUSE_DX=False, FUSE_DW=False)
                out.append((f"fwd-{'split' if split else 'tiled'}-{tag}", K._margin_ce_fwd_kernel, fwd, dt, dt, dt))
            bwd = dict(meta, BLOCK_C=block_c, BLOCK_DO=128, HAS_TAIL=False, BLOCK_DT=16)
            out.append((f"bwd-dx-{tag}", K._margin_ce_bwd_dx_kernel, bwd, dt, dt, dt))
            out.append((f"bwd-dw-{tag}", K._margin_ce_bwd_dw_kernel, bwd, dt, dt, dt))
            combine = {k: meta[k] for k in ("MARGIN", "HAS_CW", "ACC_DTYPE", "BLOCK_B")}
            out.append((f"combine-{tag}", K._margin_ce_combine_kernel, combine, dt, dt, dt))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--only", default="", help="substring filter on the variant labels")
    ap.add_argument("--num-warps", type=int, default=4, help="warps per program (the launchers use Triton's 4)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    failures = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}, {args.num_warps} warps")
    for label, kernel, constexprs, x_ty, w_ty, dx_ty in variants():
        if args.only not in label:
            continue
        t0 = time.perf_counter()
        try:
            src = ASTSource(fn=kernel, signature=_signature(kernel, constexprs, x_ty, w_ty, dx_ty),
                            constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": args.num_warps, "num_stages": 3})
            usage = _resource_usage(cuobjdump, compiled.asm["cubin"])
            print(f"ok    {label:28s} {time.perf_counter() - t0:5.1f} s  {usage}", flush=True)
        except Exception as exc:  # report every variant, then fail
            failures += 1
            msg = str(exc).strip().splitlines()
            print(f"FAIL  {label:28s} {type(exc).__name__}: {' | '.join(msg[-3:])[:400]}", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


def _resource_usage(cuobjdump, cubin: bytes) -> str:
    """Registers, local memory (spills) and shared memory per thread block, read from the cubin (no driver needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        text = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", text) for key in ("REG", "LOCAL", "SHARED")}
    return ", ".join(f"{key.lower()} {m.group(1) if m else '?'}" for key, m in found.items())


if __name__ == "__main__":
    sys.exit(main())
