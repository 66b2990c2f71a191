"""torch.compile with inductor (the default backend, which also runs on CPU) and bad values (NaN/Inf inputs,
out-of-range targets) on both fast backends.

Inductor checks every custom op's real output strides against its fake ones (aot_eager does not), so each loss is
compiled for every C kind x reduction x dtype. Compiling is slow, so one graph per (loss, backend) holds all of them:
each combination is traced and stride-checked on its own, and the backward is checked through one random weighted
sum of all outputs, whose gradient for each input is that input's own combination's.
"""

import pytest
import torch

from backend_cases import FAST_BACKENDS, FUNCS, LOSSES, make_case, options

REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.bfloat16)
# C: the deepfake head (one class tile; OCSoftmax has one centre), a small odd C, and C just above one class tile
# (16 wide in the interpreter): the two kinds of launch plan, fused one-tile and class-tiled.
C_KINDS = {"oc": (1,), "am": (2, 5, 17), "a": (2, 5, 17), "ce": (2, 5, 17)}
# The torch backend's autograd Function is traced op by op (slow to compile): one combination per loss, together
# covering every C kind, reduction and dtype; its code shape depends on C only through C < D (`_gemm_layout`).
TORCH_COMBOS = [("am", 2, torch.float32, "mean"), ("a", 17, torch.bfloat16, "sum"), ("oc", 1, torch.bfloat16, "none"),
                ("ce", 5, torch.float32, "none"), ("ce", 17, torch.bfloat16, "mean")]
B, D = 7, 9
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-2)}  # bf16: one ulp


def _combos(backend):
    if backend == "torch":
        return TORCH_COMBOS
    return [(loss, C, dtype, r) for loss in LOSSES for C in C_KINDS[loss] for dtype in DTYPES for r in REDUCTIONS]


def _step(combos, cases, fn):
    """Every output of `fn` and the gradients of a random weighted sum of them w.r.t. every x, w (and bias)."""
    leaves = [{k: v.detach().clone().requires_grad_() for k, v in case.items() if k in ("x", "w", "bias")}
              for case in cases]
    outs = fn(leaves, [case["t"] for case in cases])
    gen = torch.Generator().manual_seed(0)
    total = sum((o.double() * (torch.rand(o.shape, generator=gen, dtype=torch.float64) + 0.5)).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs], [[leaf.grad for leaf in case.values()] for case in leaves]


@pytest.fixture
def one_compile_thread():
    """Inductor's compile worker pool costs more than it saves for these small graphs on a 2-core machine."""
    with torch._inductor.config.patch(compile_threads=1):
        yield


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_inductor_fullgraph_matches_eager(monkeypatch, backend, one_compile_thread):
    """Forward and gradients under torch.compile(fullgraph=True) with inductor equal eager's for every loss x C kind x
    reduction x dtype, all in one graph (inductor asserts each custom op's real output strides against its fake's).
    Heads with C <= 16 run the large-head kernels' one-tile path here (where a fake op's strides once broke compile); the
    small-head path has its own inductor test (tests/test_small_head.py)."""
    from deepfense.kernels import plan
    monkeypatch.setattr(plan, "SMALL_HEADS", False)
    torch._dynamo.reset()
    combos = _combos(backend)
    cases = [make_case(loss, B, D, C, dtype, seed=C, ignore_some=True) for loss, C, dtype, _ in combos]

    def fn(leaves, targets):
        outs = []
        for (loss, _, _, r), case, t in zip(combos, leaves, targets):
            extra = {"bias": case["bias"]} if loss == "ce" else {}
            outs.append(FUNCS[loss](case["x"], case["w"], t, backend=backend, **options(loss, reduction=r), **extra))
        return outs

    eager_outs, eager_grads = _step(combos, cases, fn)
    outs, grads = _step(combos, cases, torch.compile(fn, fullgraph=True))
    for combo, a, b, ga, gb in zip(combos, outs, eager_outs, grads, eager_grads):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m: f"{combo}: loss: {m}")
        for name, x, y in zip(("dX", "dW", "dbias"), ga, gb):
            assert x is not None and y is not None, (combo, name)
            torch.testing.assert_close(x, y, **TOL[combo[2]], msg=lambda m: f"{combo}: {name}: {m}")


BAD = ["nan-x", "inf-x", "nan-w", "inf-w", "nan-bias"]


