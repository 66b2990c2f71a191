"""Run the DeepFense framework's own detector, trainer and command line on the fused losses.

    from deepfense.losses.integrations.deepfense import use_fused_losses
    with use_fused_losses():   # DeepFense's registry now builds its four losses, ArcFace, AAMSoftmax, CombinedMargin
                               # and the adaptive face heads (AdaFace, MagFace, ElasticFace, CurricularFace)
        ...                    # from ours: its unchanged YAML config, ModularDetector and StandardTrainer
    # leaving the block (or handle.restore()) puts DeepFense's own classes back

or, without code: `deepfense-losses deepfense train -c cfg.yaml` (`run_deepfense`). A detector built before the call
keeps DeepFense's losses: `convert_losses(detector)` swaps them in place. The adapters themselves are in
deepfense_adapters.py; docs/deepfense.md has the differences from deepfense.losses and the install guide.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings
from functools import lru_cache
from typing import Dict, Optional

from torch import nn

from .deepfense_adapters import (ADAPTERS, DEEPFENSE_KEYS, FusedAMSoftmax, FusedArcFace, FusedASoftmax,  # noqa: F401
                                 FusedCombinedMargin, FusedCrossEntropy, FusedOCSoftmax, deepfense_targets)

_INSTALL = ("`pip install --no-deps deepfense==0.2.2` plus the packages its model package imports (numpy, einops, "
            "torchaudio); docs/deepfense.md has the steps")
_ORIGINALS: Dict[type, str] = {}  # DeepFense's own loss classes as first seen in its registry -> their names
_ACTIVE: Optional["FusedLosses"] = None  # the registration in force


@lru_cache(maxsize=None)
def adapter_classes(deepfense_semantics: bool = True) -> Dict[str, type]:
    """{registry name: adapter class}; with deepfense_semantics=False, subclasses that behave as deepfense.losses."""
    if deepfense_semantics:
        return dict(ADAPTERS)
    made = {cls: type(cls.__name__, (cls,), {"deepfense_semantics": False, "__module__": __name__})
            for cls in set(ADAPTERS.values())}
    return {name: made[cls] for name, cls in ADAPTERS.items()}


def _registry():
    """DeepFense's LOSS_REGISTRY, after `deepfense.models` has registered DeepFense's own losses."""
    try:
        import deepfense.models  # noqa: F401 - registers DeepFense's own losses
        from deepfense.utils.registry import LOSS_REGISTRY
    except (ImportError, OSError) as exc:  # OSError: a torchaudio whose native library does not load
        if getattr(exc, "name", None) in ("deepfense.models", "deepfense.utils", "deepfense.utils.registry"):
            raise ImportError(f"this needs the DeepFense framework: {_INSTALL}") from exc
        raise ImportError(f"DeepFense is installed but `import deepfense.models` failed: {exc} ({_INSTALL})") from exc
    ours = {c for sem in (True, False) for c in adapter_classes(sem).values()}
    for name in LOSS_REGISTRY.list():
        cls = LOSS_REGISTRY.get(name)
        if cls not in ours:
            _ORIGINALS.setdefault(cls, name)
    return LOSS_REGISTRY


@contextlib.contextmanager
def _quiet(registry):
    """Drop DeepFense's "already registered ... Overwriting" log lines: replacing its losses is the point here."""
    log = logging.getLogger(type(registry).__module__)
    drop = logging.Filter()
    drop.filter = lambda record: "already registered" not in record.getMessage()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _put(registry, name: str, cls) -> None:
    with _quiet(registry):
        if cls is not None:
            registry.register(name)(cls)
        else:  # a name DeepFense did not have: its Registry has no unregister, so remove the entry itself
            registry._registry.pop(name, None)


class FusedLosses:
    """The change `use_fused_losses()` made to DeepFense's LOSS_REGISTRY; also a context manager.

    Attributes:
        previous: {name: the class registered before, or None where DeepFense had none} (DeepFense's own classes,
            whatever later calls did). deepfense_semantics: which adapters are registered. active: not yet restored.
    """

    def __init__(self, registry, previous: Dict[str, Optional[type]], deepfense_semantics: bool):
        self.registry, self.previous, self.deepfense_semantics = registry, previous, deepfense_semantics
        self.active = True

    def restore(self) -> None:
        """Put back the classes registered before (DeepFense's own); a second call does nothing."""
        global _ACTIVE
        if not self.active:
            return
        for name, cls in self.previous.items():
            _put(self.registry, name, cls)
        self.active = False
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self) -> "FusedLosses":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return (f"FusedLosses(active={self.active}, deepfense_semantics={self.deepfense_semantics}, "
                f"names={sorted(self.previous)})")


