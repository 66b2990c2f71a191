"""Measuring one (case, provider): time, peak extra memory, error against float64, and the device's ceilings.

Timing: each iteration runs forward then backward on the next of a few rotated input copies (so caches do not
flatter), with the gradients set to None first (as `zero_grad(set_to_none=True)` does). On CUDA, events around the
forward and the backward give per-iteration times with no host sync inside the loop; on CPU, `perf_counter`. The
forward is a training forward (inputs require grad). Medians over the iterations after warm-up.

Peak extra memory: CUDA, `max_memory_allocated()` during one step minus the memory held before it (the gradients
dX, dW are outputs and are included). CPU, the same quantity from the PyTorch profiler's allocation events (every
CPU tensor allocation and free, so it sees what tracemalloc cannot).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time

import torch

from .cases import DTYPES, LOSSES, Case, make_inputs, traffic



@contextlib.contextmanager
def _quiet_stderr():
    """Silence fd 2 (the CPU profiler's native start/stop lines would interleave with the progress output)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _clear(inputs):
    for x, w, _ in inputs:
        x.grad = None
        w.grad = None


def warm(fn, inputs, device: str, warmup: int) -> float:
    """Run `warmup` steps, then one timed step; returns its seconds (to size the timed runs)."""
    for i in range(warmup):
        _clear(inputs)
        fn(*inputs[i % len(inputs)]).backward()
    sync(device)
    t0 = time.perf_counter()
    _clear(inputs)
    fn(*inputs[0]).backward()
    sync(device)
    _clear(inputs)
    return time.perf_counter() - t0


def time_steps(fn, inputs, device: str, n: int, first: int = 0) -> tuple[list, list]:
    """Forward and backward ms of `n` steps of `fn` over the rotated `inputs` (see module docstring)."""
    fwd, bwd = [], []
    if device == "cuda":
        ev = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(n)]
    for i in range(n):
        _clear(inputs)
        args = inputs[(first + i) % len(inputs)]
        if device == "cuda":
            ev[i][0].record()
            loss = fn(*args)
            ev[i][1].record()
            loss.backward()
            ev[i][2].record()
        else:
            a = time.perf_counter()
            loss = fn(*args)
            b = time.perf_counter()
            loss.backward()
            c = time.perf_counter()
            fwd.append((b - a) * 1e3)
            bwd.append((c - b) * 1e3)
    if device == "cuda":
        torch.cuda.synchronize()
        fwd = [e[0].elapsed_time(e[1]) for e in ev]
        bwd = [e[1].elapsed_time(e[2]) for e in ev]
    _clear(inputs)
    return fwd, bwd


def medians(fwd: list, bwd: list) -> dict:
    return {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
            "fwdbwd_ms": statistics.median([a + b for a, b in zip(fwd, bwd)]), "iters": len(fwd)}


def peak_memory(fn, args, device: str) -> int | None:
    """Peak extra bytes allocated by one forward+backward (gradients included), or None if not measurable."""
    x, w, _ = args
    x.grad = w.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    elif device == "cpu":
        from torch.profiler import ProfilerActivity, profile
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(*args).backward()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        cur = peak = 0
        for _, nbytes in events:
            cur += nbytes
            peak = max(peak, cur)
    else:
        peak = None
    x.grad = w.grad = None
    return peak


def gold(case: Case, device: str, oracle: dict | None = None, max_elems: int = 1 << 25):
    """float64 reference (loss, dX, dW) on the case's first input copy (mean reduction, no class weights).

    Rows go through the reference in chunks of at most `max_elems` logits, so a face head (B*C = 1e9) needs no
    B x C float64 buffer: loss = sum of per-row losses / B, and dW accumulates over the chunks."""
    spec = LOSSES[case.loss]
    x, w, t = make_inputs(case, device, copies=1, requires_grad=False)[0]
    w64 = w.double().requires_grad_(True)
    opts = {**spec.options, **(oracle or {}), "reduction": "none"}
    rows = max(1, max_elems // max(case.C, 1))
    total, dx = torch.zeros((), dtype=torch.float64, device=device), []
    for lo in range(0, case.B, rows):
        xc = x[lo:lo + rows].double().requires_grad_(True)
        part = spec.ref(xc, w64, t[lo:lo + rows], **opts).sum() / max(case.B, 1)
        part.backward()
        total += part.detach()
        dx.append(xc.grad)
    return total, torch.cat(dx), w64.grad


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (the max-norm relative error; elementwise ratios blow up near zero)."""
    if got is None:
        return math.nan
    den = want.abs().max().item() if want.numel() else 0.0
    num = (got.double() - want).abs().max().item() if want.numel() else 0.0
    return num / den if den > 0 else num


def errors(fn, args, ref) -> dict:
    """Loss and gradient errors of `fn` on `args` against the float64 `ref` = (loss, dX, dW)."""
    x, w, t = args
    x.grad = w.grad = None
    loss = fn(x, w, t)
    loss.backward()
    out = {"loss_err": rel_err(loss.detach().reshape(()), ref[0]),
           "grad_err": max(rel_err(x.grad, ref[1]), rel_err(w.grad, ref[2]))}
    x.grad = w.grad = None
    return out


def _bench_seconds(fn, device: str, reps: int = 5) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device: str, dtypes) -> dict:
    """The device's copy bandwidth (GB/s, read + write counted) and matmul TFLOP/s per dtype, measured now."""
    n_bytes = (1 << 30) if device == "cuda" else (128 << 20)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    out = {"copy_GBps": 2 * n_bytes / _bench_seconds(lambda: dst.copy_(src), device) / 1e9, "matmul_TFLOPs": {}}
    del src, dst
    n = 8192 if device == "cuda" else 1024
    for name in dtypes:
        a = torch.randn(n, n, device=device).to(DTYPES[name])
        b = torch.randn(n, n, device=device).to(DTYPES[name])
        out["matmul_TFLOPs"][name] = 2 * n ** 3 / _bench_seconds(lambda: a @ b, device) / 1e12
    return out


def make_inputs_rotated(case: Case, device: str):
    """The rotated input copies: enough to spill the last-level cache (~256 MB CUDA, 64 MB CPU), 2..6 of them."""
    nbytes = traffic(case)[0] // 2
    target = (256 << 20) if device == "cuda" else (64 << 20)
    return make_inputs(case, device, copies=int(min(6, max(2, math.ceil(target / max(nbytes, 1))))))


def prepare(case: Case, provider, device: str, *, warmup: int, inputs, ref) -> tuple:
    """Build `provider`'s step for `case`, compile it (timed), warm it up, and measure peak memory and errors.

    Returns (fn, seconds of one step, row fields)."""
    row = {}
    t0 = time.perf_counter()
    fn = provider.build(case)
    if provider.compiled:
        _clear(inputs)
        fn(*inputs[0]).backward()
        sync(device)
        row["compile_s"] = time.perf_counter() - t0
    step_s = warm(fn, inputs, device, warmup)
    row["peak_bytes"] = peak_memory(fn, inputs[0], device)
    if ref is not None:
        row.update(errors(fn, inputs[0], ref))
    return fn, step_s, row
