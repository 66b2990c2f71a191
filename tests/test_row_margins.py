"""Per-sample margins (ArcFace / CombinedMargin with [B] margin tensors: what AdaFace, MagFace and ElasticFace build
on), AdaFace's fallback and CurricularFace's hard negatives, on every backend against the independent float64 oracle
(tests/oracle.py): the loss, dX, dW and the margins' own gradients."""

from __future__ import annotations

import math

import pytest
import torch

import oracle
from backend_cases import DEVICE, FAST_BACKENDS, assert_close_to_gold, make_case, run
from deepfense import functional as F
from deepfense.options import LossConfigError

BACKENDS = ("reference",) + FAST_BACKENDS
FALLBACKS = ("wespeaker", "speechbrain", "pml", "easy", "none", "adaface")


def row_margins(B, seed, m1=False):
    """Per-sample margins [B] in float64 on the test device: m (angular) in [-0.5, 1.4], so some rows pass pi - m
    (fallbacks) and some have negative margins (AdaFace's high-norm rows), m3 in [0, 0.5], m1 in [0.7, 1.8]."""
    gen = torch.Generator().manual_seed(seed)
    out = {"m": torch.rand(B, generator=gen, dtype=torch.float64) * 1.9 - 0.5,
           "m3": torch.rand(B, generator=gen, dtype=torch.float64) * 0.5}
    if m1:
        out["m1"] = torch.rand(B, generator=gen, dtype=torch.float64) * 1.1 + 0.7
    return {k: v.to(DEVICE) for k, v in out.items()}


