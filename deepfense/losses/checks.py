"""Config errors and the value checks shared by the loss constructors and `build_loss`.

Every error names the offending key. The classes subclass `LossConfigError` (a ValueError), and also KeyError or
TypeError where that is the natural kind, so callers may catch either the specific kind or one ValueError.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Optional

from ..inputs import BACKENDS
from ..options import (REDUCTIONS, LossConfigError, MissingKeyError, UnknownKeyError, UnknownLossError,  # noqa: F401
                       Rule, WrongTypeError, check_choice, check_class_weights, check_int, check_label_smoothing)


def check_float(owner: str, key: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                low_open: bool = False) -> float:
    """Return `value` as a finite float (not a bool or string) with low <= v <= high (low < v when low_open)."""
    return Rule(low=low, high=high, low_open=low_open)(owner, key, value)


def check_reduction(owner: str, value) -> str:
    return check_choice(owner, "reduction", value, REDUCTIONS)


def check_backend(owner: str, value) -> str:
    return check_choice(owner, "backend", value, BACKENDS)


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
