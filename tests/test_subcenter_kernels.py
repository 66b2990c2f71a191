"""Sub-centres (K weight columns per class, the class cosine the max over them) in the fused large-head kernels.

Every result is held to the backends' error rule against the float64 reference (tests/backend_cases.py):
|fused - gold| <= 2 |reference_same_dtype - gold| + atol, for the loss, dX and dW. The small-head path has no
sub-centres: K > 1 runs the large-head kernels even when C*K <= 16, which the small-C cases here exercise.
"""

import math

import pytest
import torch

from backend_cases import DEVICE, LargestAllocation, assert_close_to_gold, make_case, options, run
from deepfense import functional as F
from deepfense.kernels import plan as P
from deepfense.params import Margin

FALLBACKS = ["wespeaker", "speechbrain", "pml", "easy", "none"]


def _kernels_or_skip():
    if DEVICE != "cuda":
        from deepfense.kernels import INTERPRET
        if not INTERPRET:
            pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")


CASES = [  # (loss, options, K, dtype, B, C): C not a multiple of the tile, C*K above and below 16, B ragged
    pytest.param("am", dict(smoothing=0.1), 2, torch.float32, 21, 19, id="am-K2-fp32-C19"),
    pytest.param("am", dict(reduction="none"), 3, torch.float16, 13, 5, id="am-K3-fp16-CK15"),
    pytest.param("am", {}, 3, torch.bfloat16, 18, 7, id="am-K3-bf16-C7"),
    pytest.param("arc", dict(fallback="wespeaker", reduction="none"), 3, torch.float32, 17, 7, id="arc-wespeaker-K3"),
    pytest.param("arc", dict(fallback="speechbrain"), 2, torch.float16, 19, 6, id="arc-speechbrain-K2-CK12"),
    pytest.param("arc", dict(fallback="pml", m=math.radians(28.6), s=64.0), 3, torch.float32, 20, 18, id="arc-pml-K3"),
    pytest.param("arc", dict(fallback="easy", reduction="sum"), 2, torch.bfloat16, 15, 9, id="arc-easy-K2"),
    pytest.param("arc", dict(fallback="none", smoothing=0.2), 3, torch.float32, 11, 4, id="arc-none-K3-CK12"),
    pytest.param("arc", dict(m1=1.35, m=0.25, m3=0.1, fallback="none", reduction="none"), 2, torch.float16, 22, 17,
                 id="combined-K2-fp16"),
    pytest.param("arc", dict(m1=1.0, m=0.3, m3=0.2, s=64.0, fallback="none", straight_through=True), 3,
                 torch.bfloat16, 14, 6, id="combined-straight-K3-bf16"),
]


@pytest.mark.parametrize("loss,opts,K,dtype,B,C", CASES)
def test_sub_centers_match_reference(loss, opts, K, dtype, B, C):
    _kernels_or_skip()
    case = make_case(loss, B, 10, C, dtype, seed=B + C, sub_centers=K, class_weights=C % 2 == 1,
                     ignore_some=B % 2 == 0)
    assert_close_to_gold(loss, case, "triton", options(loss, sub_centers=K, **opts), dtype)


