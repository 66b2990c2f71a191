"""Parity with the toolkits speaker and face recipes train with, and loading their head checkpoints.

WeSpeaker's, SpeechBrain's and insightface's heads are written here from their published formulas, independently
of `deepfense.reference`; pytorch-metric-learning is compared directly when installed.
Weights are built the way each toolkit names and shapes them ([C, D], or pml's [D, C]). All in float64 on the
torch backend (the backends agree with the reference in tests/test_arcface.py); `PARITY_TOL` bounds the difference.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from backend_cases import DEVICE
from deepfense import functional as F
from deepfense.losses import AMSoftmax, ArcFace, CombinedMargin, load_head_weight
from test_arcface import angled_case

# theta = 1e-3 rows: sin theta from 1 - cos^2 loses ~6 digits, which d phi / d cos = cos m + sin m cos / sin theta shows
PARITY_TOL = dict(rtol=1e-9, atol=1e-10)


def _cos(x, weight_cd):
    return TF.linear(TF.normalize(x), TF.normalize(weight_cd))


def wespeaker_arc(x, weight_cd, y, scale, margin, easy_margin=False):
    """WeSpeaker ArcMarginProduct + CrossEntropyLoss: sin from (1 - cos^2).clamp(0, 1), fallback cos - mmm."""
    cosine = _cos(x, weight_cd)
    sine = torch.sqrt((1.0 - cosine.pow(2)).clamp(0, 1))
    phi = cosine * math.cos(margin) - sine * math.sin(margin)
    if easy_margin:
        phi = torch.where(cosine > 0, phi, cosine)
    else:
        phi = torch.where(cosine > math.cos(math.pi - margin), phi, cosine - (1.0 + math.cos(math.pi - margin)))
    one_hot = torch.zeros_like(cosine).scatter_(1, y[:, None], 1.0)
    return TF.cross_entropy(scale * (one_hot * phi + (1.0 - one_hot) * cosine), y)


def speechbrain_aam(x, weight_cd, y, scale, margin):
    """SpeechBrain Classifier + AdditiveAngularMargin + LogSoftmaxWrapper (KL divergence to one-hot / batch)."""
    cosine = _cos(x, weight_cd).clamp(-1 + 1e-7, 1 - 1e-7)
    sine = torch.sqrt(1.0 - cosine.pow(2))
    phi = cosine * math.cos(margin) - sine * math.sin(margin)
    phi = torch.where(cosine > math.cos(math.pi - margin), phi, cosine - math.sin(math.pi - margin) * margin)
    one_hot = TF.one_hot(y, cosine.shape[1]).to(cosine)
    out = scale * (one_hot * phi + (1.0 - one_hot) * cosine)
    return TF.kl_div(TF.log_softmax(out, 1), one_hot, reduction="sum") / one_hot.sum()


def insightface_combined(x, weight_cd, y, s, m1, m2, m3, interclass_filtering_threshold=0.0):
    """insightface arcface_torch: clamped normalised linear, CombinedMarginLoss (theta under no_grad), CE mean."""
    logits = _cos(x, weight_cd).clamp(-1, 1)
    index = torch.where(y != -1)[0]
    if interclass_filtering_threshold > 0:
        with torch.no_grad():
            dirty = (logits > interclass_filtering_threshold).float()
            mask = torch.ones_like(dirty).scatter_(1, y[index, None], 0)
            dirty[index] *= mask
        logits = (1 - dirty) * logits
    target = logits[index, y[index]]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            target.arccos_()
            logits.arccos_()
            logits[index, y[index]] = target + m2
            logits.cos_()
        logits = logits * s
    else:
        logits[index, y[index]] = target - m3
        logits = logits * s
    return TF.cross_entropy(logits, y)


def _ours(head, x, y):
    x = x.detach().clone().requires_grad_()
    head.zero_grad()
    loss = head(x, y)
    loss.backward()
    return loss.detach(), x.grad, head.mapper.weight.grad


def _theirs(fn, x, w_cd, y, **kw):
    x, w_cd = x.detach().clone().requires_grad_(), w_cd.detach().clone().requires_grad_()
    loss = fn(x, w_cd, y, **kw)
    loss.backward()
    return loss.detach(), x.grad, w_cd.grad.t()


def parity(ours, theirs):
    """Max abs difference of (loss, dX, dW); also asserted to be within PARITY_TOL."""
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **PARITY_TOL)
    return [float((a - b).abs().max()) for a, b in zip(ours, theirs)]


def _against_pml(theirs_fn, ours_fn, x, w, t):
    """`parity` of a pml loss (its W set to w [D, C]) and ours_fn(x, w, t), loss and gradients."""
    theirs_fn.W.data = w.clone()
    x_theirs, x_ours, w_ours = x.clone().requires_grad_(), x.clone().requires_grad_(), w.clone().requires_grad_()
    theirs, ours = theirs_fn(x_theirs, t), ours_fn(x_ours, w_ours, t)
    theirs.backward(), ours.backward()
    return parity((ours.detach(), x_ours.grad, w_ours.grad), (theirs.detach(), x_theirs.grad, theirs_fn.W.grad))


def _head(cls, case, **kw):
    D, C = case["w"].shape
    head = cls(D, C, backend="torch", **kw).double()
    with torch.no_grad():
        head.mapper.weight.copy_(case["w"])
    return head


# at s = 32..64 a row past pi - m has p_y ~ 0, so its gradient does not see the fallback's constant; s = 2 does
SCALES = [(0.2, 32.0), (0.5, 64.0), (0.5, 2.0)]
SCALE_IDS = ["speaker", "face", "small-scale"]


@pytest.mark.parametrize("m,s", SCALES, ids=SCALE_IDS)
def test_wespeaker_arc_margin_product(m, s):
    case = angled_case(m, torch.float64, seed=1)
    ours = _ours(_head(ArcFace, case, m=m, s=s, fallback="wespeaker"), case["x"], case["t"])
    parity(ours, _theirs(wespeaker_arc, case["x"], case["w"].t(), case["t"], scale=s, margin=m))
    easy = _ours(_head(ArcFace, case, m=m, s=s, fallback="easy"), case["x"], case["t"])
    parity(easy, _theirs(wespeaker_arc, case["x"], case["w"].t(), case["t"], scale=s, margin=m, easy_margin=True))


@pytest.mark.parametrize("m,s", SCALES, ids=SCALE_IDS)
def test_speechbrain_additive_angular_margin(m, s):
    case = angled_case(m, torch.float64, seed=2)
    ours = _ours(_head(ArcFace, case, m=m, s=s, fallback="speechbrain"), case["x"], case["t"])
    parity(ours, _theirs(speechbrain_aam, case["x"], case["w"].t(), case["t"], scale=s, margin=m))


@pytest.mark.parametrize("s", [64.0, 2.0], ids=["face", "small-scale"])
@pytest.mark.parametrize("m1,m2,m3,thr", [(1.0, 0.5, 0.0, 0.0), (1.0, 0.5, 0.0, 0.3), (1.0, 0.0, 0.35, 0.0)],
                         ids=["arcface", "arcface-filtering", "cosface"])
def test_insightface_combined_margin(m1, m2, m3, thr, s):
    case = angled_case(0.5, torch.float64, seed=3)
    head = _head(CombinedMargin, case, m1=m1, m2=m2, m3=m3, s=s, interclass_filtering_threshold=thr,
                 straight_through=True)
    parity(_ours(head, case["x"], case["t"]), _theirs(insightface_combined, case["x"], case["w"].t(), case["t"], s=s,
                                                      m1=m1, m2=m2, m3=m3, interclass_filtering_threshold=thr))


def test_insightface_straight_through_differs_from_the_analytic_gradient():
    """The issue's ~15% relative gradient difference: the option is not a no-op."""
    case = angled_case(0.5, torch.float64, seed=3)
    analytic = _ours(_head(CombinedMargin, case, m2=0.5), case["x"], case["t"])
    straight = _ours(_head(CombinedMargin, case, m2=0.5, straight_through=True), case["x"], case["t"])
    assert torch.equal(analytic[0], straight[0])
    rel = (analytic[2] - straight[2]).norm() / analytic[2].norm()
    assert 0.02 < rel < 1.0


