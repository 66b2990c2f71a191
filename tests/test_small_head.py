"""The small-head path (deepfense.kernels.small_head, C <= 16) against the float64 reference, and its properties.

Every case runs through the functional API on backend='triton', which serves these heads with the small-head
kernels (the `small` fixture sees that it did), so the same inputs, options and error rule as tests/test_backends.py
apply (|fast - gold| <= 2 |torch same dtype - gold|
+ atol). Interpreter tiles are 4-8 wide (kernels.plan.plan_small, gpu=False), so these small shapes run several
row blocks, K chunks and backward programs; the `gpu_plan` cases use the H200 plan (DEEPFENSE_TILES=gpu,
DEEPFENSE_SM_COUNT=132).
"""

import pytest
import torch

from deepfense import dispatch
from backend_cases import FUNCS, LOSSES, assert_close_to_gold, make_case, options, run
from work_counter import WorkCounter
from deepfense.benchmark.launches import Step, step_launches
from deepfense.benchmark.work import launch_work, partial_sum_bytes
from deepfense.kernels.plan import SMALL_C, plan_small
from deepfense.kernels.small_head import small_head_loss
from deepfense.params import LossParams, Margin

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture
def small(monkeypatch):
    """Counts the calls the dispatcher sends to the small-head kernels, so a test can tell the path ran."""
    calls = []
    real = dispatch._IMPLEMENTATIONS[dispatch.Path.SMALL_HEAD]

    def spy(p, x, w, *args):
        calls.append(w.shape[0 if p.margin == Margin.NONE else 1])
        return real(p, x, w, *args)

    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, dispatch.Path.SMALL_HEAD, spy)
    return calls


@pytest.fixture
def gpu_plan(monkeypatch):
    monkeypatch.setenv("DEEPFENSE_TILES", "gpu")
    monkeypatch.setenv("DEEPFENSE_SM_COUNT", "132")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_reference_all_options(loss, dtype, small):
    """B = 13 (prime: a partial row block), D = 11 (odd: 3 forward / 2 backward K chunks, masked tails), C = 3 (not a
    power of two: a padded class column), with class weights, ignored rows and label smoothing (AM, CE)."""
    case = make_case(loss, 13, 11, 3, dtype, seed=7, ignore_some=True, class_weights=True)
    assert_close_to_gold(loss, case, "triton", options(loss, smoothing=0.1), dtype)
    assert small


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
def test_reductions(loss, reduction, small):
    """Per-row ('none': a different upstream gradient on every row) and summed losses on the binary head."""
    case = make_case(loss, 10, 6, 2, torch.float32, seed=3, ignore_some=True)
    assert_close_to_gold(loss, case, "triton", options(loss, reduction=reduction), torch.float32)


SHAPES = [
    pytest.param(0, 5, 2, id="B0"),  # empty batch: no launch, zero gradients, mean 0
    pytest.param(1, 1, 1, id="B1-D1-C1"),  # one row, one feature (every cosine +-1), one class
    pytest.param(5, 1, 16, id="D1-C16"),  # the largest small head
    pytest.param(23, 9, 2, id="prime-B"),  # several backward programs with unequal row ranges
    pytest.param(6, 19, 16, id="C16-K-chunks"),
]


@pytest.mark.parametrize("B,D,C", SHAPES)
@pytest.mark.parametrize("loss", LOSSES)
def test_shapes(loss, B, D, C, small):
    case = make_case(loss, B, D, C, torch.float32, seed=B + D + C, class_weights=True)
    assert_close_to_gold(loss, case, "triton", options(loss, reduction="none" if B % 2 else "mean"), torch.float32)


@pytest.mark.parametrize("loss", LOSSES)
def test_strided_views(loss, small):
    """Embeddings as a row- and column-strided view; the weight a transposed layout (CrossEntropy's fc.weight [C, D]
    with strides (1, C), which the kernels take as it is)."""
    case = make_case(loss, 9, 14, 3, torch.float32, seed=5)
    case["x"] = torch.cat([case["x"], case["x"]], 1).repeat(2, 1)[::2, ::2]
    assert case["x"].stride() == (56, 2)
    case["w"] = case["w"].t().contiguous().t()
    assert_close_to_gold(loss, case, "triton", options(loss), torch.float32)


@pytest.mark.parametrize("loss,dtype,C", [("am", torch.bfloat16, 2), ("a", torch.float32, 2), ("oc", torch.bfloat16, 1),
                                          ("ce", torch.float32, 2), ("a", torch.float32, 8),
                                          ("ce", torch.bfloat16, 16)], ids=str)
