"""One road through every call: `deepfense.dispatch.choose` alone picks the implementation, the value checks never
change it, the plain CPU path serves every option against the float64 reference, and the value-check policy."""

import time

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from backend_cases import DEVICE, FUNCS, assert_close_to_gold, make_case, options
from deepfense import dispatch, inputs, torch_plain
from deepfense import options as option_rules
from deepfense.dispatch import Path
from deepfense.params import SMALL_HEAD_CLASSES, LossParams, Margin

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the plain path and the CPU check policy are CPU concerns")

SYNCS = {"item", "_local_scalar_dense", "nonzero", "is_nonzero", "tolist", "equal"}


@pytest.fixture
def paths(monkeypatch):
    """The path of every call made while active, as `dispatch.choose` returned it."""
    seen = []
    real = dispatch.choose

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(dispatch, "choose", spy)
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    return seen


@pytest.fixture
def cuda_policy(monkeypatch):
    """The CUDA check policy on CPU tensors (no value checks unless asked); the plain path, which serves CPU tensors
    only, is left out as it is on CUDA."""
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    monkeypatch.setattr(option_rules, "POLICY_DEVICE", "cuda")
    monkeypatch.setattr(torch_plain, "serves", lambda *args: False)


# B = 1 (one row), 8 and 33 (DeepFense's sizes, 33 odd); D = 1 (every cosine +-1) and 160 (a DeepFense embedding);
# C = 2 (the deepfake head) and 5 (a wider small head); 60 x 1024 a wide embedding; float64 checks the formulation
# tightly.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B,D,C", [(1, 1, 2), (8, 160, 2), (33, 7, 5), (60, 1024, 3)])
@pytest.mark.parametrize("loss", ["ce", "oc"])
def test_plain_path_matches_reference(loss, B, D, C, reduction, dtype, paths):
    case = make_case(loss, B, D, C, dtype, seed=B + D)
    assert_close_to_gold(loss, case, "torch", options(loss, reduction), dtype)
    assert paths[-1] is Path.PLAIN  # the last call is the backend's own (the first two are the reference's)


# every option DeepFense users set, alone and together, with the value checks on and off
OPTION_SETS = {
    "class-weights": dict(class_weights=True),
    "ignore-some": dict(ignore_some=True),
    "smoothing": dict(smoothing=0.1),
    "all-together": dict(class_weights=True, ignore_some=True, smoothing=0.1),
    "ignore-in-range": dict(ignore_index=1),
    "bonafide-0": dict(bonafide_label=0),
}


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss,what", [(loss, what) for loss in ("ce", "oc") for what in OPTION_SETS
                                       if not ("smoothing" in OPTION_SETS[what] and loss == "oc"
                                               or "bonafide_label" in OPTION_SETS[what] and loss == "ce")])
def test_plain_path_serves_every_option(loss, what, reduction, validate, paths):
    spec = dict(OPTION_SETS[what])
    case = make_case(loss, 19, 12, 3, torch.float64, seed=7, ignore_some=spec.pop("ignore_some", False),
                     class_weights=spec.pop("class_weights", False))
    opts = options(loss, reduction, smoothing=spec.pop("smoothing", 0.0), validate=validate, **spec)
    assert_close_to_gold(loss, case, "torch", opts, torch.float64)
    assert paths[-1] is Path.PLAIN, paths


@pytest.mark.parametrize("loss", ["am", "a", "oc", "ce", "arc"])
def test_validate_never_changes_the_path(loss, paths):
    """Every loss, options on and off, checks on and off: the same path each time (torch and triton backends)."""
    for backend in ("torch", "triton", "reference"):
        for cw in (False, True):
            case = make_case("am" if loss == "arc" else loss, 9, 6, 3, torch.float32, seed=3, class_weights=cw,
                             ignore_some=True)
            kw = {"bias": case["bias"]} if loss == "ce" else {}
            if cw:
                kw["class_weights"] = case["cw"].float()
            by_validate = []
            for validate in (True, False):
                paths.clear()
                FUNCS[loss](case["x"], case["w"], case["t"], backend=backend, validate=validate,
                            **options(loss), **kw)
                by_validate.append(list(paths))
            assert by_validate[0] == by_validate[1] and len(by_validate[0]) == 1, (backend, cw, by_validate)


