"""The nn.Module layer: options reach the functional API, scores/logits semantics, the ASoftmax lambda schedule,
and bad inputs giving clear errors. The loss maths itself is tested against the reference in the functional tests."""

import math
import zlib

import pytest
import torch

import oracle
from backend_cases import error_excess
from deepfense import reference
from deepfense.losses import ASoftmax, OCSoftmax
from loss_helpers import LOSS_TYPES, make, backend_params, targets_for


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Parameter initialisation draws from the global RNG: seed it so results do not depend on test order."""
    torch.manual_seed(0)



# the loss functions of the reference and of the independent float64 oracle (tests/oracle.py), by module type
IMPLS = {"reference": dict(CrossEntropy=reference.cross_entropy_ref, AMSoftmax=reference.am_softmax_ref,
                           ASoftmax=reference.a_softmax_ref, OCSoftmax=reference.oc_softmax_ref),
         "oracle": dict(CrossEntropy=oracle.ce, AMSoftmax=oracle.am, ASoftmax=oracle.a, OCSoftmax=oracle.oc)}


def ref_loss(module, x, y, dtype=torch.float64, impl="reference", params=None, **options):
    """The reference (or the oracle) in `dtype` on the module's own parameters (or `params`, in named_parameters
    order), with the options the module should pass on."""
    x = x.to(dtype)
    if options.get("class_weights") is not None:
        options["class_weights"] = torch.as_tensor(options["class_weights"], dtype=dtype, device=x.device)
    name = type(module).__name__
    fn = IMPLS[impl][name]
    params = params if params is not None else [p.to(dtype) for p in module.parameters()]
    if name == "CrossEntropy":
        return fn(x, params[0], y, bias=params[1], **options)
    if name == "AMSoftmax":
        return fn(x, params[0], y, m=module.m, s=module.s, **options)
    if name == "ASoftmax":
        return fn(x, params[0], y, m=module.m, lam=module.lam.item(), gamma=module.gamma, **options)
    return fn(x, params[0], y, m_real=module.m_real, m_fake=module.m_fake, alpha=module.alpha,
              bonafide_label=module.bonafide_label, **options)


def ref_loss_and_grad(module, x, y, upstream, dtype, impl, **options):
    """(loss, dX, the parameters' gradients...) of `impl` in `dtype`, as float64."""
    leaf = x.detach().to(dtype).requires_grad_()
    params = [p.detach().to(dtype).requires_grad_() for p in module.parameters()]
    loss = ref_loss(module, leaf, y, dtype, impl, params, **options)
    loss.backward(upstream.to(loss.dtype))
    return [loss.detach().double(), leaf.grad.double()] + [p.grad.double() for p in params]


# (B, D, C): B=1 and D=1 the smallest; (7, 13, 3) primes, odd and C > 2; (17, 50, 2) the usual binary head with
# unaligned B and D, kept small because the Triton interpreter is slow (the backend tests cover large shapes);
# C=1 a single class (ignored by OCSoftmax, which always has one centre).
SHAPES = [(1, 1, 2), (7, 13, 3), (17, 50, 2), (5, 6, 1)]
# options that must reach the functional call; the empty dict is the defaults
# ignore_index=0 drops the class-0 rows: some rows of a batch, or all of them when B=1 draws class 0
OPTIONS = [{}, {"reduction": "sum"}, {"reduction": "none"}, {"class_weights": "random"}, {"ignore_index": 0},
           {"label_smoothing": 0.2}]


# label_smoothing only where the loss takes it (the rejection is tested in test_loss_config)
TYPE_OPTIONS = [pytest.param(t, o, id=f"{t}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}")
                for t in LOSS_TYPES for o in OPTIONS
                if not ("label_smoothing" in o and t in ("ASoftmax", "OCSoftmax"))]


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dD%dC%d" % s)
@pytest.mark.parametrize("loss_type, options", TYPE_OPTIONS)
def test_forward_and_grad_match_reference(loss_type, options, shape, backend_device):
    backend, device = backend_device
    B, D, C = shape
    g = torch.Generator().manual_seed(zlib.crc32(f"{loss_type}{shape}".encode()))
    torch.manual_seed(zlib.crc32(f"{loss_type}{shape}{options}".encode()))  # the module's weight init: reproducible
    n_weights = 2 if loss_type == "OCSoftmax" else C
    options = dict(options)
    if options.get("class_weights") == "random":
        options["class_weights"] = (torch.rand(n_weights, generator=g) + 0.5).tolist()
    module = make(loss_type, D, C, backend=backend, **options).to(device)
    x = torch.randn(B, D, generator=g).to(device).requires_grad_()
    y = targets_for(loss_type, B, C, g).to(device)
    loss = module(x, y)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(device) + 0.5  # non-unit
    loss.backward(upstream)
    same = ref_loss_and_grad(module, x, y, upstream, x.dtype, "reference", **options)
    gold = ref_loss_and_grad(module, x, y, upstream, torch.float64, "oracle", **options)
    fast = [loss.detach().double(), x.grad.double()] + [p.grad.double() for p in module.parameters()]
    names = ["loss", "dX"] + [n for n, _ in module.named_parameters()]
    assert len(fast) == len(gold) == len(names) >= 3, names
    # D = 1: the one row's cosine is +-1 and its p_y near 1, so dL/dlogit = p_y - 1 cancels in fp32 (relative error
    # eps / (1 - p_y), 6e-5 in ASoftmax's dX on the kernels) where the same-dtype reference happens to be exact
    atol_scale = 10.0 if D == 1 else 1.0
    for name, f, s, g in zip(names, fast, same, gold):
        excess = error_excess(f, s, g, torch.float32, atol_scale, floor=1.0 if name == "loss" else 0.0)
        assert excess <= 0, f"{name}: {f} vs gold {g} (same-dtype reference {s})"


@pytest.mark.parametrize("bonafide_label", [0, 1])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_logits_and_scores_two_classes(loss_type, bonafide_label):
    module = make(loss_type, 10, 2, bonafide_label=bonafide_label).double()
    x = torch.randn(9, 10, dtype=torch.float64)
    logits, score = module.get_logits(x), module.get_score(x)
    unit_x = torch.nn.functional.normalize(x, dim=1)
    if loss_type == "CrossEntropy":
        expected = x @ module.fc.weight.t() + module.fc.bias
    else:
        cos = unit_x @ torch.nn.functional.normalize(module.mapper.weight, dim=0)
        expected = {"AMSoftmax": lambda: module.s * cos, "ASoftmax": lambda: x.norm(dim=1, keepdim=True) * cos,
                    "OCSoftmax": lambda: cos}[loss_type]()
    if loss_type == "OCSoftmax":  # one centre: [B, 1] cosine, and the score is that cosine
        expected_score = expected[:, 0]
    else:  # the bonafide-minus-spoof log-likelihood-ratio logit (CrossEntropy too, where DeepFense returns one logit)
        expected_score = expected[:, bonafide_label] - expected[:, 1 - bonafide_label]
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(score, expected_score)


@pytest.mark.parametrize("loss_type", ["AMSoftmax", "ASoftmax", "CrossEntropy"])
def test_scores_are_full_logits_with_more_classes(loss_type):
    module = make(loss_type, 6, 5)
    x = torch.randn(4, 6)
    assert module.get_logits(x).shape == (4, 5)
    torch.testing.assert_close(module.get_score(x), module.get_logits(x))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bonafide_label_swaps_oc_roles_and_score_sign(loss_type):
    x, y = torch.randn(8, 5), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    a = make(loss_type, 5, bonafide_label=1)
    b = make(loss_type, 5, bonafide_label=0)
    b.load_state_dict(a.state_dict())
    if loss_type == "OCSoftmax":  # the loss treats the other label as bonafide
        torch.testing.assert_close(b(x, 1 - y), a(x, y))
        torch.testing.assert_close(b.get_score(x), a.get_score(x))  # the score is the cosine either way
    else:
        torch.testing.assert_close(b.get_score(x), -a.get_score(x))


def test_oc_softmax_aliases():
    assert (OCSoftmax(4, w_posi=0.9, w_nega=0.1).m_real, OCSoftmax(4, w_posi=0.9, w_nega=0.1).m_fake) == (0.9, 0.1)
    oc = OCSoftmax(4, r_real=0.8, r_fake=-0.3)
    assert (oc.m_real, oc.m_fake) == (0.8, -0.3)
    with pytest.raises(ValueError, match="'w_nega' and 'r_fake'"):
        OCSoftmax(4, w_nega=0.1, r_fake=0.1)


# ---- ASoftmax lambda schedule ---------------------------------------------------------------------------------------

def expected_lambda(t, lambda_min=5.0, lambda_max=1500.0):
    return max(lambda_min, lambda_max / (1 + 0.1 * t))


def test_lambda_schedule_over_training_steps():
    module = ASoftmax(6, n_classes=3, backend="reference")
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
    assert module.step.dtype == torch.int64 and module.step.dim() == 0 and "step" in module.state_dict()
    for t in range(1, 6):  # the first training forward uses t = 1
        loss = module(x, y)
        assert int(module.step) == t and module.lam.item() == pytest.approx(expected_lambda(t), rel=1e-15)
        torch.testing.assert_close(loss, ref_loss(module, x, y).float())
    # around the point where lambda_max / (1 + 0.1 t) reaches lambda_min = 5 (t = 2990)
    module.step.fill_(2987)
    for t in (2988, 2989, 2990, 2991, 5000):
        module.step.fill_(t - 1)
        module(x, y)
        assert module.lam.item() == pytest.approx(expected_lambda(t), rel=1e-15)
    assert module.lam.item() == 5.0


def test_eval_forwards_do_not_advance_lambda():
    module = ASoftmax(6, backend="reference")
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 1, 0])
    module.eval()
    before = module(x, y)  # before any training: t = max(0, 1) = 1, the lambda of the first training forward
    assert int(module.step) == 0 and module.lam.item() == pytest.approx(expected_lambda(1))
    module.train()
    first_train = module(x, y)
    torch.testing.assert_close(before, first_train)
    for _ in range(3):
        module(x, y)
    module.eval()
    with torch.no_grad():
        for _ in range(5):
            module(x, y)
    assert int(module.step) == 4 and module.lam.item() == pytest.approx(expected_lambda(4))


