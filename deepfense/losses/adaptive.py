"""Face heads whose margin changes from sample to sample: `AdaFace`, `MagFace`, `ElasticFace` and `CurricularFace`.

Each head computes its per-sample margins (or CurricularFace's running t) here, with a few [B]-sized torch ops, and
hands them to `deepfense.functional.arcface_loss` (`curricular_face_loss`), where the loss's maths lives. Like
`ArcFace` they own `mapper.weight` [D, C], take the same backend / reduction / class_weights / ignore_index /
validate options and give logits s*cos_c. Running state (AdaFace's norm statistics, CurricularFace's t) sits in
buffers, so it travels in the state_dict; it is updated by training-mode forwards only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import functional as F
from .. import options
from ..reference import class_cosine, target_cosine
from . import checks
from .margins import _scalar
from .modules import _LossHead, _Mapper
from .registry import register_loss


def _target_cosine(embeddings, weight, targets, ignore_index):
    """[B] detached cosine of each row to its target column (0 for ignored rows, `reference.target_cosine`) and the
    [B] bool mask of the rows that count."""
    with torch.no_grad():
        valid = targets != ignore_index
        cos = target_cosine(embeddings, weight, torch.where(valid, targets, torch.zeros_like(targets)))
        return torch.where(valid, cos, torch.zeros_like(cos)), valid


class _AdaptiveHead(_LossHead):
    """Construction, logits and the functional call shared by the four heads; subclasses supply the margins."""

    _OPTIONS = {**_LossHead._OPTIONS, "s": _scalar(options.SCALE)}

    def _init_head(self, embedding_dim, n_classes, s, common):
        self.n_classes = checks.check_int(type(self).__name__, "n_classes", n_classes, low=1)
        self.s = s
        self._init_common(embedding_dim, self.n_classes, **common)
        self.mapper = _Mapper(self.embedding_dim, self.n_classes)

    def _arcface(self, embeddings, targets, *, m, m3, fallback):
        """`functional.arcface_loss` with this head's scale and options and the given (per-sample) margins."""
        return F.arcface_loss(embeddings, self.mapper.weight, targets, m=m, s=self.s, m3=m3, fallback=fallback,
                              label_smoothing=self.label_smoothing, **self._options())

    def _dtype(self, embeddings):
        return torch.promote_types(torch.promote_types(embeddings.dtype, self.mapper.weight.dtype), torch.float32)

    def get_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, C] scaled class cosines s*cos_c (no margin)."""
        self._check_embeddings(embeddings)
        return self.s * class_cosine(embeddings, self.mapper.weight)


@register_loss("AdaFace")
class AdaFace(_AdaptiveHead):
    """AdaFace (Kim et al., 2022): the margin adapts to image quality, read from the feature norm.

    With a = clip(|x|, 1e-3, 100) detached and the running mean / std of a, scaler = clip(h (a - mean) /
    (std + 1e-3), -1, 1); the target angle is theta_y - m scaler (clipped to [1e-3, pi - 1e-3]) and the target
    cosine then loses m (1 + scaler); every cosine is first clamped to +-(1 - 1e-3) (`fallback='adaface'`).

    Running statistics (buffers `batch_mean` [1] = 20, `batch_std` [1] = 100, in the state_dict): an exponential
    average with weight t_alpha of the batch's mean and unbiased std of a, updated before the margin is computed, as
    the authors do. Two decisions differ from the authors' head, which updates on every call: (1) only training-mode
    forwards update them (the authors' trainer calls the head in training steps only; an eval forward here reuses
    the stored statistics and changes nothing); (2) a batch of one row keeps the old statistics (its unbiased std is
    NaN, which would poison both buffers for good). Every row, ignored ones too, enters the statistics, as in the
    authors' batches.

    Args:
        embedding_dim: D. n_classes: C. m: margin (default 0.4, in [0, 1]). h: the scaler's concentration (0.333).
        s: scale (64). t_alpha: the statistics' update weight (0.01, the authors' training default; their class
        default 1.0 uses the current batch alone). Other options as `ArcFace` (no sub-centres or process_group).
    """

    def __init__(self, embedding_dim: int, n_classes: int = 2, m: float = 0.4, h: float = 0.333, s: float = 64.0,
                 t_alpha: float = 0.01, weight: float = 1.0, class_weights: Optional[Sequence[float]] = None,
                 reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 bonafide_label: int = 1, backend: str = "auto", validate: Optional[bool] = None):
        super().__init__()
        self.m, self.h, self.t_alpha = m, h, t_alpha
        self._init_head(embedding_dim, n_classes, s, dict(
            class_weights=class_weights, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, bonafide_label=bonafide_label, weight=weight, backend=backend,
            validate=validate))
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    _OPTIONS = {**_AdaptiveHead._OPTIONS, "m": options.COSINE_MARGIN, "h": options.NON_NEGATIVE,
                "t_alpha": options.FRACTION}
    _repr_keys = ("embedding_dim", "n_classes", "m", "h", "s", "t_alpha", "reduction", "backend")
    EPS = 1e-3

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against targets [B]; updates the statistics in training mode (B > 1)."""
        self._check_embeddings(embeddings)
        norms = torch.linalg.vector_norm(embeddings.detach().to(self._dtype(embeddings)), dim=1)
        norms = norms.clamp(self.EPS, 100.0)
        if self.training and norms.shape[0] > 1:
            with torch.no_grad():
                a = self.t_alpha
                self.batch_mean.copy_(a * norms.mean() + (1 - a) * self.batch_mean)
                self.batch_std.copy_(a * norms.std() + (1 - a) * self.batch_std)
        scaler = (self.h * (norms - self.batch_mean) / (self.batch_std + self.EPS)).clamp(-1.0, 1.0)
        return self._arcface(embeddings, targets, m=-self.m * scaler, m3=self.m * (1.0 + scaler), fallback="adaface")


