"""The four loss heads as thin nn.Modules: they own the projection parameters, hold options, and call
`deepfense.functional`. The maths lives in `deepfense.functional` / `deepfense.reference`, never here.

DeepFense 0.2.2 interface: `forward(embeddings, targets, logits=None)`, `get_logits(embeddings)`,
`get_score(embeddings)`; parameter names match its state dicts (`mapper.weight`, `fc.weight`, `fc.bias`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .. import dispatch
from .. import functional as F
from ..params import Margin
from ..reference import class_cosine, cosine
from .. import options
from . import checks
from .registry import loss_classes, register_loss


class _Mapper(nn.Module):
    """Holds DeepFense's `mapper.weight` [embedding_dim, n_out], one unit-norm column per class."""

    def __init__(self, embedding_dim: int, n_out: int):
        super().__init__()
        weight = torch.empty(embedding_dim, n_out).uniform_(-1.0, 1.0)
        # renorm each column to at most 1e-5, then scale by 1e5: unit columns, as DeepFense initialises them
        self.weight = nn.Parameter(weight.renorm_(2, 1, 1e-5).mul_(1e5))


# state-dict keys under which DeepFense stores the class weights: AMSoftmax's and CrossEntropy's nn.CrossEntropyLoss
_CLASS_WEIGHT_KEYS = ("class_weights", "m_loss.weight", "criterion.weight")