def test_gpu_plan_matches_reference(loss, dtype, C, small, gpu_plan):
    """The H200 tiles under the interpreter: D = 260 gives 17 forward K chunks and 2 backward ones (BLOCK_K 256),
    B = 130 two forward row blocks of 128 and tens of backward row blocks per program; C = 8 and 16 take the
    16-warp tiles (one forward block of 512 or 256 rows, one masked backward K chunk of 1024 or 512)."""
    case = make_case(loss, 130, 260, C, dtype, seed=11, ignore_some=True, class_weights=True)
    assert_close_to_gold(loss, case, "triton", options(loss, reduction="none"), dtype)


@pytest.mark.parametrize("loss,tiles", [("am", "interpreter"), ("a", "gpu"), ("oc", "gpu"), ("ce", "interpreter")])
def test_bitwise_deterministic(loss, tiles, small, monkeypatch):
    if tiles == "gpu":
        monkeypatch.setenv("DEEPFENSE_TILES", "gpu")
        monkeypatch.setenv("DEEPFENSE_SM_COUNT", "132")
    case = make_case(loss, 23, 13, 2, torch.float32, seed=2, ignore_some=True, class_weights=True)
    first = run(loss, case, "triton", options(loss, smoothing=0.1))
    second = run(loss, case, "triton", options(loss, smoothing=0.1))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _params(loss, reduction="mean"):
    margin = {"am": Margin.ADDITIVE, "a": Margin.ANGULAR, "oc": Margin.ONE_CLASS, "ce": Margin.NONE}[loss]
    extra = {"am": dict(s=30.0, m=0.3), "a": dict(m=4.0, gamma=0.5), "oc": {}, "ce": {}}[loss]
    return LossParams(margin, reduction=reduction, **extra)


def _loss_fn(loss, case, reduction="none", ce_view=False):
    """small_head_loss called directly (no value checks), as a function of (x, w, bias); CrossEntropy's fc.weight
    [C, D] as it is (classes_first), or with ce_view its [D, C] transposed view."""
    def fn(x, w, bias):
        first = loss == "ce" and not ce_view
        return small_head_loss(x, w.t() if ce_view else w, bias, case["t"], None, 7.5, _params(loss, reduction),
                               classes_first=first)
    return fn


def _direct(loss, case, reduction="none", fn=None):
    """The loss and the leaves x, w, bias it was computed from (copies of the case's tensors)."""
    x, w = case["x"].clone().requires_grad_(), case["w"].clone().requires_grad_()
    bias = case["bias"].clone().requires_grad_() if "bias" in case else None
    return (fn or _loss_fn(loss, case, reduction))(x, w, bias), x, w, bias


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("loss", LOSSES)
def test_non_finite_row_gives_nan_row(loss, bad):
    """A NaN or Inf in one embedding row makes that row's loss NaN (never a zero vector's finite loss); the other
    rows match the reference. An exact zero row stays finite with zero gradient."""
    case = make_case(loss, 7, 5, 2, torch.float32, seed=4)
    case["x"][2, 1] = float(bad)
    case["x"][4] = 0.0
    out, x, _, _ = _direct(loss, case)
    assert torch.isnan(out[2])
    ok = torch.arange(7) != 2
    gold = FUNCS[loss](case["x"][ok].double(), case["w"].double(), case["t"][ok], backend="reference",
                       reduction="none", **({"lam": 7.5} if loss == "a" else {}),
                       **({"bias": case["bias"].double()} if loss == "ce" else {}))
    torch.testing.assert_close(out[ok].double(), gold, rtol=1e-4, atol=1e-5)
    out[ok].sum().backward()
    if loss != "ce":  # CrossEntropy has no normalisation: its zero row has a gradient
        assert torch.equal(x.grad[4], torch.zeros(5))


def test_nan_weight_gives_nan_loss():
    case = make_case("am", 5, 4, 2, torch.float32, seed=1)
    case["w"][0, 1] = float("nan")
    assert torch.isnan(_direct("am", case)[0]).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_out_of_range_target_gives_nan_row(loss):
    """With no value check (small_head_loss itself never syncs), a target outside the classes makes its row NaN;
    ignore_index rows stay 0."""
    case = make_case(loss, 6, 4, 2, torch.float32, seed=9)
    case["t"][1] = 7
    case["t"][3] = -100
    out = _direct(loss, case)[0]
    assert torch.isnan(out[1]) and out[3] == 0
    assert torch.isfinite(out[torch.arange(6) != 1]).all()


@pytest.mark.parametrize("loss,reduction", [("am", "mean"), ("a", "none"), ("oc", "mean"), ("ce", "none"),
                                            ("ce", "sum")])
