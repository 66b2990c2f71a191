"""Run the DeepFense framework's own detector and trainer on the fused losses.

    from deepfense.losses.integrations.deepfense import use_fused_losses
    use_fused_losses()      # after this, DeepFense builds AMSoftmax, ASoftmax, OCSoftmax and CrossEntropy from ours
    # ... DeepFense's unchanged YAML config, ModularDetector and StandardTrainer ...

DeepFense 0.2.2's detector builds each loss as `LOSS_REGISTRY.build(type, cfg)`, i.e. `cls(cfg)` with one dict: the
config entry without `type`, still holding `weight`, which the detector itself multiplies in (the adapters never
apply it). The adapters below take that dict and, by default (`deepfense_semantics=True`), reproduce DeepFense's
behaviour where it differs from `deepfense.losses` (README, "Running DeepFense on the fused losses", has the table):
the two-class CrossEntropy score is `logit[bonafide]`; ASoftmax's schedule advances on every forward, eval included;
AMSoftmax's class weights default to [0.5, 0.5]; keys DeepFense ignores are ignored (with a warning); the state_dict
uses DeepFense's key names, so checkpoints load both ways with `strict=True`.
"""

from __future__ import annotations

import warnings
from typing import Dict, Mapping

import torch

from .. import checks
from ..modules import AMSoftmax, ASoftmax, CrossEntropy, OCSoftmax

# Config keys DeepFense 0.2.2's loss classes read (besides `type`; `weight` is read by its detector; `in_planes` is
# written into the dict by its OCSoftmax itself).
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
_IGNORED = ("DeepFense's {name} ignores it, so the adapter does too (use_fused_losses(deepfense_semantics=False) "
            "applies it)")


class _DeepFenseAdapter:
    """Mixin: builds the loss from DeepFense's config dict and saves DeepFense's state_dict keys."""

    deepfense_semantics = True
    _CLASS_WEIGHT_KEY = None  # where DeepFense keeps the class weights: "m_loss.weight" / "criterion.weight"

    def _kwargs(self, name: str, config: Mapping, semantics: bool) -> dict:
        """DeepFense's config dict -> our constructor keywords, warning about every key that is dropped."""
        if not isinstance(config, Mapping):
            raise TypeError(f"{name}: DeepFense passes the loss config as one dict, got {type(config).__name__}")
        ours = set(checks.constructor_keys(self._BASE)) - {"process_group"}
        kwargs, dropped = {}, []
        for key, value in config.items():
            if key == "type" or (name, key) in _READ_ELSEWHERE:
                continue
            if key not in ours:
                dropped.append((key, f"neither DeepFense's {name} nor deepfense.losses takes it"))
            elif semantics and key not in DEEPFENSE_KEYS[name] and key in _NOT_IN_DEEPFENSE:
                dropped.append((key, _IGNORED.format(name=name)))
            elif semantics and name == "OCSoftmax" and key == "bonafide_label":
                if value != 1:  # DeepFense's OCSoftmax loss always treats target 1 as bonafide
                    dropped.append((key, _IGNORED.format(name=name)))
            else:
                kwargs[key] = value
        for key, why in dropped:
            warnings.warn(f"{name}: config key {key!r} is ignored: {why}", UserWarning, stacklevel=4)
        return kwargs

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

    _BASE = AMSoftmax

    _CLASS_WEIGHT_KEY = "m_loss.weight"

    def __init__(self, config: Mapping, *, deepfense_semantics: bool | None = None):
        semantics = self.deepfense_semantics if deepfense_semantics is None else deepfense_semantics
        kwargs = self._kwargs("AMSoftmax", config, semantics)
        if semantics and "class_weights" not in kwargs and kwargs.get("n_classes", 2) == 2:
            kwargs["class_weights"] = [0.5, 0.5]
        super().__init__(**kwargs)
        self.deepfense_semantics = semantics


