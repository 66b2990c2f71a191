"""Properties of the fused path beyond pointwise accuracy: gradcheck, torch.compile, determinism, memory, backend
selection, and training that tracks the reference."""

import pytest
import torch

from backend_cases import DEVICE, FUNCS, LOSSES, LargestAllocation, make_case, options, run
from deepfense import functional as F
from deepfense import reference


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_gradcheck_float64(loss, backend):
    """Finite differences agree with each backend's analytic gradient (the reference's guards its clamps).
    ASoftmax runs with gamma = 0: its focal factor deliberately carries no gradient, which finite differences see."""
    case = make_case(loss, 5, 4, 3, torch.float64, seed=11, class_weights=True)
    kw = options(loss, smoothing=0.1, **({"gamma": 0.0} if loss == "a" else {}))
    if "cw" in case:
        kw["class_weights"] = case["cw"]
    args = (case["x"].requires_grad_(), case["w"].requires_grad_()) + ((case["bias"].requires_grad_(),)
                                                                       if loss == "ce" else ())

    def fn(x, w, bias=None):
        extra = {"bias": bias} if loss == "ce" else {}
        return FUNCS[loss](x, w, case["t"], backend=backend, **kw, **extra)

    # the fused kernels in the interpreter: fast mode (finite differences along random directions, a few
    # evaluations instead of one per input element) keeps the check and the suite's time
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, fast_mode=backend == "triton")


def test_gradcheck_reference_at_clamp_edge_and_k_boundaries():
    """x parallel to a class column (cos = 1, the clamp's edge) and angles at k boundaries theta = j pi / m."""
    m = 4
    angles = torch.tensor([0.0, torch.pi / 4, torch.pi / 2, 3 * torch.pi / 4], dtype=torch.float64)
    x = torch.stack([angles.cos(), angles.sin()], 1).mul(1.5).requires_grad_()
    w = torch.tensor([[1.0, 0.3], [0.0, 0.9]], dtype=torch.float64, requires_grad=True)
    t = torch.zeros(4, dtype=torch.long)
    assert torch.autograd.gradcheck(lambda x, w: reference.a_softmax_ref(x, w, t, m=m, lam=3.0, gamma=0.0), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: reference.am_softmax_ref(x, w, t), (x, w))


@pytest.mark.parametrize("C", [3, 40], ids=["fused-forward-grads", "recompute-backward"])
@pytest.mark.parametrize("loss", LOSSES)
def test_bitwise_deterministic(loss, C):
    case = make_case(loss, 37, 33, C, torch.float32, seed=2, ignore_some=True, class_weights=True)
    first = run(loss, case, "triton", options(loss, smoothing=0.1))
    second = run(loss, case, "triton", options(loss, smoothing=0.1))
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("loss", ["am", "a", "ce"])
def test_no_batch_by_class_allocation(loss):
    """With many classes, neither forward nor backward allocates anything of B x C elements."""
    B, D, C = 48, 8, 200  # B x C = 9600 is far above every legitimate buffer (dW: D x C = 1600; dX: B x D)
    case = make_case(loss, B, D, C, torch.float32, seed=4)
    x, w = case["x"].requires_grad_(), case["w"].requires_grad_()
    extra = {"bias": case["bias"]} if loss == "ce" else {}
    with LargestAllocation() as mode:
        out = FUNCS[loss](x, w, case["t"], backend="triton", **options(loss), **extra)
        out.backward()
    assert x.grad is not None and w.grad is not None
    assert 0 < mode.largest < B * C // 4, mode.largest
    with LargestAllocation() as ref_mode:  # the check can fail: the reference does allocate B x C
        FUNCS[loss](x, w, case["t"], backend="reference", **options(loss), **extra).backward()
    assert ref_mode.largest >= B * C


