"""Loss registry and config: the only place YAML and config dicts enter.

Accepted config forms (all through `build_loss`):
    * spec form       ``{type: AMSoftmax, args: {embedding_dim: 192, m: 0.3}}`` (``weight`` in args or beside them)
    * DeepFense flat  ``{type: AMSoftmax, weight: 0.5, embedding_dim: 192}``
    * either under a top-level ``loss:`` key (or ``model: {loss: ...}``, DeepFense's experiment layout)
    * a list of entries -> `MultiLoss` (sum of weight_i * loss_i; the first entry gives logits and scores)
    * YAML text or a YAML file path (parsed with ``yaml.safe_load``)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Dict, Union

import yaml
from torch import nn

from . import checks
from .checks import LossConfigError, MissingKeyError, UnknownKeyError, WrongTypeError
# the registry is a leaf that each loss class fills with its `register_loss` decorator (`deepfense.losses` imports
# them all); re-exported here as the config API
from .registry import _REGISTRY, get_loss_class, list_losses, loss_classes, register_loss  # noqa: F401
from .registry import suggest as _suggest


class _Required:
    """Marks a parameter without a default in `loss_signature`."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def _parameters(cls: type) -> Dict[str, inspect.Parameter]:
    """Keyword parameters of cls.__init__ (without self, *args, **kwargs)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for i, (k, p) in enumerate(params.items())
            if i > 0 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def loss_signature(name: str) -> Dict[str, object]:
    """Parameters of loss `name` with their defaults, in signature order; `REQUIRED` marks ones without a default."""
    cls = get_loss_class(name)
    shown = getattr(cls, "DISPLAY_DEFAULTS", {})
    return {k: shown.get(k, REQUIRED if p.default is p.empty else p.default) for k, p in _parameters(cls).items()}


def _load(cfg):
    """YAML text or a path -> Python data; mappings and lists pass through."""
    if isinstance(cfg, os.PathLike) or (isinstance(cfg, str) and "\n" not in cfg and os.path.isfile(cfg)):
        with open(cfg, encoding="utf-8") as f:
            return yaml.safe_load(f)
    if isinstance(cfg, str):
        if cfg.strip().endswith((".yaml", ".yml")) and "\n" not in cfg.strip():
            raise FileNotFoundError(f"loss config file not found: {cfg}")
        return yaml.safe_load(cfg)
    return cfg


def _unwrap(cfg):
    """Strip a top-level ``loss:`` (or ``model: {loss: ...}``) wrapper."""
    if isinstance(cfg, Mapping) and "type" not in cfg:
        if "loss" in cfg:
            return cfg["loss"]
        if isinstance(cfg.get("model"), Mapping) and "loss" in cfg["model"]:
            return cfg["model"]["loss"]
    return cfg


def _split_entry(entry: Mapping):
    """One config entry -> (type name, constructor kwargs, weight or None)."""
    if "type" not in entry:
        raise MissingKeyError(f"loss config needs a 'type' key (one of {', '.join(list_losses())}); got keys "
                              f"{sorted(map(str, entry))}", "type")
    name = entry["type"]
    cls = get_loss_class(name)
    if "args" in entry:  # spec form: options under args, only weight may sit beside them
        extra = [k for k in entry if k not in ("type", "args", "weight")]
        if extra:
            raise UnknownKeyError(f"{name}: key {extra[0]!r} belongs under 'args' (top-level keys of the spec form: "
                                  f"type, args, weight)", extra[0])
        args = entry["args"] if entry["args"] is not None else {}
        if not isinstance(args, Mapping):
            raise WrongTypeError(f"{name}: 'args' must be a mapping, got {type(args).__name__}", "args")
        if "weight" in entry and "weight" in args:
            raise LossConfigError(f"{name}: 'weight' is given both beside and inside 'args'; give it once", "weight")
        kwargs = dict(args)
        if "weight" in entry:
            kwargs["weight"] = entry["weight"]
    else:  # DeepFense's flat form
        kwargs = {k: v for k, v in entry.items() if k != "type"}
    return name, cls, kwargs


def _check_keys(name: str, cls: type, kwargs: dict) -> None:
    checks.check_unknown_keys(cls, kwargs, siblings=loss_classes(), also=("weight",))
    for key, p in _parameters(cls).items():
        if p.default is p.empty and key not in kwargs:
            raise MissingKeyError(f"{name}: missing required key {key!r}", key)


def _build_one(entry) -> nn.Module:
    if not isinstance(entry, Mapping):
        raise WrongTypeError(f"a loss config entry must be a mapping, got {type(entry).__name__} {entry!r}", "type")
    name, cls, kwargs = _split_entry(entry)
    _check_keys(name, cls, kwargs)
    weight = kwargs.get("weight")
    if "weight" not in _parameters(cls):  # a custom loss without a weight argument: keep it for MultiLoss
        kwargs.pop("weight", None)
    module = cls(**kwargs)
    if weight is not None and not hasattr(module, "loss_weight"):
        module.loss_weight = checks.check_float(name, "weight", weight, low=0.0)
    return module


def build_loss(cfg: Union[Mapping, list, str, os.PathLike]) -> nn.Module:
    """Build a loss module from config.

    Args:
        cfg: a mapping (spec or flat form, optionally under ``loss:``), a list of them, YAML text, or a path to a
            YAML file.

    Returns:
        The loss module for one entry; a `MultiLoss` for a list.

    Raises:
        LossConfigError (a ValueError) or a subclass that is also a KeyError (unknown type or key, missing key) or a
        TypeError (wrong type); the message names the key and, for a misspelt key, the nearest valid one.
    """
    cfg = _unwrap(_load(cfg))
    if isinstance(cfg, (list, tuple)):
        modules = []
        for i, entry in enumerate(cfg):
            try:
                modules.append(_build_one(entry))
            except LossConfigError as e:  # say which entry of the list is wrong
                raise type(e)(f"loss[{i}]: {e}", e.key) from e
        from .modules import MultiLoss  # the modules sit above the registry, not below config: imported on use
        return MultiLoss(modules)
    if cfg is None:
        raise MissingKeyError("empty loss config: expected a mapping with a 'type' key, or a list of them", "type")
    return _build_one(cfg)
