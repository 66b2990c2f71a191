"""Every loss option's rule, in one place, and the errors that name a bad option.

The functional API (through `deepfense.params.LossParams`), the modules' constructors and attribute assignments,
`MarginScheduler`, YAML (`deepfense.losses.build_loss`) and the DeepFense adapter all check an option with the rule
here, so a bad value gets the same error wherever it enters.

Options may be Python numbers or, where a loss schedules them (ArcFace's s and margins, ASoftmax's lambda), 0-dim
tensors. A tensor's value is read and checked where that needs no device sync: always for CPU tensors, and for CUDA
tensors only when a module is built or an attribute set (once), not per loss call.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

REDUCTIONS = ("mean", "sum", "none")

# Tests only: the device type whose policy applies ("cuda" makes CPU tensors follow CUDA's: no value read per call);
# None: the tensors' own device.
POLICY_DEVICE = None


def readable(t: torch.Tensor) -> bool:
    """Whether a tensor's values may be read on every call: on the CPU (no device sync), never while compiling."""
    on_cpu = t.is_cpu if POLICY_DEVICE is None else POLICY_DEVICE == "cpu"  # (device.type costs ~1 us a call)
    return on_cpu and not torch.compiler.is_compiling()
ANGLE_MAX = math.pi / 2  # an angular margin beyond a right angle turns the target logit against its own class


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


def check_choice(owner: str, key: str, value, choices: Sequence):
    """Check that `value` is one of `choices`."""
    if isinstance(value, bool) or value not in choices:
        raise LossConfigError(f"{_where(owner)}'{key}' must be one of {tuple(choices)}, got {value!r}", key)
    return value


