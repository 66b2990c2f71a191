"""Shared inputs and runners for the backend tests: one loss axis, every backend compared to the float64 reference."""

from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oracle
from deepfense import functional as F

LOSSES = ("am", "a", "oc", "ce")
FUNCS = {"am": F.am_softmax_loss, "a": F.a_softmax_loss, "oc": F.oc_softmax_loss, "ce": F.cross_entropy_loss,
         "arc": F.arcface_loss}  # ArcFace / CombinedMargin: tests/test_arcface.py
DEVICE = "cuda" if os.environ.get("DEEPFENSE_TEST_DEVICE") == "cuda" else "cpu"
FAST_BACKENDS = ("torch", "triton")
# Slack on top of twice the same-dtype PyTorch error (flash-attention / CCE rule), as a fraction of the tensor's
# largest gold value. A dtype's rounding error in a computed tensor scales with the values it was computed from, not
# with each element: dX under 'mean' is ~1/B in size, and most of its elements are far smaller than its largest, so an
# absolute floor (the former ATOL (1 + |gold|)) was ~100x the 2x-torch term for bf16 gradients and let an all-zero
# dX pass at B = 256. Scaled to max |gold|, the floor is ATOL of the tensor's own size: an answer wrong by a fraction
# of the tensor (zero, halved, sign-flipped; test_backends.py guards this) fails.
ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the reference against the independent oracle, both in float64: rounding only (the clamps keep it well conditioned)
REF_RTOL = 1e-9


def make_case(loss, B, D, C, dtype=torch.float32, seed=0, ignore_some=False, class_weights=False, sub_centers=1):
    """Random embeddings, weight, targets (and bias for CrossEntropy) on the test device; the weight has C*K columns
    with K = sub_centers."""
    gen = torch.Generator().manual_seed(seed)
    C = 1 if loss == "oc" else C * sub_centers
    x = torch.randn(B, D, generator=gen, dtype=torch.float64) * 3.0
    w = torch.randn(C, D, generator=gen, dtype=torch.float64) if loss == "ce" else torch.randn(D, C, generator=gen,
                                                                                               dtype=torch.float64)
    n_t = 2 if loss == "oc" else C // sub_centers
    t = torch.randint(0, n_t, (B,), generator=gen)
    if ignore_some and B > 2:
        t[::3] = -100
    case = {"x": x, "w": w, "t": t}
    if loss == "ce":
        case["bias"] = torch.randn(C, generator=gen, dtype=torch.float64)
    if class_weights:
        case["cw"] = torch.rand(n_t, generator=gen, dtype=torch.float64) + 0.2
    return {k: (v.to(dtype) if v.is_floating_point() and k in ("x", "w", "bias") else v).to(DEVICE)
            for k, v in case.items()}


def options(loss, reduction="mean", smoothing=0.0, **extra):
    opts = dict(reduction=reduction, **extra)
    if smoothing and loss in ("am", "ce", "arc"):
        opts["label_smoothing"] = smoothing
    if loss == "a":
        opts.setdefault("lam", 7.5)
    return opts


def run(loss, case, backend, opts, grad_seed=1, dtype=None):
    """Loss and gradients (float64 copies). `dtype` recasts the case's float tensors first (for the gold run)."""
    leaves = {}
    for k in ("x", "w", "bias"):
        if k in case:
            v = case[k].detach()
            leaves[k] = (v.to(dtype) if dtype else v.clone()).requires_grad_()
    kw = dict(opts)
    if "cw" in case:
        kw["class_weights"] = case["cw"].to(dtype) if dtype else case["cw"]
    if loss == "ce":
        kw["bias"] = leaves.get("bias")  # a case without "bias": CrossEntropy without one
    if backend == "oracle":  # tests/oracle.py: no code shared with the package (and no value-check switch)
        kw.pop("validate", None)
        out = oracle.FUNCS[loss](leaves["x"], leaves["w"], case["t"], **kw)
    else:
        out = FUNCS[loss](leaves["x"], leaves["w"], case["t"], backend=backend, **kw)
    gen = torch.Generator().manual_seed(grad_seed)
    g = (torch.rand(out.shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(out)  # non-unit upstream gradient
    if leaves["x"].shape[0] > 0:
        (out * g).sum().backward()
    grads = [leaves[k].grad for k in ("x", "w", "bias") if k in leaves]
    return [out.detach().double()] + [None if gr is None else gr.double() for gr in grads]


def tensor_scale(gold, floor=0.0):
    """max(max |gold|, floor); 1 where that is float64 rounding noise (below 1e-12: zero in exact arithmetic, as dX
    with D = 1 or every gradient with one class), so that the slack is then the rounding of the O(1) inputs."""
    top = max(gold.abs().max().item(), floor)
    return top if top > 1e-12 else 1.0


def error_excess(fast, same, gold, dtype, atol_scale=1.0, floor=0.0):
    """The largest amount by which |fast - gold| exceeds 2 |same - gold| + atol_scale ATOL[dtype] tensor_scale(gold)
    (<= 0: within the rule). A loss passes floor=1: it is a log-sum-exp minus a logit, whose rounding is absolute, of
    the logits' size (>= 1), however small the loss (a confident row's e^-24); gradients scale with their own size."""
    if gold.numel() == 0:
        return -1.0
    bound = 2 * (same - gold).abs() + atol_scale * ATOL[dtype] * tensor_scale(gold, floor)
    return ((fast - gold).abs() - bound).max().item()


def gold_runs(loss, case, opts):
    """(gold, same): the oracle in float64 (checked against the reference in float64) and the reference in the
    case's dtype."""
    gold = run(loss, case, "oracle", opts, dtype=torch.float64)
    ref64 = run(loss, case, "reference", opts, dtype=torch.float64)
    for name, r, g in zip(("loss", "dX", "dW", "dbias"), ref64, gold):
        if g is not None and g.numel():
            err = (r - g).abs().max().item()
            assert err <= REF_RTOL * tensor_scale(g), f"reference {name} vs the oracle: {err:.3g}"
    return gold, run(loss, case, "reference", opts)


def assert_close_to_gold(loss, case, backend, opts, dtype, atol_scale=1.0):
    """|fast - gold| <= 2 |torch_same_dtype - gold| + atol_scale ATOL[dtype] max|gold|, elementwise, for the loss
    and every gradient; gold is the independent float64 oracle."""
    gold, same = gold_runs(loss, case, opts)
    fast = run(loss, case, backend, opts)
    for name, f, s, g in zip(("loss", "dX", "dW", "dbias"), fast, same, gold):
        if g is None:
            assert f is None or not f.abs().sum(), name
            continue
        assert f is not None, f"{name}: no gradient from {backend}"
        assert torch.isfinite(f).all(), f"{name}: non-finite values from {backend}"
        excess = error_excess(f, s, g, dtype, atol_scale, floor=1.0 if name == "loss" else 0.0)
        assert excess <= 0, (f"{name} ({backend}, {dtype}): max error {(f - g).abs().max().item():.3g}, "
                             f"worst excess {excess:.3g}")


class LargestAllocation(TorchDispatchMode):
    """Records the number of elements of the largest tensor any op returns while active (kernels' outputs included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
