"""What every module of the kernel package shares, and nothing above it: the interpreter switch, the dtype rules, the
reduction codes, the row-count jit decorator and the scalar record the custom ops take.

Imports only torch, triton and `deepfense.params` (below the kernels); every other kernel module may import it.
"""

from __future__ import annotations

import os
from dataclasses import astuple, dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..params import LossParams, Margin, RowMargin

# triton.jit reads TRITON_INTERPRET when the kernels are decorated; the plan and the launchers follow the same switch.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# the dtypes the kernels compile for, as Triton types
TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}

# the `reduction` option as the kernels' `reduce` argument (`reduce_rows.py`); the loss options' names are
# `deepfense.params.REDUCTIONS`
REDUCE = {"none": 0, "sum": 1, "mean": 2}

# Batch sizes change from step to step (the last batch of an epoch, uneven shards): a row count or index that
# Triton specialised on (== 1, divisible by 16) would recompile the kernels; D, C and the strides stay specialised,
# since their divisibility lets the loads vectorise.
ROW_ARGS = ("B", "n_targets", "c_offset", "n_total", "tiles_per_split", "ignore_index", "bonafide", "n_smooth",
            "n_splits", "n_part", "reduce", "blocks_per_prog")


def jit_rows(fn):
    """triton.jit, leaving the row-count and index arguments (`ROW_ARGS`) unspecialised."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(do_not_specialize=[a for a in ROW_ARGS if a in names])(fn)


def has(name: str):
    """A `triton.heuristics` rule: the constexpr flag is on when the optional pointer argument `name` is given."""
    return lambda args: args[name] is not None


def acc_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The accumulator dtype of these inputs: fp64 when either is fp64, else fp32."""
    return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32


def dot_dtypes(x: torch.Tensor, w: torch.Tensor):
    """(dot operand dtype as a Triton type, accumulator torch dtype): the promoted dtype, accumulated in fp32/fp64."""
    dot = torch.promote_types(x.dtype, w.dtype)
    if INTERPRET and dot == torch.bfloat16:
        dot = torch.float32  # the interpreter's bf16 tl.dot multiplies raw bit patterns (triton #11584)
    return TL[dot], acc_dtype(x, w)


def check_device(x: torch.Tensor, w: torch.Tensor):
    """Raise unless the kernels can run on these tensors: CUDA (or any device under TRITON_INTERPRET=1) and a float
    dtype they compile for."""
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing deepfense "
                           f"to run the kernels on CPU in the interpreter); got tensors on {x.device}. "
                           "Use backend='torch' or 'auto' on this device.")
    if x.dtype not in TL or w.dtype not in TL:
        raise ValueError("backend='triton' supports float16, bfloat16, float32 and float64, "
                         f"got {x.dtype}/{w.dtype}")


@dataclass(frozen=True)
class OpScalars:
    """The loss options a custom op takes as scalars. torch.library ops take lists of floats and ints, so these
    cross the op boundary as `to_lists()` and come back as `from_lists(floats, ints)`: the one encoding.

    Attributes: the kernels' runtime scalars s, m, gamma, m_real, m_fake, alpha, eps (label smoothing),
    ignore_index and bonafide (OCSoftmax's bona fide label); margin (`Margin`, the MARGIN constexpr); c_offset /
    n_classes: the first class of this weight's columns and the class count of the whole softmax (they differ when
    the classes are sharded across ranks); reduce (`REDUCE`); classes_first: the weight is CrossEntropy's fc.weight
    [C, D], read transposed through its strides; sub: sub-centres per class (K adjacent weight columns per class).
    """

    s: float
    m: float
    gamma: float
    m_real: float
    m_fake: float
    alpha: float
    eps: float
    margin: int
    ignore_index: int
    bonafide: int
    c_offset: int
    n_classes: int
    reduce: int
    classes_first: int
    sub: int

    N_FLOATS = 7  # the first seven fields are the floats, the rest the ints

    @classmethod
    def of(cls, p: LossParams, n_classes: int, class_offset: int = 0, classes_first: bool = False) -> "OpScalars":
        return cls(p.s, p.m, p.gamma, p.m_real, p.m_fake, p.alpha, p.label_smoothing, int(p.margin), p.ignore_index,
                   p.bonafide_label, class_offset, n_classes, REDUCE[p.reduction], int(classes_first), p.sub_centers)

    def to_lists(self) -> Tuple[List[float], List[int]]:
        values = astuple(self)
        return [float(v) for v in values[:self.N_FLOATS]], [int(v) for v in values[self.N_FLOATS:]]

    @classmethod
    def from_lists(cls, floats: List[float], ints: List[int]) -> "OpScalars":
        return cls(*floats, *ints)

    def runtime(self) -> dict:
        """The forward kernels' runtime scalar arguments, by name."""
        return dict(s=self.s, m=self.m, gamma=self.gamma, m_real=self.m_real, m_fake=self.m_fake, alpha=self.alpha,
                    eps=self.eps, ignore_index=self.ignore_index, bonafide=self.bonafide)

    @property
    def one_class(self) -> bool:
        return self.margin == int(Margin.ONE_CLASS)


def kernel_lam(lam, p: LossParams, x: torch.Tensor, w: torch.Tensor, targets=None) -> Optional[torch.Tensor]:
    """The kernels' LAM tensor: ASoftmax's lambda [1] or 0-dim (fp32); CombinedMargin's in the accumulator dtype: the
    static header (fallback, straight_through, filter threshold, `RowMargin` flags; `arc_margin.ARC_*`) then the
    runtime values s, m1, m2, m3 (and CurricularFace's t) from `lam` [4 or 5, N] (`functional.combined_lam`; p's
    when None), a per-sample value's B entries, a shared one's one, and the hard-negative threshold: with
    `RowMargin.CURRICULAR` each row's cos(theta_y + m2) from its target cosine (`reference.target_cosine`, a
    gathered column per row: `targets` needed), else +inf; None for the other losses."""
    if p.margin == Margin.ANGULAR:  # the kernels read one value: a 0-dim or [1] tensor goes as it is (no view op)
        lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
        return lam if lam.numel() == 1 and lam.dim() <= 1 else lam.reshape(1)
    if p.margin != Margin.COMBINED:
        return None
    acc = dot_dtypes(x, w)[1]
    if lam is None:
        lam = torch.tensor([[p.s], [p.m1], [p.m], [p.m3]], dtype=acc, device=x.device)
    lam = lam.detach().to(device=x.device, dtype=acc)
    values = [lam[k] if p.row_margins & (1 << k) else lam[k, :1] for k in range(4)]
    if p.row_margins & RowMargin.CURRICULAR:
        from ..reference import arc_margin, target_cosine
        n_classes = w.shape[1]
        safe = torch.where((targets >= 0) & (targets < n_classes), targets, 0)
        cos_y = target_cosine(x.detach(), w.detach(), safe).to(acc)[:, None]
        values += [lam[4, :1], arc_margin(cos_y, 1.0, lam[2].view(-1, 1), 0.0)[:, 0]]
    else:
        values += [lam.new_zeros(1), lam.new_full((1,), float("inf"))]
    header = torch.tensor([float(p.fallback), float(p.straight_through), p.filter_threshold, float(p.row_margins)],
                          dtype=acc, device=x.device)
    return torch.cat([header, *values])
