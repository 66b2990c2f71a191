"""An independent float64 oracle: every loss written out again in plain torch autograd, sharing no code with
`deepfense` (not its reference, its parameters or its helpers), so a bug in a helper that the reference and a backend
share cannot pass as agreement.

Where the package and this file must agree on a definition, the definition is the one documented in
`deepfense.functional` and `deepfense.params` (the toolkits' fallbacks, torch's label smoothing and class weights).
Different routes on purpose: cos(m theta) from the angle (the package uses the Chebyshev recurrence), the angle by atan2
(the package expands cos(theta + m) for m1 = 1), softplus by logaddexp, the softmax by torch's cross_entropy.
Each function takes the functional API's arguments (backend and the like are not accepted) and returns float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_F64 = torch.float64


def _unit(t, dim):
    """t / |t| along dim; a zero vector stays zero with a zero gradient (the where on both sides keeps it finite)."""
    sq = (t * t).sum(dim, keepdim=True)
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return torch.where(sq > 0, t / safe.sqrt(), torch.zeros_like(t))


def _class_cos(x, w, k=1):
    """Cosines [B, C] of rows of x and columns of w [D, C*k]; a class's cosine is the max over its k columns."""
    cos = (_unit(x.to(_F64), 1) @ _unit(w.to(_F64), 0)).clamp(-1.0, 1.0)
    return cos.view(cos.shape[0], -1, k).max(2).values if k > 1 else cos  # ties: the first column wins


def _theta(c):
    """The angle of cosine c by atan2; sin is taken as 0 (with zero gradient) where 1 - c^2 <= 0."""
    s2 = 1.0 - c * c
    sin = torch.where(s2 > 0, torch.where(s2 > 0, s2, torch.ones_like(s2)).sqrt(), torch.zeros_like(s2))
    return torch.atan2(sin, c)


