"""Margins and scales as runtime values: WeSpeaker's MarginScheduler ramps, ASoftmax's lambda constants, changing m and
s under torch.compile (inductor) without recompiling, and a short ArcFace training run that tracks the reference."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from deepfense.losses import AMSoftmax, ArcFace, ASoftmax, CombinedMargin, MarginScheduler


def wespeaker_margin(it, initial, final, start, fix, kind):
    """WeSpeaker's MarginScheduler.get_increase_margin around its step(): fixed outside [start, fix)."""
    if it >= fix:
        return final
    if it < start:
        return initial
    frac = (it - start) / (fix - start)
    ratio = 1.0 - math.exp(frac * math.log(1e-3 / (1.0 + 1e-6))) if kind == "exp" else frac
    return initial + (final - initial) * ratio


@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
@pytest.mark.parametrize("kind", ["exp", "linear"])
def test_margin_scheduler_follows_wespeaker(kind, as_tensor):
    head = ArcFace(4, 3, m=torch.tensor(0.0) if as_tensor else 0.0)
    # WeSpeaker's epochs are 1-based: increase_start_epoch=2, fix_start_epoch=5 with 10 iterations per epoch
    sched = MarginScheduler.from_epochs(head, 0.0, 0.2, 2, 5, 10, increase_type=kind)
    seen = [sched.step() for _ in range(60)]
    expected = [wespeaker_margin(i, 0.0, 0.2, 10, 40, kind) for i in range(60)]
    assert seen == pytest.approx(expected, abs=1e-15)
    assert float(head.m) == pytest.approx(0.2) and isinstance(head.m, torch.Tensor) == as_tensor
    assert seen[10] == 0.0 and 0.0 < seen[11] < seen[20] < seen[39] < 0.2  # the ramp rises monotonically


def test_margin_scheduler_on_combined_margin_and_bad_arguments():
    head = CombinedMargin(4, 3, m2=0.0, m3=0.0)
    sched = MarginScheduler(head, 0.0, 0.35, 0, 4, increase_type="linear", attr="m3")
    assert [sched.step() for _ in range(5)] == pytest.approx([0.0, 0.0875, 0.175, 0.2625, 0.35])
    with pytest.raises(ValueError, match="increase_type"):
        MarginScheduler(head, 0.0, 0.2, 0, 4, increase_type="cosine")
    with pytest.raises(ValueError, match="no attribute 'm'"):
        MarginScheduler(head, 0.0, 0.2, 0, 4)


def test_asoftmax_lambda_reproduces_wespeaker_and_deepfense_schedules():
    """WeSpeaker's SphereProduct: max(5, 1000 / (1 + 0.12 iter)); DeepFense's: max(5, 1500 / (1 + 0.1 t))."""
    wespeaker = ASoftmax(4, 3, m=2, lambda_max=1000.0, lambda_gamma=0.12, lambda_power=1.0, lambda_min=5.0,
                         backend="torch")
    deepfense = ASoftmax(4, 3, backend="torch")
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for it in range(1, 400, 37):
        wespeaker.step.fill_(it), deepfense.step.fill_(it)
        assert wespeaker.lam.item() == pytest.approx(max(5.0, 1000.0 / (1 + 0.12 * it)), rel=1e-14)
        assert deepfense.lam.item() == pytest.approx(max(5.0, 1500.0 / (1 + 0.1 * it)), rel=1e-14)
    assert torch.isfinite(wespeaker(x, y))


def _compiled_steps(head, values, set_value):
    """Run the compiled head once per value (set between calls); returns (compiled frames, max diff to eager)."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(head, fullgraph=True, backend=counter)
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    worst = 0.0
    for v in values:
        set_value(v)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = compiled(xc, y)
        out.backward()
        ref = head(xe, y)
        ref.backward()
        worst = max(worst, (out - ref).abs().item(), (xc.grad - xe.grad).abs().max().item())
    return counter.frame_count, worst


@pytest.mark.parametrize("cls", [ArcFace, AMSoftmax])
def test_float_margin_changes_recompile_at_most_once(cls):
    head = cls(6, 5, backend="torch")
    frames, worst = _compiled_steps(head, [0.1, 0.15, 0.2], lambda v: setattr(head, "m", v))
    assert frames <= 2 and worst < 1e-4


def test_tensor_margin_and_scale_never_recompile():
    head = ArcFace(6, 5, m=torch.tensor(0.0), s=torch.tensor(30.0), backend="torch")
    sched = MarginScheduler(head, 0.0, 0.3, 0, 2, increase_type="linear")  # 0, 0.15, 0.3 over the three calls

    def set_value(v):
        sched.step()
        head.s.fill_(v)

    frames, worst = _compiled_steps(head, [30.0, 31.0, 32.0], set_value)
    assert frames == 1 and worst < 1e-4 and float(head.m) == pytest.approx(0.3)


@pytest.mark.parametrize("backend,sub_centers", [("torch", 2), ("triton", 1)])
def test_thirty_training_steps_track_the_reference(backend, sub_centers):
    """SGD on a linear embedder + ArcFace: the fast backend's trajectory follows the reference backend's (triton in
    the interpreter on CPU; sub-centres on the kernels: tests/test_subcenter_kernels.py)."""
    torch.manual_seed(0)
    data = torch.randn(64, 12)
    labels = torch.randint(0, 7, (64,))

    def train(backend):
        torch.manual_seed(1)
        embed = torch.nn.Linear(12, 8)
        head = ArcFace(8, 7, m=0.2, s=16.0, sub_centers=sub_centers, label_smoothing=0.05, backend=backend)
        opt = torch.optim.SGD(list(embed.parameters()) + list(head.parameters()), lr=0.05)
        losses = []
        for step in range(30):
            rows = slice((step * 16) % 64, (step * 16) % 64 + 16)
            loss = head(embed(data[rows]), labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, head.mapper.weight.detach()

    fast, w_fast = train(backend)
    ref, w_ref = train("reference")
    assert fast[-1] < fast[0]  # it learns
    assert max(abs(a - b) for a, b in zip(fast, ref)) < 1e-4
    torch.testing.assert_close(w_fast, w_ref, rtol=1e-4, atol=1e-5)
