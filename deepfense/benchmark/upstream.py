"""DeepFense 0.2.2's own loss modules (PyPI `deepfense`), loaded in isolation as a benchmark peer.

DeepFense 0.2.2 ships an import package also named `deepfense`, pins torch <= 2.9, and its `deepfense/models/
__init__.py` imports torchaudio. So it is never imported as a package here: its four loss files (and the two small
modules they import, the registry and `BaseLoss`) are executed from their files under a temporary `deepfense` entry in
`sys.modules`, and our own `deepfense` modules are put back afterwards. The classes keep their own module globals.

Where the files come from (first found wins):
    DEEPFENSE_UPSTREAM=DIR  a folder made by `pip install --no-deps --target DIR deepfense==0.2.2`;
    an installed distribution `deepfense` (co-installed non-editable, as `pip install --no-deps deepfense==0.2.2`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types

VERSION = "0.2.2"
# our loss name -> (file under deepfense/models/losses, class name)
_FILES = {"AMSoftmax": ("am_softmax", "AMSoftmaxLoss"), "ASoftmax": ("a_softmax", "ASoftmaxLoss"),
          "OCSoftmax": ("oc_softmax", "OCSoftmaxLoss"), "CrossEntropy": ("cross_entropy", "CrossEntropy")}


def _root() -> str | None:
    """The folder that holds DeepFense 0.2.2's `deepfense/` package, or None."""
    env = os.environ.get("DEEPFENSE_UPSTREAM")
    if env:
        return env if os.path.isfile(os.path.join(env, "deepfense", "models", "base_model.py")) else None
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        dist = distribution("deepfense")
    except (ImportError, PackageNotFoundError):
        return None
    if dist.version != VERSION:
        return None
    root = str(dist.locate_file(""))
    return root if os.path.isfile(os.path.join(root, "deepfense", "models", "base_model.py")) else None


def _exec(name: str, path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def loss_classes() -> dict | None:
    """{our loss name: DeepFense 0.2.2's class}, or None when DeepFense 0.2.2 is not found."""
    root = _root()
    if root is None:
        return None
    pkg = os.path.join(root, "deepfense")
    ours = {k: v for k, v in sys.modules.items() if k == "deepfense" or k.startswith("deepfense.")}
    for k in ours:
        del sys.modules[k]
    try:
        for name, sub in (("deepfense", ""), ("deepfense.utils", "utils"), ("deepfense.models", "models"),
                          ("deepfense.models.losses", "models/losses")):
            stub = types.ModuleType(name)  # package shells: their __init__ files (torchaudio) never run
            stub.__path__ = [os.path.join(pkg, sub)]
            sys.modules[name] = stub
        _exec("deepfense.utils.registry", os.path.join(pkg, "utils", "registry.py"))
        _exec("deepfense.models.base_model", os.path.join(pkg, "models", "base_model.py"))
        out = {}
        for loss, (fname, cls) in _FILES.items():
            mod = _exec(f"deepfense.models.losses.{fname}", os.path.join(pkg, "models", "losses", f"{fname}.py"))
            out[loss] = getattr(mod, cls)
        return out
    except Exception:  # a different or broken DeepFense: the provider is absent
        return None
    finally:
        for k in [k for k in sys.modules if k == "deepfense" or k.startswith("deepfense.")]:
            del sys.modules[k]
        sys.modules.update(ours)


def build(loss: str, D: int, C: int, options: dict):
    """DeepFense 0.2.2's module for `loss` with the benchmark's options, no class weights (its cheapest path).

    Returns `step(x, w, t) -> loss`: the benchmark's weight (its layout is DeepFense's `mapper.weight` [D, C] /
    `fc.weight` [C, D]) replaces the module's parameter on each call, so its gradient lands on `w`. CrossEntropy's
    `fc.bias` is removed: the benchmark's CrossEntropy has no bias.
    """
    cls = loss_classes()[loss]
    cfg = {"embedding_dim": D, "n_classes": C, "class_weights": None, "reduction": "mean"}
    if loss == "AMSoftmax":
        cfg.update(m=options["m"], s=options["s"])
    elif loss == "ASoftmax":
        # lambda = max(lambda_min, lambda_max / (1 + 0.1 iter)): a huge iter pins it at lambda_min = the bench's lam
        cfg.update(m=options["m"], gamma=options["gamma"], lambda_min=options["lam"], lambda_max=1500.0, iter=10**9)
    elif loss == "OCSoftmax":
        cfg.update(w_posi=options["m_real"], w_nega=options["m_fake"], alpha=options["alpha"])
    mod = cls(cfg)
    holder = mod.fc if loss == "CrossEntropy" else mod.mapper
    del holder.weight
    if loss == "CrossEntropy":
        holder.bias = None

    def step(x, w, t):
        holder.weight = w
        return mod(x, t)
    return step
