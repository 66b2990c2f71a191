"""One validation layer: every option is checked by its rule (`deepfense.options`) wherever it enters, with the same
error on every backend: the functional API, the module constructors, attribute assignment, `MarginScheduler` and
YAML."""

import math

import pytest
import torch

from backend_cases import DEVICE
from deepfense import functional as F
from deepfense.losses import AMSoftmax, ArcFace, ASoftmax, CombinedMargin, CrossEntropy, OCSoftmax, build_loss
from deepfense.losses.margins import MarginScheduler
from deepfense.options import LossConfigError

BACKENDS = ("torch", "triton", "reference")


def _inputs(C=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 8, generator=gen).to(DEVICE)
    return x, torch.randn(8, C, generator=gen).to(DEVICE), torch.randint(0, min(C, 2) if C == 1 else C, (6,),
                                                                          generator=gen).to(DEVICE)


# (call, the option the error must name): each returned a plausible number before it had a rule
FUNCTIONAL_CASES = {
    "am negative m": (lambda x, w, y, b: F.am_softmax_loss(x, w, y, m=-0.3, backend=b), "'m'"),
    "am zero s": (lambda x, w, y, b: F.am_softmax_loss(x, w, y, s=0.0, backend=b), "'s'"),
    "oc m_real above 1": (lambda x, w, y, b: F.oc_softmax_loss(x, w[:, :1], y % 2, m_real=1.5, backend=b),
                          "'m_real'"),
    "oc zero alpha": (lambda x, w, y, b: F.oc_softmax_loss(x, w[:, :1], y % 2, alpha=0.0, backend=b), "'alpha'"),
    "a negative lambda": (lambda x, w, y, b: F.a_softmax_loss(x, w, y, lam=-0.5, backend=b), "'lam'"),
    "a negative lambda tensor": (lambda x, w, y, b: F.a_softmax_loss(x, w, y, lam=torch.tensor(-0.5), backend=b),
                                 "'lam'"),
    "a fractional margin": (lambda x, w, y, b: F.a_softmax_loss(x, w, y, m=2.5, backend=b), "'m'"),
    "negative class weights": (lambda x, w, y, b: F.am_softmax_loss(x, w, y, class_weights=-torch.ones(4),
                                                                    backend=b), "class_weights"),
    "negative class weights, checks off": (
        lambda x, w, y, b: F.cross_entropy_loss(x, w.t(), y, class_weights=-torch.ones(4), backend=b,
                                                validate=False), "class_weights"),
    "NaN class weight": (lambda x, w, y, b: F.am_softmax_loss(
        x, w, y, class_weights=torch.tensor([1.0, math.nan, 1.0, 1.0]), backend=b), "class_weights"),
    "float ignore_index": (lambda x, w, y, b: F.am_softmax_loss(x, w, y, ignore_index=1.5, backend=b),
                           "'ignore_index'"),
    "smoothing above 1": (lambda x, w, y, b: F.cross_entropy_loss(x, w.t(), y, label_smoothing=1.5, backend=b),
                          "'label_smoothing'"),
    "arcface degrees": (lambda x, w, y, b: F.arcface_loss(x, w, y, m=20.0, backend=b), "looks like degrees"),
    "arcface zero s tensor": (lambda x, w, y, b: F.arcface_loss(x, w, y, s=torch.tensor(0.0), backend=b), "'s'"),
    "arcface negative m tensor": (lambda x, w, y, b: F.arcface_loss(x, w, y, m=torch.tensor(-0.5), backend=b),
                                  "'m'"),
    "combined negative m3": (lambda x, w, y, b: F.arcface_loss(x, w, y, m3=-1.0, backend=b), "'m3'"),
    "reduction typo": (lambda x, w, y, b: F.am_softmax_loss(x, w, y, reduction="avg", backend=b), "'reduction'"),
    "validate as a string": (lambda x, w, y, b: F.am_softmax_loss(x, w, y, validate="false", backend=b),
                             "validate"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FUNCTIONAL_CASES))
def test_functional_options_raise_the_same_error_on_every_backend(case, backend):
    call, names = FUNCTIONAL_CASES[case]
    x, w, y = _inputs()
    with pytest.raises(ValueError, match=names):
        call(x, w, y, backend)