def test_lambda_survives_save_and_load(tmp_path):
    module = ASoftmax(6, backend="reference")
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 1, 0])
    for _ in range(7):
        module(x, y)
    torch.save(module.state_dict(), tmp_path / "asoftmax.pt")
    resumed = ASoftmax(6, backend="reference")
    resumed.load_state_dict(torch.load(tmp_path / "asoftmax.pt"), strict=True)
    assert int(resumed.step) == 7
    torch.testing.assert_close(resumed(x, y), module(x, y))  # both use t = 8 now
    assert int(resumed.step) == 8 and resumed.lam.item() == pytest.approx(expected_lambda(8))


def test_asoftmax_module_compiles_fullgraph_and_advances_step():
    # inductor, the default backend (it checks what aot_eager lets through, e.g. a custom op's output strides)
    module = ASoftmax(6, backend="torch" if _has_torch_backend() else "reference")
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 1, 0])
    compiled = torch.compile(module, fullgraph=True)
    for t in (1, 2, 3):
        loss = compiled(x, y)
        assert int(module.step) == t
    torch.testing.assert_close(loss, ref_loss(module, x, y).float(), rtol=1e-5, atol=1e-6)


def _has_torch_backend():
    return any(p.values[0][0] == "torch" for p in backend_params())


# ---- bad inputs -----------------------------------------------------------------------------------------------------

