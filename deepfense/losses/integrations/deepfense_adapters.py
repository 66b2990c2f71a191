"""The loss modules DeepFense's registry builds after `use_fused_losses()` (deepfense.py beside this file).

DeepFense 0.2.2's detector builds each loss as `LOSS_REGISTRY.build(type, cfg)`, i.e. `cls(cfg)` with one dict: the
config entry without `type`, still holding `weight`, which the detector itself multiplies in (the adapters never
apply it). Under DeepFense semantics (the default) the adapters reproduce DeepFense's behaviour where it differs from
`deepfense.losses` (docs/deepfense.md has the table): the two-class CrossEntropy score is `logit[bonafide]`; ASoftmax's
schedule advances on every forward, eval included; AMSoftmax's class weights default to [0.5, 0.5]; float labels are
cast to class indices; keys DeepFense ignores are ignored (with a warning); the state_dict uses DeepFense's key names,
so checkpoints load both ways with `strict=True`. ArcFace (also `AAMSoftmax`), CombinedMargin and the adaptive-margin
face heads (AdaFace, MagFace, ElasticFace, CurricularFace) have no DeepFense counterpart: every key of ours applies,
and `final_margin` (+ `increase_start_iter`, `fix_start_iter`, `increase_type`, `scheduled_margin`) adds WeSpeaker's
margin ramp, stepped by each training forward.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Mapping

import torch

from .. import checks
from ..adaptive import AdaFace, CurricularFace, ElasticFace, MagFace
from ..margins import ArcFace, CombinedMargin, MarginScheduler
from ..modules import AMSoftmax, ASoftmax, CrossEntropy, OCSoftmax

# Config keys DeepFense 0.2.2's loss classes read (besides `type`; `weight` is read by its detector; `in_planes` is
# written into the dict by its OCSoftmax itself). Losses without an entry have no DeepFense class: all keys apply.
DEEPFENSE_KEYS = {
    "CrossEntropy": {"embedding_dim", "n_classes", "class_weights", "reduction", "bonafide_label"},
    "AMSoftmax": {"embedding_dim", "n_classes", "s", "m", "class_weights", "reduction", "bonafide_label"},
    "ASoftmax": {"embedding_dim", "n_classes", "m", "gamma", "iter", "lambda_min", "lambda_max", "lamb",
                 "bonafide_label"},
    "OCSoftmax": {"embedding_dim", "w_posi", "w_nega", "alpha", "in_planes", "bonafide_label"},
}
# Keys of ours that DeepFense's class of the same name does not honour: ignored under DeepFense semantics.
_NOT_IN_DEEPFENSE = ("class_weights", "reduction", "ignore_index", "label_smoothing")
# Keys DeepFense reads that need no keyword here: ASoftmax's starting step (read by the adapter) and values it
# overwrites or writes itself.
_READ_ELSEWHERE = {("ASoftmax", "iter"), ("ASoftmax", "lamb"), ("OCSoftmax", "in_planes")}
# The margin ramp's keys (MarginScheduler's arguments; the starting margin is the scheduled one's configured value).
SCHEDULE_KEYS = {"final_margin", "increase_start_iter", "fix_start_iter", "increase_type", "scheduled_margin"}
_IGNORED = ("DeepFense's {name} ignores it, so the adapter does too (use_fused_losses(deepfense_semantics=False) "
            "applies it)")


def deepfense_targets(targets: torch.Tensor) -> torch.Tensor:
    """Float labels -> int64 class indices, as DeepFense's losses treat them (`target.long()`); other dtypes pass.

    Raises:
        ValueError: a float label that is not a whole number (0.5, NaN, inf), which DeepFense would truncate.
    """
    if not (isinstance(targets, torch.Tensor) and targets.is_floating_point()):
        return targets
    indices = targets.long()
    wrong = indices.to(targets.dtype) != targets
    if bool(wrong.any()):  # one host sync, only for float labels
        raise ValueError(f"targets: float labels must be whole class indices (DeepFense casts them with .long()), "
                         f"got {targets[wrong][0].item()!r}")
    return indices


class _DeepFenseAdapter:
    """Mixin: builds the loss from DeepFense's config dict, reads its labels and saves its state_dict keys."""

    NAME = None  # the registry name the messages use
    deepfense_semantics = True
    _CLASS_WEIGHT_KEY = None  # where DeepFense keeps the class weights: "m_loss.weight" / "criterion.weight"

    def __init__(self, config: Mapping, *, deepfense_semantics: bool | None = None):
        semantics = self.deepfense_semantics if deepfense_semantics is None else deepfense_semantics
        kwargs = self._kwargs(config, semantics)
        schedule = {k: kwargs.pop(k) for k in SCHEDULE_KEYS & set(kwargs)}
        super().__init__(**self._defaults(kwargs, semantics))
        self.deepfense_semantics = semantics
        self.config = config  # as DeepFense's BaseLoss keeps it
        self._schedule = self._margin_schedule(schedule) if schedule else None

    def _defaults(self, kwargs: dict, semantics: bool) -> dict:
        return kwargs

    def _kwargs(self, config: Mapping, semantics: bool) -> dict:
        """DeepFense's config dict -> our constructor keywords, warning about every key that is dropped."""
        name = self.NAME
        if not isinstance(config, Mapping):
            raise TypeError(f"{name}: DeepFense passes the loss config as one dict, got {type(config).__name__}")
        params = checks.constructor_keys(self._BASE)
        ours = set(params) - {"process_group"} | (SCHEDULE_KEYS if name not in DEEPFENSE_KEYS else set())
        if "args" in config:
            raise checks.UnknownKeyError(
                f"{name}: DeepFense's loss entries are flat: write the keys beside 'type' ({{type: {name}, weight: "
                f"..., embedding_dim: ..., ...}}), not under 'args' (the {{type, args}} form is for "
                f"deepfense.losses.build_loss); got args keys {sorted(map(str, config['args'] or {}))}", "args")
        given = [k for k in config if k != "type" and (name, k) not in _READ_ELSEWHERE]
        for key, p in params.items():
            if p.default is p.empty and key not in config:
                near = difflib.get_close_matches(key, [str(k) for k in given], n=1, cutoff=0.6)
                hint = f" (the config has {near[0]!r}: did you mean {key!r}?)" if near else ""
                raise checks.MissingKeyError(f"{name}: missing required key {key!r}{hint}", key)
        kwargs, dropped = {}, []
        for key in given:
            value = config[key]
            if key not in ours:
                near = difflib.get_close_matches(str(key), sorted(ours), n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}? " if near else ""
                dropped.append((key, f"{hint}neither DeepFense's {name} nor deepfense.losses takes it"))
            elif semantics and key not in DEEPFENSE_KEYS.get(name, ours) and key in _NOT_IN_DEEPFENSE:
                dropped.append((key, _IGNORED.format(name=name)))
            elif semantics and name == "OCSoftmax" and key == "bonafide_label":
                if value != 1:  # DeepFense's OCSoftmax loss always treats target 1 as bonafide
                    dropped.append((key, _IGNORED.format(name=name)))
            else:
                kwargs[key] = value
        for key, why in dropped:
            warnings.warn(f"{name}: config key {key!r} is ignored: {why}", UserWarning, stacklevel=4)
        return kwargs

    def _margin_schedule(self, keys: dict) -> MarginScheduler:
        """WeSpeaker's ramp from the configured margin to `final_margin`; its step is the buffer `margin_step`."""
        attr = keys.pop("scheduled_margin", "m2" if isinstance(self, CombinedMargin) else "m")
        missing = sorted({"final_margin", "increase_start_iter", "fix_start_iter"} - set(keys))
        if missing:
            raise checks.MissingKeyError(f"{self.NAME}: the margin schedule needs {missing} too (keys: final_margin, "
                                         f"increase_start_iter, fix_start_iter, increase_type)", missing[0])
        start = getattr(self, attr, None) if isinstance(attr, str) else None
        if isinstance(start, torch.Tensor) or not isinstance(start, float):
            raise checks.LossConfigError(f"{self.NAME}: 'scheduled_margin' must name a float margin of this loss, "
                                         f"got {attr!r}", "scheduled_margin")
        self.register_buffer("margin_step", torch.zeros((), dtype=torch.int64))
        return MarginScheduler(self, start, attr=attr, **keys)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """The loss; under DeepFense semantics float labels are cast first (`deepfense_targets`)."""
        if self.deepfense_semantics:
            targets = deepfense_targets(targets)
        if self._schedule is not None and self.training:
            self._schedule.step(int(self.margin_step))
            self.margin_step.add_(1)
        return super().forward(embeddings, targets, logits)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.deepfense_semantics:
            return
        destination.pop(prefix + "step", None)  # DeepFense keeps ASoftmax's schedule outside the state_dict
        weights = destination.pop(prefix + "class_weights", None)
        if weights is not None and self._CLASS_WEIGHT_KEY:
            destination[prefix + self._CLASS_WEIGHT_KEY] = weights