def test_auto_backend_and_env_override(monkeypatch):
    assert F.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("DEEPFENSE_BACKEND", "reference")
    assert F.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert F.resolve_backend("torch", torch.device("cpu")) == "torch"  # an explicit choice wins over the env
    monkeypatch.setenv("DEEPFENSE_BACKEND", "fast")
    with pytest.raises(ValueError, match="DEEPFENSE_BACKEND"):
        F.resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        F.resolve_backend("cuda", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from deepfense.kernels import common
    if DEVICE == "cuda":
        pytest.skip("the CUDA run has no CPU-interpreter switch to turn off")
    monkeypatch.setattr(common, "INTERPRET", False)
    case = make_case("am", 4, 3, 2)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        F.am_softmax_loss(case["x"], case["w"], case["t"], backend="triton")


@pytest.mark.parametrize("loss,C", [("am", 2), ("a", 2), ("oc", 1), ("ce", 2), ("am", 5), ("ce", 20)])
def test_training_tracks_reference(loss, C):
    """A small encoder + loss head trained 12 SGD steps on synthetic bonafide/spoof (or multi-class) clusters with
    the fused kernels follows the reference's loss curve and ends at the same weights (fp32, tolerance 1e-4)."""
    gen = torch.Generator().manual_seed(C)
    D_in, D, B = 12, 16, 32
    n_t = 2 if loss == "oc" else C
    centres = torch.randn(n_t, D_in, generator=gen) * 2
    init_enc = torch.randn(D_in, D, generator=gen) * 0.3
    init_head = torch.randn(C, D, generator=gen) if loss == "ce" else torch.randn(D, C, generator=gen)
    batches = []
    for _ in range(12):
        t = torch.randint(0, n_t, (B,), generator=gen)
        batches.append((centres[t] + torch.randn(B, D_in, generator=gen), t))
    curves, finals = {}, {}
    for backend in ("reference", "triton"):
        enc = init_enc.clone().to(DEVICE).requires_grad_()
        head = init_head.clone().to(DEVICE).requires_grad_()
        opt = torch.optim.SGD([enc, head], lr=0.05)
        curve = []
        for xb, t in batches:
            out = FUNCS[loss](xb.to(DEVICE) @ enc, head, t.to(DEVICE), backend=backend, **options(loss))
            opt.zero_grad()
            out.backward()
            opt.step()
            curve.append(out.item())
        curves[backend], finals[backend] = torch.tensor(curve), (enc.detach().cpu(), head.detach().cpu())
    torch.testing.assert_close(curves["triton"], curves["reference"], rtol=1e-4, atol=1e-4)
    assert curves["reference"][-4:].mean() < curves["reference"][:4].mean()  # it does learn
    for a, b in zip(finals["triton"], finals["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("C,reduction,fuse_dx,expected", [
    (40, "mean", False, 3),  # several class tiles: forward, then the dX and the dW kernels
    (3, "mean", False, 2),  # one class tile: the forward also sums dW; backward recomputes dX
    (3, "mean", True, 1),  # DEEPFENSE_FUSE_DX=1: the forward writes dX too; backward only scales
    (3, "none", True, 2),  # per-row upstream gradients: dW cannot be summed before they are known
])
def test_kernel_launches_per_training_step(monkeypatch, C, reduction, fuse_dx, expected):
    from deepfense.kernels import plan
    monkeypatch.setenv("DEEPFENSE_FUSE_DX", "1" if fuse_dx else "0")
    monkeypatch.setattr(plan, "SMALL_HEADS", False)  # the large-head kernels' one-tile path
    from deepfense.kernels import margin_ce as K

    launches = []

    class Counting:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_margin_ce_fwd_kernel", "_margin_ce_bwd_dx_kernel", "_margin_ce_bwd_dw_kernel"):
        monkeypatch.setattr(K, name, Counting(name, getattr(K, name)))
    case = make_case("am", 40, 20, C, torch.float32, seed=8)
    x, w = case["x"].requires_grad_(), case["w"].requires_grad_()
    F.am_softmax_loss(x, w, case["t"], backend="triton", reduction=reduction).sum().backward()
    assert len(launches) == expected, launches


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", LOSSES)
def test_mixed_dtypes_as_under_autocast(loss, backend):
    """bf16 embeddings with an fp32 weight (autocast's activations and master weights): computed in the promoted
    dtype, gradients returned in each input's own dtype."""
    case = make_case(loss, 13, 17, 6, torch.float32, seed=12)
    x = case["x"].to(torch.bfloat16).requires_grad_()
    w = case["w"].requires_grad_()
    extra = {"bias": case["bias"]} if loss == "ce" else {}
    out = FUNCS[loss](x, w, case["t"], backend=backend, **options(loss), **extra)
    out.backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    extra = {"bias": case["bias"].double()} if loss == "ce" else {}
    gold = FUNCS[loss](xr, wr, case["t"], backend="reference", **options(loss), **extra)
    gold.backward()
    torch.testing.assert_close(out.double(), gold, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-2, atol=1e-3)  # bf16 rounding of the result
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ["am", "a", "ce"])
def test_class_splits_match_reference(monkeypatch, loss, reduction, splits):
    """Class-split forward (partial log-sum-exp merged by the combine kernel), class-split dX partials and row-split
    dW partials, as a face head on a GPU would use them; 5 splits of 73 classes in 16-wide tiles leave the last split a short tile."""
    from backend_cases import assert_close_to_gold
    from deepfense.kernels import plan

    monkeypatch.setattr(plan, "FORCE_SPLITS", splits)
    case = make_case(loss, 20, 18, 73, torch.float32, seed=splits, class_weights=True, ignore_some=True)
    assert_close_to_gold(loss, case, "triton", options(loss, reduction=reduction, smoothing=0.1), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_dx_fused_into_the_forward_matches_reference(monkeypatch, loss, dtype, reduction):
    """The opt-in path (DEEPFENSE_FUSE_DX=1) where a one-tile forward also writes the unit-gradient dX."""
    from backend_cases import assert_close_to_gold
    from deepfense.kernels import plan

    monkeypatch.setenv("DEEPFENSE_FUSE_DX", "1")
    monkeypatch.setattr(plan, "SMALL_HEADS", False)  # the large-head kernels' one-tile path
    case = make_case(loss, 21, 19, 3, dtype, seed=13, class_weights=True, ignore_some=True)
    assert_close_to_gold(loss, case, "triton", options(loss, reduction=reduction, smoothing=0.1), dtype)
