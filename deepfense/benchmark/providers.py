"""Providers: every implementation the benchmark compares, behind one registry.

A provider turns a `Case` into a step function `fn(x, weight, targets) -> scalar loss` (mean reduction), taking the
weight in the functional API's layout for that loss. `absent(case, device)` returns None when the provider can run
the case, else a short reason ("not installed", "CUDA only", ...): absent providers are listed, never failures.
Baselines import the reference (`deepfense.reference`); nothing here copies it.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import functional
from .cases import LOSSES, Case


@dataclass
class Provider:
    """One implementation.

    Attributes:
        name: table name. build: `build(case) -> fn(x, w, t)`. absent_fn: `(case, device) -> reason or None`.
        oracle: loss options the float64 reference uses for this provider's error (when it computes a variant).
        compiled: True for torch.compile; its first call's time is reported as compile time.
        baseline: 'eager' / 'compile' mark the rows that speed-ups are taken against.
    """

    name: str
    build: Callable
    absent_fn: Callable
    oracle: dict = field(default_factory=dict)
    compiled: bool = False
    baseline: str = ""

    def absent(self, case: Case, device: str):
        return self.absent_fn(case, device)


@functools.lru_cache(maxsize=None)
def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # missing, or broken by its own deps (e.g. no CUDA): the provider is absent either way
        return None


def _backend_missing(backend: str) -> str | None:
    if backend == "triton" and _module("deepfense.kernels") is None:
        return "the Triton kernels do not import here (is triton installed?)"
    return None


def _deepfense(backend):
    def build(case):
        spec = LOSSES[case.loss]
        return lambda x, w, t: spec.functional(x, w, t, **spec.options, backend=backend)
    return build


def _deepfense_absent(backend):
    def absent(case, device):
        resolved = functional.resolve_backend(backend, torch.device(device))
        if backend == "torch" and functional.resolve_backend("auto", torch.device(device)) == "torch":
            return "same as deepfense on this device"
        return _backend_missing(resolved)
    return absent


def _eager(case):
    spec = LOSSES[case.loss]
    return lambda x, w, t: spec.ref(x, w, t, **spec.options)


def _compiled(case):
    spec = LOSSES[case.loss]
    torch._dynamo.reset()  # fresh caches per shape: dynamo's recompile limit would otherwise fall back to eager
    fn = torch.compile(spec.ref, dynamic=False)
    return lambda x, w, t: fn(x, w, t, **spec.options)


def _always(case, device):
    return None


def _only(loss, cuda=False, module=None, check=None):
    def absent(case, device):
        if case.loss != loss:
            return f"{loss} only"
        if cuda and device != "cuda":
            return "CUDA only"
        if module and _module(module) is None:
            return "not installed"
        if check and not check():
            return "not in this torch"
        return None
    return absent


def _linear_ce(case):
    return lambda x, w, t: F.linear_cross_entropy(x, w, t)


def _liger(case):
    loss = _module("liger_kernel.transformers").LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)


def _cce(case):
    lce = _module("cut_cross_entropy").linear_cross_entropy
    return lambda x, w, t: lce(x, w, t)


def _pml(cls_name, **map_options):
    """pytorch-metric-learning's CosFaceLoss / SphereFaceLoss / ArcFaceLoss with the benchmark's weight put in as its
    W [D, C]. map_options: pml option -> our option name, a constant, or a function of our options."""
    def build(case):
        cls = getattr(_module("pytorch_metric_learning.losses"), cls_name)
        opts = LOSSES[case.loss].options
        mod = cls(num_classes=case.C, embedding_size=case.D,
                  **{k: opts[v] if isinstance(v, str) else v(opts) if callable(v) else v
                     for k, v in map_options.items()})
        del mod.W  # make W a plain attribute so each step can use the rotated weight copy (and get its gradient)

        def step(x, w, t):
            mod.W = w
            return mod(x, t)
        return step
    return build


def _upstream(case):
    from . import upstream
    return upstream.build(case.loss, case.D, case.C, LOSSES[case.loss].options)


def _upstream_absent(case, device):
    from . import upstream
    return None if upstream.loss_classes() else "not found (set DEEPFENSE_UPSTREAM, see docs/deepfense.md)"


PROVIDERS = [
    Provider("deepfense", _deepfense("auto"), _deepfense_absent("auto")),
    Provider("deepfense-torch", _deepfense("torch"), _deepfense_absent("torch")),
    Provider("eager", _eager, _always, baseline="eager"),
    Provider("compile", _compiled, _always, compiled=True, baseline="compile"),
    # DeepFense 0.2.2's own modules (deepfense/benchmark/upstream.py): the speed a DeepFense user has today
    Provider("deepfense-0.2.2", _upstream, _upstream_absent),
    Provider("F.linear_cross_entropy", _linear_ce,
             _only("CrossEntropy", check=lambda: hasattr(F, "linear_cross_entropy"))),
    Provider("liger", _liger, _only("CrossEntropy", cuda=True, module="liger_kernel.transformers")),
    Provider("cce", _cce, _only("CrossEntropy", cuda=True, module="cut_cross_entropy")),
    Provider("pml-cosface", _pml("CosFaceLoss", margin="m", scale="s"),
             _only("AMSoftmax", module="pytorch_metric_learning.losses")),
    # SphereFaceLoss is SphereFace without lambda blending or focal factor: its error is taken against the
    # reference with lam=0, gamma=0 (the function it computes); its time is comparable in work.
    Provider("pml-sphereface", _pml("SphereFaceLoss", margin="m", scale=1.0),
             _only("ASoftmax", module="pytorch_metric_learning.losses"), oracle={"lam": 0.0, "gamma": 0.0}),
    # ArcFaceLoss takes its margin in degrees and falls back to cos - m sin m past pi - m ('pml' fallback)
    Provider("pml-arcface", _pml("ArcFaceLoss", margin=lambda o: math.degrees(o["m"]), scale="s"),
             _only("ArcFace", module="pytorch_metric_learning.losses"), oracle={"fallback": "pml"}),
]
REGISTRY = {p.name: p for p in PROVIDERS}


def select(names=None) -> list[Provider]:
    """Providers by name (all when names is None); an unknown name is an error that lists the known ones."""
    if not names:
        return list(PROVIDERS)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; known: {list(REGISTRY)}")
    return [REGISTRY[n] for n in names]


def display_name(provider: Provider, device: str) -> str:
    """'deepfense' shows the backend that 'auto' picked here, e.g. deepfense[triton]."""
    if provider.name == "deepfense":
        return f"deepfense[{functional.resolve_backend('auto', torch.device(device))}]"
    return provider.name
