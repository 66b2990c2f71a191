"""Config errors and the value checks shared by the loss constructors and `build_loss`.

Every error names the offending key. The classes subclass `LossConfigError` (a ValueError), and also KeyError or
TypeError where that is the natural kind, so callers may catch either the specific kind or one ValueError.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Optional, Sequence

import torch

from ..inputs import BACKENDS
from ..params import REDUCTIONS


class LossConfigError(ValueError):
    """A loss option is missing, misspelt, of the wrong type or out of range. `key` names the option."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key

    def __str__(self) -> str:  # KeyError would print repr(message) with quotes; keep the plain text
        return str(self.args[0]) if self.args else ""


class UnknownLossError(LossConfigError, KeyError):
    """The config names a loss type that is not registered."""


class UnknownKeyError(LossConfigError, KeyError):
    """The config has a key that the loss does not take (usually a typo)."""


class MissingKeyError(LossConfigError, KeyError):
    """A required key (embedding_dim, n_classes, type) is absent."""


class WrongTypeError(LossConfigError, TypeError):
    """A value has the wrong type (a string for a number, a bool for an int, ...)."""


def _where(owner: str) -> str:
    return f"{owner}: " if owner else ""


def check_int(owner: str, key: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """Return `value` as an int, accepting integral floats (192.0) but not bools or strings; check low <= v <= high."""
    if low is not None and high is not None:
        wanted = f"an integer in {low}..{high}"
    else:
        wanted = "an integer" + (f" >= {low}" if low is not None else "") + (f" <= {high}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise WrongTypeError(f"{_where(owner)}'{key}' must be {wanted}, got {type(value).__name__} {value!r}", key)
    out_of_range = (low is not None and value < low) or (high is not None and value > high)
    if out_of_range or (not isinstance(value, numbers.Integral) and (not math.isfinite(value) or int(value) != value)):
        raise LossConfigError(f"{_where(owner)}'{key}' must be {wanted}, got {value!r}", key)
    return int(value)


def check_float(owner: str, key: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False) -> float:
    """Return `value` as a finite float (not a bool or string) with low <= v <= high (low < v when low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise WrongTypeError(f"{_where(owner)}'{key}' must be a number, got {type(value).__name__} {value!r}", key)
    value = float(value)
    if not math.isfinite(value):
        raise LossConfigError(f"{_where(owner)}'{key}' must be finite, got {value}", key)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise LossConfigError(f"{_where(owner)}'{key}' must be {' and '.join(p for p in (lo, hi) if p)}, got {value}",
                              key)
    return value


def check_choice(owner: str, key: str, value, choices: Sequence) -> str:
    """Check that `value` is one of `choices`."""
    if value not in choices:
        raise LossConfigError(f"{_where(owner)}'{key}' must be one of {tuple(choices)}, got {value!r}", key)
    return value


def check_reduction(owner: str, value) -> str:
    return check_choice(owner, "reduction", value, REDUCTIONS)


def check_backend(owner: str, value) -> str:
    return check_choice(owner, "backend", value, BACKENDS)


def check_class_weights(owner: str, value, n: int) -> Optional[torch.Tensor]:
    """Turn a list/tuple/tensor of `n` finite non-negative numbers into a float32 [n] tensor (None stays None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            raise WrongTypeError(f"{_where(owner)}'class_weights' must be a 1-D real tensor or a list of numbers",
                                 "class_weights")
        weights = value.detach().to(torch.float32).clone()
    else:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise WrongTypeError(f"{_where(owner)}'class_weights' must be a list of numbers, got "
                                 f"{type(value).__name__} {value!r}", "class_weights")
        items = [check_float(owner, f"class_weights[{i}]", v) for i, v in enumerate(value)]
        weights = torch.tensor(items, dtype=torch.float32)
    if weights.numel() != n:
        raise LossConfigError(f"{_where(owner)}'class_weights' must have {n} entries (one per class), got "
                              f"{weights.numel()}", "class_weights")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise LossConfigError(f"{_where(owner)}'class_weights' must be finite and >= 0, got {weights.tolist()}",
                              "class_weights")
    return weights


def check_label_smoothing(owner: str, value, *, allowed: bool) -> float:
    """label_smoothing in [0, 1]; only 0 where the loss has no softmax over classes to smooth (ASoftmax, OCSoftmax)."""
    value = check_float(owner, "label_smoothing", value, low=0.0, high=1.0)
    if value and not allowed:
        raise LossConfigError(f"{_where(owner)}'label_smoothing' is not supported by this loss (only CrossEntropy "
                              f"and AMSoftmax take it), got {value}", "label_smoothing")
    return value


def constructor_keys(cls: type) -> dict:
    """Keyword parameters of cls.__init__ (without self, *args, **kwargs), in signature order."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p for i, (k, p) in enumerate(params.items())
            if i > 0 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_unknown_keys(cls: type, keys, siblings=(), also=()) -> None:
    """Raise UnknownKeyError for a key `cls` does not take; the same message for direct construction and YAML.

    A key another loss in `siblings` takes (OCSoftmax's 'n_classes') is named as theirs; any other unknown key gets
    the nearest valid one ("did you mean"). Keys in `also` are accepted besides the constructor's.
    """
    params = constructor_keys(cls)
    if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values()):
        return
    name = cls.__name__
    for key in keys:
        if not isinstance(key, str):
            raise WrongTypeError(f"{name}: config keys must be strings, got {key!r}", str(key))
        if key in params or key in also:
            continue
        owners = [c.__name__ for c in siblings if c is not cls and key in constructor_keys(c)]
        if owners:
            hint = f" ({', '.join(owners)} take{'s' if len(owners) == 1 else ''} it; {name} does not)"
        else:
            close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownKeyError(f"{name}: unknown key {key!r}{hint}; valid keys: {', '.join(params)}", key)
