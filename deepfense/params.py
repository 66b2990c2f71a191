"""Loss identity and non-tensor options, shared by every backend.

One frozen dataclass carries the scalar options through the autograd Function and the kernel launchers, so the
backward returns a short tuple and a changing margin or lambda never changes code shape.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .options import (COSINE, COSINE_MARGIN, NON_NEGATIVE, REDUCTIONS, SCALE, SPHEREFACE_M, LossConfigError, Rule,
                      check_bool, check_choice, check_ignore_index, check_int, check_label_smoothing)


# A small head: at most this many classes (the deepfake heads). The small-head kernels serve these, and on the CPU
# torch's own ops beat the closed-form Function for them: the [B, C] logits are no bigger than the [B] row statistics.
SMALL_HEAD_CLASSES = 16


class Margin(enum.IntEnum):
    """Which transform the target column gets. The value is the Triton constexpr that selects the loss."""

    NONE = 0  # CrossEntropy: linear logits, no margin.
    ADDITIVE = 1  # AMSoftmax: s * (cos_y - m).
    ANGULAR = 2  # ASoftmax: |x| * (lambda * cos_y + psi(theta_y)) / (1 + lambda), focal factor.
    ONE_CLASS = 3  # OCSoftmax: softplus(alpha * (m_real - cos)) / softplus(alpha * (cos - m_fake)).
    COMBINED = 4  # ArcFace / CombinedMargin: s * (cos(m1 * theta_y + m2) - m3), a fallback past the monotone range.


class Fallback(enum.IntEnum):
    """ArcFace's target cosine where cos(m1 theta + m2) stops decreasing (theta > (pi - m2) / m1), by toolkit.

    With th = cos((pi - m2) / m1) and phi = cos(m1 theta + m2), each with its toolkit's rule at the switch point:
    NONE (insightface) phi everywhere; WESPEAKER cos > th ? phi : cos - (1 + cos(pi - m2)) (WeSpeaker's
    `torch.where(cosine > self.th, phi, cosine - self.mmm)`); SPEECHBRAIN cos clamped to +-(1 - 1e-7) first, then
    cos > th ? phi : cos - m2 sin(pi - m2) (`torch.where(cosine > self.th, phi, cosine - self.mm)`); PML
    (pytorch-metric-learning) cos >= th ? phi : cos - m2 sin(m2): its ArcFaceLoss keeps phi while
    `angles <= pi - margin`, so at theta = pi - m exactly it keeps phi where the others fall back; EASY (easy_margin)
    cos > 0 ? phi : cos (`torch.where(cosine > 0, phi, cosine)`); ADAFACE (AdaFace's head): every cosine clamped to
    +-(1 - ADAFACE_EPS) first, then cos(clip(m1 theta + m2, ADAFACE_EPS, pi - ADAFACE_EPS)), no gradient through a
    clamp or clip that binds. m3 is subtracted after the fallback.
    """

    NONE = 0
    WESPEAKER = 1
    SPEECHBRAIN = 2
    PML = 3
    EASY = 4
    ADAFACE = 5


ADAFACE_EPS = 1e-3  # AdaFace's cosine clamp and angle clip (its head's eps)


class RowMargin(enum.IntFlag):
    """Which of CombinedMargin's runtime values (s, m1, m2, m3) are per-sample [B] tensors (`LossParams.row_margins`):
    the kernels then read that one value per row, and a shared value once. CURRICULAR: CurricularFace's hard
    negatives, with its running t as a fifth runtime value (shared) and, on the kernels, each row's hard-negative
    threshold cos(theta_y + m2) (per sample)."""

    S = 1
    M1 = 2
    M2 = 4
    M3 = 8
    CURRICULAR = 16


@dataclass(frozen=True)
class LossParams:
    """Scalar options of one loss call.

    Attributes:
        margin: which loss (see `Margin`).
        s: logit scale of AMSoftmax.
        m: additive margin (AMSoftmax, float) or integer angular multiplier (ASoftmax, >= 1).
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
        row_margins: a `RowMargin` flag: which of CombinedMargin's runtime values are per-sample tensors, and
            whether CurricularFace's hard negatives apply.
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
    row_margins: int = 0

    def __post_init__(self):
        """Check every option with its rule (`deepfense.options`); errors name the loss and the option."""
        owner = LOSS_NAMES[self.margin]
        for key, rule in _RULES[self.margin].items():
            rule(owner, key, getattr(self, key))
        check_choice(owner, "reduction", self.reduction, REDUCTIONS)
        check_label_smoothing(owner, self.label_smoothing,
                              allowed=self.margin not in (Margin.ANGULAR, Margin.ONE_CLASS))
        check_ignore_index(owner, self.ignore_index)
        check_int(owner, "bonafide_label", self.bonafide_label, low=0, high=1)
        check_int(owner, "sub_centers", self.sub_centers, low=1)
        if self.sub_centers > 1 and self.margin not in (Margin.ADDITIVE, Margin.COMBINED):
            raise LossConfigError(f"{owner}: 'sub_centers' > 1 is only for AMSoftmax, ArcFace and CombinedMargin, "
                                  f"got {self.sub_centers}", "sub_centers")
        check_choice(owner, "fallback", self.fallback, tuple(Fallback))
        check_bool(owner, "straight_through", self.straight_through)
        check_int(owner, "row_margins", self.row_margins, low=0, high=2 * int(RowMargin.CURRICULAR) - 1)


LOSS_NAMES = {Margin.NONE: "CrossEntropy", Margin.ADDITIVE: "AMSoftmax", Margin.ANGULAR: "ASoftmax",
              Margin.ONE_CLASS: "OCSoftmax", Margin.COMBINED: "ArcFace"}
# the options each loss reads from LossParams; ArcFace's s, m2 and m3 travel as a tensor (see functional.arcface_loss)
_RULES = {
    Margin.NONE: {},
    Margin.ADDITIVE: {"s": SCALE, "m": COSINE_MARGIN},
    Margin.ANGULAR: {"m": SPHEREFACE_M, "gamma": NON_NEGATIVE},
    Margin.ONE_CLASS: {"m_real": COSINE, "m_fake": COSINE, "alpha": SCALE},
    Margin.COMBINED: {"m1": SCALE, "filter_threshold": Rule(low=0.0, high=1.0)},
}
