"""The loss registry: config `type` names -> loss classes, filled by the `register_loss` decorator on each class.

A leaf: the loss modules import it to register themselves and to name their siblings in errors; `config` imports it
to build losses. Neither imports the other through it.
"""

from __future__ import annotations

import difflib
from typing import Callable, Dict, List

from torch import nn

from .checks import LossConfigError, UnknownLossError, WrongTypeError

_REGISTRY: Dict[str, type] = {}


def register_loss(name: str, *, override: bool = False) -> Callable[[type], type]:
    """Class decorator that makes a loss buildable from config as ``type: name``.

    The class is constructed with the config keys as keyword arguments; its forward should take
    ``(embeddings, targets)`` (and may take ``logits=None``). A ``weight`` key that the constructor does not take is
    kept by `build_loss` as the module's ``loss_weight`` for `MultiLoss`.

    Args:
        name: the config ``type``; must not be registered already unless `override` is set.
    """
    if not isinstance(name, str) or not name:
        raise WrongTypeError(f"register_loss: the name must be a non-empty string, got {name!r}", "type")

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise WrongTypeError(f"register_loss({name!r}): expected an nn.Module subclass, got {cls!r}", "type")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not override:
            raise LossConfigError(f"loss type {name!r} is already registered to {_REGISTRY[name].__qualname__}; "
                                  f"pass override=True to replace it", "type")
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_losses() -> List[str]:
    """Names of the registered loss types, sorted."""
    return sorted(_REGISTRY)


def loss_classes() -> List[type]:
    """The registered loss classes, each once (aliases such as AAMSoftmax share ArcFace's), by registered name."""
    return list(dict.fromkeys(_REGISTRY[n] for n in list_losses()))


def get_loss_class(name: str) -> type:
    """The class registered as `name`; an `UnknownLossError` naming the registered ones otherwise."""
    if not isinstance(name, str):
        raise WrongTypeError(f"loss 'type' must be a string, got {type(name).__name__} {name!r}", "type")
    if name not in _REGISTRY:
        raise UnknownLossError(f"unknown loss type {name!r}{suggest(name, _REGISTRY)}; registered: "
                               f"{', '.join(list_losses())}", "type")
    return _REGISTRY[name]


def suggest(key: str, valid) -> str:
    """' (did you mean ...?)' naming the entry of `valid` nearest to `key`, or ''."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6) if isinstance(key, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""