def check_bool(owner: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise WrongTypeError(f"{_where(owner)}'{key}' must be True or False, got {value!r}", key)
    return value


def check_validate(owner: str, value) -> Optional[bool]:
    """The `validate` option: None (the device's default), True or False."""
    if value is not None and not isinstance(value, bool):
        raise LossConfigError(f"{_where(owner)}'validate' must be None, True or False, got {value!r}", "validate")
    return value


@dataclass(frozen=True)
class Rule:
    """A real option's range: low <= v <= high (low < v when low_open), an integer when `integer`; `angle` adds a
    hint when the value looks like degrees."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    integer: bool = False
    angle: bool = False

    def wanted(self) -> str:
        if self.integer:
            if self.low is not None and self.high is not None:
                return f"an integer in {int(self.low)}..{int(self.high)}"
            return "an integer" + (f" >= {int(self.low)}" if self.low is not None else "") + (
                f" <= {int(self.high)}" if self.high is not None else "")
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"<= {self.high:.4g}"
        what = "an angle in radians " if self.angle else "a finite number "
        return what + " and ".join(p for p in (lo, hi) if p)

    def ok(self, v: float) -> bool:
        if not math.isfinite(v) or (self.integer and int(v) != v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or v <= self.high

    def __call__(self, owner: str, key: str, value, *, tensors: str = "no"):
        """Check `value`; return it as a float (an int for integer rules), or a 0-dim tensor as it is.

        tensors: 'no' (a tensor is an error), 'value' (a 0-dim float tensor is accepted and its value checked, with a
        sync on CUDA: construction time), 'cpu' (accepted; its value checked only on the CPU: per call).
        While torch.compile traces, nothing is checked: a comparison of a traced number would specialise the graph
        on its value (a recompile per margin change); the eager call, or the module's assignment, checks it.
        """
        if torch.compiler.is_compiling():
            return value
        if isinstance(value, torch.Tensor) and tensors != "no":
            if value.dim() != 0 or not value.is_floating_point():
                raise WrongTypeError(f"{_where(owner)}'{key}' must be a number or a 0-dim float tensor, got a tensor "
                                     f"of shape {tuple(value.shape)} and dtype {value.dtype}", key)
            if tensors == "value" or tensors == "cpu" and readable(value):
                self._range(owner, key, float(value.detach()))
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise WrongTypeError(f"{_where(owner)}'{key}' must be {self.wanted()}, got {type(value).__name__} "
                                 f"{value!r}", key)
        self._range(owner, key, float(value))
        return int(value) if self.integer else float(value)

    def _range(self, owner: str, key: str, v: float) -> None:
        if self.ok(v):
            return
        hint = ""
        if self.angle and self.high is not None and self.high < v <= 180.0:
            hint = f"; it looks like degrees: math.radians({v:g}) = {math.radians(v):.4f}"
        raise LossConfigError(f"{_where(owner)}'{key}' must be {self.wanted()}, got {v:g}{hint}", key)


SCALE = Rule(low=0.0, low_open=True)  # s, alpha, m1
NON_NEGATIVE = Rule(low=0.0)  # gamma, lambda and its schedule, the multi-loss weight
COSINE_MARGIN = Rule(low=0.0, high=1.0)  # AMSoftmax's m, CombinedMargin's m3: subtracted from a cosine
ANGLE = Rule(low=0.0, high=ANGLE_MAX, angle=True)  # ArcFace's m, CombinedMargin's m2
COSINE = Rule(low=-1.0, high=1.0)  # OCSoftmax's m_real / m_fake, a filtering threshold
FRACTION = Rule(low=0.0, high=1.0)  # label smoothing
SPHEREFACE_M = Rule(low=1, integer=True)  # ASoftmax's integer angle multiplier
# per-sample margins (the adaptive-margin heads): AdaFace's angular margin is negative for high-norm samples and its
# additive one reaches 2m, ElasticFace's normal draws may fall below 0: a sample's angular margin may take either
# sign within a right angle, its cosine margin either sign within the width of the cosine's range
ROW_ANGLE = Rule(low=-ANGLE_MAX, high=ANGLE_MAX, angle=True)
ROW_COSINE_MARGIN = Rule(low=-2.0, high=2.0)


def check_rows(owner: str, key: str, value, rule: Rule, n_rows: int):
    """A per-sample option: a float tensor of shape [n_rows] (one value per embedding row), returned as it is; its
    values checked with `rule` where that needs no device sync (`readable`: on the CPU, not while compiling)."""
    if value.dim() != 1 or value.shape[0] != n_rows or not value.is_floating_point():
        raise WrongTypeError(f"{_where(owner)}'{key}' must be a number, a 0-dim tensor or a per-sample float tensor "
                             f"of shape [{n_rows}] (one value per embedding row), got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}", key)
    if readable(value) and n_rows:
        v = value.detach()
        bad = ~torch.isfinite(v)
        if rule.low is not None:
            bad |= v < rule.low
        if rule.high is not None:
            bad |= v > rule.high
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            got = float(v[i])
            hint = ""
            if rule.angle and rule.high is not None and rule.high < got <= 180.0:
                hint = "; it looks like degrees: torch.deg2rad turns degrees into radians"
            raise LossConfigError(f"{_where(owner)}'{key}' must hold {rule.wanted()} in every row, got {got:g} in "
                                  f"row {i}{hint}", key)
    return value


def check_label_smoothing(owner: str, value, *, allowed: bool) -> float:
    """label_smoothing in [0, 1]; only 0 where the loss has no softmax over classes to smooth (ASoftmax, OCSoftmax)."""
    value = FRACTION(owner, "label_smoothing", value)
    if value and not allowed:
        raise LossConfigError(f"{_where(owner)}'label_smoothing' is not supported by this loss (only CrossEntropy, "
                              f"AMSoftmax, ArcFace and CombinedMargin take it), got {value}", "label_smoothing")
    return value


def check_ignore_index(owner: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise WrongTypeError(f"{_where(owner)}'ignore_index' must be an integer, got {type(value).__name__} "
                             f"{value!r}", "ignore_index")
    return int(value)


def class_weights_error(weights: torch.Tensor) -> Optional[str]:
    """Why these class weights are unusable (a NaN/Inf or a negative entry), or None. Reads the values."""
    bad = ~torch.isfinite(weights.detach()) | (weights.detach() < 0)
    if not bad.any():
        return None
    i = int(bad.nonzero()[0, 0])
    return f"'class_weights' must be finite and >= 0, got {float(weights[i])} at index {i}"


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
        items = [Rule()(owner, f"class_weights[{i}]", v) for i, v in enumerate(value)]
        weights = torch.tensor(items, dtype=torch.float32)
    if weights.numel() != n:
        raise LossConfigError(f"{_where(owner)}'class_weights' must have {n} entries (one per class), got "
                              f"{weights.numel()}", "class_weights")
    problem = class_weights_error(weights)
    if problem:
        raise LossConfigError(_where(owner) + problem, "class_weights")
    return weights
