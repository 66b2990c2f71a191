"""The 'torch' and 'triton' backends against the float64 reference, over losses x dtypes x shapes x options.

On a CPU-only machine the Triton kernels run in the interpreter with 16-wide tiles (deepfense.kernels.plan),
so the shapes below cross tile boundaries in every dimension while staying small enough for the interpreter.
"""

import pytest
import torch

from backend_cases import (DEVICE, FAST_BACKENDS, LOSSES, assert_close_to_gold, error_excess, gold_runs, make_case,
                           options, run)

SHAPES = [
    pytest.param(0, 8, 3, id="B0-empty-batch"),
    pytest.param(1, 1, 2, id="B1-D1"),  # a single row; D = 1 makes every cosine +-1 (the clamp's edge)
    pytest.param(9, 5, 1, id="C1"),  # one class: softmax losses are identically 0, gradients 0
    pytest.param(9, 7, 2, id="C2-deepfake"),  # the binary head; the whole class dimension is one (fused) tile
    pytest.param(17, 19, 3, id="odd-B-prime-D"),  # B, D one past a 16-tile: masked tails in rows and features
    pytest.param(33, 40, 37, id="C-multi-tile"),  # C = 37 > 16: the online log-sum-exp runs over 3 class tiles
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,C", SHAPES)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_reference(loss, B, D, C, dtype, backend):
    case = make_case(loss, B, D, C, dtype, seed=B * 100 + C)
    assert_close_to_gold(loss, case, backend, options(loss), dtype)


# the error rule's guard: every case above (but the empty batch), and the shape at which 'mean' makes gradients ~1/B
GUARD = [pytest.param(loss, *p.values, id=f"{loss}-{p.id}") for loss in LOSSES for p in SHAPES
         if p.values[0] > 0 and (loss == "oc" or p.values[2] > 1)]  # softmax losses over one class: all zero
GUARD += [pytest.param(loss, 256, 192, C, id=f"{loss}-B256-D192-C{C}") for loss in LOSSES for C in (2, 37)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss,B,D,C", GUARD)
def test_error_rule_rejects_wrong_answers(loss, B, D, C, dtype):
    """The rule above fails an answer that is zero, halved or sign-flipped, for the loss and every gradient that is
    not zero in exact arithmetic, while the same-dtype reference itself passes."""
    case = make_case(loss, B, D, C, dtype, seed=B * 100 + C)
    gold, same = gold_runs(loss, case, options(loss))
    checked = []
    for name, s, g in zip(("loss", "dX", "dW", "dbias"), same, gold):
        if g is None or not g.abs().max() > 1e-12:  # zero in exact arithmetic (dX with D = 1): nothing to get wrong
            continue
        floor = 1.0 if name == "loss" else 0.0
        assert error_excess(s, s, g, dtype, floor=floor) <= 0, name
        for wrong, value in (("zero", torch.zeros_like(g)), ("halved", g / 2), ("sign-flipped", -g)):
            assert error_excess(value, s, g, dtype, floor=floor) > 0, f"a {wrong} {name} passes the rule"
        checked.append(name)
    assert "loss" in checked and len(checked) >= (2 if D > 1 else 1), checked


OPTIONS = [
    pytest.param(dict(reduction="sum"), {}, id="sum"),
    pytest.param(dict(reduction="none"), {}, id="none"),  # per-row upstream gradient: dW cannot be fused
    pytest.param(dict(), dict(ignore_some=True), id="ignore-some"),
    pytest.param(dict(reduction="none"), dict(ignore_some=True), id="ignore-some-none"),
    pytest.param(dict(), dict(class_weights=True), id="class-weights"),
    pytest.param(dict(reduction="sum"), dict(class_weights=True, ignore_some=True), id="weights-ignore-sum"),
    pytest.param(dict(smoothing=0.1), {}, id="label-smoothing"),
    pytest.param(dict(smoothing=0.2), dict(class_weights=True, ignore_some=True), id="smoothing-weights-ignore"),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("C", [5, 23], ids=["one-tile", "two-tiles"])
@pytest.mark.parametrize("opts,case_kw", OPTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_options_match_reference(loss, opts, case_kw, C, backend):
    case = make_case(loss, 21, 18, C, torch.float32, seed=C, **case_kw)
    assert_close_to_gold(loss, case, backend, options(loss, **opts), torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_float64_matches_reference_tightly(loss, backend):
    """In float64 the fast paths agree with the oracle to rounding (the kernels' scalars s, m, eps are fp32)."""
    case = make_case(loss, 19, 21, 18, torch.float64, seed=3, class_weights=True, ignore_some=True)
    assert_close_to_gold(loss, case, backend, options(loss, reduction="none", smoothing=0.1), torch.float64)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_is_zero_not_nan(loss, reduction, backend):
    case = make_case(loss, 6, 5, 3, torch.float32)
    case["t"][:] = -100
    out = run(loss, case, backend, options(loss, reduction=reduction))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert all(g is None or not g.abs().sum() for g in out[1:])


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_row_strided_embeddings(loss, backend):
    """A row-strided, column-strided view goes to the kernels with its strides (no hidden .contiguous())."""
    case = make_case(loss, 20, 24, 6, torch.float32, seed=5)
    big = torch.randn(40, 48, dtype=torch.float32, device=DEVICE)
    case["x"] = big[::2, ::2]
    assert not case["x"].is_contiguous()
    assert_close_to_gold(loss, case, backend, options(loss), torch.float32)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss", ["am", "a", "oc"])
def test_zero_norm_rows_and_columns_are_finite(loss, backend):
    """Zero embeddings and zero weight columns normalise to zero: finite loss and gradients equal to the oracle's."""
    case = make_case(loss, 10, 6, 4, torch.float32, seed=9)
    case["x"][2] = 0
    case["w"][:, 0] = 0
    assert_close_to_gold(loss, case, backend, options(loss), torch.float32)


def _spread_angles(C, dtype, B=24):
    """Targets (all class 0, the column [1, 0]) at angles spread over [0, pi], so that every k = floor(m theta / pi)
    branch of psi is taken; the other C - 1 columns at fixed random angles."""
    theta = torch.linspace(0.01, 3.13, B, dtype=torch.float64)
    x = torch.stack([theta.cos(), theta.sin()], 1) * 2.0
    others = torch.rand(C - 1, generator=torch.Generator().manual_seed(C), dtype=torch.float64) * 6.28
    w = torch.cat([torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.stack([others.cos(), others.sin()])], 1)
    return {"x": x.to(dtype).to(DEVICE), "w": w.to(dtype).to(DEVICE), "t": torch.zeros(B, dtype=torch.long).to(DEVICE)}


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 10])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_asoftmax_every_m_across_k_boundaries(m, backend):
    """SphereFace's m is any integer >= 1: the usual 1..5 and beyond them, every k branch."""
    assert_close_to_gold("a", _spread_angles(3, torch.float32), backend,
                         options("a", m=m, gamma=0.5, reduction="none"), torch.float32)


@pytest.mark.parametrize("m", [6, 7, 10])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype,C", [(torch.float64, 3), (torch.float32, 20)], ids=["float64", "two-class-tiles"])
def test_asoftmax_large_m(m, dtype, C, backend):
    """m past 5 in float64 (to rounding) and on the large-head kernels (C = 20 > 16: two class tiles)."""
    assert_close_to_gold("a", _spread_angles(C, dtype), backend, options("a", m=m, gamma=0.5, reduction="none"), dtype)