def _reduce(rows, row_w, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    den = row_w.sum()
    return rows.sum() / den if den > 0 else rows.sum() * 0.0


def _row_weight(t, class_weights, ignore_index, n):
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    cw = torch.ones(n, dtype=_F64) if class_weights is None else class_weights.to(_F64).cpu()
    return cw[safe.cpu()].to(t.device) * valid.to(_F64), safe, valid


def _softmax_loss(logits, t, class_weights, ignore_index, eps, reduction, gamma=0.0):
    """torch's cross_entropy per row (weights, smoothing, ignore_index), a detached focal factor (1 - p_y)^gamma."""
    C = logits.shape[1]
    row_w, safe, valid = _row_weight(t, class_weights, ignore_index, C)
    cw = None if class_weights is None else class_weights.to(_F64).to(logits.device)
    tt = torch.where(valid, t, torch.full_like(t, -1))
    rows = F.cross_entropy(logits, tt, weight=cw, ignore_index=-1, label_smoothing=eps, reduction="none")
    if gamma:
        p_y = torch.softmax(logits.detach(), 1).gather(1, safe[:, None])[:, 0]
        rows = rows * (1.0 - p_y).clamp_min(0.0) ** gamma
    return _reduce(rows, row_w, reduction)


def _with_target(cos, safe, target):
    onehot = F.one_hot(safe, cos.shape[1]).bool()
    return torch.where(onehot, target, cos)


def am(x, w, t, *, m=0.3, s=30.0, class_weights=None, ignore_index=-100, label_smoothing=0.0, reduction="mean",
       sub_centers=1):
    """AMSoftmax: logits s cos_c, target s (cos_y - m)."""
    cos = _class_cos(x, w, sub_centers)
    safe = torch.where(t != ignore_index, t, torch.zeros_like(t))
    logits = s * _with_target(cos, safe, cos - m)
    return _softmax_loss(logits, t, class_weights, ignore_index, label_smoothing, reduction)


def a(x, w, t, *, m=4, lam=5.0, gamma=0.5, class_weights=None, ignore_index=-100, reduction="mean"):
    """ASoftmax: logits |x| cos_c, target |x| (lam cos_y + psi) / (1 + lam), psi = (-1)^k T_m(cos_y) - 2k with
    k = floor(m theta / pi) held constant; focal factor (1 - p_y)^gamma."""
    lam = float(lam)
    cos = _class_cos(x, w)
    k = torch.floor(int(m) * _theta(cos.detach()) / math.pi)
    psi = torch.where(k % 2 == 0, 1.0, -1.0) * torch.cos(int(m) * _theta(cos)) - 2.0 * k
    safe = torch.where(t != ignore_index, t, torch.zeros_like(t))
    xn = x.to(_F64).norm(dim=1, keepdim=True)
    logits = xn * _with_target(cos, safe, (lam * cos + psi) / (1.0 + lam))
    return _softmax_loss(logits, t, class_weights, ignore_index, 0.0, reduction, gamma)


def oc(x, w, t, *, m_real=0.5, m_fake=0.2, alpha=20.0, bonafide_label=1, class_weights=None, ignore_index=-100,
       reduction="mean"):
    """OCSoftmax: softplus(alpha (m_real - cos)) for bonafide rows, softplus(alpha (cos - m_fake)) for the others."""
    cos = _class_cos(x, w)[:, 0]
    z = torch.where(t == bonafide_label, alpha * (m_real - cos), alpha * (cos - m_fake))
    row_w = _row_weight(t, class_weights, ignore_index, 2)[0]
    return _reduce(row_w * torch.logaddexp(z, torch.zeros_like(z)), row_w, reduction)


def ce(x, w, t, *, bias=None, class_weights=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """CrossEntropy: logits x W^T + b (w is fc.weight [C, D])."""
    logits = x.to(_F64) @ w.to(_F64).t() + (0.0 if bias is None else bias.to(_F64))
    return _softmax_loss(logits, t, class_weights, ignore_index, label_smoothing, reduction)


def _per_row(v, like):
    """A margin as float64 that broadcasts over rows [B, 1]: a float, a 0-dim or a per-sample [B] tensor."""
    v = torch.as_tensor(v, dtype=_F64, device=like.device)
    return v.reshape(-1, 1) if v.dim() == 1 else v


def arc_target(c, m1, m2, m3, fallback):
    """The combined-margin target cosine cos(m1 theta + m2) - m3 with a toolkit's fallback past the monotone range
    (`deepfense.params.Fallback`: wespeaker cos - (1 + cos(pi - m2)) where cos <= th; speechbrain the same
    clamp-first with cos - m2 sin(pi - m2); pml cos - m2 sin m2 where acos(cos) > (pi - m2) / m1, compared as angles
    the way pml does; easy cos where cos <= 0; adaface cos(clip(m1 theta + m2, eps, pi - eps)) with eps = 1e-3, its
    cosines clamped by the caller). m1, m2, m3: floats or [B, 1] tensors."""
    m1, m2, m3 = (_per_row(v, c) for v in (m1, m2, m3))
    if fallback == "speechbrain":
        c = c.clamp(-1.0 + 1e-7, 1.0 - 1e-7)
    if fallback == "adaface":
        return torch.cos(torch.clip(m1 * torch.acos(c) + m2, min=1e-3, max=math.pi - 1e-3)) - m3
    phi = torch.cos(m1 * _theta(c) + m2)
    if fallback == "easy":
        phi = torch.where(c > 0, phi, c)
    elif fallback != "none":
        th = torch.cos(torch.clamp((math.pi - m2) / m1, 0.0, math.pi))
        shift = {"wespeaker": 1.0 + torch.cos(math.pi - m2), "speechbrain": m2 * torch.sin(math.pi - m2),
                 "pml": m2 * torch.sin(m2)}[fallback]
        keep = torch.acos(c) <= (math.pi - m2) / m1 if fallback == "pml" else c > th
        phi = torch.where(keep, phi, c - shift)
    return phi - m3


def arc(x, w, t, *, m=0.2, s=32.0, fallback="wespeaker", m1=1.0, m3=0.0, interclass_filtering_threshold=0.0,
        straight_through=False, sub_centers=1, class_weights=None, ignore_index=-100, label_smoothing=0.0,
        reduction="mean"):
    """ArcFace / CombinedMargin: logits s cos_c, target s arc_target(cos_y); non-target cosines above the filter
    threshold count as 0 (constants); straight_through: the target's gradient is that of s cos_y. m, m1, m3 may be
    per-sample [B] tensors (their gradients follow through autograd); adaface clamps every cosine to +-(1 - 1e-3)."""
    s = float(s)
    cos = _class_cos(x, w, sub_centers)
    if fallback == "adaface":
        cos = cos.clamp(-1.0 + 1e-3, 1.0 - 1e-3)
    safe = torch.where(t != ignore_index, t, torch.zeros_like(t))
    onehot = F.one_hot(safe, cos.shape[1]).bool()
    if interclass_filtering_threshold > 0:
        cos = torch.where((cos > interclass_filtering_threshold) & ~onehot, torch.zeros_like(cos), cos)
    target = arc_target(cos, m1, m, m3, fallback)
    if straight_through:
        target = cos + (target - cos).detach()
    logits = s * torch.where(onehot, target, cos)
    return _softmax_loss(logits, t, class_weights, ignore_index, label_smoothing, reduction)


def curricular(x, w, t, *, m=0.5, s=64.0, t_run=0.0, class_weights=None, ignore_index=-100, label_smoothing=0.0,
               reduction="mean"):
    """CurricularFace: target s cos(theta_y + m), s (cos_y - m sin m) where cos_y <= cos(pi - m); non-target cosines
    above cos(theta_y + m) become cos (t + cos), t a constant."""
    cos = _class_cos(x, w)
    safe = torch.where(t != ignore_index, t, torch.zeros_like(t))
    onehot = F.one_hot(safe, cos.shape[1]).bool()
    cos_y = cos.gather(1, safe[:, None])
    phi = torch.cos(_theta(cos_y) + m)
    target = torch.where(cos_y > math.cos(math.pi - m), phi, cos_y - m * math.sin(m))
    hard = (cos > phi.detach()) & ~onehot
    logits = s * torch.where(onehot, target, torch.where(hard, cos * (float(t_run) + cos), cos))
    return _softmax_loss(logits, t, class_weights, ignore_index, label_smoothing, reduction)


FUNCS = {"am": am, "a": a, "oc": oc, "ce": ce, "arc": arc}


def combined(x, w, t, *, m1=1.0, m2=0.5, m3=0.0, s=64.0, fallback="none", **options):
    """CombinedMargin's argument names."""
    return arc(x, w, t, m=m2, s=s, m1=m1, m3=m3, fallback=fallback, **options)


def asoftmax_lambda(t, lambda_min=5.0, lambda_max=1500.0, lambda_gamma=0.1, lambda_power=1.0):
    """The ASoftmax module's lambda at training step t: max(lambda_min, lambda_max (1 + lambda_gamma t)^-power)."""
    return max(lambda_min, lambda_max * (1.0 + lambda_gamma * t) ** -lambda_power)
