"""CombinedMargin's (ArcFace's) target-cosine maths for the fused kernels, called by `tiles._target_logit` /
`_target_logit_grad`: cos(m1 theta + m2) - m3 with each toolkit's fallback, its derivative, and an acos that runs in
the Triton interpreter. Mirrors `deepfense.reference.arc_margin` (the oracle) and the torch backend's
`_arc_margin_grad`.
"""

import triton
import triton.language as tl

from ..params import ADAFACE_EPS, Fallback, RowMargin

FALLBACK_NONE: tl.constexpr = tl.constexpr(int(Fallback.NONE))
FALLBACK_WESPEAKER: tl.constexpr = tl.constexpr(int(Fallback.WESPEAKER))
FALLBACK_SPEECHBRAIN: tl.constexpr = tl.constexpr(int(Fallback.SPEECHBRAIN))
FALLBACK_PML: tl.constexpr = tl.constexpr(int(Fallback.PML))
FALLBACK_EASY: tl.constexpr = tl.constexpr(int(Fallback.EASY))
FALLBACK_ADAFACE: tl.constexpr = tl.constexpr(int(Fallback.ADAFACE))
ADA_EPS: tl.constexpr = tl.constexpr(ADAFACE_EPS)
# CombinedMargin's LAM tensor (`common.kernel_lam`): a header of static options, then the runtime values s, m1, m2,
# m3, CurricularFace's t and the hard-negative threshold in that order, each one entry, or B entries where
# `RowMargin` (ARC_ROWS) says it is per sample (the threshold: with CURRICULAR; without, one +inf: no hard negative).
# A schedule or a new batch's margins change them without recompiling anything.
ARC_FALLBACK: tl.constexpr = tl.constexpr(0)
ARC_STRAIGHT: tl.constexpr = tl.constexpr(1)
ARC_FILTER: tl.constexpr = tl.constexpr(2)
ARC_ROWS: tl.constexpr = tl.constexpr(3)
ARC_N = 4  # the header's length
ARC_VALUES: tl.constexpr = tl.constexpr(ARC_N)
ROW_S: tl.constexpr = tl.constexpr(int(RowMargin.S))
ROW_M1: tl.constexpr = tl.constexpr(int(RowMargin.M1))
ROW_M2: tl.constexpr = tl.constexpr(int(RowMargin.M2))
ROW_M3: tl.constexpr = tl.constexpr(int(RowMargin.M3))
ROW_CURRICULAR: tl.constexpr = tl.constexpr(int(RowMargin.CURRICULAR))


@triton.jit
def _lam_value(LAM_ptr, off, flags, rows, row_mask, B, BIT: tl.constexpr):
    """One runtime value for each of `rows` (its B entries when BIT is set in flags, else its one entry, read by
    every row) and the offset of the next value."""
    if (flags & BIT) != 0:
        v = tl.load(LAM_ptr + off + rows, mask=row_mask, other=1.0)
        nxt = off + B
    else:  # one scalar load, broadcast
        v = tl.load(LAM_ptr + off) + tl.zeros_like(rows).to(LAM_ptr.dtype.element_ty)
        nxt = off + B * 0 + 1  # the same type as off + B
    return v, nxt


@triton.jit
def _load_arc(LAM_ptr, rows, row_mask, B):
    """CombinedMargin's `lam` of a row block: (LAM, s, m1, m2, m3, t, hard-negative threshold), the values [BLOCK_B]
    each."""
    flags = tl.load(LAM_ptr + ARC_ROWS).to(tl.int32)
    s, off = _lam_value(LAM_ptr, ARC_VALUES, flags, rows, row_mask, B, BIT=ROW_S)
    m1, off = _lam_value(LAM_ptr, off, flags, rows, row_mask, B, BIT=ROW_M1)
    m2, off = _lam_value(LAM_ptr, off, flags, rows, row_mask, B, BIT=ROW_M2)
    m3, off = _lam_value(LAM_ptr, off, flags, rows, row_mask, B, BIT=ROW_M3)
    t, off = _lam_value(LAM_ptr, off, flags, rows, row_mask, B, BIT=0)
    hard, off = _lam_value(LAM_ptr, off, flags, rows, row_mask, B, BIT=ROW_CURRICULAR)
    return LAM_ptr, s, m1, m2, m3, t, hard


@triton.jit
def _sincos(a):
    """(sin a, cos a) for |a| up to ~1e4 (the angles here are at most m1 pi + m2), without libdevice: its sinf/cosf
    keep a local-memory frame for the Payne-Hanek reduction of huge arguments, which compile_check counts as a spill
    (4 B in the bf16 small-head ArcFace forward on sm_90). a = q pi/2 + r with |r| <= pi/4, then Taylor polynomials to
    r^17 / r^18 (truncation below 1e-18, so fp64 keeps its accuracy too) and q's quadrant. NaN and Inf give NaN."""
    q = tl.floor(a * 0.6366197723675814 + 0.5)
    # pi/2 in three parts (Cody-Waite; Cephes' split): q times each of the first two is exact in fp32 for these q
    r = ((a - q * 1.5703125) - q * 4.837512969970703125e-4) - q * 7.549789954891882e-08
    z = r * r
    sin = r + r * z * (-1.6666666666666666e-01 + z * (8.3333333333333332e-03 + z * (-1.9841269841269841e-04 + z * (
        2.7557319223985893e-06 + z * (-2.5052108385441720e-08 + z * (1.6059043836821613e-10 + z * (
            -7.6471637318198164e-13 + z * 2.8114572543455206e-15)))))))
    cos = 1.0 + z * (-0.5 + z * (4.1666666666666664e-02 + z * (-1.3888888888888889e-03 + z * (
        2.4801587301587302e-05 + z * (-2.7557319223985888e-07 + z * (2.0876756987868100e-09 + z * (
            -1.1470745597729725e-11 + z * 4.7794773323873853e-14)))))))
    quad = (q - 4.0 * tl.floor(q * 0.25)).to(tl.int32)  # q mod 4 (0 for NaN rows too, whose sin and cos are NaN)
    s_out = tl.where(quad == 0, sin, tl.where(quad == 1, cos, tl.where(quad == 2, -sin, -cos)))
    c_out = tl.where(quad == 0, cos, tl.where(quad == 1, -sin, tl.where(quad == 2, -cos, sin)))
    return s_out, c_out