@register_loss("MagFace")
class MagFace(_AdaptiveHead):
    """MagFace (Meng et al., 2021): the margin grows with the feature norm, and a regulariser pulls the norm up.

    a = clamp(|x|, l_a, u_a) (not detached: the margin and g pass gradient to the norm inside [l_a, u_a], none
    outside); margin m(a) = (u_margin - l_margin) / (u_a - l_a) (a - l_a) + l_margin; loss = ArcFace loss with
    per-row margin m(a) + lambda_g g(a), g(a) = a / u_a^2 + 1 / a. easy_margin (the authors' default): the raw
    cosine where cos_y <= 0; without it cos_y - m sin m past cos(pi - m) (`fallback='pml'`, the same value).

    g's share: 'mean' adds lambda_g times the mean of g over the rows that count (the authors' mean over the
    batch), 'sum' the sum, 'none' each row's own lambda_g g to its loss; ignored rows carry no g.

    Args:
        embedding_dim: D. n_classes: C. s: scale (64). l_a, u_a: the norm's range (10, 110). l_margin, u_margin: the
        margin at l_a and at u_a (0.45, 0.8). lambda_g: g's weight (35, the authors' scripts). easy_margin: True.
        Other options as `ArcFace` (no sub-centres or process_group).
    """

    def __init__(self, embedding_dim: int, n_classes: int = 2, s: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_margin: float = 0.45, u_margin: float = 0.8, lambda_g: float = 35.0,
                 easy_margin: bool = True, weight: float = 1.0, class_weights: Optional[Sequence[float]] = None,
                 reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 bonafide_label: int = 1, backend: str = "auto", validate: Optional[bool] = None):
        super().__init__()
        self.l_a, self.u_a, self.l_margin, self.u_margin = l_a, u_a, l_margin, u_margin
        self.lambda_g, self.easy_margin = lambda_g, easy_margin
        if not self.l_a < self.u_a:
            raise checks.LossConfigError(f"MagFace: need l_a < u_a, got {l_a} and {u_a}", "u_a")
        self._init_head(embedding_dim, n_classes, s, dict(
            class_weights=class_weights, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, bonafide_label=bonafide_label, weight=weight, backend=backend,
            validate=validate))

    _OPTIONS = {**_AdaptiveHead._OPTIONS, "l_a": options.SCALE, "u_a": options.SCALE, "l_margin": options.ANGLE,
                "u_margin": options.ANGLE, "lambda_g": options.NON_NEGATIVE, "easy_margin": options.check_bool}
    _repr_keys = ("embedding_dim", "n_classes", "s", "l_a", "u_a", "l_margin", "u_margin", "lambda_g", "easy_margin",
                  "reduction", "backend")

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against targets [B], g's share included."""
        self._check_embeddings(embeddings)
        a = torch.linalg.vector_norm(embeddings.to(self._dtype(embeddings)), dim=1).clamp(self.l_a, self.u_a)
        margin = (self.u_margin - self.l_margin) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_margin
        loss = self._arcface(embeddings, targets, m=margin, m3=0.0, fallback="easy" if self.easy_margin else "pml")
        valid = (targets != self.ignore_index).to(a.dtype)
        g = (a / self.u_a ** 2 + 1.0 / a) * valid
        if self.reduction == "mean":
            g = g.sum() / valid.sum().clamp_min(1.0)
        elif self.reduction == "sum":
            g = g.sum()
        return loss + (self.lambda_g * g).to(loss.dtype)