class _LossHead(nn.Module):
    """Shared options, checks, scores and state-dict compatibility of the four heads."""

    def __new__(cls, *args, **kwargs):
        # an unknown keyword gets build_loss's error (naming the loss that takes it, or the nearest key), not
        # Python's bare "unexpected keyword argument"; the siblings are the registry's, as build_loss names them
        checks.check_unknown_keys(cls, kwargs, siblings=loss_classes())
        return super().__new__(cls)

    # attribute -> rule (`deepfense.options`), applied on every assignment, construction included: `head.m = -5.0`
    # raises as `AMSoftmax(..., m=-5.0)` does. Subclasses add their own.
    _OPTIONS = {
        "reduction": lambda o, k, v: options.check_choice(o, k, v, options.REDUCTIONS),
        "ignore_index": lambda o, k, v: options.check_ignore_index(o, v),
        "bonafide_label": lambda o, k, v: options.check_int(o, k, v, low=0, high=1),
        "loss_weight": lambda o, k, v: options.NON_NEGATIVE(o, "weight", v),
        "backend": lambda o, k, v: checks.check_backend(o, v),
        "validate": lambda o, k, v: options.check_validate(o, v),
    }
    _SMOOTHING = True  # whether the loss takes label_smoothing
    process_group = None  # the class-parallel group of the heads that take one

    def __setattr__(self, name, value):
        rule = self._OPTIONS.get(name)
        if rule is not None:
            value = rule(type(self).__name__, name, value)
        elif name == "label_smoothing":
            value = options.check_label_smoothing(type(self).__name__, value, allowed=self._SMOOTHING)
        if rule is not None or name in ("label_smoothing", "sub_centers"):
            self.__dict__.pop("_params", None)  # the options changed: `loss_params` builds them again
        super().__setattr__(name, value)

    def loss_params(self):
        """This head's options as `deepfense.params.LossParams`, built once per change of an option (and while
        torch.compile traces, from the attributes: a changed float margin then recompiles once, not every time)."""
        if torch.compiler.is_compiling():
            return self._build_params()
        p = self.__dict__.get("_params")
        if p is None:
            p = self.__dict__["_params"] = self._build_params()
        return p

    def _build_params(self):
        raise NotImplementedError

    def _loss(self, embeddings, weight, targets, bias=None, lam=None):
        """The loss through the one dispatch point (`deepfense.dispatch.run`), with this head's options."""
        return dispatch.run(self.loss_params(), embeddings, weight, bias, targets, self.class_weights, lam,
                            self.backend, self._sharding(), self.validate)

    def check_option(self, name: str, value):
        """`value` checked as option `name` would be on assignment (what `MarginScheduler` writes in place)."""
        rule = self._OPTIONS.get(name)
        return value if rule is None else rule(type(self).__name__, name, value)

    def _init_common(self, embedding_dim, n_weights, *, class_weights, reduction, ignore_index, label_smoothing,
                     bonafide_label, weight, backend, validate=None):
        name = type(self).__name__
        self.embedding_dim = checks.check_int(name, "embedding_dim", embedding_dim, low=1)
        self.n_weights = n_weights  # how many class weights the loss takes (n_classes; 2 for OCSoftmax)
        self.register_buffer("class_weights", checks.check_class_weights(name, class_weights, n_weights))
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.bonafide_label, self.loss_weight, self.backend, self.validate = bonafide_label, weight, backend, validate

    @property
    def spoof_label(self) -> int:
        return 1 - self.bonafide_label

    def _options(self) -> dict:
        """Keyword arguments every functional loss takes."""
        return dict(class_weights=self.class_weights, ignore_index=self.ignore_index, reduction=self.reduction,
                    backend=self.backend, validate=self.validate)

    def _sharding(self):
        """`process_group` as the functional API takes it: with the class count this head was built for, which every
        rank checks against the sum of the ranks' slices (`deepfense.distributed.DeclaredGroup`)."""
        if self.process_group is None:  # a class attribute: None unless the head was built with a group
            return None
        from ..distributed import DeclaredGroup
        return DeclaredGroup(self.process_group, self.n_classes)

    def _check_embeddings(self, embeddings: torch.Tensor) -> None:
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
            got = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings must be a 2-D floating-point tensor [batch, embedding_dim], got {got}")
        if embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embedding_dim mismatch: embeddings have {embeddings.shape[1]} features, "
                             f"{type(self).__name__} expects {self.embedding_dim}")

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def get_score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores for EER: [B] logit_bonafide - logit_spoof with two classes, else the full [B, C] logits."""
        logits = self.get_logits(embeddings)
        if logits.shape[1] == 2:
            return logits[:, self.bonafide_label] - logits[:, self.spoof_label]
        return logits

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # DeepFense keeps class weights inside its nn.CrossEntropyLoss (m_loss / criterion); ours is one optional
        # buffer, so adopt whichever key is present (registering the buffer if this module was built without one).
        found = [prefix + k for k in _CLASS_WEIGHT_KEYS if prefix + k in state_dict]
        if len(found) > 1:
            error_msgs.append(f"state_dict has class weights under several keys: {found}")
        elif found:
            loaded = state_dict.pop(found[0])
            if tuple(loaded.shape) != (self.n_weights,):
                error_msgs.append(f"{found[0]}: expected {self.n_weights} class weights, got {tuple(loaded.shape)}")
            else:
                if self.class_weights is None:  # a placeholder that the default loading below copies into
                    self.class_weights = torch.empty(self.n_weights, device=next(self.parameters()).device)
                state_dict[prefix + "class_weights"] = loaded
        # DeepFense does not save the ASoftmax schedule: keep the current step when the key is absent
        if isinstance(getattr(self, "step", None), torch.Tensor) and prefix + "step" not in state_dict:
            state_dict[prefix + "step"] = self.step.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        keys = [k for k in self._repr_keys if getattr(self, k) is not None]
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in keys)

    _repr_keys = ("embedding_dim", "reduction", "backend")


@register_loss("AMSoftmax")
class AMSoftmax(_LossHead):
    """Additive-margin softmax (CosFace): logits s*cos_c, target logit s*(cos_y - m), softmax cross-entropy.

    Args:
        embedding_dim: D. n_classes: C (>= 1). m: additive margin (>= 0). s: logit scale (> 0).
        weight: multi-loss weight (`loss_weight`). class_weights: C per-class weights or None. reduction: 'mean' |
        'sum' | 'none'. ignore_index: target value that is skipped. label_smoothing: torch's epsilon in [0, 1].
        bonafide_label: 0 or 1, the bonafide column of two-class scores. backend: 'auto' | 'torch' | 'triton' |
        'reference'. process_group: split the classes over this torch.distributed group (`deepfense.distributed`):
        n_classes stays global, the weight holds this rank's `rank_slice` and get_logits returns those columns.
        validate: the value checks (targets in range, finite inputs): None = on for CPU tensors, off on CUDA (a NaN
        loss instead of a host sync; see `deepfense.inputs`), True / False = always / never.
        sub_centers: K weight columns per class (adjacent in `mapper.weight` [D, C*K]); a class's cosine is the max.
    """

    def __init__(self, embedding_dim: int, n_classes: int = 2, m: float = 0.3, s: float = 30.0, weight: float = 1.0,
                 class_weights: Optional[Sequence[float]] = None, reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0, bonafide_label: int = 1, backend: str = "auto", process_group=None,
                 sub_centers: int = 1, validate: Optional[bool] = None):
        super().__init__()
        name = type(self).__name__
        self.n_classes = checks.check_int(name, "n_classes", n_classes, low=1)
        self.process_group = process_group
        self.m, self.s = m, s
        self._init_common(embedding_dim, self.n_classes, class_weights=class_weights, reduction=reduction,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          bonafide_label=bonafide_label, weight=weight, backend=backend, validate=validate)
        self.sub_centers = checks.check_int(name, "sub_centers", sub_centers, low=1)
        self.mapper = _Mapper(self.embedding_dim, _local_classes(self.n_classes, process_group) * self.sub_centers)

    _OPTIONS = {**_LossHead._OPTIONS, "m": options.COSINE_MARGIN, "s": options.SCALE}
    _repr_keys = ("embedding_dim", "n_classes", "m", "s", "reduction", "backend")

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against integer targets [B]; `logits` (DeepFense's cache) is ignored."""
        return self._loss(embeddings, self.mapper.weight, targets)

    def _build_params(self):
        return F.loss_params(Margin.ADDITIVE, s=self.s, m=self.m, ignore_index=self.ignore_index,
                             label_smoothing=self.label_smoothing, reduction=self.reduction,
                             sub_centers=self.sub_centers)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, C] scaled cosines s*cos_c (no margin; with sub-centres the max over each class's K)."""
        self._check_embeddings(embeddings)
        return self.s * class_cosine(embeddings, self.mapper.weight, self.sub_centers)


@register_loss("ASoftmax")
class ASoftmax(_LossHead):
    """Angular softmax (SphereFace) with lambda annealing and a focal factor.

    lambda = max(lambda_min, lambda_max * (1 + lambda_gamma t)^-lambda_power) (SphereFace's base, gamma, power;
    DeepFense: 1500, 0.1, 1; WeSpeaker's SphereProduct: lambda_max=1000, lambda_gamma=0.12); the int64 buffer `step` (in state_dict) holds t and each
    training-mode forward adds one before computing lambda, so the first training forward uses t = 1. Eval-mode
    forwards use t = max(step, 1) without advancing it: the lambda of the last training forward, or, before any
    training, the lambda the first training forward (and DeepFense's first forward) would use.

    Args:
        embedding_dim: D. n_classes: C. m: integer angular margin >= 1. gamma: focal exponent (>= 0).
        lambda_min, lambda_max: annealing bounds (>= 0). lambda_gamma, lambda_power: the decay's rate and power (>= 0).
        Other options as `AMSoftmax` (no label_smoothing), including
        process_group.
    """

    def __init__(self, embedding_dim: int, n_classes: int = 2, m: int = 4, gamma: float = 0.5,
                 lambda_min: float = 5.0, lambda_max: float = 1500.0, weight: float = 1.0,
                 class_weights: Optional[Sequence[float]] = None, reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0, bonafide_label: int = 1, backend: str = "auto", process_group=None,
                 lambda_gamma: float = 0.1, lambda_power: float = 1.0,
                 validate: Optional[bool] = None):
        super().__init__()
        name = type(self).__name__
        self.n_classes = checks.check_int(name, "n_classes", n_classes, low=1)
        self.process_group = process_group
        self.lambda_gamma, self.lambda_power, self.m, self.gamma = lambda_gamma, lambda_power, m, gamma
        self.lambda_min, self.lambda_max = lambda_min, lambda_max
        self._init_common(embedding_dim, self.n_classes, class_weights=class_weights, reduction=reduction,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          bonafide_label=bonafide_label, weight=weight, backend=backend, validate=validate)
        self.mapper = _Mapper(self.embedding_dim, _local_classes(self.n_classes, process_group))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    _OPTIONS = {**_LossHead._OPTIONS, "m": options.SPHEREFACE_M, "gamma": options.NON_NEGATIVE,
                "lambda_min": options.NON_NEGATIVE, "lambda_max": options.NON_NEGATIVE,
                "lambda_gamma": options.NON_NEGATIVE, "lambda_power": options.NON_NEGATIVE}
    _SMOOTHING = False
    _repr_keys = ("embedding_dim", "n_classes", "m", "gamma", "lambda_min", "lambda_max", "reduction", "backend")

    @property
    def lam(self) -> torch.Tensor:
        """0-dim float64 tensor: the lambda an eval forward uses now (t = max(step, 1)). No host sync."""
        t = self.step.clamp_min(1).to(torch.float64)
        return torch.clamp_min(self.lambda_max * (1.0 + self.lambda_gamma * t) ** -self.lambda_power, self.lambda_min)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against targets [B]; advances `step` in training mode. `logits` is ignored."""
        if self.training:
            self.step.add_(1)  # in place on the buffer: no Python counter, so torch.compile keeps one graph
        return self._loss(embeddings, self.mapper.weight, targets, lam=self.lam)

    def _build_params(self):
        return F.loss_params(Margin.ANGULAR, m=float(self.m), gamma=self.gamma, ignore_index=self.ignore_index,
                             reduction=self.reduction)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, C] logits |x| * cos_c (no margin)."""
        self._check_embeddings(embeddings)
        cos = cosine(embeddings, self.mapper.weight)
        return torch.linalg.vector_norm(embeddings.to(cos.dtype), dim=1, keepdim=True) * cos


@register_loss("OCSoftmax")
class OCSoftmax(_LossHead):
    """One-class softmax: one bonafide centre; z = alpha (m_real - cos) for bonafide rows, alpha (cos - m_fake) for
    the others; row loss softplus(z).

    Args:
        embedding_dim: D. m_real: bonafide margin (default 0.5). m_fake: spoof margin (default 0.2); both are cosines
        in [-1, 1]. alpha: scale (> 0). Aliases: `w_posi`/`w_nega` (DeepFense) and `r_real`/`r_fake` (AIR-ASVspoof)
        for m_real/m_fake; give one name per margin. class_weights: 2 weights indexed by target. bonafide_label:
        which target is bonafide. Other options as `AMSoftmax` (no label_smoothing).
    """

    DISPLAY_DEFAULTS = {"m_real": 0.5, "m_fake": 0.2}  # shown by loss_signature; None in the signature detects aliases

    def __init__(self, embedding_dim: int, m_real: Optional[float] = None, m_fake: Optional[float] = None,
                 alpha: float = 20.0, weight: float = 1.0, class_weights: Optional[Sequence[float]] = None,
                 reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 bonafide_label: int = 1, backend: str = "auto", w_posi: Optional[float] = None,
                 w_nega: Optional[float] = None, r_real: Optional[float] = None, r_fake: Optional[float] = None,
                 validate: Optional[bool] = None):
        super().__init__()
        name = type(self).__name__
        m_real = _one_of(name, "m_real", m_real, w_posi=w_posi, r_real=r_real)
        m_fake = _one_of(name, "m_fake", m_fake, w_nega=w_nega, r_fake=r_fake)
        self.m_real = self.DISPLAY_DEFAULTS["m_real"] if m_real is None else m_real
        self.m_fake = self.DISPLAY_DEFAULTS["m_fake"] if m_fake is None else m_fake
        self.alpha = alpha
        self._init_common(embedding_dim, 2, class_weights=class_weights, reduction=reduction,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          bonafide_label=bonafide_label, weight=weight, backend=backend, validate=validate)
        self.mapper = _Mapper(self.embedding_dim, 1)

    _OPTIONS = {**_LossHead._OPTIONS, "m_real": options.COSINE, "m_fake": options.COSINE, "alpha": options.SCALE}
    _SMOOTHING = False
    _repr_keys = ("embedding_dim", "m_real", "m_fake", "alpha", "bonafide_label", "reduction", "backend")

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against targets [B] in {0, 1}; `logits` is ignored."""
        return self._loss(embeddings, self.mapper.weight, targets)

    def _build_params(self):
        return F.loss_params(Margin.ONE_CLASS, m_real=self.m_real, m_fake=self.m_fake, alpha=self.alpha,
                             bonafide_label=self.bonafide_label, ignore_index=self.ignore_index,
                             reduction=self.reduction)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, 1] cosine to the bonafide centre."""
        self._check_embeddings(embeddings)
        return cosine(embeddings, self.mapper.weight)

    def get_score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B] cosine to the bonafide centre (higher means more bonafide)."""
        return self.get_logits(embeddings)[:, 0]


def _one_of(owner: str, key: str, value, **aliases):
    """The value given under `key` or under exactly one of its alias names; an error if several are given."""
    given = {k: v for k, v in {key: value, **aliases}.items() if v is not None}
    if len(given) > 1:
        raise checks.LossConfigError(f"{owner}: {' and '.join(map(repr, given))} name the same margin; give one",
                                     key)
    return next(iter(given.values()), None)


@register_loss("CrossEntropy")
class CrossEntropy(_LossHead):
    """Linear layer (`fc`, with bias) then softmax cross-entropy.

    Args:
        embedding_dim: D. n_classes: C. Other options as `AMSoftmax` (with process_group, `fc` holds this rank's
        rows of the weight and bias).
    """

    def __init__(self, embedding_dim: int, n_classes: int = 2, weight: float = 1.0,
                 class_weights: Optional[Sequence[float]] = None, reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0, bonafide_label: int = 1, backend: str = "auto", process_group=None,
                 validate: Optional[bool] = None):
        super().__init__()
        self.n_classes = checks.check_int(type(self).__name__, "n_classes", n_classes, low=1)
        self.process_group = process_group
        self._init_common(embedding_dim, self.n_classes, class_weights=class_weights, reduction=reduction,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          bonafide_label=bonafide_label, weight=weight, backend=backend, validate=validate)
        self.fc = nn.Linear(self.embedding_dim, _local_classes(self.n_classes, process_group))

    _repr_keys = ("embedding_dim", "n_classes", "reduction", "backend")

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against targets [B]; `logits` is ignored (recomputed in the fused path)."""
        fc = self.fc
        return self._loss(embeddings, fc.weight, targets, bias=fc.bias)

    def _build_params(self):
        return F.loss_params(Margin.NONE, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                             reduction=self.reduction)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, C] logits x W^T + b, computed in the promoted dtype of embeddings and weights."""
        self._check_embeddings(embeddings)
        dtype = torch.promote_types(embeddings.dtype, self.fc.weight.dtype)
        return nn.functional.linear(embeddings.to(dtype), self.fc.weight.to(dtype), self.fc.bias.to(dtype))


def _local_classes(n_classes: int, group) -> int:
    """How many class columns this module holds: all, or the rank's slice under a process group."""
    if group is None:
        return n_classes
    from ..distributed import rank_slice
    start, stop = rank_slice(n_classes, group)
    return stop - start


