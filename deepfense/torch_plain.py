"""Plain-autograd formulations of CrossEntropy and OCSoftmax for small batches on the 'torch' backend.

At DeepFense's sizes (B = 1..256, C = 2) a loss costs the dispatch of its small ops, not arithmetic, so the fewest ops
win: torch's fused `linear` + `cross_entropy`, and OCSoftmax in 15 ops with autograd's own backward, beat the
closed-form Function (`deepfense.torch_backend`) that pays off at large B. The caller (`deepfense.functional._plain`)
takes this path only while the value checks run, so an out-of-range target raises (torch's cross_entropy checks its
targets; OCSoftmax's are checked first, and a batch with ignored rows goes to the Function), and a non-finite result
(CrossEntropy with every row ignored: torch's mean is NaN where ours is 0) is recomputed by the Function. What this path
keeps itself: a NaN or Inf in a row's inputs gives that row a NaN loss, and an exact zero vector
has cosine 0 and a zero gradient. `deepfense.reference` stays the oracle it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .params import LossParams, Margin

# Largest batch for which this path is faster than the Function (measured on 2 CPU cores, fwd+bwd, C = 2, D = 160 and
# 1024: the plain path wins up to B = 4096 for CrossEntropy and about B = 2048 for OCSoftmax).
MAX_ROWS = {Margin.NONE: 4096, Margin.ONE_CLASS: 1024}
MAX_CLASSES = 16  # heads this narrow: the [B, C] logits are no bigger than the [B] statistics
# From B*D = 2^17 on, CrossEntropy's logits are computed as W X^T (an [C, B] product with the long D inside), whose
# backward products are W^T G^T and G^T X: on 2 CPU cores (MKL) the [B, D] x [D, C] product behind `linear` and the
# X^T G of its weight gradient take a slow path for C this narrow (~75 and ~90 us at B = 256, D = 1024, C = 2, against
# ~17 and ~19 for these); below it the one `linear` node costs less than the extra transposes' autograd nodes.
WIDE_GEMM = 1 << 17
_REDUCTION = {"none": 0, "mean": 1, "sum": 2}  # torch's reduction enum (torch.nn._reduction.get_enum)


def applies(p: LossParams, x, n_classes: int, bias, class_weights, w_dtype: torch.dtype) -> bool:
    """Whether `margin_loss` may serve this call: a small CrossEntropy or OCSoftmax head without class weights, and one
    floating dtype (fp32 or fp64) for every input. The caller checks the targets (see the module docstring)."""
    rows = MAX_ROWS.get(p.margin)
    return rows is not None and class_weights is None and _fits(rows, x, n_classes, bias, w_dtype)


def cross_entropy_applies(x, w, bias) -> bool:
    """`applies` for CrossEntropy without class weights, w its fc.weight [C, D] (no LossParams needed)."""
    return _fits(MAX_ROWS[Margin.NONE], x, w.shape[0], bias, w.dtype)


def _fits(max_rows: int, x, n_classes: int, bias, w_dtype: torch.dtype) -> bool:
    if not 0 < x.shape[0] <= max_rows or n_classes > MAX_CLASSES:
        return False
    if x.dtype not in (torch.float32, torch.float64) or w_dtype != x.dtype:
        return False
    return bias is None or bias.dtype == x.dtype


def cross_entropy(x, w, bias, targets, reduction: str, ignore_index: int, label_smoothing: float):
    """CrossEntropy on `x` [B, D], fc.weight `w` [C, D], `bias` [C] or None, `targets` [B] int64 (torch checks their
    range itself), reduced per `reduction`, in x's dtype."""
    if x.shape[0] * x.shape[1] < WIDE_GEMM:
        logits = F.linear(x, w, bias)
    else:  # [C, D] @ [D, B], then a transposed view: see WIDE_GEMM
        logits = (torch.mm(w, x.t()) if bias is None else torch.addmm(bias[:, None], w, x.t())).t()
    # torch's own op behind F.cross_entropy, without its Python wrapper (~2 us of the ~10 a small forward costs)
    return torch._C._nn.cross_entropy_loss(logits, targets, None, _REDUCTION[reduction], ignore_index,
                                           label_smoothing)


def margin_loss(x, w, bias, targets, p: LossParams):
    """The loss on `x` [B, D], `w` (CrossEntropy: fc.weight [C, D]; OCSoftmax: [D, 1]), `bias` [C] or None, `targets`
    [B] all in range; reduced per `p.reduction`, in x's dtype."""
    if p.margin == Margin.NONE:
        return cross_entropy(x, w, bias, targets, p.reduction, p.ignore_index, p.label_smoothing)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True) * torch.linalg.vector_norm(w)
    # 1/|x||w|, and 0 for a zero vector: 1/inf is 0 with a zero gradient, where 1/0 would make the gradient NaN; a
    # NaN norm is not > 0 either, and 0 times the row's NaN dot product stays NaN
    inv = torch.where(norm > 0, norm, torch.inf).reciprocal()
    cos = ((x @ w) * inv).clamp(-1.0, 1.0)[:, 0]
    bona = targets == p.bonafide_label  # z = alpha (m_real - cos) if bonafide, else alpha (cos - m_fake)
    slope = torch.where(bona, -p.alpha, p.alpha).to(cos.dtype)
    offset = torch.where(bona, p.alpha * p.m_real, -p.alpha * p.m_fake).to(cos.dtype)
    rows = F.softplus(torch.addcmul(offset, slope, cos))
    if p.reduction == "none":
        return rows
    return rows.sum() if p.reduction == "sum" else rows.mean()