D = 6
BAD_INPUTS = {
    "embeddings-3d": (lambda: torch.randn(2, 3, D), lambda: torch.tensor([0, 1]), "2-D"),
    "embeddings-1d": (lambda: torch.randn(D), lambda: torch.tensor([0]), "2-D"),
    "targets-2d": (lambda: torch.randn(2, D), lambda: torch.tensor([[0], [1]]), "1-D"),
    "dim-mismatch": (lambda: torch.randn(2, D + 1), lambda: torch.tensor([0, 1]), "embedding_dim"),
    "batch-mismatch": (lambda: torch.randn(3, D), lambda: torch.tensor([0, 1]), "batch size"),
    "target-float": (lambda: torch.randn(2, D), lambda: torch.tensor([0.0, 1.0]), "integer"),
    "target-too-big": (lambda: torch.randn(2, D), lambda: torch.tensor([0, 2]), "out of range"),
    "target-negative": (lambda: torch.randn(2, D), lambda: torch.tensor([-1, 1]), "out of range"),
    "embeddings-nan": (lambda: torch.tensor([[float("nan")] * D, [1.0] * D]), lambda: torch.tensor([0, 1]), "NaN"),
    "embeddings-inf": (lambda: torch.tensor([[math.inf] + [0.0] * (D - 1), [1.0] * D]), lambda: torch.tensor([0, 1]),
                       "Inf"),
    "embeddings-int": (lambda: torch.ones(2, D, dtype=torch.int64), lambda: torch.tensor([0, 1]), "floating"),
    # a device mix (CPU weights, embeddings elsewhere); 'meta' stands in for CUDA on a machine without one
    "device-mix": (lambda: torch.randn(2, D, device="meta"), lambda: torch.tensor([0, 1]), "one device"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bad_inputs_raise_clear_value_errors(loss_type, case):
    make_x, make_y, text = BAD_INPUTS[case]
    module = make(loss_type, D, 2)
    with pytest.raises(ValueError, match=text):
        module(make_x(), make_y())


@pytest.mark.parametrize("case", ["embeddings-3d", "embeddings-1d", "dim-mismatch", "embeddings-int"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bad_embeddings_in_scores(loss_type, case):
    module = make(loss_type, D, 2)
    with pytest.raises(ValueError, match=BAD_INPUTS[case][2]):
        module.get_score(BAD_INPUTS[case][0]())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_norm_rows_are_finite_and_match_reference(loss_type):
    module = make(loss_type, D, 3 if loss_type != "OCSoftmax" else 2)
    x = torch.randn(4, D)
    x[1] = 0.0  # a zero embedding: cosine 0 (not NaN), zero gradient through the normalisation
    x.requires_grad_()
    y = torch.tensor([0, 1, 1, 0])
    loss = module(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.isfinite(module.get_score(x.detach())).all()
    torch.testing.assert_close(loss.double(), ref_loss(module, x.detach(), y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction, shape", [("mean", ()), ("sum", ()), ("none", (0,))])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_batch_gives_zero_loss_and_zero_grads(loss_type, reduction, shape):
    module = make(loss_type, D, reduction=reduction)
    x = torch.randn(0, D, requires_grad=True)
    loss = module(x, torch.zeros(0, dtype=torch.int64))
    assert loss.shape == shape and torch.all(loss == 0)
    loss.sum().backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is None or torch.all(g == 0) for g in grads)
    assert module.get_score(x.detach()).shape[0] == 0