class MultiLoss(nn.Module):
    """Weighted sum of several loss heads, as DeepFense's detector combines them.

    forward returns sum_i weight_i * loss_i; the first entry is the main loss: it receives `logits` and provides
    get_logits/get_score. The heads sit in `losses` (a ModuleList), the key DeepFense's detector uses.

    Args:
        losses: the loss modules, main loss first.
        weights: one float per loss; default each module's `loss_weight` (1.0 when it has none).
    """

    def __init__(self, losses: Sequence[nn.Module], weights: Optional[Sequence[float]] = None):
        super().__init__()
        if len(losses) == 0:
            raise checks.LossConfigError("MultiLoss needs at least one loss", "loss")
        self.losses = nn.ModuleList(losses)
        if weights is None:
            weights = [getattr(loss, "loss_weight", 1.0) for loss in losses]
        if len(weights) != len(losses):
            raise checks.LossConfigError(f"MultiLoss: {len(weights)} weights for {len(losses)} losses", "weight")
        self.loss_weights = [checks.check_float("MultiLoss", f"weight[{i}]", w, low=0.0) for i, w in enumerate(weights)]

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """sum_i weight_i * loss_i(embeddings, targets); only the main loss sees `logits` (when given)."""
        total = None
        for i, (loss, w) in enumerate(zip(self.losses, self.loss_weights)):
            extra = {"logits": logits} if i == 0 and logits is not None else {}  # custom losses may lack `logits`
            value = loss(embeddings, targets, **extra)
            total = w * value if total is None else total + w * value
        return total

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The main (first) loss's logits."""
        return self.losses[0].get_logits(embeddings)

    def get_score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The main (first) loss's scores."""
        return self.losses[0].get_score(embeddings)

    def extra_repr(self) -> str:
        return f"weights={self.loss_weights}"