@pytest.mark.parametrize("sub_centers", [1, 3])
@pytest.mark.parametrize("m,s", SCALES, ids=SCALE_IDS)
def test_pytorch_metric_learning_arcface(m, s, sub_centers):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    case = angled_case(m, torch.float64, seed=4)
    D, C = case["w"].shape
    if sub_centers > 1:
        gen = torch.Generator().manual_seed(5)
        case["w"] = torch.randn(D, C * sub_centers, generator=gen, dtype=torch.float64)
        theirs_fn = pml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, margin=math.degrees(m), scale=s,
                                             sub_centers=sub_centers)
    else:
        theirs_fn = pml.ArcFaceLoss(num_classes=C, embedding_size=D, margin=math.degrees(m), scale=s)
    theirs_fn.W.data = case["w"].clone()
    x = case["x"].detach().clone().requires_grad_()
    loss = theirs_fn(x, case["t"])
    loss.backward()
    head = ArcFace(D, C, m=m, s=s, fallback="pml", sub_centers=sub_centers, backend="torch").double()
    load_head_weight(head, theirs_fn.state_dict(), "pml")
    parity(_ours(head, case["x"], case["t"]), (loss.detach(), x.grad, theirs_fn.W.grad))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_pytorch_metric_learning_arcface_at_the_tie(backend):
    """A target exactly at theta = pi - m: pml keeps cos(theta + m) there (`angle <= pi - m`), and so must 'pml'.

    The target cosine c comes first and m = pi - acos(c) puts it on the tie; the weight's columns are unit vectors
    and the row [c, sqrt(1 - c^2), 0] has norm 1 exactly, so every backend's float64 cosine is c itself."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    c = torch.tensor(math.cos(2.64), dtype=torch.float64)
    m, s = math.pi - float(torch.acos(c)), 2.0  # s = 2: the tie row's p_y is not ~0, its gradient counts
    theirs_fn = pml.ArcFaceLoss(num_classes=3, embedding_size=3, margin=math.degrees(m), scale=s).to(DEVICE)
    # pml's own comparison is an exact tie, and so is ours in cosines: cos(pi - m) is c to the last bit
    assert theirs_fn.margin == m and float(theirs_fn.get_angles(c)) == np.deg2rad(180) - theirs_fn.margin
    assert torch.cos(torch.tensor(math.pi - m, dtype=torch.float64)) == c
    x = torch.tensor([[float(c), math.sqrt(1.0 - float(c) ** 2), 0.0], [0.3, -0.2, 0.9], [0.5, 0.7, -0.1]],
                     dtype=torch.float64, device=DEVICE)
    assert torch.linalg.vector_norm(x[0]) == 1.0
    w, t = torch.eye(3, dtype=torch.float64, device=DEVICE), torch.tensor([0, 2, 1], device=DEVICE)
    _against_pml(theirs_fn, lambda x, w, t: F.arcface_loss(x, w, t, m=m, s=s, fallback="pml", backend=backend), x, w, t)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("m", [4, 6, 8])
def test_pytorch_metric_learning_sphereface(m, backend):
    """pml's SphereFaceLoss (scale 1: logits |x| cos) is ASoftmax without lambda and focal factor, m past 5 too."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    case = angled_case(0.5, torch.float64, seed=7)  # targets from theta = 1e-3 to pi - 0.1: most k branches
    D, C = case["w"].shape
    theirs_fn = pml.SphereFaceLoss(num_classes=C, embedding_size=D, margin=m, scale=1).to(DEVICE)
    _against_pml(theirs_fn, lambda x, w, t: F.a_softmax_loss(x, w, t, m=m, lam=0.0, gamma=0.0, backend=backend),
                 case["x"], case["w"], case["t"])