def near_targets(case, rows, angle):
    """Put `rows` of the case at `angle` from their target's column (in float64, then the case's dtype)."""
    x, w, t = case["x"].double(), case["w"].double(), case["t"]
    for i in rows:
        u = w[:, t[i]] / w[:, t[i]].norm()
        v = torch.randn(w.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        v = v - (v @ u) * u
        x[i] = 2.5 * (math.cos(angle) * u + math.sin(angle) * v / v.norm())
    case["x"] = x.to(case["x"].dtype)
    return case


# C = 9 takes the small-head kernels on 'triton' when nothing requires a margin's gradient; 40 the large-head ones
@pytest.mark.parametrize("C", [9, 40])
@pytest.mark.parametrize("fallback", FALLBACKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_margins_match_oracle(backend, fallback, C):
    """Loss, dX and dW with per-sample m and m3 (and, for 'none', per-sample m1), ignored rows, class weights and
    label smoothing, against the float64 oracle (float32 inputs; the oracle and the reference agree to 1e-9)."""
    B = 13
    case = make_case("arc", B, 24, C, torch.float32, seed=C, ignore_some=True, class_weights=True)
    case = near_targets(case, [1, 4], 0.02)  # cos past AdaFace's clamp (1 - cos = 2e-4)
    opts = dict(s=12.0, fallback=fallback, label_smoothing=0.1, reduction="mean",
                **row_margins(B, seed=C, m1=fallback == "none"))
    assert_close_to_gold("arc", case, backend, opts, torch.float32)


def test_per_sample_margins_bf16():
    """bf16 inputs with per-sample margins on the kernels: the rule against the oracle at bf16's tolerance."""
    backend, B = "triton", 16
    case = make_case("arc", B, 32, 40, torch.bfloat16, seed=5, ignore_some=True)
    opts = dict(s=16.0, fallback="adaface", reduction="none", **row_margins(B, seed=5))
    assert_close_to_gold("arc", case, backend, opts, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_row_takes_its_own_margin(backend):
    """Row i of a reduction='none' loss with per-sample margins equals the loss of that row alone with its margins
    as plain floats: the values reach the row they belong to (not row 0's, not a mean)."""
    B = 6
    case = make_case("arc", B, 16, 5, torch.float64, seed=3)
    margins = {k: v.abs() for k, v in row_margins(B, seed=3).items()}  # a float margin is >= 0
    rows = F.arcface_loss(case["x"], case["w"], case["t"], s=10.0, fallback="wespeaker", reduction="none",
                          backend=backend, **margins)
    for i in range(B):
        alone = F.arcface_loss(case["x"][i:i + 1], case["w"], case["t"][i:i + 1], s=10.0, fallback="wespeaker",
                               reduction="none", backend=backend, m=float(margins["m"][i]),
                               m3=float(margins["m3"][i]))
        torch.testing.assert_close(rows[i:i + 1], alone, rtol=1e-12, atol=1e-12)
    assert len({round(float(v), 6) for v in margins["m"]}) == B  # distinct margins: a shared value would fail


def _margin_grads(backend, case, opts, names):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in opts.items() if k in names}
    x, w = case["x"].detach().clone().requires_grad_(), case["w"].detach().clone().requires_grad_()
    kw = {**opts, **leaves}
    if backend == "oracle":
        out = oracle.arc(x, w, case["t"], class_weights=case.get("cw"), **kw)
    else:
        out = F.arcface_loss(x, w, case["t"], class_weights=case.get("cw"), backend=backend, **kw)
    g = torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (out * g).sum().backward()
    return [out.detach().double(), x.grad.double(), w.grad.double()] + [leaves[k].grad.double() for k in names]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fallback", ["wespeaker", "pml", "easy", "adaface", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_gradients_match_oracle(backend, fallback, reduction):
    """Margins that require grad (MagFace's, a function of the feature norm) get dL/dm, dL/dm3 (and dL/dm1) equal to
    the oracle's autograd, in float64, with the loss, dX and dW; small heads on 'triton' take the large-head kernels,
    whose statistics the margins' gradient comes from."""
    B, C = 11, 7
    case = make_case("arc", B, 20, C, torch.float64, seed=11, ignore_some=True, class_weights=True)
    names = ("m", "m3") + (("m1",) if fallback == "none" else ())
    opts = dict(s=9.0, fallback=fallback, label_smoothing=0.05, reduction=reduction,
                **row_margins(B, seed=11, m1=fallback == "none"))
    gold = _margin_grads("oracle", case, opts, names)
    got = _margin_grads(backend, case, opts, names)
    for name, a, b in zip(("loss", "dX", "dW") + names, got, gold):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    assert gold[3].abs().max() > 1e-3 and gold[4].abs().max() > 1e-3  # the margins' gradients are not all zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_margin_tensor_gets_summed_gradient(backend):
    """A 0-dim margin that requires grad (a learnable shared margin) gets the sum of the rows' gradients."""
    case = make_case("arc", 9, 16, 30, torch.float64, seed=2)
    opts = dict(s=8.0, fallback="wespeaker", m=torch.tensor(0.3, dtype=torch.float64, device=DEVICE),
                m3=torch.tensor(0.1, dtype=torch.float64, device=DEVICE))
    gold = _margin_grads("oracle", case, opts, ("m", "m3"))
    got = _margin_grads(backend, case, opts, ("m", "m3"))
    for a, b in zip(got, gold):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adaface_clamp_and_clip_bind(backend):
    """AdaFace's fallback where its clamp and clip bind: rows at |cos| > 1 - 1e-3 and rows whose negative margin
    takes theta + m below 1e-3 match the oracle (no gradient through a binding clamp), and the case has both."""
    B = 8
    case = make_case("arc", B, 16, 6, torch.float64, seed=4)
    case = near_targets(case, [0, 1], 0.02)  # theta 0.02: cos past the clamp
    case = near_targets(case, [2, 3], 0.1)
    m = torch.full((B,), 0.3, dtype=torch.float64, device=DEVICE)
    m[2:4] = -0.4  # theta + m < 0: the clip binds at 1e-3
    opts = dict(s=10.0, fallback="adaface", m=m, m3=torch.full((B,), 0.2, dtype=torch.float64, device=DEVICE))
    cos_y = oracle._class_cos(case["x"], case["w"]).gather(1, case["t"][:, None])[:, 0]
    assert (cos_y[:2] > 1 - 1e-3).all() and (torch.acos(cos_y[2:4]) + m[2:4] < 1e-3).all()
    gold = _margin_grads("oracle", case, opts, ("m", "m3"))
    got = _margin_grads(backend, case, opts, ("m", "m3"))
    for name, a, b in zip(("loss", "dX", "dW", "dm", "dm3"), got, gold):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda msg: f"{name}: {msg}")
    assert (gold[3][2:4] == 0).all() and (gold[3][:2] != 0).all()  # a binding clip passes m no gradient


def _curricular(x, w, targets, *, backend, **kw):
    if backend == "oracle":
        kw["t_run"] = kw.pop("t")
        return oracle.curricular(x, w, targets, **kw)
    return F.curricular_face_loss(x, w, targets, backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [6, 40])
@pytest.mark.parametrize("backend", BACKENDS)
def test_curricular_matches_oracle(backend, C, dtype):
    """CurricularFace: loss, dX and dW against the oracle, with hard negatives in the case and t weighing them."""
    B = 12
    case = make_case("arc", B, 24, C, dtype, seed=C, ignore_some=True, class_weights=True)
    cos = oracle._class_cos(case["x"], case["w"])
    safe = case["t"].clamp_min(0)
    phi = torch.cos(oracle._theta(cos.gather(1, safe[:, None])) + 0.5)
    assert ((cos > phi) & ~torch.nn.functional.one_hot(safe, C).bool()).sum() >= 5  # hard negatives exist
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for t_run in (0.0, 0.4):
        opts = dict(m=0.5, s=10.0, t=t_run, label_smoothing=0.1, reduction="mean", class_weights=case["cw"])
        outs = []
        for be in ("oracle", backend):
            x, w = case["x"].detach().double().requires_grad_(), case["w"].detach().double().requires_grad_()
            if be != "oracle":
                x, w = (case[k].detach().clone().requires_grad_() for k in ("x", "w"))
            loss = _curricular(x, w, case["t"], backend=be, **opts)
            loss.backward()
            outs.append([loss.detach().double(), x.grad.double(), w.grad.double()])
        for name, a, b in zip(("loss", "dX", "dW"), outs[1], outs[0]):
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"t={t_run} {name}: {m}")
        if t_run == 0.0:
            at_zero = outs[0][0]
    assert abs(float(outs[0][0] - at_zero)) > 1e-3  # t changes the loss: it reaches the hard negatives