@pytest.mark.parametrize("make,names", [
    (lambda: AMSoftmax(8, 4, m=-0.3), "'m'"),
    (lambda: AMSoftmax(8, 4, m=1.5), "'m'"),
    (lambda: ArcFace(8, 4, s=torch.tensor(0.0)), "'s'"),
    (lambda: ArcFace(8, 4, s=torch.tensor(-30.0)), "'s'"),
    (lambda: ArcFace(8, 4, m=torch.tensor(-0.5)), "'m'"),
    (lambda: ArcFace(8, 4, m=4.0), "looks like degrees"),
    (lambda: CombinedMargin(8, 4, m3=torch.tensor(-1.0)), "'m3'"),
    (lambda: CombinedMargin(8, 4, m2=28.6), r"math.radians\(28.6\) = 0.4992"),
    (lambda: OCSoftmax(8, m_fake=-1.5), "'m_fake'"),
    (lambda: OCSoftmax(8, alpha=-20.0), "'alpha'"),
    (lambda: ASoftmax(8, 4, lambda_power=-1.0), "'lambda_power'"),
    (lambda: ASoftmax(8, 4, lambda_min=float("nan")), "'lambda_min'"),
    (lambda: CrossEntropy(8, 4, ignore_index=True), "'ignore_index'"),
    (lambda: CrossEntropy(8, 4, class_weights=[1.0, -2.0, 1.0, 1.0]), "class_weights"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_constructors_check_every_option(make, names):
    with pytest.raises(LossConfigError, match=names):
        make()


@pytest.mark.parametrize("make,attr,bad", [
    (lambda: AMSoftmax(8, 4), "m", -5.0),
    (lambda: AMSoftmax(8, 4), "s", 0.0),
    (lambda: ArcFace(8, 4), "m", 20.0),
    (lambda: ArcFace(8, 4), "s", torch.tensor(-1.0)),
    (lambda: OCSoftmax(8), "m_real", 2.0),
    (lambda: OCSoftmax(8), "bonafide_label", 2),
    (lambda: ASoftmax(8, 4), "gamma", -0.5),
    (lambda: CrossEntropy(8, 4), "reduction", "avg"),
    (lambda: CrossEntropy(8, 4), "label_smoothing", -0.1),
    (lambda: OCSoftmax(8), "label_smoothing", 0.1),
])
def test_attribute_assignment_is_checked_and_leaves_the_head_usable(make, attr, bad):
    head = make()
    before = getattr(head, attr)
    with pytest.raises(LossConfigError, match=attr):
        setattr(head, attr, bad)
    assert getattr(head, attr) is before or getattr(head, attr) == before


@pytest.mark.parametrize("m", [0, -1, 2.5])
def test_asoftmax_margin_is_a_positive_integer(m):
    """SphereFace's m is any integer >= 1 (no upper bound: T_m's fp32 error stays below that of the cosine's own
    rounding); 0, negatives and fractions are errors wherever m enters."""
    x, w, y = _inputs()
    wanted = "'m' must be an integer >= 1"
    with pytest.raises(LossConfigError, match=wanted):
        F.a_softmax_loss(x, w, y, m=m, backend="reference")
    with pytest.raises(LossConfigError, match=wanted):
        ASoftmax(8, 4, m=m)
    with pytest.raises(LossConfigError, match=wanted):
        ASoftmax(8, 4).m = m
    with pytest.raises(LossConfigError, match=wanted):
        build_loss({"type": "ASoftmax", "args": {"embedding_dim": 8, "n_classes": 4, "m": m}})


def test_assignment_reaches_the_loss():
    """A valid assignment after construction changes the loss (the cached options are rebuilt)."""
    x, _, y = _inputs()
    head = AMSoftmax(8, 4, backend="torch")
    first = head(x, y)
    head.m = 0.0
    assert head(x, y) < first
    head.s = 10.0
    want = F.am_softmax_loss(x, head.mapper.weight, y, m=0.0, s=10.0, backend="reference")
    torch.testing.assert_close(head(x, y).double(), want.double(), rtol=1e-6, atol=0)


def test_margin_scheduler_checks_its_ends():
    with pytest.raises(LossConfigError, match="'m'"):
        MarginScheduler(AMSoftmax(8, 4), 0.0, -0.5, 0, 10)
    with pytest.raises(LossConfigError, match="looks like degrees"):
        MarginScheduler(ArcFace(8, 4, m=torch.tensor(0.0)), 0.0, 30.0, 0, 10)
    head = ArcFace(8, 4, m=torch.tensor(0.0))
    sched = MarginScheduler(head, 0.0, 0.4, 0, 4, increase_type="linear")
    assert [round(sched.step(), 6) for _ in range(5)] == [0.0, 0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("args,names", [
    ({"type": "ArcFace", "args": {"embedding_dim": 8, "n_classes": 4, "m": 20}}, "looks like degrees"),
    ({"type": "AMSoftmax", "args": {"embedding_dim": 8, "n_classes": 4, "m": -0.2}}, "'m'"),
    ({"type": "OCSoftmax", "args": {"embedding_dim": 8, "w_posi": 1.2}}, "'m_real'"),
])
def test_yaml_options_get_the_same_rules(args, names):
    with pytest.raises(LossConfigError, match=names):
        build_loss(args)


def test_nan_class_weight_is_named_not_blamed_on_the_scales():
    x, w, y = _inputs()
    cw = torch.tensor([1.0, 1.0, 1.0, 1.0])
    head = CrossEntropy(8, 4, class_weights=cw)
    head.class_weights[1] = math.nan  # written after construction: the per-call check sees it
    with pytest.raises(ValueError, match="class_weights"):
        head(x, y)
