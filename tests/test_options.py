"""Every scalar option of every loss, at a non-default value, through every layer (the nn.Module, the functional API,
a YAML config through `build_loss`) on every backend, against the independent float64 oracle (tests/oracle.py):
the loss and the gradients of the embeddings and of every parameter.

The inputs reach the saturated regimes as well as the middle: rows nearly parallel to their target column (cos near
+1, confident at large s), nearly anti-parallel (cos near -1: ArcFace's fallback branches, OCSoftmax's softplus
far in its linear part), small-norm rows (ASoftmax scales logits by |x|) and plain random rows. Each option's value
is checked to change the oracle's answer measurably, so a layer that drops it fails here.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import oracle
from deepfense import functional as F
from deepfense.losses import build_loss
from loss_helpers import backend_params

B, D, C = 12, 8, 5
STEP = 3  # the ASoftmax module's training step at the forward under test (its buffer holds STEP - 1 before it)
TOL = 1e-6  # relative to the tensor's largest gold value: the kernels take s, m, alpha and eps as fp32 scalars

# (module type, its non-default options). Class weights are given as a list, as a config would.
CW5, CW2 = [0.6, 1.4, 1.0, 0.8, 2.3], [1.6, 0.7]
CASES = {
    "am": ("AMSoftmax", dict(m=0.45, s=17.0, label_smoothing=0.15, class_weights=CW5, ignore_index=2)),
    "am-subcentres-large-s": ("AMSoftmax", dict(m=0.1, s=64.0, sub_centers=3, reduction="none")),
    "a-lambda-schedule": ("ASoftmax", dict(m=2, gamma=1.5, lambda_min=0.5, lambda_max=40.0, lambda_gamma=0.7,
                                            lambda_power=2.5, class_weights=CW5, ignore_index=2, reduction="sum")),
    # lambda_max / (1 + 0.1 t) = 6.9 at t = 3: below lambda_min, so lambda is the floor
    "a-lambda-floor": ("ASoftmax", dict(m=3, gamma=0.0, lambda_min=8.0, lambda_max=9.0, reduction="none")),
    "oc": ("OCSoftmax", dict(m_real=0.8, m_fake=-0.3, alpha=9.0, bonafide_label=0, class_weights=CW2,
                             ignore_index=-1)),
    # no class weights, no ignored row: the 'torch' backend's plain-autograd path (deepfense.torch_plain); z reaches 70
    "oc-plain-saturated": ("OCSoftmax", dict(m_real=0.9, m_fake=-0.6, alpha=45.0, bonafide_label=0,
                                             reduction="none")),
    "ce": ("CrossEntropy", dict(label_smoothing=0.2, class_weights=CW5, ignore_index=1, reduction="sum")),
    "ce-plain": ("CrossEntropy", dict(label_smoothing=0.1, ignore_index=1, reduction="none")),  # torch_plain too
    "arc-speechbrain": ("ArcFace", dict(m=0.6, s=13.0, fallback="speechbrain", class_weights=CW5, ignore_index=2)),
    "arc-pml": ("ArcFace", dict(m=0.6, s=13.0, fallback="pml", label_smoothing=0.1, reduction="none")),
    "arc-easy": ("ArcFace", dict(m=0.6, s=13.0, fallback="easy")),
    "arc-none": ("ArcFace", dict(m=0.6, s=13.0, fallback="none", reduction="sum")),
    "arc-subcentres-straight-through": ("ArcFace", dict(m=0.3, s=64.0, sub_centers=2, straight_through=True)),
    "combined": ("CombinedMargin", dict(m1=1.6, m2=0.25, m3=0.15, s=20.0, interclass_filtering_threshold=0.3,
                                        fallback="wespeaker", label_smoothing=0.05)),
}
DEFAULTS = {  # the constructors' defaults of the options above (what a layer that drops one would use)
    "AMSoftmax": dict(m=0.3, s=30.0, sub_centers=1),
    "ASoftmax": dict(m=4, gamma=0.5, lambda_min=5.0, lambda_max=1500.0, lambda_gamma=0.1, lambda_power=1.0),
    "OCSoftmax": dict(m_real=0.5, m_fake=0.2, alpha=20.0, bonafide_label=1),
    "CrossEntropy": {},
    "ArcFace": dict(m=0.2, s=32.0, fallback="wespeaker", straight_through=False, sub_centers=1),
    "CombinedMargin": dict(m1=1.0, m2=0.5, m3=0.0, s=64.0, interclass_filtering_threshold=0.0, fallback="none"),
}
COMMON_DEFAULTS = dict(label_smoothing=0.0, class_weights=None, ignore_index=-100, reduction="mean")
FUNCS = {"AMSoftmax": F.am_softmax_loss, "ASoftmax": F.a_softmax_loss, "OCSoftmax": F.oc_softmax_loss,
         "CrossEntropy": F.cross_entropy_loss, "ArcFace": F.arcface_loss, "CombinedMargin": F.arcface_loss}
ORACLE = {"AMSoftmax": oracle.am, "ASoftmax": oracle.a, "OCSoftmax": oracle.oc, "CrossEntropy": oracle.ce,
          "ArcFace": oracle.arc, "CombinedMargin": oracle.arc}


def functional_options(kind, opts):
    """The functional API's keywords for module options: ASoftmax's schedule becomes the lambda at STEP,
    CombinedMargin's m2 the functional m, class weights a float64 tensor."""
    out = dict(opts)
    if out.get("class_weights") is not None:
        out["class_weights"] = torch.tensor(out["class_weights"], dtype=torch.float64)
    if kind == "ASoftmax":
        sched = {k: out.pop(k) for k in list(out) if k.startswith("lambda_")}
        out["lam"] = oracle.asoftmax_lambda(STEP, **sched)
    if kind == "CombinedMargin":
        out["m"] = out.pop("m2", 0.5)
    return out