def _winner_case(B, D, C, K, dtype, seed=0):
    """Rows close to one sub-centre of their target class, the sub-centre alternating with the row (k = i % 2), so
    the winning column differs across rows of the same class."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, C * K, generator=gen, dtype=torch.float64)
    t = torch.arange(B) % C
    k = torch.arange(B) % 2
    x = w[:, t * K + k].t() * 2.0 + 0.3 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    case = {"x": x.to(dtype).to(DEVICE), "w": w.to(dtype).to(DEVICE), "t": t.to(DEVICE)}
    cos = torch.nn.functional.normalize(case["x"].double(), dim=1) @ torch.nn.functional.normalize(case["w"].double(),
                                                                                                   dim=0)
    return case, cos.view(B, C, K).argmax(2)[torch.arange(B), t]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_winning_sub_center_differs_across_rows(dtype):
    _kernels_or_skip()
    case, winners = _winner_case(24, 12, 9, 3, dtype)
    assert winners.unique().numel() == 2, "the case must make different rows of a class pick different sub-centres"
    # rows this close to a column are confident (p_y ~ 0.9996 at s = 32): the kernels' nll = lse - logit_y rounds at
    # the logits' size, so their 1 - p_y carries eps s / (1 - p_y) ~ 3e-3 relative error, 10-25x the reference's
    # log_softmax (measured: dX 2.8e-6 on a largest |dX| of 0.0105)
    assert_close_to_gold("arc", case, "triton", options("arc", sub_centers=3, reduction="none"), dtype,
                         atol_scale=30.0)


def test_tied_sub_centers_send_the_gradient_to_the_first():
    """Two identical columns tie on every row: the first wins (torch's max), the second gets an exactly zero dW."""
    _kernels_or_skip()
    case = make_case("am", 10, 8, 6, torch.float32, seed=5, sub_centers=2)
    case["w"][:, 1::2] = case["w"][:, 0::2]
    opts = dict(sub_centers=2, s=30.0, m=0.2)
    fused, ref = run("am", case, "triton", opts), run("am", case, "reference", opts)
    assert torch.count_nonzero(fused[2][:, 1::2]) == 0 and torch.count_nonzero(ref[2][:, 1::2]) == 0
    assert torch.count_nonzero(fused[2][:, 0::2]) > 0
    assert_close_to_gold("am", case, "triton", options("am", **opts), torch.float32)


@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles-132-sms"])
def test_class_splits(monkeypatch, gpu_tiles):
    """The classes split across programs (forward + combine, dX partials) and dW's rows split: sub-centres unchanged."""
    _kernels_or_skip()
    if gpu_tiles:  # an H200's plan: 70 classes are two 64-wide tiles, split for parallelism with so few rows
        monkeypatch.setenv("DEEPFENSE_TILES", "gpu")
        monkeypatch.setenv("DEEPFENSE_SM_COUNT", "132")
        B, D, C = 20, 24, 70
    else:
        monkeypatch.setattr(P, "FORCE_SPLITS", 2)
        B, D, C = 40, 12, 40
    launches = P.plan(Margin.COMBINED, B, D, C, torch.float32, torch.float32, n_sm=P.sm_count(None), sub=2)
    assert launches[0].grid[1] > 1 and P.launch(launches, "_margin_ce_combine_kernel") is not None
    assert P.launch(launches, "_margin_ce_bwd_dx_kernel").meta["n_splits"] > 1
    case = make_case("arc", B, D, C, torch.float32, seed=7, sub_centers=2, class_weights=True)
    assert_close_to_gold("arc", case, "triton", options("arc", sub_centers=2, smoothing=0.1), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_wide_dx_takes_two_feature_chunks(monkeypatch, dtype):
    """From D = 512 the sub-centre dX takes two feature chunks (16-bit: 256 + 256; fp32: main + tail of 128 each),
    which keeps the face head's dX (D = 512, K = 3) from spilling on sm_90 (bench/compile_check_subcenters.py):
    an H200's plan against the float64 reference."""
    _kernels_or_skip()
    monkeypatch.setenv("DEEPFENSE_TILES", "gpu")
    monkeypatch.setenv("DEEPFENSE_SM_COUNT", "132")
    B, D, C = 6, 512, 20
    dx = P.launch(P.plan(Margin.COMBINED, B, D, C, dtype, dtype, n_sm=132, sub=3), "_margin_ce_bwd_dx_kernel")
    assert dx.grid[0] == 2 and dx.meta["BLOCK_DO"] == (256 if dtype == torch.bfloat16 else 128), dx
    case = make_case("arc", B, D, C, dtype, seed=9, sub_centers=3)
    assert_close_to_gold("arc", case, "triton", options("arc", sub_centers=3, reduction="none"), dtype)


def test_plan_never_takes_the_small_head_or_one_tile_fusion():
    launches = P.plan(Margin.COMBINED, 30, 16, 4, torch.float32, torch.float32, n_sm=1, sub=3)
    names = [launch.kernel for launch in launches]
    assert names == ["_margin_ce_fwd_kernel", "_margin_ce_bwd_dx_kernel", "_margin_ce_bwd_dw_kernel"]
    assert not launches[0].meta["FUSE_DW"] and not launches[0].meta["FUSE_DX"]
    assert launches[2].grid[1] == 3  # one dW program per class block and sub-centre


def test_no_batch_by_classes_buffer():
    """Forward + backward on the fused path allocate nothing of B*C elements (the torch backend's [B, C*K] cosines
    show the recorder sees such buffers)."""
    _kernels_or_skip()
    B, D, C, K = 48, 6, 40, 3
    case = make_case("arc", B, D, C, torch.float32, seed=2, sub_centers=K)
    sizes = {}
    for backend in ("triton", "torch"):
        with LargestAllocation() as rec:
            run("arc", case, backend, dict(sub_centers=K, validate=False))
        sizes[backend] = rec.largest
    assert sizes["torch"] >= B * C * K
    assert sizes["triton"] < B * C, sizes


@pytest.mark.parametrize("where", ["row", "losing-sub-center"])
def test_nan_propagates(where):
    """A NaN embedding row makes its row's loss NaN; a NaN in a sub-centre that would lose the max still wins it (the
    kernels' max keeps NaN, as torch's does), so every row's loss is NaN. Value checks off: nothing raises."""
    _kernels_or_skip()
    case = make_case("am", 9, 8, 5, torch.float32, seed=4, sub_centers=2)
    if where == "row":
        case["x"][3, 2] = float("nan")
    else:
        case["w"][:, 3] = -case["w"][:, 2]  # class 1: column 3 opposite column 2, so it loses every row ...
        case["w"][0, 3] = float("nan")  # ... but a NaN in it must not be dropped by the max
    x, w = case["x"].clone().requires_grad_(), case["w"].clone().requires_grad_()
    loss = F.am_softmax_loss(x, w, case["t"], sub_centers=2, reduction="none", backend="triton", validate=False)
    ref = F.am_softmax_loss(case["x"], case["w"], case["t"], sub_centers=2, reduction="none", backend="reference",
                            validate=False)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref)) and torch.isnan(loss).any()
    if where == "row":
        assert torch.isnan(loss).sum() == 1 and torch.isfinite(loss[torch.arange(9) != 3]).all()
    loss.sum().backward()
    assert torch.isnan(w.grad).any() and torch.isnan(x.grad[3 if where == "row" else 0]).any()


def test_torch_compile_fullgraph_inductor():
    _kernels_or_skip()
    torch._dynamo.reset()
    case = make_case("arc", 12, 10, 9, torch.float32, seed=6, sub_centers=3)

    def loss_fn(x, w, t):
        return F.arcface_loss(x, w, t, m=0.3, s=30.0, sub_centers=3, backend="triton")

    def step(fn):
        x, w = case["x"].detach().clone().requires_grad_(), case["w"].detach().clone().requires_grad_()
        out = fn(x, w, case["t"])
        out.backward()
        return out.detach(), x.grad, w.grad

    for a, b in zip(step(loss_fn), step(torch.compile(loss_fn, fullgraph=True))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
