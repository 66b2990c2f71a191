"""The small-batch path (deepfense.torch_plain) and the value-check policy (deepfense.inputs).

The plain path serves CrossEntropy and OCSoftmax on the 'torch' backend while the value checks run (CPU default); the
tests below check that it is taken where it should be, matches the float64 reference by the error rule, keeps the NaN
and zero-vector semantics, and that every case it declines still gives the general path's answer.
"""

import time

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from backend_cases import DEVICE, FUNCS, assert_close_to_gold, make_case, options
from deepfense import inputs, torch_plain
from deepfense.params import LossParams, Margin

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the plain path and the CPU check policy are CPU concerns")

SYNCS = {"item", "_local_scalar_dense", "nonzero", "is_nonzero", "tolist", "equal"}


@pytest.fixture
def plain_calls(monkeypatch):
    """Counts the calls that reach the plain path (CrossEntropy's `cross_entropy`, OCSoftmax's `margin_loss`)."""
    calls = []
    real_ce, real = torch_plain.cross_entropy, torch_plain.margin_loss

    def spy_ce(*args):
        calls.append(Margin.NONE)
        return real_ce(*args)

    def spy(*args):
        calls.append(args[-1].margin)
        return real(*args)
    monkeypatch.setattr(torch_plain, "cross_entropy", spy_ce)
    monkeypatch.setattr(torch_plain, "margin_loss", spy)
    return calls


@pytest.fixture
def cuda_policy(monkeypatch):
    """The CUDA check policy on CPU tensors (no value checks unless asked)."""
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    monkeypatch.setattr(inputs, "POLICY_DEVICE", "cuda")


# B = 1 (one row), 8 and 33 (DeepFense's sizes, 33 odd); D = 1 (every cosine +-1) and 160 (a DeepFense embedding);
# C = 2 (the deepfake head) and 5 (a wider small head); 130 x 1024 takes CrossEntropy's W X^T layout
# (torch_plain.WIDE_GEMM); float64 checks the formulation tightly.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B,D,C", [(1, 1, 2), (8, 160, 2), (33, 7, 5), (130, 1024, 3)])
@pytest.mark.parametrize("loss", ["ce", "oc"])
def test_plain_path_matches_reference(loss, B, D, C, reduction, dtype, plain_calls, monkeypatch):
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    case = make_case(loss, B, D, C, dtype, seed=B + D)
    assert_close_to_gold(loss, case, "torch", options(loss, reduction), dtype)
    assert plain_calls, "the plain path was not taken"


@pytest.mark.parametrize("loss", ["ce", "oc"])
def test_plain_path_zero_vectors_and_smoothing(loss, plain_calls, monkeypatch):
    """Zero rows (and OCSoftmax's zero centre) normalise to zero with zero gradient; CE with label smoothing and some
    rows ignored stays on the plain path (torch's own weighting)."""
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    case = make_case(loss, 12, 9, 3, torch.float64, seed=4, ignore_some=loss == "ce")
    case["x"][1] = 0
    if loss == "oc":
        zero_w = dict(case, w=torch.zeros_like(case["w"]))
        assert_close_to_gold(loss, zero_w, "torch", options(loss), torch.float64)
    assert_close_to_gold(loss, case, "torch", options(loss, smoothing=0.1), torch.float64)
    if loss == "ce":  # an ignore_index inside [0, C): class-1 rows are dropped
        plain = make_case(loss, 12, 9, 3, torch.float64, seed=5)
        assert_close_to_gold(loss, plain, "torch", options(loss, ignore_index=1), torch.float64)
    assert plain_calls


@pytest.mark.parametrize("B,D", [(8, 160), (130, 1024)])
def test_plain_cross_entropy_without_bias(B, D, plain_calls, monkeypatch):
    """fc without bias (DeepFense's benchmark head) on both of CrossEntropy's layouts (torch_plain.WIDE_GEMM)."""
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    case = make_case("ce", B, D, 2, torch.float32, seed=B)
    del case["bias"]
    assert_close_to_gold("ce", case, "torch", options("ce"), torch.float32)
    assert plain_calls == [Margin.NONE]