def test_pytorch_metric_learning_cosface_is_amsoftmax():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    case = angled_case(0.35, torch.float64, seed=6)
    D, C = case["w"].shape
    theirs_fn = pml.CosFaceLoss(num_classes=C, embedding_size=D, margin=0.35, scale=64)
    theirs_fn.W.data = case["w"].clone()
    x = case["x"].detach().clone().requires_grad_()
    loss = theirs_fn(x, case["t"])
    loss.backward()
    head = load_head_weight(AMSoftmax(D, C, m=0.35, s=64.0, backend="torch").double(), theirs_fn.state_dict(), "pml")
    parity(_ours(head, case["x"], case["t"]), (loss.detach(), x.grad, theirs_fn.W.grad))


# ---- checkpoints, built the way each toolkit names and shapes them --------------------------------------------------

def _weights(C, D, seed=0):
    return torch.randn(C, D, generator=torch.Generator().manual_seed(seed))


def test_load_wespeaker_model_state_dict():
    C, D, K = 7, 6, 3
    w = _weights(C * K, D)  # ArcMarginProduct_intertopk_subcenter: [out_features * K, in_features], class-major
    state = {"front.conv1.weight": torch.zeros(3), "projection.weight": w}
    head = load_head_weight(ArcFace(D, C, sub_centers=K), state, "wespeaker")
    assert torch.equal(head.mapper.weight, w.t())
    x, y = torch.randn(5, D), torch.randint(0, C, (5,))
    cos = _cos(x, w).view(5, C, K).max(2).values  # WeSpeaker's sub-centre cosine: the max over each class's K rows
    torch.testing.assert_close(head.get_logits(x), head.s * cos)


def test_load_speechbrain_classifier():
    C, D = 9, 8
    w = _weights(C, D, 1)  # ECAPA_TDNN.Classifier.weight: [out_neurons, input_size]
    for state in ({"weight": w}, {"classifier.weight": w}, {"mods.classifier.weight": w}):
        assert torch.equal(load_head_weight(ArcFace(D, C), state, "speechbrain").mapper.weight, w.t())


def test_load_insightface_partial_fc_rank_slices():
    from deepfense.distributed import class_slice
    C, D, world = 11, 5, 3
    full = _weights(C, D, 2)
    ranks = [{"weight": full[slice(*class_slice(C, world, r))]} for r in range(world)]  # softmax_fc_gpu_{r}.pt
    head = load_head_weight(CombinedMargin(D, C), ranks, "insightface")
    assert torch.equal(head.mapper.weight, full.t())


@pytest.mark.parametrize("state, error", [({"projection.weight": torch.zeros(7, 5)}, "holds"),
                                          ({"other": torch.zeros(7, 6)}, "no head weight"),
                                          ({"a.projection.weight": torch.zeros(1), "b.projection.weight": torch.zeros(1)},
                                           "several keys")])
def test_load_errors_name_the_problem(state, error):
    with pytest.raises((KeyError, ValueError), match=error):
        load_head_weight(ArcFace(6, 7), state, "wespeaker")