def make_inputs(kind, opts, seed=0):
    """x [B, D], the weight (fc.weight [C, D] and a bias for CrossEntropy, else [D, C*K]; OCSoftmax [D, 1]) and
    targets, float64; rows cycle through confident, anti-parallel, small-norm and random. Where ignore_index is set,
    a few rows carry it."""
    g = torch.Generator().manual_seed(seed)
    K = opts.get("sub_centers", 1)
    n_out = 1 if kind == "OCSoftmax" else C * K
    n_t = 2 if kind == "OCSoftmax" else C
    w = torch.randn(D, n_out, generator=g, dtype=torch.float64)
    t = torch.randint(0, n_t, (B,), generator=g)
    t[:n_t] = torch.arange(n_t)  # every class present
    cols = torch.zeros(B, dtype=torch.long) if kind == "OCSoftmax" else t * K + torch.randint(0, K, (B,), generator=g)
    w_hat = w / w.norm(dim=0, keepdim=True)
    noise = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = 3.0 * noise
    x[0::4] = 4.0 * w_hat[:, cols[0::4]].t() + 0.05 * noise[0::4]  # cos_y near +1
    x[1::4] = -3.0 * w_hat[:, cols[1::4]].t() + 0.05 * noise[1::4]  # cos_y near -1
    x[2::4] = 0.2 * noise[2::4]  # small norm
    if opts.get("ignore_index", -100) == -1:
        t[B - 3:] = -1
    bias = None
    if kind == "CrossEntropy":
        w = 0.5 * torch.randn(C, D, generator=g, dtype=torch.float64)
        w[t[0::4]] += 0.25 * x[0::4]  # confident rows: a large target logit
        bias = torch.randn(C, generator=g, dtype=torch.float64)
    return x, w, bias, t


def _upstream(loss):
    """A non-unit upstream gradient: 0.7 for a reduced loss, 0.5..2 over the rows for reduction='none'."""
    if loss.dim():
        return torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype)
    return torch.tensor(0.7, dtype=loss.dtype)


def _run(fn, fopts, x, w, bias, t):
    leaves = [v.clone().requires_grad_() for v in (x, w, bias) if v is not None]
    extra = dict(bias=leaves[2]) if bias is not None else {}
    loss = fn(leaves[0], leaves[1], t, **fopts, **extra)
    (loss * _upstream(loss)).sum().backward()
    return [loss.detach()] + [v.grad for v in leaves]


def oracle_run(kind, opts, *inputs):
    """The oracle's loss and gradients (x, weight, bias) for module options `opts`."""
    return _run(ORACLE[kind], functional_options(kind, opts), *inputs)


def functional_run(kind, opts, backend, *inputs):
    return _run(FUNCS[kind], dict(functional_options(kind, opts), backend=backend), *inputs)


def module_run(module, kind, x, w, bias, t):
    """Load the case's weight (and bias) into the module, run one training-mode forward at STEP, return the loss and
    the gradients of x and of every parameter."""
    module = module.double().train()
    params = dict(module.named_parameters())
    with torch.no_grad():
        if kind == "CrossEntropy":
            params["fc.weight"].copy_(w)
            params["fc.bias"].copy_(bias)
        else:
            params["mapper.weight"].copy_(w)
        if kind == "ASoftmax":
            module.step.fill_(STEP - 1)
    xl = x.clone().requires_grad_()
    loss = module(xl, t)
    (loss * _upstream(loss)).sum().backward()
    names = ["fc.weight", "fc.bias"] if kind == "CrossEntropy" else ["mapper.weight"]
    assert sorted(params) == sorted(names), params.keys()
    return [loss.detach(), xl.grad] + [params[n].grad for n in names]


