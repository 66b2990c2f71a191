"""The angular-margin heads speaker and face recipes train with: `ArcFace` (also registered as `AAMSoftmax`) and
insightface's `CombinedMargin`, plus `MarginScheduler`, WeSpeaker's margin ramp.

Like the heads in `modules`, they own `mapper.weight` [D, C*K] (K = sub_centers, a class's K columns adjacent) and call
`deepfense.functional.arcface_loss`; the maths lives there and in `deepfense.reference`.

Schedules: `s` and the margins are runtime values. Assigning a new Python float (``head.m = 0.3``) costs at most one
torch.compile recompile (dynamo then treats the float as dynamic); a 0-dim tensor (``ArcFace(..., m=torch.tensor(0.))``
updated in place, as `MarginScheduler` does) costs none.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import functional as F
from .. import options
from ..params import Fallback
from ..reference import class_cosine
from . import checks
from .modules import _LossHead, _Mapper, _local_classes
from .registry import register_loss

FALLBACKS = tuple(f.name.lower() for f in Fallback)


def _scalar(rule):
    """A rule that also takes a 0-dim float tensor (a schedulable value), its value checked on assignment."""
    return lambda owner, key, value: rule(owner, key, value, tensors="value")


class _AngularMarginHead(_LossHead):
    """Shared construction, forward and logits of ArcFace and CombinedMargin; subclasses set m1, m2 and m3."""

    _OPTIONS = {**_LossHead._OPTIONS, "s": _scalar(options.SCALE),
                "fallback": lambda o, k, v: checks.check_choice(o, k, v, FALLBACKS),
                "straight_through": options.check_bool,
                "interclass_filtering_threshold": options.Rule(low=0.0, high=1.0)}

    def _init_head(self, embedding_dim, n_classes, s, fallback, interclass_filtering_threshold, straight_through,
                   sub_centers, process_group, common):
        self.n_classes = checks.check_int(type(self).__name__, "n_classes", n_classes, low=1)
        self.process_group = process_group
        self.s, self.fallback, self.straight_through = s, fallback, straight_through
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.sub_centers = checks.check_int(type(self).__name__, "sub_centers", sub_centers, low=1)
        self._init_common(embedding_dim, self.n_classes, **common)
        self.mapper = _Mapper(self.embedding_dim, _local_classes(self.n_classes, process_group) * self.sub_centers)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against integer targets [B]; `logits` (DeepFense's cache) is ignored."""
        return F.arcface_loss(embeddings, self.mapper.weight, targets, m=self.m2, s=self.s, m1=self.m1, m3=self.m3,
                              fallback=self.fallback, interclass_filtering_threshold=self.interclass_filtering_threshold,
                              straight_through=self.straight_through, sub_centers=self.sub_centers,
                              label_smoothing=self.label_smoothing, process_group=self._sharding(), **self._options())

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, C] scaled class cosines s*cos_c (no margin; with sub-centres the max over each class's K)."""
        self._check_embeddings(embeddings)
        return self.s * class_cosine(embeddings, self.mapper.weight, self.sub_centers)


@register_loss("AAMSoftmax")  # the name speaker recipes (WeSpeaker, SpeechBrain) use
@register_loss("ArcFace")
class ArcFace(_AngularMarginHead):
    """Additive angular margin (ArcFace, speaker recipes' AAM-Softmax): logits s*cos_c, target s*cos(theta_y + m).

    Args:
        embedding_dim: D. n_classes: C. m: angular margin in radians (>= 0; float or 0-dim tensor). s: scale (> 0).
        fallback: the target logit past theta > pi - m, as the toolkit it names: 'wespeaker' (default, also
            SpeechBrain-free recipes), 'speechbrain', 'pml', 'easy' (easy_margin), 'none' (insightface).
        straight_through: insightface's gradient (theta computed under no_grad) instead of the analytic one.
        sub_centers: K sub-centres per class (WeSpeaker's / pytorch-metric-learning's sub-center ArcFace).
        Other options as `AMSoftmax`, including label_smoothing and process_group.
    """

    def __init__(self, embedding_dim: int, n_classes: int = 2, m: float = 0.2, s: float = 32.0,
                 fallback: str = "wespeaker", straight_through: bool = False, sub_centers: int = 1,
                 weight: float = 1.0, class_weights: Optional[Sequence[float]] = None, reduction: str = "mean",
                 ignore_index: int = -100, label_smoothing: float = 0.0, bonafide_label: int = 1,
                 backend: str = "auto", process_group=None, validate: Optional[bool] = None):
        super().__init__()
        self.m = m
        self._init_head(embedding_dim, n_classes, s, fallback, 0.0, straight_through, sub_centers, process_group,
                        dict(class_weights=class_weights, reduction=reduction, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, bonafide_label=bonafide_label, weight=weight,
                             backend=backend, validate=validate))

    _OPTIONS = {**_AngularMarginHead._OPTIONS, "m": _scalar(options.ANGLE)}
    m1, m3 = 1.0, 0.0

    @property
    def m2(self):
        return self.m

    _repr_keys = ("embedding_dim", "n_classes", "m", "s", "fallback", "sub_centers", "reduction", "backend")


@register_loss("CombinedMargin")
class CombinedMargin(_AngularMarginHead):
    """insightface's combined margin: target logit s*(cos(m1 theta_y + m2) - m3).

    (1, m, 0) is ArcFace, (1, 0, m) CosFace (AMSoftmax), (m, 0, 0) SphereFace's angle multiplier without its
    lambda blending. insightface's recipes use s = 64 and (1.0, 0.5, 0.0) or (1.0, 0.3, 0.2).

    Args:
        embedding_dim: D. n_classes: C. m1: angle multiplier (> 0, a float). m2: angular margin (radians), m3: cosine
        margin (>= 0; floats or 0-dim tensors). s: scale. interclass_filtering_threshold: > 0 zeroes non-target
        cosines above it (no gradient), as insightface. fallback: default 'none' (insightface's cos(m1 theta + m2)
        everywhere); the others as `ArcFace`. Other options as `ArcFace`.
    """

    def __init__(self, embedding_dim: int, n_classes: int = 2, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 s: float = 64.0, interclass_filtering_threshold: float = 0.0, fallback: str = "none",
                 straight_through: bool = False, sub_centers: int = 1, weight: float = 1.0,
                 class_weights: Optional[Sequence[float]] = None, reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0, bonafide_label: int = 1, backend: str = "auto", process_group=None,
                 validate: Optional[bool] = None):
        super().__init__()
        self.m1, self.m2, self.m3 = m1, m2, m3
        self._init_head(embedding_dim, n_classes, s, fallback, interclass_filtering_threshold, straight_through,
                        sub_centers, process_group,
                        dict(class_weights=class_weights, reduction=reduction, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, bonafide_label=bonafide_label, weight=weight,
                             backend=backend, validate=validate))

    _OPTIONS = {**_AngularMarginHead._OPTIONS, "m1": options.SCALE, "m2": _scalar(options.ANGLE),
                "m3": _scalar(options.COSINE_MARGIN)}
    _repr_keys = ("embedding_dim", "n_classes", "m1", "m2", "m3", "s", "interclass_filtering_threshold", "fallback",
                  "sub_centers", "reduction", "backend")


class MarginScheduler:
    """WeSpeaker's margin ramp: the margin stays `initial_margin` before `increase_start_iter`, rises to
    `final_margin` by `fix_start_iter` (exponentially or linearly) and then stays there.

    exp: ratio = 1 - exp(t / T * ln(1e-3 / (1 + 1e-6))), linear: ratio = t / T, with t the iterations since the ramp
    started and T its length; margin = initial + (final - initial) * ratio. Call `step()` once per iteration (or
    `step(i)` with the global iteration). A head attribute that is a tensor is updated in place (no recompile under
    torch.compile); a float attribute is reassigned.

    Args:
        head: the loss module. attr: which attribute to schedule ('m' for AMSoftmax / ArcFace, 'm2' or 'm3' for
        CombinedMargin, or 's'). increase_type: 'exp' | 'linear'.
    """

    def __init__(self, head, initial_margin: float, final_margin: float, increase_start_iter: int,
                 fix_start_iter: int, increase_type: str = "exp", attr: str = "m"):
        if increase_type not in ("exp", "linear"):
            raise ValueError(f"increase_type must be 'exp' or 'linear', got {increase_type!r}")
        if not 0 <= increase_start_iter <= fix_start_iter:
            raise ValueError(f"need 0 <= increase_start_iter <= fix_start_iter, got {increase_start_iter}, "
                             f"{fix_start_iter}")
        if not hasattr(head, attr):
            raise ValueError(f"{type(head).__name__} has no attribute {attr!r} to schedule")
        self.head, self.attr = head, attr
        check = getattr(head, "check_option", lambda name, value: value)  # the head's rule for that option
        self.initial_margin = float(check(attr, float(initial_margin)))
        self.final_margin = float(check(attr, float(final_margin)))
        self.increase_start_iter, self.fix_start_iter = int(increase_start_iter), int(fix_start_iter)
        self.increase_type = increase_type
        self.current_iter = 0
        self._set(self.initial_margin)

    @classmethod
    def from_epochs(cls, head, initial_margin, final_margin, increase_start_epoch, fix_start_epoch, epoch_iter,
                    increase_type="exp", attr="m"):
        """WeSpeaker's epoch arguments (1-based epochs): the ramp spans iterations (epoch - 1) * epoch_iter."""
        return cls(head, initial_margin, final_margin, (increase_start_epoch - 1) * epoch_iter,
                   (fix_start_epoch - 1) * epoch_iter, increase_type, attr)

    def value(self, iteration: int) -> float:
        """The margin at a global iteration."""
        if iteration >= self.fix_start_iter:
            return self.final_margin
        if iteration < self.increase_start_iter:
            return self.initial_margin
        frac = (iteration - self.increase_start_iter) / (self.fix_start_iter - self.increase_start_iter)
        ratio = 1.0 - math.exp(frac * math.log(1e-3 / (1.0 + 1e-6))) if self.increase_type == "exp" else frac
        return self.initial_margin + (self.final_margin - self.initial_margin) * ratio

    def step(self, current_iter: Optional[int] = None) -> float:
        """Set the head's margin for this iteration, then advance the counter; returns the value set."""
        if current_iter is not None:
            self.current_iter = int(current_iter)
        value = self.value(self.current_iter)
        self._set(value)
        self.current_iter += 1
        return value

    def _set(self, value: float) -> None:
        current = getattr(self.head, self.attr)
        if isinstance(current, torch.Tensor):  # every value the ramp takes lies between two checked ends
            with torch.no_grad():
                current.fill_(value)
        else:
            setattr(self.head, self.attr, float(value))