def test_torch_compile_inductor(loss, reduction):
    """fullgraph with inductor: the fake ops' shapes and strides match the real ones, gradients flow, numbers agree."""
    torch._dynamo.reset()
    case = make_case(loss, 12, 10, 3, torch.float32, seed=6)
    g = torch.rand(12, dtype=torch.float32) + 0.5

    def step(fn):
        out, x, w, bias = _direct(loss, case, fn=fn)
        (out * g).sum().backward() if reduction == "none" else out.backward()
        return [out.detach(), x.grad, w.grad] + ([bias.grad] if bias is not None else [])

    eager = step(_loss_fn(loss, case, reduction))
    compiled = step(torch.compile(_loss_fn(loss, case, reduction), fullgraph=True, backend="inductor"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rejects_what_it_cannot_run():
    case = make_case("am", 4, 3, SMALL_C + 1, torch.float32)
    with pytest.raises(ValueError, match="1..16 classes"):
        small_head_loss(case["x"], case["w"], None, case["t"], None, None, _params("am"))
    with pytest.raises(ValueError, match="float16, bfloat16"):
        small_head_loss(case["x"].int(), case["w"], None, case["t"], None, None, _params("am"))


def test_plan_h200_deepfake_head():
    """B = 65536, D = 1024, C = 2 on 132 SMs: two launches, each with at least 2 x SM-count programs, power-of-two
    tiles, a row reduction of at most 4096 products per program (32 per thread at 4 warps)."""
    for dtype in (torch.bfloat16, torch.float32):
        launches = plan_small(Margin.ADDITIVE, 65536, 1024, 2, dtype, dtype, n_sm=132)
        assert [launch.kernel for launch in launches] == ["_small_head_fwd_kernel", "_small_head_bwd_kernel"]
        for launch in launches:
            assert launch.programs >= 2 * 132, launch
            assert launch.num_warps == 4
            tile = launch.meta["BLOCK_B"] * launch.meta["BLOCK_K"] * launch.meta["BLOCK_C"]
            assert tile <= 4096 and all(v & (v - 1) == 0 for v in launch.meta.values()), launch
            assert launch.meta["BLOCK_C"] == 2  # no padding of the two classes to 16
    assert len(plan_small(Margin.NONE, 64, 8, 2, torch.float32, torch.float32, n_sm=132, need_dx=False,
                          need_dw=False)) == 1


@pytest.mark.parametrize("loss", ["am", "ce"])
def test_mixed_dtypes(loss, small):
    """bf16 embeddings with an fp32 weight (autocast's usual pair): computed in fp32, dX in bf16, dW in fp32."""
    case = make_case(loss, 11, 9, 2, torch.float32, seed=8, ignore_some=True)
    case["x"] = case["x"].bfloat16()
    assert_close_to_gold(loss, case, "triton", options(loss, reduction="none"), torch.bfloat16)


@pytest.mark.parametrize("frozen", ["x", "w"])
@pytest.mark.parametrize("loss", ["a", "ce", "ce-view"])
def test_one_gradient_only(loss, frozen):
    """Only dW (a frozen encoder's embeddings) or only dX (a frozen head): the backward launches with NEED_DX or
    NEED_DW off and gives the same gradient as the full backward. ce-view: CrossEntropy given its [D, C] view."""
    loss, ce_view = loss[:2] if loss.startswith("ce") else loss, loss == "ce-view"
    case = make_case(loss, 9, 7, 3, torch.float32, seed=12)
    full, x, w, bias = _direct(loss, case, fn=_loss_fn(loss, case, ce_view=ce_view))
    full.sum().backward()
    x2, w2 = case["x"].clone().requires_grad_(frozen != "x"), case["w"].clone().requires_grad_(frozen != "w")
    bias2 = case["bias"].clone().requires_grad_(frozen != "w") if "bias" in case else None
    _loss_fn(loss, case, ce_view=ce_view)(x2, w2, bias2).sum().backward()
    live, kept = (w, w2) if frozen == "x" else (x, x2)
    assert (x2.grad if frozen == "x" else w2.grad) is None
    assert torch.equal(live.grad, kept.grad)


STEP_LOSS = {"am": "AMSoftmax", "a": "ASoftmax", "oc": "OCSoftmax", "ce": "CrossEntropy"}


def _planned_work(loss, B, D, C, dtype, n_sm=132):
    """One training step ('mean', CrossEntropy with its bias) by the roofline work model (deepfense.benchmark.work,
    which tests/test_roofline.py checks equals the interpreter's counts exactly): (launches, kernel bytes, bytes of
    the launchers' torch ops: the sum of the row groups' dW partials and dW's cast, none for one group; minimum,
    executed multiply-adds). The minimum reads x and w once and writes dX and dW once."""
    step = Step(STEP_LOSS[loss], B, D, C, "bf16" if dtype == torch.bfloat16 else "fp32", bias=loss == "ce")
    launches = step_launches(step, n_sm)
    works = [launch_work(launch, step, launches) for launch in launches]
    e = torch.finfo(dtype).bits // 8
    return (launches, sum(w.bytes for w in works), partial_sum_bytes(step, launches), 2 * B * D * e + 2 * D * C * e,
            sum(w.macs for w in works))


@pytest.mark.parametrize("loss,C,dtype", [("oc", 1, torch.bfloat16), ("am", 2, torch.bfloat16),
                                          ("ce", 2, torch.float32), ("a", 8, torch.float32),
                                          ("am", 16, torch.bfloat16), ("ce", 16, torch.bfloat16)], ids=str)
def test_budget_counted(loss, C, dtype, gpu_plan):
    """The small-head bytes budget, counted by tests/work_counter.py on the H200 plan (B = 256, D = 512; the
    bias-and-no-x-term CrossEntropy variant in fp32 and bf16; C = 8 and 16 at 16 warps): 2 launches, x read twice,
    dX written once, all bytes (the kernels' and the launchers' torch ops) <= 1.6x the minimum, multiply-adds <= 2x
    the useful ones; the counts equal the work model's, which the H200-shape test below relies on."""
    B, D = 256, 512
    case = make_case(loss, B, D, C, dtype, seed=1)
    with WorkCounter() as wc:
        out, x, w, _ = _direct(loss, case, "mean")
        out.backward()
    launches, planned_bytes, post, minimum, macs = _planned_work(loss, B, D, C, dtype)
    assert wc.grids() == [(launch.kernel, launch.grid) for launch in launches]
    assert wc.loaded("X_ptr") == 2 * x.nbytes and wc.stored("DX_ptr") == x.nbytes and wc.stored("X_ptr") == 0
    assert wc.loaded() + wc.stored() == planned_bytes, wc.table()
    assert (planned_bytes + post) / minimum <= 1.6, (planned_bytes + post) / minimum
    assert wc.macs == macs <= 2 * 3 * B * D * C


@pytest.mark.parametrize("B,D,C", [(B, D, C) for B, D in ((65536, 1024), (256, 512)) for C in (1, 2, 4, 8, 16)]
                         + [(8192, 512, C) for C in (1, 2, 4, 8)])
def test_budget_h200(B, D, C):
    """The same budget from the work model (checked against the counter above) for every loss, bf16 and fp32, at
    the deepfake heads' H200 shape B = 65536, D = 1024 and at D = 512: bytes <= 1.6x the minimum, multiply-adds
    <= 2x the useful ones, 2 launches. Where it does not hold (8192 x 512 with 16 classes: 1.61x in bf16, the
    partials of the few row groups; D <= 192 with 4 or more classes) docs/kernels.md says so."""
    for loss in (["oc"] if C == 1 else ["am", "a", "ce"]):
        for dtype in (torch.bfloat16, torch.float32):
            launches, kernel_bytes, post, minimum, macs = _planned_work(loss, B, D, C, dtype)
            assert len(launches) == 2
            assert (kernel_bytes + post) / minimum <= 1.6, (loss, dtype, (kernel_bytes + post) / minimum)
            assert macs <= 2 * 3 * B * D * C


@pytest.mark.parametrize("B,D", [(1024, 192), (8192, 160)])
def test_budget_deepfake_embeddings(B, D):
    """DeepFense's own embedding widths (D = 160, 192): the deepfake heads (C = 1, 2) meet the same budget."""
    for loss, C in (("oc", 1), ("am", 2), ("a", 2), ("ce", 2)):
        for dtype in (torch.bfloat16, torch.float32):
            _, kernel_bytes, post, minimum, _ = _planned_work(loss, B, D, C, dtype)
            assert (kernel_bytes + post) / minimum <= 1.6, (loss, dtype, (kernel_bytes + post) / minimum)


def test_small_heads_fill_the_gpu():
    """At B = 65536, D = 1024 the deepfake heads' launches have at least 2 x SM-count programs; 8 and 16 classes
    use 16 warps per program and keep at least one program per SM in the forward."""
    for C in (1, 2, 8, 16):
        fwd, bwd = plan_small(Margin.ONE_CLASS if C == 1 else Margin.ADDITIVE, 65536, 1024, C, torch.bfloat16,
                              torch.bfloat16, n_sm=132)
        if C <= 2:
            assert fwd.programs >= 264 and bwd.programs >= 264, (fwd, bwd)
        else:
            assert fwd.num_warps == bwd.num_warps == 16 and fwd.programs >= 128, (fwd, bwd)
