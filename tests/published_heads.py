"""The four adaptive-margin face heads as their authors published them, transcribed into plain float64 torch.

Each function follows the authors' forward step by step (the same clamps, the same order of the state update and
the margin, the same fallbacks), written here in our own words, and shares no code with `deepfense`. It takes the
embeddings, the class weight [D, C] (the authors' `kernel`, our `mapper.weight`), integer labels [B], the options
by the authors' names and the head's state, and returns (loss, new state). The loss is what the authors' training
step back-propagates: torch's mean cross-entropy of the head's logits (plus MagFace's regulariser).

Sources (read from the public repositories):
    AdaFace         mk-minchul/AdaFace, head.py (class AdaFace) and train_val.py (CrossEntropyLoss on its output).
    MagFace         IrvingMeng/MagFace, models/magface.py (SoftmaxBuilder._margin, MagLinear, MagLoss) and
                    run/trainer.py (loss = loss_id + lambda_g * loss_g).
    ElasticFace     fdbtrs/ElasticFace, utils/losses.py (ElasticArcFace, ElasticCosFace with `plus`).
    CurricularFace  HuangYG123/CurricularFace, head/metrics.py (class CurricularFace).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _unit_rows(x):
    return x / x.norm(dim=1, keepdim=True)


def _unit_cols(w):
    return w / w.norm(dim=0, keepdim=True)


def _one_hot(labels, like):
    return torch.zeros_like(like).scatter_(1, labels[:, None], 1.0)


def adaface(unit_embeddings, norms, kernel, labels, *, m=0.4, h=0.333, s=64.0, t_alpha=0.01, state):
    """AdaFace. The backbone hands the head unit embeddings and their norms [B, 1] separately (its `norms` carry
    gradient, the head detaches them). state: {'batch_mean': [1], 'batch_std': [1]} (initially 20 and 100).

    Every cosine is clamped to [-1 + eps, 1 - eps] (eps = 1e-3); the norms are clipped to [1e-3, 100] and detached;
    the running mean and unbiased std of the batch's norms are updated first (EMA with t_alpha), then
    scaler = clip(h (norm - mean) / (std + eps), -1, 1), the target angle becomes clip(theta_y - m scaler, eps,
    pi - eps), its cosine is reduced by m (1 + scaler), and everything is scaled by s.
    """
    eps = 1e-3
    cos = (unit_embeddings @ _unit_cols(kernel)).clamp(-1 + eps, 1 - eps)
    safe = norms.clip(min=1e-3, max=100).clone().detach()
    with torch.no_grad():
        mean = safe.mean() * t_alpha + (1 - t_alpha) * state["batch_mean"]
        std = safe.std() * t_alpha + (1 - t_alpha) * state["batch_std"]
    scaler = ((safe - mean) / (std + eps) * h).clip(-1, 1)
    hot = _one_hot(labels, cos)
    theta = (cos.acos() + hot * (-m * scaler)).clip(min=eps, max=math.pi - eps)
    logits = (theta.cos() - hot * (m + m * scaler)) * s
    return F.cross_entropy(logits, labels), {"batch_mean": mean, "batch_std": std}


def magface(embeddings, kernel, labels, *, s=64.0, l_a=10.0, u_a=110.0, l_margin=0.45, u_margin=0.8, lambda_g=35.0,
            easy_margin=True, state=None):
    """MagFace. The norm |x| clamped to [l_a, u_a] (no gradient outside) gives the margin
    m(a) = (u_margin - l_margin) / (u_a - l_a) (a - l_a) + l_margin and the regulariser g(a) = a / u_a^2 + 1 / a.
    Target cosine cos(theta + m(a)); with easy_margin (MagLinear's default, which SoftmaxBuilder keeps) the raw cosine
    where cos <= 0, else cos - m sin(pi - m) where cos <= cos(pi - m). Loss: CE + lambda_g mean(g)."""
    a = embeddings.norm(dim=1, keepdim=True).clamp(l_a, u_a)
    margin = (u_margin - l_margin) / (u_a - l_a) * (a - l_a) + l_margin
    cos = (_unit_rows(embeddings) @ _unit_cols(kernel)).clamp(-1, 1)
    sin = torch.sqrt(1.0 - cos ** 2)
    cos_m = cos * torch.cos(margin) - sin * torch.sin(margin)
    if easy_margin:
        cos_m = torch.where(cos > 0, cos_m, cos)
    else:
        cos_m = torch.where(cos > torch.cos(math.pi - margin), cos_m, cos - torch.sin(math.pi - margin) * margin)
    hot = _one_hot(labels, cos)
    logits = s * (hot * cos_m + (1.0 - hot) * cos)
    g = (a / u_a ** 2 + 1 / a).mean()
    return F.cross_entropy(logits, labels) + lambda_g * g, state


def elasticface(embeddings, kernel, labels, *, form="arc", m=0.5, s=64.0, std=0.05, plus=False, generator=None,
                state=None):
    """ElasticFace-Arc (target angle theta + m_i) or -Cos (target cosine cos - m_i), m_i ~ N(m, std) drawn per row
    as the authors draw it (float32, shape [B, 1], on the embeddings' device; a generator stands in for the global
    RNG). With `plus` the draws are sorted ascending and, under no_grad, the rows' target cosines sorted descending
    (indices idx); row i takes sorted_margin[idx[i]], the authors' indexing, kept as written."""
    cos = (_unit_rows(embeddings) @ _unit_cols(kernel)).clamp(-1, 1)
    margin = torch.normal(mean=m, std=std, size=(labels.shape[0], 1), generator=generator,
                          device=embeddings.device)
    if plus:
        with torch.no_grad():
            _, idx = torch.sort(cos[torch.arange(labels.shape[0]), labels], dim=0, descending=True)
            margin, _ = torch.sort(margin, dim=0)
        margin = margin[idx]
    hot = _one_hot(labels, cos) * margin.to(cos.dtype)
    logits = (torch.cos(cos.acos() + hot) if form == "arc" else cos - hot) * s
    return F.cross_entropy(logits, labels), state


def curricular_face(embeddings, kernel, labels, *, m=0.5, s=64.0, state):
    """CurricularFace. state: {'t': [1]} (initially 0). The target logit is cos(theta_y + m) where
    cos_y > cos(pi - m), else cos_y - m sin(pi - m). Under no_grad t <- 0.01 mean(cos_y) + 0.99 t, updated before it
    is used; then every cosine above the raw cos(theta_y + m) (the target column too, overwritten next) becomes
    cos (t + cos), and the target column takes the target logit; all scaled by s."""
    cos = (_unit_rows(embeddings) @ _unit_cols(kernel)).clamp(-1, 1)
    rows = torch.arange(labels.shape[0])
    cos_y = cos[rows, labels][:, None]
    sin_y = torch.sqrt(1.0 - cos_y ** 2)
    phi = cos_y * math.cos(m) - sin_y * math.sin(m)
    hard = cos > phi
    target = torch.where(cos_y > math.cos(math.pi - m), phi, cos_y - math.sin(math.pi - m) * m)
    with torch.no_grad():
        t = cos_y.mean() * 0.01 + (1 - 0.01) * state["t"]
    cos = torch.where(hard, cos * (t + cos), cos)
    logits = cos.scatter(1, labels[:, None], target) * s
    return F.cross_entropy(logits, labels), {"t": t}