def test_plain_path_nan_row_stays_nan():
    """A NaN or Inf in one row's inputs gives that row a NaN loss and leaves the other rows finite."""
    for loss in ("ce", "oc"):
        case = make_case(loss, 6, 5, 2, torch.float32, seed=1)
        case["x"][2, 0] = float("nan")
        case["x"][4, 1] = float("inf")
        p = LossParams(Margin.NONE if loss == "ce" else Margin.ONE_CLASS, reduction="none")
        rows = torch_plain.margin_loss(case["x"], case["w"], case.get("bias"), case["t"], p)
        assert rows[[2, 4]].isnan().all() and rows[[0, 1, 3, 5]].isfinite().all(), (loss, rows)


@pytest.mark.parametrize("what", ["all-ignored", "oc-ignored", "class-weights", "fp16", "checks-off"])
def test_declined_cases_take_the_general_path(what, plain_calls, monkeypatch):
    """Where the plain path would differ (torch's NaN mean over no rows, OCSoftmax ignored rows) or does not apply,
    the general path answers: every row ignored is 0, not NaN."""
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    loss = "oc" if what == "oc-ignored" else "ce"
    case = make_case(loss, 9, 6, 2, torch.float16 if what == "fp16" else torch.float32, seed=2,
                     ignore_some=what == "oc-ignored", class_weights=what == "class-weights")
    opts = options(loss, validate=False if what == "checks-off" else None)
    if what == "all-ignored":
        case["t"][:] = -100
        assert FUNCS[loss](case["x"], case["w"], case["t"], bias=case["bias"]).item() == 0.0
    dtype = torch.float16 if what == "fp16" else torch.float32
    assert_close_to_gold(loss, case, "torch", opts, dtype)
    if what != "all-ignored":  # (that one reaches the plain path, whose NaN mean sends it on to the general path)
        assert not plain_calls, "the plain path served a declined case"


@pytest.mark.parametrize("loss", ["am", "a", "oc", "ce"])
def test_cpu_default_checks_raise_clear_errors(loss, monkeypatch):
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    case = make_case(loss, 5, 4, 2, torch.float32)
    kw = {"bias": case["bias"]} if loss == "ce" else {}
    bad_t = case["t"].clone()
    bad_t[3] = 2
    with pytest.raises(ValueError, match="target 2 is out of range"):
        FUNCS[loss](case["x"], case["w"], bad_t, backend="torch", **kw)
    x = case["x"].clone()
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="embeddings contain NaN or Inf"):
        FUNCS[loss](x, case["w"], case["t"], backend="torch", **kw)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", ["am", "a", "oc", "ce"])
def test_cuda_policy_makes_no_host_sync_and_no_error(loss, cuda_policy):
    """Under the CUDA policy an out-of-range target or a NaN input raises nothing and syncs nothing (the loss is
    NaN where the kernels issue's semantics apply); validate=True brings the clear errors back."""
    case = make_case(loss, 6, 5, 2, torch.float32)
    kw = {"bias": case["bias"]} if loss == "ce" else {}
    case["t"][0] = 7
    case["x"][1, 0] = float("nan")
    with _Ops() as ops:
        FUNCS[loss](case["x"], case["w"], case["t"], backend="torch", **options(loss), **kw)
    assert not SYNCS & set(ops.names), ops.names
    with pytest.raises(ValueError, match="out of range"):
        FUNCS[loss](case["x"], case["w"], case["t"], backend="torch", validate=True, **options(loss), **kw)


def test_env_and_option_precedence(monkeypatch):
    t = torch.zeros(3, dtype=torch.long)
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    assert inputs.validating(t) and not inputs.validating(t, False)
    monkeypatch.setattr(inputs, "POLICY_DEVICE", "cuda")
    assert not inputs.validating(t) and inputs.validating(t, True)
    monkeypatch.setenv("DEEPFENSE_VALIDATE", "1")
    assert inputs.validating(t) and not inputs.validating(t, False)
    monkeypatch.setenv("DEEPFENSE_VALIDATE", "0")
    assert not inputs.validating(t) and not inputs.validating(t[:0], True)


def test_cpu_checks_are_cheap(monkeypatch):
    """The CPU value checks of one call at B = 32 (target min/max, loss finiteness) take a few microseconds: well
    under the 50 us the old masks-and-any checks cost on a busy 2-core machine (median of many calls)."""
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    t = torch.randint(0, 2, (32,))
    loss = torch.tensor(0.5, requires_grad=True) * 2
    x, w = torch.randn(32, 8), torch.randn(8, 2)
    p = LossParams(Margin.ADDITIVE, s=30.0, m=0.3)
    times = []
    for _ in range(300):
        start = time.perf_counter()
        inputs.check_targets(t, 2, p)
        inputs.check_finite(loss, x, w, None)
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 50e-6