class FusedASoftmax(_DeepFenseAdapter, ASoftmax):
    """DeepFense's `ASoftmax` config on the fused loss; `iter` sets the starting step. Under DeepFense semantics the
    step advances on every forward, eval included, and is not saved (DeepFense keeps it in a Python attribute)."""

    _BASE = ASoftmax

    def __init__(self, config: Mapping, *, deepfense_semantics: bool | None = None):
        semantics = self.deepfense_semantics if deepfense_semantics is None else deepfense_semantics
        super().__init__(**self._kwargs("ASoftmax", config, semantics))
        self.deepfense_semantics = semantics
        self.step.fill_(int(config.get("iter", 0)))

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """As `ASoftmax.forward`; also advances `step` in eval mode under DeepFense semantics."""
        if self.deepfense_semantics and not self.training:
            self.step.add_(1)
        return super().forward(embeddings, targets, logits)


class FusedOCSoftmax(_DeepFenseAdapter, OCSoftmax):
    """DeepFense's `OCSoftmax` config (`w_posi`, `w_nega`, `alpha`; our `m_real`/`m_fake` names work too)."""

    _BASE = OCSoftmax

    def __init__(self, config: Mapping, *, deepfense_semantics: bool | None = None):
        semantics = self.deepfense_semantics if deepfense_semantics is None else deepfense_semantics
        super().__init__(**self._kwargs("OCSoftmax", config, semantics))
        self.deepfense_semantics = semantics


class FusedCrossEntropy(_DeepFenseAdapter, CrossEntropy):
    """DeepFense's `CrossEntropy` config; under DeepFense semantics the two-class score is `logit[bonafide]`."""

    _BASE = CrossEntropy

    _CLASS_WEIGHT_KEY = "criterion.weight"

    def __init__(self, config: Mapping, *, deepfense_semantics: bool | None = None):
        semantics = self.deepfense_semantics if deepfense_semantics is None else deepfense_semantics
        super().__init__(**self._kwargs("CrossEntropy", config, semantics))
        self.deepfense_semantics = semantics

    def get_score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B] logit[bonafide] (DeepFense) or logit[bonafide] - logit[spoof] with two classes; else [B, C] logits."""
        if self.deepfense_semantics and self.n_classes == 2:
            return self.get_logits(embeddings)[:, self.bonafide_label]
        return super().get_score(embeddings)


ADAPTERS = {"AMSoftmax": FusedAMSoftmax, "ASoftmax": FusedASoftmax, "OCSoftmax": FusedOCSoftmax,
            "CrossEntropy": FusedCrossEntropy}


def use_fused_losses(*, deepfense_semantics: bool = True) -> Dict[str, object]:
    """Register the adapters under DeepFense's four loss names in DeepFense's `LOSS_REGISTRY`.

    Imports `deepfense.models` first (which registers DeepFense's own losses), so ours replace them and a later build
    of DeepFense's `ModularDetector` uses the fused losses with its config unchanged.

    Args:
        deepfense_semantics: True (default): DeepFense's scores, schedule, defaults and state_dict keys; False: the
            behaviour of `deepfense.losses` (every key applied, our scores, `step` and `class_weights` saved).

    Returns:
        The classes that were registered before, by name (register them back to undo).

    Raises:
        ImportError: DeepFense is not installed, or its model package fails to import (the message says which
            package is missing).
    """
    try:
        import deepfense.models  # noqa: F401 - registers DeepFense's own losses, which ours then replace
        from deepfense.utils.registry import LOSS_REGISTRY
    except ImportError as exc:
        if exc.name in ("deepfense.models", "deepfense.utils", "deepfense.utils.registry"):
            raise ImportError("use_fused_losses() needs the DeepFense framework: `pip install --no-deps "
                              "deepfense==0.2.2` plus numpy and einops, next to a regular (not editable) install of "
                              "deepfense-losses (see the README)") from exc
        raise ImportError(f"DeepFense is installed but `import deepfense.models` failed: {exc} (DeepFense's model "
                          f"package needs numpy and einops)") from exc
    previous = {}
    for name, cls in ADAPTERS.items():
        if not deepfense_semantics:
            cls = type(cls.__name__, (cls,), {"deepfense_semantics": False, "__module__": __name__})
        previous[name] = LOSS_REGISTRY.get(name) if name in LOSS_REGISTRY else None
        LOSS_REGISTRY.register(name)(cls)
    return previous
