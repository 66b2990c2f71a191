"""PyTorch reference implementations: the correctness oracle for every other backend.

Written for clarity with plain autograd, correct in float64. All four share one signature style:
``<loss>_ref(embeddings, weight, targets, *, <loss options>, class_weights=None, ignore_index=-100, reduction="mean")``.

Conventions shared with the fast backends:
    * ``weight`` is DeepFense's ``mapper.weight`` of shape [D, C] (OCSoftmax: [D, 1]); CrossEntropy takes ``fc.weight``
      of shape [C, D] and an optional ``bias`` [C].
    * A row or class column of zero norm normalises to zero (cosine 0, gradient 0) instead of NaN.
    * ``reduction='mean'`` divides by the sum of the class weights of the non-ignored rows, like torch; when that sum
      is zero (empty batch, every row ignored) the loss is 0, not NaN.
    * Mixed input dtypes compute in the promoted dtype; the loss is returned in float32 or float64.
"""

from __future__ import annotations

import math

import torch

from .params import ADAFACE_EPS, Fallback


def _unit(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t / ||t|| along `dim`, with zero vectors mapping to zero (and a zero, not NaN, gradient)."""
    norm = torch.linalg.vector_norm(t, dim=dim, keepdim=True)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return t * torch.where(norm > 0, 1.0 / safe, torch.zeros_like(norm))


def cosine(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Clamped cosine between rows of x [B, D] and columns of weight [D, C]; returns [B, C]."""
    dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    x, w = embeddings.to(dtype), weight.to(dtype)
    return (_unit(x, 1) @ _unit(w, 0)).clamp(-1.0, 1.0)


def class_cosine(embeddings: torch.Tensor, weight: torch.Tensor, sub_centers: int = 1) -> torch.Tensor:
    """`cosine` [B, C]; with K sub-centres (weight [D, C*K], a class's K columns adjacent) the max over each class's
    K columns, its gradient going to the winning column."""
    cos = cosine(embeddings, weight)
    if sub_centers > 1:
        cos = cos.view(cos.shape[0], -1, sub_centers).max(2).values
    return cos


def target_cosine(embeddings: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  sub_centers: int = 1) -> torch.Tensor:
    """[B]: each row's clamped cosine with its target class (the max over the class's K sub-centre columns), from
    one gathered weight column per row and sub-centre: x [B, D], weight [D, C*K], targets [B] in [0, C)."""
    dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    cols = (targets[:, None] * sub_centers + torch.arange(sub_centers, device=targets.device)).reshape(-1)
    w_y = _unit(weight.to(dtype).index_select(1, cols), 0).view(weight.shape[0], -1, sub_centers)
    return torch.einsum("bd,dbk->bk", _unit(embeddings.to(dtype), 1), w_y).clamp(-1.0, 1.0).amax(1)


def scalar_like(v, like: torch.Tensor) -> torch.Tensor:
    """A float or 0-dim tensor as a 0-dim tensor of like's dtype and device. Built as zeros + v: under torch.compile
    with inductor, as_tensor / full / scalar_tensor specialise a Python float (a recompile per value) while
    arithmetic keeps it symbolic (one recompile, then the float is dynamic)."""
    if isinstance(v, torch.Tensor):
        return v.to(dtype=like.dtype, device=like.device)
    return torch.zeros((), dtype=like.dtype, device=like.device) + v


def arc_margin(cos: torch.Tensor, m1, m2, m3, fallback: int = Fallback.NONE) -> torch.Tensor:
    """The combined-margin target cosine cos(m1 theta + m2) - m3 of target cosines `cos` [B, 1], with each toolkit's
    fallback past the monotone range (see `deepfense.params.Fallback`).

    m1 is a Python float (1 selects the identity cos(theta + m2) = cos cos m2 - sin sin m2, as WeSpeaker and
    SpeechBrain compute it) or a per-sample tensor [B, 1]; m2, m3 are floats, 0-dim or per-sample [B, 1] tensors.
    sin theta is kept >= sqrt(tiny) so that the gradient at cos = +-1 (where d cos / dx = 0) is finite. SpeechBrain's
    and AdaFace's clamps of the target cosine happen here (AdaFace's heads clamp the other columns too:
    `combined_margin_ref`).
    """
    fb = Fallback(fallback)
    if fb == Fallback.SPEECHBRAIN:
        cos = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7)
    elif fb == Fallback.ADAFACE:
        cos = cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS)
    m2 = scalar_like(m2, cos)
    sin = torch.sqrt(torch.clamp_min(1.0 - cos * cos, torch.finfo(cos.dtype).tiny))
    if fb == Fallback.ADAFACE:
        angle = m1 * torch.atan2(sin, cos) + m2
        return torch.cos(torch.clamp(angle, ADAFACE_EPS, math.pi - ADAFACE_EPS)) - m3
    if isinstance(m1, float) and m1 == 1.0:
        phi = cos * torch.cos(m2) - sin * torch.sin(m2)
    else:
        phi = torch.cos(m1 * torch.atan2(sin, cos) + m2)
    if fb == Fallback.EASY:
        phi = torch.where(cos > 0, phi, cos)
    elif fb != Fallback.NONE:
        th = torch.cos(torch.clamp((math.pi - m2) / m1, 0.0, math.pi))
        shift = {Fallback.WESPEAKER: 1.0 + torch.cos(math.pi - m2), Fallback.SPEECHBRAIN: m2 * torch.sin(math.pi - m2),
                 Fallback.PML: m2 * torch.sin(m2)}[fb]
        keep = cos >= th if fb == Fallback.PML else cos > th  # pml keeps the margin at theta = pi - m exactly
        phi = torch.where(keep, phi, cos - shift)
    return phi - m3