@register_loss("ElasticFace")
class ElasticFace(_AdaptiveHead):
    """ElasticFace (Boutros et al., 2022): each row's margin is a fresh draw from N(m, std).

    form='arc' (ElasticArcFace): target cos(theta_y + m_i), no fallback (`fallback='none'`: past pi the cosine
    rises again, as the authors' acos / cos does); form='cos' (ElasticCosFace): target cos_y - m_i. The draws are
    float32 on the embeddings' device from `generator` (None: torch's global generator, as the authors), one per
    row, ignored rows included. plus=True (ElasticFace+): the draws sorted ascending, the rows' target cosines
    sorted descending (indices idx), and row i takes sorted_draw[idx[i]]: the authors' indexing, kept as written
    (it is not the rank-matching inverse permutation that the paper describes).

    Args:
        embedding_dim: D. n_classes: C. form: 'arc' | 'cos'. m: the draws' mean (default 0.5 for 'arc', 0.35 for
        'cos'). std: their spread (0.05, the authors' config; their class default is 0.0125). s: scale (64).
        plus: ElasticFace+. generator: a torch.Generator for reproducible draws (an attribute; not in YAML).
        Other options as `ArcFace` (no sub-centres or process_group).
    """

    DEFAULT_M = {"arc": 0.5, "cos": 0.35}

    def __init__(self, embedding_dim: int, n_classes: int = 2, form: str = "arc", m: Optional[float] = None,
                 std: float = 0.05, s: float = 64.0, plus: bool = False, generator: Optional[torch.Generator] = None,
                 weight: float = 1.0, class_weights: Optional[Sequence[float]] = None, reduction: str = "mean",
                 ignore_index: int = -100, label_smoothing: float = 0.0, bonafide_label: int = 1,
                 backend: str = "auto", validate: Optional[bool] = None):
        super().__init__()
        self.form = form
        self.m = self.DEFAULT_M[form] if m is None else m
        self.std, self.plus, self.generator = std, plus, generator
        self._init_head(embedding_dim, n_classes, s, dict(
            class_weights=class_weights, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, bonafide_label=bonafide_label, weight=weight, backend=backend,
            validate=validate))

    _OPTIONS = {**_AdaptiveHead._OPTIONS, "form": lambda o, k, v: checks.check_choice(o, k, v, ("arc", "cos")),
                "m": options.ANGLE, "std": options.NON_NEGATIVE, "plus": options.check_bool,
                "generator": lambda o, k, v: _check_generator(o, v)}
    _repr_keys = ("embedding_dim", "n_classes", "form", "m", "std", "s", "plus", "reduction", "backend")

    def draw(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B] per-row margins for this batch (fresh draws; sorted against the target cosines with `plus`)."""
        margin = torch.normal(self.m, self.std, (len(targets),), generator=self.generator,
                              device=embeddings.device, dtype=torch.float32)
        if self.plus:
            cos_y, _ = _target_cosine(embeddings, self.mapper.weight, targets, self.ignore_index)
            order = torch.sort(cos_y, descending=True).indices
            margin = torch.sort(margin).values[order]
        return margin.to(self._dtype(embeddings))

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against targets [B] with this batch's draws."""
        self._check_embeddings(embeddings)
        margin = self.draw(embeddings, targets)
        if self.form == "arc":
            return self._arcface(embeddings, targets, m=margin, m3=0.0, fallback="none")
        return self._arcface(embeddings, targets, m=0.0, m3=margin, fallback="none")


