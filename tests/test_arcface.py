"""ArcFace / CombinedMargin on the fast backends against the float64 reference, and the settings where the combined
margin coincides with AMSoftmax, ArcFace and ASoftmax.

The error rule is the backends' (tests/backend_cases.py): |fast - gold| <= 2 |reference_same_dtype - gold| + atol.
"""

import math

import pytest
import torch

from backend_cases import DEVICE, assert_close_to_gold, make_case, options, run
from deepfense import functional as F
from deepfense import reference

FALLBACKS = ["wespeaker", "speechbrain", "pml", "easy", "none"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]


def _skip_without_kernels(backend, **opts):
    """Skip the fused backend where it has no kernel for these options (named in the reason)."""
    if backend != "triton":
        return
    from deepfense.kernels import tiles
    if not hasattr(tiles, "MARGIN_COMBINED"):
        pytest.skip("ArcFace / CombinedMargin have no fused kernel on this branch yet (torch backend only)")


def angled_case(m, dtype, seed=0, B_per=2, D=9, C=5, fine=False):
    """Rows at chosen angles theta to their target column: near 0, inside, near pi - m (either side) and beyond it,
    so every branch of each fallback is taken. fp32 adds angles 1e-4 from pi - m (16-bit rounding of x moves theta
    by ~1e-3, which must not carry it across the discontinuous fallbacks' threshold)."""
    gen = torch.Generator().manual_seed(seed)
    edge = math.pi - m
    thetas = [1e-3, 0.05, 0.7, 1.6, edge - 0.05, edge - 0.01, edge + 0.01, edge + 0.05, math.pi - 0.1]
    if fine:
        thetas += [edge - 1e-4, edge + 1e-4]
    w = torch.randn(D, C, generator=gen, dtype=torch.float64)
    w_hat = w / w.norm(dim=0)
    rows, targets = [], []
    for i, theta in enumerate(thetas * B_per):
        y = (i * 3) % C
        u = torch.randn(D, generator=gen, dtype=torch.float64)
        u = u - (u @ w_hat[:, y]) * w_hat[:, y]
        u = u / u.norm()
        rows.append((math.cos(theta) * w_hat[:, y] + math.sin(theta) * u) * (1 + i % 3))
        targets.append(y)
    case = {"x": torch.stack(rows), "w": w, "t": torch.tensor(targets)}
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(DEVICE) for k, v in case.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fallback", FALLBACKS)
def test_every_fallback_branch_matches_reference(fallback, dtype, backend):
    _skip_without_kernels(backend)
    # m = 0.5 (insightface's face margin): pi - m = 2.64, so the fallback region is wide. s = 30 (SpeechBrain's): at
    # s = 64 a row with p_y ~ 1 has dL/dlogit_y = p_y - 1 ~ 1e-3, and the kernels' fp32 p_y (from the saved LSE)
    # carries ~2e-5 absolute error there, more than the error rule's atol when the fp32 reference is exact on it
    m = 0.5
    case = angled_case(m, dtype, fine=dtype == torch.float32)
    assert_close_to_gold("arc", case, backend, options("arc", reduction="none", m=m, s=30.0, fallback=fallback), dtype)