def use_fused_losses(*, deepfense_semantics: bool = True) -> FusedLosses:
    """Register the adapters in DeepFense's LOSS_REGISTRY under its four loss names and ArcFace, AAMSoftmax,
    CombinedMargin, AdaFace, MagFace, ElasticFace and CurricularFace, so that a ModularDetector built afterwards uses
    the fused losses with its config unchanged.

    Calling it again while the registration is in force changes nothing (or only the semantics) and returns the same
    handle. If DeepFense loss modules exist already (a detector built before the call), they keep DeepFense's losses:
    a warning names them and points to `convert_losses`.

    Args:
        deepfense_semantics: True (default): DeepFense's scores, schedule, defaults, label casting and state_dict
            keys; False: the behaviour of `deepfense.losses` (every key applied, our scores, `step` and
            `class_weights` saved).

    Returns:
        A `FusedLosses` handle: `restore()` or leaving a `with` block puts DeepFense's own classes back.

    Raises:
        ImportError: DeepFense is not installed, or its model package fails to import (the message says what).
    """
    global _ACTIVE
    registry = _registry()
    classes = adapter_classes(deepfense_semantics)
    ours = {c for sem in (True, False) for c in adapter_classes(sem).values()}
    current = {name: registry.get(name) if name in registry else None for name in classes}
    if _ACTIVE is not None and _ACTIVE.active and _ACTIVE.registry is registry and set(current.values()) <= ours:
        handle = _ACTIVE  # still in force: nothing to warn about, the same handle
    else:
        by_name = {name: cls for cls, name in _ORIGINALS.items()}
        previous = {name: by_name.get(name) if cls in ours else cls for name, cls in current.items()}
        handle = _ACTIVE = FusedLosses(registry, previous, deepfense_semantics)
        _warn_if_late()
    for name, cls in classes.items():
        if current[name] is not cls:
            _put(registry, name, cls)
    handle.deepfense_semantics = deepfense_semantics
    return handle


def _live_deepfense_losses() -> list:
    """DeepFense's own loss modules alive in this process (gc's tracked objects; nn.Modules are tracked)."""
    own = tuple(_ORIGINALS)
    if not own:
        return []
    gc.collect()  # a detector already dropped is no reason to warn
    # type(), not isinstance(): isinstance reads __class__, which some lazy objects (torch.distributed.reduce_op) warn on
    return [obj for obj in gc.get_objects() if issubclass(type(obj), own)]


def _warn_if_late() -> None:
    live = _live_deepfense_losses()
    if live:
        names = sorted({type(m).__name__ for m in live})
        warnings.warn(f"use_fused_losses(): {len(live)} DeepFense loss module(s) ({', '.join(names)}) were built "
                      f"before this call and keep DeepFense's losses; call it before building the detector, or "
                      f"convert one built earlier with convert_losses(detector)", UserWarning, stacklevel=3)


def convert_losses(model: nn.Module, *, deepfense_semantics: bool = True) -> int:
    """Swap every DeepFense loss module inside `model` (a ModularDetector's `losses`, at any depth) for its adapter,
    in place, keeping its state: the adapter holds the very Parameter objects (an optimizer built on the model
    keeps working, its state included), the buffers are copied, ASoftmax's current `iter` becomes its `step`.

    Returns:
        How many modules were swapped.
    """
    _registry()  # learn DeepFense's own classes
    classes = adapter_classes(deepfense_semantics)
    swapped = 0
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            name = _ORIGINALS.get(type(child))
            if name in classes:
                setattr(parent, key, _converted(classes[name], child))
                swapped += 1
    return swapped


def _converted(cls: type, old: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the config was read by DeepFense already; its warnings were its own
        new = cls(dict(old.config))
    params = dict(old.named_parameters())
    first = next(iter(params.values()))
    new.to(device=first.device, dtype=first.dtype)
    new.load_state_dict(old.state_dict(), strict=True)
    for path, param in params.items():  # the same Parameter objects, so optimizers keep pointing at them
        owner, _, leaf = path.rpartition(".")
        setattr(new.get_submodule(owner), leaf, param)
    if hasattr(old, "iter") and hasattr(new, "step"):
        new.step.fill_(int(old.iter))
    return new.train(old.training)


def run_deepfense(argv) -> int:
    """DeepFense's own command line (`deepfense train|test|list ...`) with the fused losses registered first.

    Returns:
        DeepFense's exit status; 2 with a one-line message when DeepFense or what its CLI imports is missing.
    """
    try:
        use_fused_losses()
    except ImportError as exc:
        print(f"deepfense-losses deepfense: {exc}", file=sys.stderr)
        return 2
    try:
        from deepfense.cli.main import cli
    except (ImportError, OSError) as exc:  # OSError: a torchaudio whose native library does not load
        print(f"deepfense-losses deepfense: DeepFense's command line does not import ({type(exc).__name__}: {exc}); "
              f"docs/deepfense.md lists what it needs", file=sys.stderr)
        return 2
    try:
        cli.main(args=list(argv), prog_name="deepfense-losses deepfense", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