@triton.jit
def _acos(c):
    """acos(c), c in [-1, 1], from asin on |t| <= 1/2 (no libdevice: the interpreter has none): Cephes' asinf
    polynomial, then one Newton step on sin(y) = t (|y| <= pi/6, so cos y > 0.86) for fp64 accuracy."""
    big = tl.abs(c) > 0.5
    t = tl.where(big, tl.sqrt(tl.maximum((1.0 - tl.abs(c)) * 0.5, 0.0)), c)
    z = t * t
    y = ((((4.2163199048e-2 * z + 2.4181311049e-2) * z + 4.5470025998e-2) * z + 7.4953002686e-2) * z
         + 1.6666752422e-1) * z * t + t
    sin_y, cos_y = _sincos(y)
    y = y - (sin_y - t) / cos_y
    return tl.where(big, tl.where(c > 0, 2.0 * y, 3.141592653589793 - 2.0 * y), 1.5707963267948966 - y)


@triton.jit
def _arc_margin(cos, lam):
    """CombinedMargin's target cosine cos(m1 theta + m2) - m3 with the toolkit fallback past the monotone range, and
    its derivative in cos (`deepfense.reference.arc_margin`); lam from `_load_arc`, cos and its values [BLOCK_B]."""
    m1 = lam[2].to(cos.dtype)
    m2 = lam[3].to(cos.dtype)
    fb = tl.load(lam[0] + ARC_FALLBACK).to(tl.int32)
    c = tl.where(fb == FALLBACK_SPEECHBRAIN, tl.minimum(tl.maximum(cos, -1.0 + 1e-7), 1.0 - 1e-7), cos)
    c = tl.where(fb == FALLBACK_ADAFACE, tl.minimum(tl.maximum(c, -1.0 + ADA_EPS), 1.0 - ADA_EPS), c)
    sin = tl.sqrt(tl.maximum((1.0 - c) * (1.0 + c), 0.0))  # 1 - c^2 loses digits near |c| = 1
    rsin = tl.where(sin > 0, 1.0 / tl.where(sin > 0, sin, 1.0), 0.0)  # at cos = +-1, dcos/dx = 0: any finite value
    sm, cm = _sincos(m2)
    angle = m1 * _acos(c) + m2
    # AdaFace clips the angle: cos(clip(angle)), no gradient where the clip binds
    ada = fb == FALLBACK_ADAFACE
    s_ang, c_ang = _sincos(tl.where(ada, tl.minimum(tl.maximum(angle, ADA_EPS), 3.141592653589793 - ADA_EPS), angle))
    # m1 = 1: c cos m2 - sin sin m2, d/dc = cos m2 + sin m2 c / sin; else d cos(m1 theta + m2)/dc = m1 sin(.) / sin
    identity = (m1 == 1.0) & ~ada
    phi = tl.where(identity, c * cm - sin * sm, c_ang)
    dphi = tl.where(identity, cm + sm * c * rsin, m1 * s_ang * rsin)
    dphi = tl.where(ada & ((angle < ADA_EPS) | (angle > 3.141592653589793 - ADA_EPS)), 0.0, dphi)
    _, th = _sincos(tl.minimum(tl.maximum((3.141592653589793 - m2) / m1, 0.0), 3.141592653589793))
    # WeSpeaker cos - (1 + cos(pi - m2)); SpeechBrain cos - m2 sin(pi - m2) and pml cos - m2 sin m2 are the same
    shift = tl.where(fb == FALLBACK_WESPEAKER, 1.0 - cm, m2 * sm)
    # pml keeps the margin at theta = pi - m exactly (its angle <= pi - m); WeSpeaker and SpeechBrain switch there
    past = tl.where(fb == FALLBACK_EASY, c <= 0.0,
                    (fb != FALLBACK_NONE) & ~ada & tl.where(fb == FALLBACK_PML, c < th, c <= th))
    phi = tl.where(past, tl.where(fb == FALLBACK_EASY, c, c - shift), phi)
    dphi = tl.where(past, 1.0, dphi)  # the fallbacks are cos - const
    # SpeechBrain's and AdaFace's clamps pass no gradient where they bind
    inside = tl.where(fb == FALLBACK_SPEECHBRAIN, (cos >= -1.0 + 1e-7) & (cos <= 1.0 - 1e-7),
                      ~ada | ((cos >= -1.0 + ADA_EPS) & (cos <= 1.0 - ADA_EPS)))
    return phi - lam[4].to(cos.dtype), tl.where(inside, dphi, 0.0)