SHAPES = [
    pytest.param(0, 8, 3, id="B0-empty-batch"),
    pytest.param(1, 1, 2, id="B1-D1"),  # D = 1: every cosine is +-1, theta 0 or pi (the sin guard, the fallback)
    pytest.param(9, 5, 1, id="C1"),  # one class: the loss is 0
    pytest.param(17, 19, 3, id="odd-B-prime-D"),  # one past a 16-tile in rows and features
    pytest.param(33, 40, 37, id="C-multi-tile"),  # three class tiles: the online log-sum-exp
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D,C", SHAPES)
def test_shapes_match_reference(B, D, C, dtype, backend):
    _skip_without_kernels(backend)
    case = make_case("arc", B, D, C, dtype, seed=B * 100 + C)
    assert_close_to_gold("arc", case, backend, options("arc"), dtype)


OPTIONS = [
    pytest.param(dict(reduction="sum"), {}, id="sum"),
    pytest.param(dict(reduction="none"), dict(ignore_some=True), id="ignore-some-none"),
    pytest.param(dict(), dict(class_weights=True), id="class-weights"),
    pytest.param(dict(smoothing=0.2), dict(class_weights=True, ignore_some=True), id="smoothing-weights-ignore"),
    pytest.param(dict(fallback="speechbrain", smoothing=0.1), {}, id="speechbrain-smoothing"),
    pytest.param(dict(fallback="none", straight_through=True), {}, id="insightface-straight-through"),
    pytest.param(dict(fallback="none", interclass_filtering_threshold=0.2, reduction="none"), {}, id="filtering"),
    pytest.param(dict(m1=1.0, m=0.3, m3=0.2, s=64.0, fallback="none"), {}, id="combined-1-0.3-0.2"),
    pytest.param(dict(m1=1.35, m=0.25, m3=0.1, fallback="wespeaker"), {}, id="combined-m1-1.35"),
    pytest.param(dict(m1=2.0, m=0.0, fallback="none", reduction="none"), {}, id="sphereface-like-m1-2"),
    pytest.param(dict(sub_centers=3), dict(sub_centers=3), id="sub-centers-3"),
    pytest.param(dict(sub_centers=2, fallback="pml", reduction="none"), dict(sub_centers=2, ignore_some=True),
                 id="sub-centers-2-pml-ignore"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [5, 23], ids=["one-tile", "two-tiles"])
@pytest.mark.parametrize("opts,case_kw", OPTIONS)
def test_options_match_reference(opts, case_kw, C, backend):
    _skip_without_kernels(backend, **opts)
    case = make_case("arc", 21, 18, C, torch.float32, seed=C, **case_kw)
    assert_close_to_gold("arc", case, backend, options("arc", **opts), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_reference_tightly(backend):
    _skip_without_kernels(backend)
    case = make_case("arc", 19, 21, 18, torch.float64, seed=3, class_weights=True, ignore_some=True)
    assert_close_to_gold("arc", case, backend, options("arc", reduction="none", smoothing=0.1), torch.float64)


@pytest.mark.parametrize("opts", [dict(fallback=f) for f in FALLBACKS] + [
    dict(m1=1.35, m3=0.1), dict(interclass_filtering_threshold=0.1, fallback="none"), dict(sub_centers=2)],
    ids=FALLBACKS + ["m1-1.35", "filtering", "sub-centers"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(opts, backend):
    """Finite differences agree with the analytic gradient (the reference's guards its sin / clamp edges)."""
    case = make_case("arc", 6, 4, 3, torch.float64, seed=11, class_weights=True, sub_centers=opts.get("sub_centers", 1))
    x, w = case["x"].requires_grad_(), case["w"].requires_grad_()
    fn = lambda x, w: F.arcface_loss(x, w, case["t"], m=0.7, class_weights=case["cw"], backend=backend,  # noqa: E731
                                     label_smoothing=0.1, **opts)
    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_tensor_margins_equal_float_margins(backend):
    """0-dim tensors for s, m, m3 (a schedule's runtime values) give the float results exactly."""
    case = make_case("arc", 12, 7, 5, torch.float32, seed=4)
    as_float = run("arc", case, backend, dict(m=0.3, s=20.0, m3=0.05))
    as_tensor = run("arc", case, backend, dict(m=torch.tensor(0.3), s=torch.tensor(20.0), m3=torch.tensor(0.05)))
    for a, b in zip(as_float, as_tensor):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- where the combined margin coincides with the other heads -------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("sub_centers", [1, 3])
def test_cosface_setting_equals_amsoftmax_exactly(backend, sub_centers):
    """CombinedMargin(1, 0, m3) is AMSoftmax(m3): cos(theta + 0) is computed as cos * 1 - sin * 0, bitwise cos."""
    case = make_case("am", 20, 9, 7, torch.float32, seed=8, class_weights=True, sub_centers=sub_centers)
    kw = dict(reduction="none", label_smoothing=0.1, sub_centers=sub_centers, s=30.0, class_weights=case["cw"])
    am = run("am", case, backend, dict(kw, m=0.35))
    combined = run("arc", case, backend, dict(kw, m1=1.0, m=0.0, m3=0.35, fallback="none"))
    for a, b in zip(am, combined):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("fallback", FALLBACKS)
def test_arcface_setting_is_arcface(backend, fallback):
    """CombinedMargin(1, m, 0) and ArcFace(m) are one code path: equal bitwise, every fallback."""
    from deepfense.losses import ArcFace, CombinedMargin
    torch.manual_seed(0)
    arc = ArcFace(9, 7, m=0.4, s=30.0, fallback=fallback, backend=backend)
    comb = CombinedMargin(9, 7, m1=1.0, m2=0.4, m3=0.0, s=30.0, fallback=fallback, backend=backend)
    comb.load_state_dict(arc.state_dict())
    x, y = torch.randn(15, 9), torch.randint(0, 7, (15,))
    assert torch.equal(arc(x, y), comb(x, y))


@pytest.mark.parametrize("m", [2, 3])
def test_sphereface_setting_equals_asoftmax_without_lambda(m):
    """CombinedMargin(m1=m, 0, 0) with s = |x| equals ASoftmax(m, lambda = 0, gamma = 0) while theta_y < pi / m
    (there psi = cos(m theta)): the losses and dW agree to rounding (dX differs: ASoftmax's logits scale with |x|)."""
    D, C, s = 6, 4, 12.0
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(D, C, generator=gen, dtype=torch.float64)
    y = torch.arange(10) % C
    x = w[:, y].t() / w[:, y].norm(dim=0)[:, None] + 0.3 * torch.randn(10, D, generator=gen, dtype=torch.float64)
    x = s * x / x.norm(dim=1, keepdim=True)
    assert (reference.cosine(x, w).gather(1, y[:, None]).acos() < math.pi / m).all()
    wa, wc = w.clone().requires_grad_(), w.clone().requires_grad_()
    la = reference.a_softmax_ref(x, wa, y, m=m, lam=0.0, gamma=0.0)
    lc = reference.combined_margin_ref(x, wc, y, s=s, m1=float(m), m2=0.0, m3=0.0)
    la.backward(), lc.backward()
    torch.testing.assert_close(la, lc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wa.grad, wc.grad, rtol=1e-10, atol=1e-12)


def test_bad_options_are_clear_errors():
    case = make_case("arc", 4, 3, 2)
    with pytest.raises(ValueError, match="fallback must be one of"):
        F.arcface_loss(case["x"], case["w"], case["t"], fallback="insightface")
    with pytest.raises(ValueError, match="multiple of sub_centers"):
        F.arcface_loss(case["x"], case["w"], case["t"], sub_centers=3)
    with pytest.raises(ValueError, match="'m1' must be a finite number > 0"):
        F.arcface_loss(case["x"], case["w"], case["t"], m1=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_inductor(backend):
    """ArcFace through torch.compile(fullgraph=True) with inductor: the same loss and gradients as eager."""
    _skip_without_kernels(backend)
    torch._dynamo.reset()
    case = make_case("arc", 12, 10, 5, torch.float32, seed=6, class_weights=True)

    def loss_fn(x, w, t, m):
        return F.arcface_loss(x, w, t, m=m, s=30.0, fallback="wespeaker", class_weights=case["cw"], backend=backend)

    def step(fn):
        x, w = case["x"].detach().clone().requires_grad_(), case["w"].detach().clone().requires_grad_()
        out = fn(x, w, case["t"], torch.tensor(0.3, dtype=torch.float64, device=DEVICE))
        out.backward()
        return out.detach(), x.grad, w.grad

    for a, b in zip(step(loss_fn), step(torch.compile(loss_fn, fullgraph=True))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
