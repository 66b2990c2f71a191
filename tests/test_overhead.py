"""Per-step overhead of the Triton path under the CUDA check policy: torch ops issued outside the kernel launches, and
host syncs, counted by a TorchDispatchMode on CPU under the interpreter (or on CUDA in the GPU check).

A training step is forward + backward with reduction 'mean'. The mode also counts the ops inside the custom ops'
Python launchers (allocations, the dW partial sum), so the count is what a step costs besides its kernels.
"""

import contextlib

import pytest
import torch
from torch._library.custom_ops import OPDEFS  # the Python bodies of torch.library custom ops, by qualified name
from torch.utils._python_dispatch import TorchDispatchMode

from backend_cases import DEVICE, FUNCS, make_case, options
from deepfense import inputs
from deepfense import options as option_rules
from deepfense.losses import AMSoftmax, ASoftmax, CrossEntropy, OCSoftmax
from deepfense.params import LossParams, Margin

kernels = pytest.importorskip("deepfense.kernels", reason="the Triton kernels need the triton package")

SYNCS = {"item", "_local_scalar_dense", "nonzero", "is_nonzero", "tolist", "equal"}
# not counted: autograd's bookkeeping of saved tensors (no memory, no kernel) and dtype arithmetic
UNCOUNTED = {"detach", "promote_types"}
STEP_BUDGET = 10  # at most 10 torch ops per training step outside the kernel launches


class OpCounter(TorchDispatchMode):
    """Names of the torch ops issued outside kernel launches, including inside deepfense's custom-op launchers."""

    def __init__(self):
        super().__init__()
        self.names, self.launching = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.launching:
            return func(*args, **kwargs)
        if func.namespace == "deepfense":  # run the launcher's Python body under this mode to see its ops
            with self:
                return OPDEFS[f"deepfense::{func._opname}"]._init_fn(*args, **kwargs)
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **kwargs)

    @property
    def counted(self):
        return [n for n in self.names if n not in UNCOUNTED]


@pytest.fixture
def counter(monkeypatch):
    """An OpCounter that ignores the interpreter's own tensor copies during a launch; the CUDA check policy."""
    mode = OpCounter()
    if kernels.INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction
        real = InterpretedFunction.run

        def run(fn, *args, **kwargs):
            mode.launching += 1
            try:
                return real(fn, *args, **kwargs)
            finally:
                mode.launching -= 1
        monkeypatch.setattr(InterpretedFunction, "run", run)
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    monkeypatch.setattr(option_rules, "POLICY_DEVICE", "cuda")
    return mode


def _step(loss, case, fn):
    """`step(mode)`: one training step on fresh leaves (as after zero_grad(set_to_none=True)), its forward and
    backward under `mode`; `fn(x, w, t, bias)` is the loss."""
    def step(mode):
        x, w = case["x"].detach().clone().requires_grad_(), case["w"].detach().clone().requires_grad_()
        bias = case["bias"].detach().clone().requires_grad_() if loss == "ce" else None
        with mode:
            fn(x, w, case["t"], bias).backward()
    return step


def _functional(loss):
    kw = options(loss)
    if loss == "a":
        kw["lam"] = torch.tensor(7.5)  # a training loop's annealed lambda is a 0-dim tensor (no recompile, no sync)

    def fn(x, w, t, bias):
        return FUNCS[loss](x, w, t, backend="triton", **kw, **({"bias": bias} if loss == "ce" else {}))
    return fn


# the options `_functional` passes, as the functional API turns them into LossParams
PARAMS = {"am": LossParams(Margin.ADDITIVE, s=30.0, m=0.3), "a": LossParams(Margin.ANGULAR, m=4.0, gamma=0.5),
          "oc": LossParams(Margin.ONE_CLASS), "ce": LossParams(Margin.NONE)}


def _kernels_direct(loss):
    lam = torch.tensor(7.5) if loss == "a" else None

    def fn(x, w, t, bias):
        small = kernels.uses_small_head(w.shape[0 if loss == "ce" else 1])
        fn = kernels.small_head_loss if small else kernels.large_head_loss
        return fn(x, w, bias, t, None, lam, PARAMS[loss], classes_first=loss == "ce")
    return fn


def _count(counter, step):
    step(contextlib.nullcontext())  # warm: first-call work (imports, caches) is not a per-step cost
    step(counter)
    names = counter.counted
    counter.names = []
    return names