class FusedAMSoftmax(_DeepFenseAdapter, AMSoftmax):
    """DeepFense's `AMSoftmax` config on the fused loss. Two classes without `class_weights` get DeepFense's
    [0.5, 0.5] (the same 'mean' loss, halved 'sum'/'none'); `s`/`m` default to 30/0.3 where DeepFense needs them."""

    NAME, _BASE, _CLASS_WEIGHT_KEY = "AMSoftmax", AMSoftmax, "m_loss.weight"

    def _defaults(self, kwargs: dict, semantics: bool) -> dict:
        if semantics and "class_weights" not in kwargs and kwargs.get("n_classes", 2) == 2:
            kwargs["class_weights"] = [0.5, 0.5]
        return kwargs


class FusedASoftmax(_DeepFenseAdapter, ASoftmax):
    """DeepFense's `ASoftmax` config on the fused loss; `iter` sets the starting step. Under DeepFense semantics the
    step advances on every forward, eval included, and is not saved (DeepFense keeps it in a Python attribute)."""

    NAME, _BASE = "ASoftmax", ASoftmax

    def __init__(self, config: Mapping, *, deepfense_semantics: bool | None = None):
        super().__init__(config, deepfense_semantics=deepfense_semantics)
        self.step.fill_(int(config.get("iter", 0)))

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """As `ASoftmax.forward`; also advances `step` in eval mode under DeepFense semantics."""
        if self.deepfense_semantics and not self.training:
            self.step.add_(1)
        return super().forward(embeddings, targets, logits)


