"""Plain-autograd formulations of CrossEntropy and OCSoftmax for small heads on the CPU ('torch' backend).

At DeepFense's sizes (B = 1..1024, C = 2) a loss costs the dispatch of its small ops, not arithmetic, so the fewest ops
win: torch's fused `linear` + `cross_entropy` (the very ops DeepFense's CrossEntropy runs), and OCSoftmax in about
twenty ops with autograd's own backward, beat the closed-form Function (`deepfense.torch_backend`) that pays off at
large B. Every option is served here (class weights, ignore_index, label smoothing, every reduction), whether or not
the value checks run: `deepfense.dispatch` chooses this path from shapes, dtypes and the device alone.

What this path keeps itself, as the other paths do: a NaN or Inf in a row's inputs gives that row a NaN loss; an exact
zero vector has cosine 0 and a zero gradient; `reduction='mean'` over rows that are all ignored (or all of weight 0)
is 0, not NaN; a target out of range raises (torch's index checks on the CPU, named by `deepfense.inputs`).
`deepfense.reference` stays the oracle it is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .params import SMALL_HEAD_CLASSES, LossParams, Margin
from .torch_backend import one_class_coefficients, one_class_rows

# Where this path beats the Function, fwd+bwd, class weights on, C = 2 (`bench/plain_path.py` prints the ratio;
# measured on a 2-core AMD EPYC with 1 and 2 torch threads, bench/results/plain-path_*.txt): CrossEntropy's two fused
# ops up to 16,384 rows (a tie at 65,536); OCSoftmax's twenty while the embeddings hold up to 2^16 values (B = 64 at
# D = 1024, 409 at D = 160), beyond which its extra passes over them cost more than the Function's dispatch. Near the
# limits the two paths are within noise of each other, so a machine whose BLAS shifts the crossover loses little.
CE_MAX_ROWS = 16384
OC_MAX_VALUES = 1 << 16
_REDUCTION = {"none": 0, "mean": 1, "sum": 2}  # torch's reduction enum (torch.nn._reduction.get_enum)


def serves(p: LossParams, x, w_dtype: torch.dtype, bias, n_classes: int) -> bool:
    """Whether this path serves a call: CrossEntropy (up to `CE_MAX_ROWS` rows) or OCSoftmax (embeddings of up to
    `OC_MAX_VALUES` values) on CPU tensors, a head of at most `SMALL_HEAD_CLASSES` classes, and one floating dtype
    (fp32 or fp64) for the embeddings, weight and bias."""
    if p.margin == Margin.NONE:
        if x.shape[0] > CE_MAX_ROWS:
            return False
    elif p.margin != Margin.ONE_CLASS or x.numel() > OC_MAX_VALUES:
        return False
    if not x.is_cpu or n_classes > SMALL_HEAD_CLASSES:
        return False
    if x.dtype not in (torch.float32, torch.float64) or w_dtype != x.dtype:
        return False
    return bias is None or bias.dtype == x.dtype


def cross_entropy(x, w, bias, targets, class_weights, p: LossParams):
    """CrossEntropy on `x` [B, D], fc.weight `w` [C, D], `bias` [C] or None, `targets` [B] int64, class weights [C] or
    None; reduced per `p.reduction`, in x's dtype."""
    # the very op nn.Linear runs: another layout of the product (W X^T, transposed) was faster on one machine's BLAS
    # and slower on another's, so DeepFense's own formulation is the one that holds everywhere
    logits = F.linear(x, w, bias)
    cw = class_weights if class_weights is None or class_weights.dtype == x.dtype else class_weights.to(x.dtype)
    # torch's mean over no kept weight is 0/0, ours is 0. Eager: a read of the CPU scalar (no device sync) finds it;
    # compiled: the sum over the kept weight, which the compiled graph fuses
    compiled_mean = p.reduction == "mean" and torch.compiler.is_compiling()
    # torch's own op behind F.cross_entropy, without its Python wrapper (~2 us of the ~10 a small forward costs)
    loss = torch._C._nn.cross_entropy_loss(logits, targets, cw, _REDUCTION["sum" if compiled_mean else p.reduction],
                                           p.ignore_index, p.label_smoothing)
    if compiled_mean:
        den = _kept_weight(targets, cw, p)
        return loss / torch.where(den > 0, den, 1.0)
    if p.reduction == "mean" and math.isnan(loss.item()) and _kept_weight(targets, cw, p) == 0:
        return loss.nan_to_num(0.0)
    return loss


def _kept_weight(targets, cw, p: LossParams):
    """The sum of the kept rows' class weights: the denominator of 'mean'."""
    kept = targets != p.ignore_index
    return kept.sum() if cw is None else (cw[targets.clamp(0, cw.shape[0] - 1)] * kept).sum()


def one_class(x, w, targets, class_weights, p: LossParams):
    """OCSoftmax on `x` [B, D], the bonafide centre `w` [D, 1], `targets` [B] in {0, 1} or ignore_index, class weights
    [2] (by target) or None; reduced per `p.reduction`, in x's dtype."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True) * torch.linalg.vector_norm(w)
    # 1/|x||w|, and 0 for a zero vector: 1/inf is 0 with a zero gradient, where 1/0 would make the gradient NaN; a
    # NaN norm is not > 0 either, and 0 times the row's NaN dot product stays NaN
    inv = torch.where(norm > 0, norm, torch.inf).reciprocal()
    cos = ((x @ w) * inv).clamp(-1.0, 1.0)[:, 0]
    kept = targets != p.ignore_index
    safe = torch.where(kept, targets, 0)  # index_select raises for a target outside {0, 1}, negative ones too
    coef = one_class_coefficients(safe, p, x.dtype)
    rows = one_class_rows(torch.addcmul(coef[:, 1], coef[:, 0], cos))
    if class_weights is None:
        weight = kept.to(x.dtype)
    else:
        weight = torch.index_select(class_weights.to(x.dtype), 0, safe) * kept
    rows = rows * weight
    if p.reduction == "none":
        return rows
    total = rows.sum()
    if p.reduction == "sum":
        return total
    den = weight.sum()
    return total / torch.where(den > 0, den, 1.0)  # 'mean' over no kept weight is 0 (total is 0 then), not NaN