def _check_generator(owner, value):
    if value is not None and not isinstance(value, torch.Generator):
        raise checks.WrongTypeError(f"{owner}: 'generator' must be a torch.Generator or None, got "
                                    f"{type(value).__name__}", "generator")
    return value


@register_loss("CurricularFace")
class CurricularFace(_AdaptiveHead):
    """CurricularFace (Huang et al., 2020): hard negatives weigh more as training advances.

    Target logit s cos(theta_y + m) where cos_y > cos(pi - m), else s (cos_y - m sin m); a non-target cosine above
    the target's cos(theta_y + m) becomes cos (t + cos) (`functional.curricular_face_loss`). t (buffer [1], in the
    state_dict, initially 0) is the running mean of the target cosines: t <- 0.01 mean(cos_y) + 0.99 t, from the
    batch's detached target cosines before the loss uses it, as the authors. Only training-mode forwards update t
    (the authors' head updates on every call; their trainer calls it in training only), and the mean runs over the
    rows that count (a batch whose rows are all ignored keeps t).

    Args:
        embedding_dim: D. n_classes: C. m: angular margin (0.5). s: scale (64). Other options as `ArcFace` (no
        sub-centres or process_group).
    """

    MOMENTUM = 0.01

    def __init__(self, embedding_dim: int, n_classes: int = 2, m: float = 0.5, s: float = 64.0, weight: float = 1.0,
                 class_weights: Optional[Sequence[float]] = None, reduction: str = "mean", ignore_index: int = -100,
                 label_smoothing: float = 0.0, bonafide_label: int = 1, backend: str = "auto",
                 validate: Optional[bool] = None):
        super().__init__()
        self.m = m
        self._init_head(embedding_dim, n_classes, s, dict(
            class_weights=class_weights, reduction=reduction, ignore_index=ignore_index,
            label_smoothing=label_smoothing, bonafide_label=bonafide_label, weight=weight, backend=backend,
            validate=validate))
        self.register_buffer("t", torch.zeros(1))

    _OPTIONS = {**_AdaptiveHead._OPTIONS, "m": _scalar(options.ANGLE)}
    _repr_keys = ("embedding_dim", "n_classes", "m", "s", "reduction", "backend")

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, logits=None) -> torch.Tensor:
        """Loss of embeddings [B, D] against targets [B]; updates t first in training mode."""
        self._check_embeddings(embeddings)
        if self.training:
            cos_y, valid = _target_cosine(embeddings, self.mapper.weight, targets, self.ignore_index)
            with torch.no_grad():
                n = valid.sum()
                mean = cos_y.sum() / n.clamp_min(1)
                new = self.MOMENTUM * mean + (1 - self.MOMENTUM) * self.t
                self.t.copy_(torch.where(n > 0, new, self.t))
        return F.curricular_face_loss(embeddings, self.mapper.weight, targets, m=self.m, s=self.s,
                                      t=self.t.reshape(()), label_smoothing=self.label_smoothing, **self._options())