def test_per_sample_margins_read_once_per_row():
    """The kernels read a per-sample margin once per row wherever they read the row's target, and a shared one
    once per program: counted from the interpreter's loads (tests/work_counter.py), per launch."""
    if DEVICE == "cuda":
        pytest.skip("the counter instruments the Triton interpreter")
    from work_counter import WorkCounter
    B, C = 40, 48
    case = make_case("arc", B, 32, C, torch.float32, seed=1)
    counts = []
    for margins in (dict(m=0.3, m3=0.1), dict(m=row_margins(B, 1)["m"], m3=0.1),
                    row_margins(B, 1)):
        with WorkCounter() as wc:
            x, w = (case[k].detach().clone().requires_grad_() for k in ("x", "w"))
            F.arcface_loss(x, w, case["t"], s=10.0, backend="triton", **margins).backward()
        counts.append([(r.kernel, r.loaded.get("LAM_ptr", 0), r.loaded.get("T_ptr", 0)) for r in wc.launches])
    shared, one, two = counts
    for (k, lam0, t_bytes), (_, lam1, _), (_, lam2, _) in zip(shared, one, two):
        extra1, extra2 = lam1 - lam0, lam2 - lam0
        assert 0 < extra1 <= t_bytes // 2, (k, extra1, t_bytes)  # fp32 values against int64 targets
        assert extra2 == 2 * extra1, (k, extra1, extra2)


def test_per_sample_option_errors():
    case = make_case("arc", 5, 8, 4, torch.float32)
    x, w, t = case["x"], case["w"], case["t"]
    with pytest.raises(TypeError, match=r"'m' must be .*shape \[5\]"):
        F.arcface_loss(x, w, t, m=torch.zeros(4, device=DEVICE))
    with pytest.raises(TypeError, match=r"'m3' must be a number or a 0-dim float tensor, got a tensor of shape"):
        F.arcface_loss(x, w, t, m3=torch.zeros(5, 1, device=DEVICE))
    if DEVICE == "cpu":  # values are read per call on the CPU only
        with pytest.raises(LossConfigError, match=r"'m' must hold .* in every row, got nan in row 2"):
            F.arcface_loss(x, w, t, m=torch.tensor([0.1, 0.2, float("nan"), 0.1, 0.1]))
        with pytest.raises(LossConfigError, match=r"'m3' must hold .* every row, got 2.5 in row 0"):
            F.arcface_loss(x, w, t, m3=torch.tensor([2.5, 0.2, 0.2, 0.1, 0.1]))
        with pytest.raises(LossConfigError, match=r"looks like degrees"):
            F.arcface_loss(x, w, t, m=torch.tensor([28.6, 0.2, 0.2, 0.1, 0.1]))
    with pytest.raises(ValueError, match="'s' takes no gradient"):
        F.arcface_loss(x, w, t, s=torch.tensor(30.0, requires_grad=True))
    with pytest.raises(ValueError, match="not supported on the class-parallel path"):
        F.arcface_loss(x, w, t, m=torch.full((5,), 0.2, requires_grad=True), process_group=object())
    with pytest.raises(LossConfigError, match="CurricularFace: 't' must be"):
        F.curricular_face_loss(x, w, t, t=2.0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_inductor_fullgraph_matches_eager(backend):
    """Per-sample margins (requiring grad) and CurricularFace's t under torch.compile(fullgraph=True) with inductor:
    the loss and the gradients of x, W and the margins equal eager's, and new margin values compile nothing."""
    from torch._dynamo.utils import counters
    B, C = 10, 24
    case = make_case("arc", B, 16, C, torch.float32, seed=9, ignore_some=True)

    def fn(x, w, t, m, m3, t_run):
        return (F.arcface_loss(x, w, t, m=m, m3=m3, s=10.0, fallback="adaface", backend=backend)
                + F.curricular_face_loss(x, w, t, m=0.5, s=10.0, t=t_run, backend=backend, reduction="sum"))

    def step(f, seed):
        margins = row_margins(B, seed)
        leaves = [case["x"].detach().clone().requires_grad_(), case["w"].detach().clone().requires_grad_(),
                  margins["m"].float().requires_grad_(), margins["m3"].float().requires_grad_()]
        out = f(leaves[0], leaves[1], case["t"], leaves[2], leaves[3], torch.tensor(0.2, device=DEVICE))
        out.backward()
        return [out.detach()] + [leaf.grad for leaf in leaves]

    torch._dynamo.reset()
    with torch._inductor.config.patch(compile_threads=1):
        compiled = torch.compile(fn, fullgraph=True)
        for seed in (1, 2):
            for name, a, b in zip(("loss", "dX", "dW", "dm", "dm3"), step(compiled, seed), step(fn, seed)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda msg: f"{name}: {msg}")
            if seed == 1:
                graphs = counters["stats"]["unique_graphs"]
                assert graphs > 0  # the counter sees the compile (else the check below could not fail)
        assert counters["stats"]["unique_graphs"] == graphs  # the second batch's margins compiled nothing