def test_paths_by_shape_and_backend():
    """The table in `deepfense.dispatch`: which path serves what."""
    def path(loss, B, C, dtype=torch.float32, backend="torch", sub=1):
        margin = {"ce": Margin.NONE, "oc": Margin.ONE_CLASS, "am": Margin.ADDITIVE}[loss]
        p = LossParams(margin, s=30.0, sub_centers=sub)
        x = torch.zeros(B, 4, dtype=dtype)
        w = torch.zeros(C, 4, dtype=dtype) if loss == "ce" else torch.zeros(4, C * sub, dtype=dtype)
        return dispatch.choose(p, x, w, None, backend)
    assert path("ce", 8, 2) is Path.PLAIN and path("oc", 8, 1) is Path.PLAIN
    assert path("ce", 8, 2, torch.float16) is Path.FUNCTION  # half inputs: fp32 arithmetic inside
    assert path("ce", 8, SMALL_HEAD_CLASSES + 1) is Path.FUNCTION
    assert path("oc", torch_plain.OC_MAX_VALUES // 4, 1) is Path.PLAIN  # D = 4 here
    assert path("oc", torch_plain.OC_MAX_VALUES // 4 + 1, 1) is Path.FUNCTION
    assert path("ce", torch_plain.CE_MAX_ROWS + 1, 2) is Path.FUNCTION
    assert path("am", 8, 2) is Path.FUNCTION
    assert path("ce", 8, 2, backend="reference") is Path.REFERENCE
    assert path("am", 8, 2, backend="triton") is Path.SMALL_HEAD
    assert path("am", 8, 2, backend="triton", sub=2) is Path.LARGE_HEAD
    assert path("am", 8, 40, backend="triton") is Path.LARGE_HEAD


def _entry_points():
    """Every way a user reaches a loss: the functional API, the modules, YAML, and the DeepFense adapter's classes."""
    from deepfense.losses import ArcFace, ASoftmax, CombinedMargin, CrossEntropy, OCSoftmax, AMSoftmax, build_loss
    x, y2, y4 = torch.randn(6, 8), torch.randint(0, 2, (6,)), torch.randint(0, 4, (6,))
    w = torch.randn(8, 4)
    yield "functional am", lambda: FUNCS["am"](x, w, y4)
    yield "functional a", lambda: FUNCS["a"](x, w, y4, lam=5.0)
    yield "functional oc", lambda: FUNCS["oc"](x, w[:, :1], y2)
    yield "functional ce", lambda: FUNCS["ce"](x, w.t(), y4)
    yield "functional arcface", lambda: FUNCS["arc"](x, w, y4)
    for cls in (AMSoftmax, ASoftmax, CrossEntropy, ArcFace, CombinedMargin):
        yield f"module {cls.__name__}", lambda cls=cls: cls(8, 4)(x, y4)
    yield "module OCSoftmax", lambda: OCSoftmax(8)(x, y2)
    yield "yaml", lambda: build_loss({"type": "AMSoftmax", "args": {"embedding_dim": 8, "n_classes": 4}})(x, y4)


def test_every_entry_point_follows_choose(monkeypatch):
    """Patch the one dispatch function to send everything to the reference: every entry point follows."""
    served = []
    reference = dispatch._IMPLEMENTATIONS[Path.REFERENCE]
    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, Path.REFERENCE,
                        lambda *args: served.append(args[0].margin) or reference(*args))
    monkeypatch.setattr(dispatch, "choose", lambda *args, **kwargs: Path.REFERENCE)
    for name, call in _entry_points():
        served.clear()
        call()
        assert len(served) == 1, name


def test_plain_path_nan_row_stays_nan():
    """A NaN or Inf in one row's inputs gives that row a NaN loss and leaves the other rows finite (checks off)."""
    for loss in ("ce", "oc"):
        case = make_case(loss, 6, 5, 2, torch.float32, seed=1)
        case["x"][2, 0] = float("nan")
        case["x"][4, 1] = float("inf")
        kw = {"bias": case["bias"]} if loss == "ce" else {}
        rows = FUNCS[loss](case["x"], case["w"], case["t"], reduction="none", validate=False, **kw)
        assert rows[[2, 4]].isnan().all() and rows[[0, 1, 3, 5]].isfinite().all(), (loss, rows)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("loss", ["ce", "oc"])
def test_plain_mean_over_nothing_is_zero(loss, validate, paths):
    """Every row ignored, or every kept row of class weight 0: 'mean' is 0 with zero gradients, not torch's NaN."""
    case = make_case(loss, 7, 5, 2, torch.float32, seed=2)
    kw = {"bias": case["bias"]} if loss == "ce" else {}
    x = case["x"].clone().requires_grad_()
    out = FUNCS[loss](x, case["w"], torch.full_like(case["t"], -100), validate=validate, **kw)
    out.backward()
    assert out.item() == 0.0 and not x.grad.abs().sum()
    zero_cw = torch.zeros(2)
    assert FUNCS[loss](case["x"], case["w"], case["t"], class_weights=zero_cw, validate=validate, **kw).item() == 0.0
    assert set(paths) == {Path.PLAIN}


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


@pytest.mark.parametrize("loss", ["ce", "oc"])
def test_plain_path_names_a_bad_target_with_checks_off(loss):
    """The plain path's index ops see an out-of-range target even with the checks off: our error, not torch's."""
    case = make_case(loss, 5, 4, 2, torch.float32)
    kw = {"bias": case["bias"]} if loss == "ce" else {}
    for bad in (2, -3):
        t = case["t"].clone()
        t[1] = bad
        with pytest.raises(ValueError, match=f"target {bad} is out of range"):
            FUNCS[loss](case["x"], case["w"], t, validate=False, **kw)


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
    NaN); validate=True brings the clear errors back."""
    case = make_case(loss, 6, 5, 2, torch.float32)
    kw = {"bias": case["bias"]} if loss == "ce" else {}
    case["t"][0] = 7
    case["x"][1, 0] = float("nan")
    with _Ops() as ops:
        out = FUNCS[loss](case["x"], case["w"], case["t"], backend="torch", **options(loss), **kw)
    assert not SYNCS & set(ops.names), ops.names
    assert out.isnan()
    with pytest.raises(ValueError, match="out of range"):
        FUNCS[loss](case["x"], case["w"], case["t"], backend="torch", validate=True, **options(loss), **kw)


def test_env_and_option_precedence(monkeypatch):
    t = torch.zeros(3, dtype=torch.long)
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    assert inputs.validating(t) and not inputs.validating(t, False)
    monkeypatch.setattr(option_rules, "POLICY_DEVICE", "cuda")
    assert not inputs.validating(t) and inputs.validating(t, True)
    for on in ("1", "true", "ON", "Yes"):
        monkeypatch.setenv("DEEPFENSE_VALIDATE", on)
        assert inputs.validating(t) and not inputs.validating(t, False)
    for off in ("0", "false", "Off", "no"):
        monkeypatch.setenv("DEEPFENSE_VALIDATE", off)
        assert not inputs.validating(t) and not inputs.validating(t[:0], True)
    monkeypatch.setenv("DEEPFENSE_VALIDATE", "maybe")
    with pytest.raises(ValueError, match="DEEPFENSE_VALIDATE='maybe'"):
        inputs.validating(t)
    monkeypatch.delenv("DEEPFENSE_VALIDATE")
    with pytest.raises(ValueError, match="validate must be None, True or False"):
        inputs.validating(t, "false")


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
        inputs.check_finite(loss, x=x, weight=w)
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 50e-6
