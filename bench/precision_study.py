"""Which fp32 dot precision the fused kernels should use on CUDA: IEEE, tf32x3 or tf32, measured under the error rule.

Rule (tests/backend_cases.py): |fused - gold| <= 2 |torch fp32 - gold| + atol (1 + |gold|), elementwise, for the loss,
dX and dW (and d bias), gold = the float64 reference, on fresh random inputs (tests/backend_cases.make_case).
Reported: the worst ratio |fused - gold| / bound over all elements (<= 1 passes; the margin is how far below 1).

No GPU is needed, and none is used: the kernels run in the Triton interpreter, whose `tl.dot` ignores
`input_precision` (triton/runtime/interpreter.py `create_dot` is a plain numpy matmul). So this script replaces the
interpreter's dot by an emulation of the tensor-core arithmetic Triton generates for sm_90 (checked in the PTX):
  - tf32: wgmma `.tf32` reads fp32 registers and ignores their 13 low mantissa bits (no conversion is emitted), so each
    operand is truncated to 10 explicit mantissa bits; products are exact, accumulation in fp32;
  - tf32x3 (triton F32DotTC pass): big = cvt.rna.tf32(a) (round to nearest, ties away), small = a - big, then
    dot(a_small, b_big) + dot(a_big, b_small) + dot(a_big, b_big), accumulated in that order into the fp32 sum,
    each dot a tf32 dot as above;
  - ieee: the fp32 matmul (on the GPU: FFMA, no tensor cores).
The tensor cores' internal fp32 accumulation order and rounding are not modelled (numpy's fp32 matmul stands in), so
these are emulated results, not GPU measurements. The rest of each kernel (norms, margins, softmax) runs as written.

Run: `python bench/precision_study.py [--quick]` (a few minutes on 2 cores; prints a markdown table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import backend_cases as bc  # noqa: E402  (the tests' inputs and runner: the same rule, not a copy)
from deepfense.kernels import plan  # noqa: E402

PRECISIONS = ("ieee", "tf32x3", "tf32")


def _tf32_truncate(a: np.ndarray) -> np.ndarray:
    """What a tf32 tensor-core operand keeps of an fp32 value: the 13 low mantissa bits dropped."""
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _tf32_round_away(a: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest with ties away from zero (Inf / NaN kept)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    special = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    rounded = (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where(special, bits, rounded).view(np.float32)


def emulated_dot(a: np.ndarray, b: np.ndarray, c: np.ndarray, precision: str) -> np.ndarray:
    """c + a @ b as an sm_90 `tl.dot(..., input_precision=precision)` on fp32 operands computes it (see above)."""
    f32 = np.float32
    if precision == "ieee":
        return np.matmul(a, b, dtype=f32) + c
    if precision == "tf32":
        return np.matmul(_tf32_truncate(a), _tf32_truncate(b), dtype=f32) + c
    a_big, b_big = _tf32_round_away(a), _tf32_round_away(b)
    a_small, b_small = (a - a_big).astype(f32), (b - b_big).astype(f32)
    acc = np.matmul(_tf32_truncate(a_small), b_big, dtype=f32) + c
    acc = np.matmul(a_big, _tf32_truncate(b_small), dtype=f32) + acc
    return np.matmul(a_big, b_big, dtype=f32) + acc


def install_emulation():
    """Route the interpreter's fp32 dots through `emulated_dot` according to their input_precision."""
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or b.data.dtype != np.float32 or input_precision is None:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        name = str(input_precision).split(".")[-1].lower()
        if name not in PRECISIONS:
            raise ValueError(f"no emulation for input_precision {input_precision}")
        return interpreter.TensorHandle(emulated_dot(a.data, b.data, d.data, name), d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


def use_gpu_tiles():
    """Run the GPU's tile plan in the interpreter (DEEPFENSE_TILES=gpu, read by the launch plan): the dots then have
    the GPU's shapes (and it is much faster)."""
    os.environ.setdefault("DEEPFENSE_TILES", "gpu")
    os.environ.setdefault("DEEPFENSE_SM_COUNT", "132")


def ratios(loss: str, case: dict, opts: dict) -> dict:
    """Worst |fused - gold| / bound per output, bound = 2 |torch fp32 - gold| + atol (1 + |gold|)."""
    gold = bc.run(loss, case, "reference", opts, dtype=torch.float64)
    same = bc.run(loss, case, "reference", opts)
    fast = bc.run(loss, case, "triton", opts)
    out = {}
    for name, f, s, g in zip(("loss", "dX", "dW", "dbias"), fast, same, gold):
        if g is None:
            continue
        bound = 2 * (s - g).abs() + bc.ATOL[torch.float32] * (1 + g.abs())
        out[name] = float(((f - g).abs() / bound).max()) if torch.isfinite(f).all() else float("inf")
    return out


# (family, loss key, B, D, C, s): the speaker and face heads scaled down in B and C (the interpreter is slow) with
# their real D, which sets the dot length and so the tf32 error; s = 30 and 64 for AMSoftmax.
CASES = [("speaker", "am", 64, 192, 1000, 30.0), ("speaker", "am", 64, 192, 1000, 64.0),
         ("face", "am", 32, 512, 512, 30.0), ("face", "am", 32, 512, 512, 64.0),
         ("speaker", "ce", 64, 192, 1000, None), ("speaker", "a", 64, 192, 1000, None),
         ("deepfake", "oc", 256, 1024, 1, None)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (for the tests)")
    ap.add_argument("--seed", type=int, default=1234, help="input seed (fresh inputs: not the tests' seeds)")
    args = ap.parse_args(argv)
    install_emulation()
    use_gpu_tiles()
    cases = [("tiny", "am", 8, 40, 20, 64.0)] if args.quick else CASES
    print("| head | loss | B×D×C | s | precision | loss ratio | dX ratio | dW ratio | pass (≤ 1) |")
    print("|---|---|---|---|---|---|---|---|---|")
    saved, worst = plan.FP32_PRECISION, {p: 0.0 for p in PRECISIONS}
    try:
        for family, loss, B, D, C, s in cases:
            case = bc.make_case(loss, B, D, C, torch.float32, seed=args.seed)
            opts = bc.options(loss, **({"s": s} if s else {}))
            for precision in PRECISIONS:
                plan.FP32_PRECISION = precision
                t0 = time.perf_counter()
                r = ratios(loss, case, opts)
                case_worst = max(r.values())
                worst[precision] = max(worst[precision], case_worst)
                print(f"| {family} | {loss} | {B}×{D}×{C} | {s or '-'} | {precision} | {r['loss']:.3g} | "
                      f"{r['dX']:.3g} | {r['dW']:.3g} | {'yes' if case_worst <= 1 else 'NO'} |", flush=True)
                print(f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    finally:
        plan.FP32_PRECISION = saved
    print("\nworst ratio over all cases: " + ", ".join(f"{p} {w:.3g}" for p, w in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