@pytest.mark.parametrize("loss", ["am", "a", "oc", "ce"])
def test_functional_layer_adds_no_op(loss, counter):
    """Checks, dispatch and options of the functional API issue no tensor op of their own under the CUDA policy:
    a step through `deepfense.functional` issues exactly the ops of the kernels' entry point called directly."""
    case = make_case(loss, 5, 6, 2, torch.float32, seed=3)
    through_api = _count(counter, _step(loss, case, _functional(loss)))
    direct = _count(counter, _step(loss, case, _kernels_direct(loss)))
    assert sorted(through_api) == sorted(direct), (through_api, direct)


MODULES = {"am": AMSoftmax, "a": ASoftmax, "oc": OCSoftmax, "ce": CrossEntropy}


@pytest.mark.parametrize("loss", ["am", "a", "oc", "ce"])
def test_training_step_makes_no_host_sync(loss, counter):
    """No op of a module's training step waits for the device (item, nonzero, ...), so the loop never stalls on the
    loss and the step can be captured in a CUDA graph."""
    torch.manual_seed(0)
    head = MODULES[loss](6, **({} if loss == "oc" else {"n_classes": 2}), backend="triton")
    x, t = torch.randn(5, 6, requires_grad=True), torch.randint(0, 2, (5,))
    t[3] = 5  # out of range: under the CUDA policy nothing checks it on the host

    def step():
        head.zero_grad(set_to_none=True)
        head(x, t).backward()
    step()
    with counter:
        step()
    assert counter.names and not SYNCS & set(counter.names), counter.names


@pytest.mark.parametrize("loss", ["am", "a", "oc", "ce"])
def test_training_step_op_budget(loss, counter):
    """A training step on the deepfake heads' path (C = 2, the small-head kernels) issues at most STEP_BUDGET torch
    ops besides its two launches: the forward's three allocations (the loss, the saved coefficients, the reduction's
    zeroed workspace: the batch reduction runs inside the launch), the engine's unit gradient, and the backward's two
    allocations and partial sum (7); CrossEntropy takes fc.weight [C, D] as it is and splits dW and d bias off the
    one sum with two views (9)."""
    case = make_case(loss, 5, 6, 2, torch.float32, seed=3)
    names = _count(counter, _step(loss, case, _functional(loss)))
    assert len(names) <= STEP_BUDGET, f"{len(names)} ops per step: {names}"


def test_reduce_overhead_compiles_a_training_step(counter):
    """torch.compile(mode="reduce-overhead") compiles a Triton-path training step in one graph (inductor; on CUDA it
    captures CUDA graphs, on CPU it runs the interpreter's kernels without) and matches eager."""
    torch._dynamo.reset()
    case = make_case("am", 12, 10, 2, torch.float32, seed=8)

    def fn(x, w, t):
        return FUNCS["am"](x, w, t, backend="triton")
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    out = []
    for f in (fn, compiled, compiled):  # the second compiled call replays (on CUDA: the captured graph)
        x, w = case["x"].detach().clone().requires_grad_(), case["w"].detach().clone().requires_grad_()
        loss = f(x, w, case["t"])
        loss.backward()
        out.append((loss.detach().clone(), x.grad, w.grad))
    for got in out[1:]:
        for a, b in zip(out[0], got):
            torch.testing.assert_close(a, b)


# large heads (C > 16, the margin_ce kernels), C = 20: under the interpreter's tiles two class tiles (dX and dW
# recompute the logits); FORCE_SPLITS = 2 splits the forward's classes (the combine) and dX's (fp32 partials); the
# H200 plan (DEEPFENSE_TILES=gpu, 132 SMs) holds C = 20 in one tile, so the forward also writes the unit dW
LARGE = [(loss, opt) for opt in ("one", "split", "h200") for loss in ("am", "a", "ce")]


@pytest.mark.parametrize("loss,opt", LARGE, ids=[f"{l}-{o}" for l, o in LARGE])
def test_large_head_step_op_budget(loss, opt, counter, monkeypatch):
    """A large-head training step issues at most STEP_BUDGET torch ops besides its launches, and no host sync: the
    workspace and loss allocations, the engine's unit gradient, dX / dW (/ d bias) allocations, a split's partials."""
    from deepfense.kernels import plan
    monkeypatch.setattr(plan, "FORCE_SPLITS", 2 if opt == "split" else None)
    if opt == "h200":
        monkeypatch.setenv("DEEPFENSE_TILES", "gpu")
        monkeypatch.setenv("DEEPFENSE_SM_COUNT", "132")
    case = make_case(loss, 5, 6, 20, torch.float32, seed=3)
    names = _count(counter, _step(loss, case, _functional(loss)))
    assert not SYNCS & set(names), names
    assert len(names) <= STEP_BUDGET, f"{len(names)} ops per step: {names}"
