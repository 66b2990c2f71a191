"""`python -m deepfense check`: the fused path against the float64 reference, one PASS/FAIL line per loss.

What runs where (decided here, documented in docs/install.md):
    * The 'auto' backend on this device: Triton kernels on CUDA, the 'torch' backend on CPU.
    * On CPU, additionally the 'triton' backend under the Triton interpreter, in a child process (TRITON_INTERPRET
      must be set before Triton is imported), on small shapes. Skipped, not failed, when Triton or the kernels are
      missing.
Rule (the test suite's): err(fast) <= 2 * err(reference in the same dtype) + tol[dtype], errors as max-norm relative
errors of the loss and of dX, dW against float64.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from .. import functional
from . import measure
from .cases import LOSSES, Case, make_inputs
from .providers import _backend_missing

TOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
# Shapes: odd B and D, C = 2 (the deepfake head; OCSoftmax 1), and C = 300, more than one class tile.
SHAPES = [(37, 67, 2), (33, 48, 300)]


def _cases(device: str):
    dtypes = ["fp32", "bf16"] if device == "cuda" else ["fp32"]
    for loss in LOSSES:
        for b, d, c in SHAPES:
            if loss == "OCSoftmax" and c > 2:
                continue
            for dt in dtypes:
                yield Case(loss, b, d, 1 if loss == "OCSoftmax" else c, dt)


def check_backend(device: str, backend: str) -> int:
    """Print one PASS/FAIL/SKIP line per loss for `backend` on `device`; return the number of failures."""
    resolved = functional.resolve_backend(backend, torch.device(device))
    missing = _backend_missing(resolved)
    shown = resolved + ("[interpreter]" if resolved == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else "")
    failures = 0
    if missing:
        for loss in LOSSES:
            print(f"SKIP {loss:<13} backend={shown} on {device}: {missing}", flush=True)
        return 0
    status = {}  # loss -> [every check passed, worst score, its description]
    cases = list(_cases(device))
    for i, case in enumerate(cases):
        spec = LOSSES[case.loss]
        ref = measure.gold(case, device)
        args = make_inputs(case, device)[0]
        st = status.setdefault(case.loss, [True, -1.0, ""])
        try:
            fast = measure.errors(lambda x, w, t: spec.functional(x, w, t, **spec.options, backend=resolved), args,
                                  ref)
        except Exception as exc:  # a backend that raises fails its loss, with the reason, and the others still run
            st[0], st[1], st[2] = False, float("inf"), f"{case.label} raised {type(exc).__name__}: {exc}"
            fast = None
        if fast is not None:
            same = measure.errors(lambda x, w, t: spec.ref(x, w, t, **spec.options), args, ref)
            for what in ("loss_err", "grad_err"):
                bound = 2 * same[what] + TOL[case.dtype]
                st[0] &= fast[what] <= bound
                if fast[what] / bound > st[1]:
                    st[1], st[2] = fast[what] / bound, f"{case.label} {what} {fast[what]:.1e} (bound {bound:.1e})"
        if i + 1 == len(cases) or cases[i + 1].loss != case.loss:  # the loss's last case: report it now
            ok, _, detail = st
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {case.loss:<13} backend={shown} on {device}: worst {detail}",
                  flush=True)
    return failures


def main(device: str, backend: str = "auto", interpreter_child: bool = True) -> int:
    """Run the checks; returns the process exit code (1 on any failure)."""
    failures = check_backend(device, backend)
    if device == "cpu" and backend == "auto" and interpreter_child:
        env = dict(os.environ, TRITON_INTERPRET="1")
        try:
            import triton  # noqa: F401
        except Exception:  # the interpreter needs the triton package
            print("SKIP triton interpreter: triton is not installed", flush=True)
        else:
            print("running the Triton kernels in the Triton interpreter (a child process, ~1-2 min on 2 cores)...",
                  flush=True)
            proc = subprocess.run([sys.executable, "-m", "deepfense.benchmark.cli", "check", "--device", "cpu",
                                   "--backend", "triton"], env=env)
            failures += proc.returncode != 0
    return 1 if failures else 0