def _bad_case(loss, kind, C):
    case = make_case(loss, 6, 8, C, seed=5)
    if kind.endswith("-x"):
        case["x"][2, 3] = float(kind[:3])
    elif kind.endswith("-w"):
        case["w"][1, 0] = float(kind[:3])  # one entry of one class (CrossEntropy: [C, D]) spoils every row's softmax
    else:
        case["bias"][0] = float("nan")
    return case


def _plain(loss, case, backend):
    """Whether the call takes the plain torch-ops path (`deepfense.dispatch`), which keeps torch's own semantics."""
    from deepfense import dispatch
    from deepfense.params import LossParams, Margin
    p = LossParams({"ce": Margin.NONE, "oc": Margin.ONE_CLASS}.get(loss, Margin.ADDITIVE), s=1.0)
    return dispatch.choose(p, case["x"], case["w"], case.get("bias"), backend) is dispatch.Path.PLAIN


def _call(loss, case, backend, t=None, **kw):
    extra = {"bias": case["bias"]} if loss == "ce" else {}
    return FUNCS[loss](case["x"], case["w"], case["t"] if t is None else t, backend=backend, **options(loss, **kw),
                       **extra)


@pytest.mark.parametrize("C", [3, 20], ids=["one-tile", "two-tiles"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss,kind", [(loss, kind) for loss in LOSSES for kind in BAD
                                       if kind != "nan-bias" or loss == "ce"])  # only CrossEntropy has a bias
def test_non_finite_inputs(monkeypatch, loss, backend, kind, C):
    """NaN/Inf in an embedding row makes that row's loss NaN (and only that row's); in the weight or bias, every
    row's. Never a zero vector: with value checks on the eager check names the input."""
    case = _bad_case(loss, kind, C)
    monkeypatch.setenv("DEEPFENSE_VALIDATE", "0")
    if kind == "inf-w" and loss == "ce" and _plain(loss, case, backend):
        # torch's own cross_entropy (the plain path, as DeepFense runs it): a row whose Inf logit is -inf keeps a
        # finite loss, but its embedding gradient is NaN: no row is left finite in both
        x = case["x"].clone().requires_grad_()
        rows = _call(loss, dict(case, x=x), backend, reduction="none")
        rows.sum().backward()
        assert (torch.isnan(rows) | ~torch.isfinite(x.grad).all(1)).all(), (rows, x.grad)
        return
    rows = _call(loss, case, backend, reduction="none")
    if kind.endswith("-x"):
        assert torch.isnan(rows[2]), rows
        assert torch.isfinite(rows[torch.arange(6) != 2]).all(), rows
    else:
        assert torch.isnan(rows).all(), rows
    assert torch.isnan(_call(loss, case, backend, reduction="mean"))
    monkeypatch.setenv("DEEPFENSE_VALIDATE", "1")
    name = {"x": "embeddings", "w": "weight", "bias": "bias"}[kind.split("-")[1]]
    with pytest.raises(ValueError, match=f"{name} contains? NaN or Inf"):
        _call(loss, case, backend)


@pytest.mark.parametrize("C", [3, 20], ids=["one-tile", "two-tiles"])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_out_of_range_targets(monkeypatch, loss, backend, C):
    """With value checks off, a target outside [0, C) (not ignore_index) makes its row's loss NaN, not a plausible
    number (the plain CPU path's index ops see it anyway: it raises); with checks on, eager raises naming the
    target."""
    case = make_case(loss, 6, 8, C, seed=6)
    n_t = 2 if loss == "oc" else C
    t = case["t"].clone()
    t[1], t[4], t[5] = n_t, -3, -100  # one past the end, negative, and ignored (which stays a valid row)
    monkeypatch.setenv("DEEPFENSE_VALIDATE", "0")
    if _plain(loss, case, backend):
        for reduction in ("none", "mean", "sum"):
            with pytest.raises(ValueError, match=f"target {n_t} is out of range"):
                _call(loss, case, backend, t=t, reduction=reduction)
        return
    rows = _call(loss, case, backend, t=t, reduction="none")
    assert torch.isnan(rows[[1, 4]]).all(), rows
    assert torch.isfinite(rows[[0, 2, 3, 5]]).all() and rows[5] == 0, rows
    for reduction in ("mean", "sum"):
        assert torch.isnan(_call(loss, case, backend, t=t, reduction=reduction))
    monkeypatch.setenv("DEEPFENSE_VALIDATE", "1")
    with pytest.raises(ValueError, match=f"target {n_t} is out of range"):
        _call(loss, case, backend, t=t)