def row_values(v, like: torch.Tensor):
    """A CombinedMargin value as it broadcasts against [B, C] cosines: a float as it is, a 0-dim tensor in like's
    dtype, a per-sample [B] tensor as [B, 1]."""
    if not isinstance(v, torch.Tensor):
        return v
    v = v.to(dtype=like.dtype, device=like.device)
    return v[:, None] if v.dim() == 1 else v


def chebyshev(cos: torch.Tensor, m: int) -> torch.Tensor:
    """cos(m*theta) as the Chebyshev polynomial T_m of cos(theta), any integer m >= 1, by the recurrence
    T_0 = 1, T_1 = cos, T_{j+1} = 2 cos T_j - T_{j-1}."""
    prev, cur = torch.ones_like(cos), cos
    for _ in range(int(m) - 1):
        prev, cur = cur, 2 * cos * cur - prev
    return cur


def sphereface_psi(cos: torch.Tensor, m: int) -> torch.Tensor:
    """SphereFace's monotone psi(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi) (no gradient through k)."""
    with torch.no_grad():
        k = torch.floor(int(m) * torch.acos(cos) / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * chebyshev(cos, m) - 2.0 * k


def _row_weights(targets, class_weights, ignore_index, dtype):
    """Per-row class weight (0 for ignored rows) and the targets made safe to index with."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    w = torch.ones(targets.shape, dtype=dtype, device=targets.device)
    if class_weights is not None:
        w = class_weights.to(dtype)[safe]
    return w * valid.to(dtype), safe


def _reduce(row_loss: torch.Tensor, row_weight: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    den = row_weight.sum()
    return torch.where(den > 0, total / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(total))


def _loss_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def softmax_ce_ref(logits, targets, *, class_weights=None, ignore_index=-100, label_smoothing=0.0,
                   reduction="mean", gamma=0.0):
    """Cross-entropy over given logits [B, C] with torch's weighting and smoothing, plus an optional focal factor.

    Row loss: (1 - eps) * w_y * F * (-log p_y) + eps / C * sum_c w_c * (-log p_c), with F = (1 - p_y)^gamma detached.
    """
    row_w, safe = _row_weights(targets, class_weights, ignore_index, logits.dtype)
    logp = torch.log_softmax(logits, dim=1)
    logp_y = logp.gather(1, safe[:, None])[:, 0]
    nll = -logp_y
    if gamma:
        nll = nll * (1.0 - logp_y.detach().exp()).clamp_min(0.0) ** gamma
    row_loss = (1.0 - label_smoothing) * row_w * nll
    if label_smoothing:
        cw = torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device)
        if class_weights is not None:
            cw = class_weights.to(logits.dtype)
        valid = (targets != ignore_index).to(logits.dtype)
        row_loss = row_loss + label_smoothing / logits.shape[1] * valid * -(logp * cw).sum(1)
    return _reduce(row_loss, row_w, reduction)


def am_softmax_ref(embeddings, weight, targets, *, m=0.3, s=30.0, class_weights=None, ignore_index=-100,
                   label_smoothing=0.0, reduction="mean", sub_centers=1):
    """AMSoftmax (CosFace): logits s*cos_c, target logit s*(cos_y - m). Shapes: x [B, D], weight [D, C*K] (K =
    sub_centers), targets [B]."""
    cos = class_cosine(embeddings, weight, sub_centers).to(_loss_dtype(embeddings, weight))
    onehot = torch.zeros_like(cos).scatter_(1, _row_weights(targets, None, ignore_index, cos.dtype)[1][:, None], 1.0)
    logits = s * (cos - m * onehot)
    return softmax_ce_ref(logits, targets, class_weights=class_weights, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction)


def combined_margin_ref(embeddings, weight, targets, *, s=64.0, m1=1.0, m2=0.5, m3=0.0, fallback=Fallback.NONE,
                        filter_threshold=0.0, straight_through=False, sub_centers=1, class_weights=None,
                        ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """ArcFace / CombinedMargin: logits s*cos_c, target logit s*`arc_margin`(cos_y, m1, m2, m3, fallback).

    ArcFace is m1 = 1, m2 = m, m3 = 0; CosFace (= `am_softmax_ref`) m1 = 1, m2 = 0, m3 = m. filter_threshold > 0:
    non-target cosines above it become 0 with no gradient (insightface's interclass filtering). straight_through:
    the target's gradient is that of s*cos_y (insightface computes theta under no_grad). s: a float or 0-dim tensor;
    m1, m2, m3: floats, 0-dim or per-sample [B] tensors (the adaptive-margin heads), differentiable where they require
    grad. fallback ADAFACE clamps every cosine to +-(1 - ADAFACE_EPS) first. Shapes: x [B, D], weight [D, C*K]
    (K = sub_centers), targets [B].
    """
    cos = class_cosine(embeddings, weight, sub_centers).to(_loss_dtype(embeddings, weight))
    if fallback == Fallback.ADAFACE:
        cos = cos.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS)
    s, m1, m2, m3 = (row_values(v, cos) for v in (s, m1, m2, m3))
    safe = _row_weights(targets, None, ignore_index, cos.dtype)[1][:, None]
    if filter_threshold > 0:
        target_col = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, safe, True)
        cos = torch.where((cos > filter_threshold) & ~target_col, torch.zeros_like(cos).detach(), cos)
    cos_y = cos.gather(1, safe)
    target = arc_margin(cos_y, m1, m2, m3, fallback)
    if straight_through:
        target = cos_y + (target - cos_y).detach()
    logits = s * cos.scatter(1, safe, target)
    return softmax_ce_ref(logits, targets, class_weights=class_weights, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction)


def hard_negatives(cos: torch.Tensor, phi_y: torch.Tensor, tcol: torch.Tensor) -> torch.Tensor:
    """CurricularFace's hard negatives [B, C]: the non-target cosines above their row's margined target cosine
    phi_y [B, 1] (cos(theta_y + m)); tcol [B, 1] the target column."""
    return (cos > phi_y).scatter(1, tcol, False)


def curricular_face_ref(embeddings, weight, targets, *, m=0.5, s=64.0, t=0.0, class_weights=None, ignore_index=-100,
                        label_smoothing=0.0, reduction="mean"):
    """CurricularFace: target logit s cos(theta_y + m), past cos_y <= cos(pi - m) s (cos_y - m sin m); a non-target
    cosine above the row's cos(theta_y + m) (a hard negative) becomes cos (t + cos), t held constant (the running
    average of the target cosines, a float or 0-dim tensor). Shapes: x [B, D], weight [D, C], targets [B]."""
    cos = cosine(embeddings, weight).to(_loss_dtype(embeddings, weight))
    safe = _row_weights(targets, None, ignore_index, cos.dtype)[1][:, None]
    cos_y = cos.gather(1, safe)
    s, m, t = (row_values(v, cos) for v in (s, m, t))
    target = arc_margin(cos_y, 1.0, m, 0.0, Fallback.PML)  # pml's fallback: cos_y - m sin m
    hard = hard_negatives(cos, arc_margin(cos_y, 1.0, m, 0.0, Fallback.NONE).detach(), safe)
    t = scalar_like(t, cos).detach()
    logits = s * torch.where(hard, cos * (t + cos), cos).scatter(1, safe, target)
    return softmax_ce_ref(logits, targets, class_weights=class_weights, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction)


def arcface_ref(embeddings, weight, targets, *, m=0.2, s=32.0, fallback="wespeaker", **options):
    """ArcFace with `functional.arcface_loss`'s argument names (fallback by name); see `combined_margin_ref`."""
    return combined_margin_ref(embeddings, weight, targets, s=s, m1=1.0, m2=m, m3=0.0,
                               fallback=Fallback[fallback.upper()], **options)


def a_softmax_ref(embeddings, weight, targets, *, m=4, lam=5.0, gamma=0.5, class_weights=None, ignore_index=-100,
                  reduction="mean"):
    """ASoftmax (SphereFace): logits |x|*cos_c, target |x|*(lam*cos_y + psi_y)/(1+lam), focal factor (1-p_y)^gamma.

    `lam` is the annealed lambda (float or 0-dim tensor). Shapes: x [B, D], weight [D, C], targets [B].
    """
    dtype = _loss_dtype(embeddings, weight)
    cos = cosine(embeddings, weight).to(dtype)
    xnorm = torch.linalg.vector_norm(embeddings.to(dtype), dim=1, keepdim=True)
    safe = _row_weights(targets, None, ignore_index, dtype)[1][:, None]
    cos_y = cos.gather(1, safe)
    target = (lam * cos_y + sphereface_psi(cos_y, m)) / (1.0 + lam)
    logits = xnorm * cos.scatter(1, safe, target)
    return softmax_ce_ref(logits, targets, class_weights=class_weights, ignore_index=ignore_index,
                          reduction=reduction, gamma=gamma)


def oc_softmax_ref(embeddings, weight, targets, *, m_real=0.5, m_fake=0.2, alpha=20.0, bonafide_label=1,
                   class_weights=None, ignore_index=-100, reduction="mean"):
    """OCSoftmax: z = alpha*(m_real - cos) for bonafide rows, alpha*(cos - m_fake) otherwise; row loss softplus(z).

    Shapes: x [B, D], weight [D, 1], targets [B] in {0, 1}; class_weights (if any) has 2 entries indexed by target.
    """
    dtype = _loss_dtype(embeddings, weight)
    cos = cosine(embeddings, weight).to(dtype)[:, 0]
    bona = targets == bonafide_label
    z = alpha * torch.where(bona, m_real - cos, cos - m_fake)
    row_w, _ = _row_weights(targets, class_weights, ignore_index, dtype)
    softplus = z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))  # stable for any z, exact in float64
    return _reduce(row_w * softplus, row_w, reduction)


def cross_entropy_ref(embeddings, weight, targets, *, bias=None, class_weights=None, ignore_index=-100,
                      label_smoothing=0.0, reduction="mean"):
    """Linear layer then softmax cross-entropy. Shapes: x [B, D], weight [C, D] (fc.weight), bias [C] or None."""
    dtype = _loss_dtype(embeddings, weight)
    logits = embeddings.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return softmax_ce_ref(logits, targets, class_weights=class_weights, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction)
