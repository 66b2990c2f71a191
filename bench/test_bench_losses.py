"""pytest-benchmark suites: every loss x shape x provider x mode, from the same cases and providers as the CLI.

Run: `pytest bench/ --benchmark-only` (add `--benchmark-json out.json` to keep results).
Environment: DEEPFENSE_BENCH_SWEEP = quick (default) | default (the CLI's full sweep for this device);
DEEPFENSE_BENCH_DEVICE = cpu | cuda (default: cuda when available). torch.compile runs on the sweep's anchor shapes
only, as in the CLI. Absent providers are skipped with their reason.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from deepfense.benchmark import measure
from deepfense.benchmark.cases import default_cases, traffic
from deepfense.benchmark.providers import PROVIDERS

DEVICE = os.environ.get("DEEPFENSE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
SWEEP = os.environ.get("DEEPFENSE_BENCH_SWEEP", "quick")
CASES = default_cases(DEVICE, quick=SWEEP == "quick")
MODES = ("fwd", "bwd", "fwdbwd")
os.environ.setdefault("DEEPFENSE_VALIDATE", "0")  # as the CLI: no per-call host sync for value checks

_cache = {}  # the current case's inputs and built step functions (params are ordered case-major)


def _setup(case, provider):
    if _cache.get("case") != case:
        _cache.clear()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        _cache.update(case=case, inputs=measure.make_inputs_rotated(case, DEVICE))
    if provider.name not in _cache:
        _cache[provider.name] = provider.build(case)
    return _cache["inputs"], _cache[provider.name]


def _params():
    for case, prov, mode in itertools.product(CASES, PROVIDERS, MODES):
        reason = prov.absent(case, DEVICE) or (None if not prov.compiled or case.anchor else "compile: anchors only")
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(case, prov, mode, marks=marks,
                           id=f"{case.loss}-{case.B}x{case.D}x{case.C}-{case.dtype}-{prov.name}-{mode}")


@pytest.mark.parametrize("case,provider,mode", list(_params()))
def test_loss(benchmark, case, provider, mode):
    inputs, fn = _setup(case, provider)
    turn = itertools.cycle(inputs)
    nbytes, flops = traffic(case)
    benchmark.group = f"{case.label} {mode}"
    benchmark.extra_info.update(loss=case.loss, B=case.B, D=case.D, C=case.C, dtype=case.dtype, mode=mode,
                                provider=provider.name, device=DEVICE, bytes_fwdbwd=nbytes, flops_fwdbwd=flops,
                                peak_bytes_fwdbwd=measure.peak_memory(fn, inputs[0], DEVICE))

    def forward():
        x, w, t = next(turn)
        x.grad = w.grad = None
        return fn(x, w, t)

    if mode == "bwd":
        def setup():
            loss = forward()
            measure.sync(DEVICE)
            return (loss,), {}

        def backward(loss):
            loss.backward()
            measure.sync(DEVICE)
        benchmark.pedantic(backward, setup=setup, rounds=20, warmup_rounds=2)
        return

    def step():
        loss = forward()
        if mode == "fwdbwd":
            loss.backward()
        measure.sync(DEVICE)
    step()  # warm-up (and compilation) outside the timed rounds
    benchmark(step)
