"""Loss identity and non-tensor options, shared by every backend.

One frozen dataclass carries the scalar options through the autograd Function and the kernel launchers, so the
backward returns a short tuple and a changing margin or lambda never changes code shape.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

REDUCTIONS = ("mean", "sum", "none")


class Margin(enum.IntEnum):
    """Which transform the target column gets. The value is the Triton constexpr that selects the loss."""

    NONE = 0  # CrossEntropy: linear logits, no margin.
    ADDITIVE = 1  # AMSoftmax: s * (cos_y - m).
    ANGULAR = 2  # ASoftmax: |x| * (lambda * cos_y + psi(theta_y)) / (1 + lambda), focal factor.
    ONE_CLASS = 3  # OCSoftmax: softplus(alpha * (m_real - cos)) / softplus(alpha * (cos - m_fake)).
    COMBINED = 4  # ArcFace / CombinedMargin: s * (cos(m1 * theta_y + m2) - m3), a fallback past the monotone range.


class Fallback(enum.IntEnum):
    """ArcFace's target cosine where cos(m1 theta + m2) stops decreasing (theta > (pi - m2) / m1), by toolkit.

    With th = cos((pi - m2) / m1) and phi = cos(m1 theta + m2):
    NONE (insightface) phi everywhere; WESPEAKER cos > th ? phi : cos - (1 + cos(pi - m2)); SPEECHBRAIN the same
    with cos clamped to +-(1 - 1e-7) first and cos - m2 sin(pi - m2) past th; PML (pytorch-metric-learning)
    cos - m2 sin(m2) past th; EASY (easy_margin) cos > 0 ? phi : cos. m3 is subtracted after the fallback.
    """

    NONE = 0
    WESPEAKER = 1
    SPEECHBRAIN = 2
    PML = 3
    EASY = 4


@dataclass(frozen=True)
class LossParams:
    """Scalar options of one loss call.

    Attributes:
        margin: which loss (see `Margin`).
        s: logit scale of AMSoftmax.
        m: additive margin (AMSoftmax, float) or integer angular multiplier (ASoftmax, 1..5).
        gamma: focal exponent of ASoftmax.
        m_real: bonafide margin of OCSoftmax.
        m_fake: spoof margin of OCSoftmax.
        alpha: scale of OCSoftmax.
        bonafide_label: the target value that OCSoftmax treats as bonafide.
        ignore_index: rows with this target contribute nothing.
        label_smoothing: epsilon of torch's label smoothing (CrossEntropy, AMSoftmax).
        reduction: 'mean' | 'sum' | 'none'.
        m1: CombinedMargin's angle multiplier (with `m` as the additive angle m2 and `m3` the cosine margin).
        m3: CombinedMargin's additive cosine margin. fallback: a `Fallback` value (ArcFace / CombinedMargin).
        filter_threshold: insightface's interclass_filtering_threshold: non-target cosines above it become 0 and pass
            no gradient (0 turns it off). straight_through: insightface's gradient, d(target logit)/d cos = s.
        sub_centers: K weight columns per class (AMSoftmax, ArcFace, CombinedMargin); a class's cosine is the max
            over its K adjacent columns.
    """

    margin: Margin
    s: float = 1.0
    m: float = 0.0
    gamma: float = 0.0
    m_real: float = 0.5
    m_fake: float = 0.2
    alpha: float = 20.0
    bonafide_label: int = 1
    ignore_index: int = -100
    label_smoothing: float = 0.0
    reduction: str = "mean"
    m1: float = 1.0
    m3: float = 0.0
    fallback: int = 0
    filter_threshold: float = 0.0
    straight_through: bool = False
    sub_centers: int = 1

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        if self.label_smoothing and self.margin in (Margin.ANGULAR, Margin.ONE_CLASS):
            raise ValueError(f"label_smoothing is not defined for {self.margin.name} losses (ASoftmax, OCSoftmax)")
        if self.margin == Margin.ANGULAR and (int(self.m) != self.m or not 1 <= self.m <= 5):
            raise ValueError(f"ASoftmax m must be an integer in 1..5, got {self.m}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.sub_centers < 1 or (self.sub_centers > 1 and self.margin not in (Margin.ADDITIVE, Margin.COMBINED)):
            raise ValueError(f"sub_centers must be >= 1 (and > 1 only for AMSoftmax, ArcFace, CombinedMargin), got "
                             f"{self.sub_centers}")
        if self.margin == Margin.COMBINED and not self.m1 > 0:
            raise ValueError(f"m1 must be > 0, got {self.m1}")
        if self.fallback not in tuple(Fallback):
            raise ValueError(f"fallback must be a Fallback value, got {self.fallback!r}")
        if self.margin in (Margin.ADDITIVE, Margin.COMBINED) and self.s <= 0:
            raise ValueError(f"s must be > 0, got {self.s}")
        if self.margin == Margin.ONE_CLASS and self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