def assert_matches(got, want, what, tol=TOL):
    for name, a, b in zip(("loss", "dX", "dW", "dbias"), got, want):
        assert a is not None and a.shape == b.shape, f"{what} {name}: {None if a is None else a.shape} vs {b.shape}"
        err = (a.double() - b).abs().max().item()
        assert err <= tol * b.abs().max().item(), f"{what} {name}: max error {err:.3g}, gold max {b.abs().max():.3g}"
    assert len(got) == len(want), what


def _relative_change(a, b):
    return max(((u - v).abs().max() / v.abs().max().clamp_min(1e-300)).item() for u, v in zip(a, b))


@pytest.mark.parametrize("name", list(CASES))
def test_each_option_changes_the_answer(name):
    """Each non-default value of a case moves the oracle's loss or gradients by more than 1e-3 (1000x TOL): a layer
    that ignores it, or falls back to the default, fails the comparisons below."""
    kind, opts = CASES[name]
    inputs = make_inputs(kind, opts)
    full = oracle_run(kind, opts, *inputs)
    defaults = {**COMMON_DEFAULTS, **DEFAULTS[kind]}
    for key in opts:
        if key == "reduction":
            continue
        try:
            dropped = oracle_run(kind, {**opts, key: defaults[key]}, *inputs)
        except (IndexError, RuntimeError):  # e.g. ignore_index back at -100 leaves targets -1 out of range
            continue
        assert _relative_change(full, dropped) > 1e-3, f"{name}: {key}={opts[key]} does not change the answer"
    t = inputs[3]
    if opts.get("class_weights") and opts.get("reduction", "mean") == "mean":  # 'mean' divides by the weights' sum
        kept = t != opts.get("ignore_index", -100)
        total = torch.tensor(opts["class_weights"], dtype=torch.float64)[t[kept]].sum().item()
        assert abs(total - kept.sum().item()) > 0.1, f"{name}: the kept rows' class weights sum to their count"


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("name", list(CASES))
def test_functional_options_match_oracle(name, backend_device):
    backend, _ = backend_device
    kind, opts = CASES[name]
    inputs = make_inputs(kind, opts)
    assert_matches(functional_run(kind, opts, backend, *inputs), oracle_run(kind, opts, *inputs), f"{name} {backend}")


@pytest.mark.parametrize("layer", ["module", "yaml"])
@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("name", list(CASES))
def test_module_and_yaml_options_match_oracle(name, backend_device, layer):
    """The module (built directly, or from YAML text through build_loss) passes every option on: its loss and the
    gradients of the embeddings and of its parameters equal the oracle's."""
    backend, _ = backend_device
    kind, opts = CASES[name]
    args = dict(embedding_dim=D, backend=backend, **opts)
    if kind != "OCSoftmax":
        args["n_classes"] = C
    if layer == "yaml":
        module = build_loss(yaml.safe_dump({"loss": {"type": kind, "args": args}}))
    else:
        from deepfense.losses import get_loss_class
        module = get_loss_class(kind)(**args)
    inputs = make_inputs(kind, opts)
    assert_matches(module_run(module, kind, *inputs), oracle_run(kind, opts, *inputs), f"{name} {layer} {backend}")


# the smallest invalid value of each bounded option: the functional API and the module reject it, naming it
INVALID = [("AMSoftmax", "s", 0.0), ("AMSoftmax", "label_smoothing", 1.5),
           ("AMSoftmax", "sub_centers", 0), ("ASoftmax", "m", 0), ("ASoftmax", "gamma", -0.5),
           ("OCSoftmax", "alpha", 0.0), ("ArcFace", "s", 0.0), ("ArcFace", "m", -0.1), ("CombinedMargin", "m1", 0.0),
           ("CrossEntropy", "label_smoothing", -0.1)]


@pytest.mark.parametrize("kind,key,value", INVALID, ids=[f"{k}-{o}" for k, o, _ in INVALID])
def test_invalid_option_values_are_named(kind, key, value):
    from deepfense.losses import get_loss_class
    x, w, bias, t = make_inputs(kind, {})
    extra = dict(bias=bias) if bias is not None else {}
    with pytest.raises(ValueError, match=key):
        FUNCS[kind](x, w, t, backend="reference", **functional_options(kind, {key: value}), **extra)
    with pytest.raises(ValueError, match=key):
        get_loss_class(kind)(embedding_dim=D, **({key: value}))