class FusedOCSoftmax(_DeepFenseAdapter, OCSoftmax):
    """DeepFense's `OCSoftmax` config (`w_posi`, `w_nega`, `alpha`; our `m_real`/`m_fake` names work too)."""

    NAME, _BASE = "OCSoftmax", OCSoftmax


class FusedCrossEntropy(_DeepFenseAdapter, CrossEntropy):
    """DeepFense's `CrossEntropy` config; under DeepFense semantics the two-class score is `logit[bonafide]`."""

    NAME, _BASE, _CLASS_WEIGHT_KEY = "CrossEntropy", CrossEntropy, "criterion.weight"

    def get_score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B] logit[bonafide] (DeepFense) or logit[bonafide] - logit[spoof] with two classes; else [B, C] logits."""
        if self.deepfense_semantics and self.n_classes == 2:
            return self.get_logits(embeddings)[:, self.bonafide_label]
        return super().get_score(embeddings)


class FusedArcFace(_DeepFenseAdapter, ArcFace):
    """`ArcFace` (AAM-Softmax) from a flat DeepFense config entry: every key of ours, plus the margin ramp."""

    NAME, _BASE = "ArcFace", ArcFace


class FusedCombinedMargin(_DeepFenseAdapter, CombinedMargin):
    """insightface's `CombinedMargin` from a flat DeepFense config entry: every key of ours, plus the margin ramp
    (`scheduled_margin` m2 by default, or m3)."""

    NAME, _BASE = "CombinedMargin", CombinedMargin


class FusedAdaFace(_DeepFenseAdapter, AdaFace):
    """`AdaFace` from a flat DeepFense config entry: every key of ours (its running norm statistics are buffers)."""

    NAME, _BASE = "AdaFace", AdaFace


class FusedMagFace(_DeepFenseAdapter, MagFace):
    """`MagFace` from a flat DeepFense config entry: every key of ours."""

    NAME, _BASE = "MagFace", MagFace


class FusedElasticFace(_DeepFenseAdapter, ElasticFace):
    """`ElasticFace` from a flat DeepFense config entry: every key of ours (`generator` stays None: global RNG)."""

    NAME, _BASE = "ElasticFace", ElasticFace


class FusedCurricularFace(_DeepFenseAdapter, CurricularFace):
    """`CurricularFace` from a flat DeepFense config entry: every key of ours (t is a buffer)."""

    NAME, _BASE = "CurricularFace", CurricularFace


# registry name -> adapter (AAMSoftmax is ArcFace's speaker-recipe name, as in deepfense.losses' own registry)
ADAPTERS = {"AMSoftmax": FusedAMSoftmax, "ASoftmax": FusedASoftmax, "OCSoftmax": FusedOCSoftmax,
            "CrossEntropy": FusedCrossEntropy, "ArcFace": FusedArcFace, "AAMSoftmax": FusedArcFace,
            "CombinedMargin": FusedCombinedMargin, "AdaFace": FusedAdaFace, "MagFace": FusedMagFace,
            "ElasticFace": FusedElasticFace, "CurricularFace": FusedCurricularFace}
