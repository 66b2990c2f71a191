"""What the benchmark measures: the losses, the shapes (default sweeps) and the counted bytes and FLOPs.

Shared by `python -m deepfense bench`, `python -m deepfense check` and the pytest-benchmark suites in `bench/`, so the
CLI and the suites build identical inputs.

Counting (stated once, used for every provider; it is the *minimal* work of one fused training step, so the achieved
rate is a lower bound on what the hardware did and a fair yardstick across implementations):
    bytes = read x [B, D] + read W [D, C] + write dX [B, D] + write dW [D, C]  (all in the case's dtype)
            + read targets (8 B each, int64)
          = 2 * (B*D + D*C) * itemsize + 8 * B
    FLOPs = 6 * B * C * D: three matmuls of 2*B*C*D each (logits, dX = G @ W^T, dW = X^T @ G). A backward that
            recomputes the logits does a fourth matmul; it is not credited (like model FLOPs vs hardware FLOPs).
            Norms, margins and the softmax are O(B*C + (B+C)*D) element-wise work and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import functional, reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass(frozen=True)
class LossSpec:
    """One loss as the benchmark sees it.

    Attributes:
        name: registry name (`AMSoftmax`, ...). functional: the `deepfense.functional` function.
        ref: the plain-PyTorch reference (`deepfense.reference`), the eager baseline and the float64 oracle.
        options: loss options used in every case (the modules' defaults).
        weight_cd: True when the weight is [C, D] (CrossEntropy's fc.weight), else [D, C].
    """

    name: str
    functional: object
    ref: object
    options: dict = field(default_factory=dict)
    weight_cd: bool = False


LOSSES = {
    "AMSoftmax": LossSpec("AMSoftmax", functional.am_softmax_loss, reference.am_softmax_ref, {"m": 0.3, "s": 30.0}),
    "ASoftmax": LossSpec("ASoftmax", functional.a_softmax_loss, reference.a_softmax_ref,
                         {"m": 4, "lam": 5.0, "gamma": 0.5}),
    "OCSoftmax": LossSpec("OCSoftmax", functional.oc_softmax_loss, reference.oc_softmax_ref,
                          {"m_real": 0.5, "m_fake": 0.2, "alpha": 20.0}),
    "CrossEntropy": LossSpec("CrossEntropy", functional.cross_entropy_loss, reference.cross_entropy_ref, {},
                             weight_cd=True),
    "ArcFace": LossSpec("ArcFace", functional.arcface_loss, reference.arcface_ref,
                        {"m": 0.2, "s": 32.0, "fallback": "wespeaker"}),
}


@dataclass(frozen=True)
class Case:
    """One benchmark shape. `anchor` cases also get torch.compile (compiling every shape takes too long)."""

    loss: str
    B: int
    D: int
    C: int
    dtype: str = "fp32"
    family: str = ""
    anchor: bool = False

    @property
    def label(self) -> str:
        return f"{self.loss} B={self.B} D={self.D} C={self.C} {self.dtype}"

    @property
    def key(self) -> tuple:
        return (self.loss, self.B, self.D, self.C, self.dtype)


def traffic(case: Case) -> tuple[int, int]:
    """(bytes, FLOPs) of one fused forward+backward, counted as in the module docstring."""
    item = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    return 2 * (case.B * case.D + case.D * case.C) * item + 8 * case.B, 6 * case.B * case.C * case.D


def _classes(loss: str, c: int) -> int:
    return 1 if loss == "OCSoftmax" else c


def _expand(losses, shapes, dtypes, family, anchors=()):
    out = []
    for dtype in dtypes:
        for loss in losses:
            for b, d, c in shapes:
                c = _classes(loss, c)
                out.append(Case(loss, b, d, c, dtype, family, anchor=(loss, b, d, c) in anchors))
    return out


ALL = tuple(LOSSES)
MULTI = ("AMSoftmax", "ASoftmax", "CrossEntropy")  # losses that make sense with many classes
# The shapes of the CPU table in docs/benchmark.md: the torch backend's fwd+bwd against eager autograd and
# torch.compile.
REFERENCE_SHAPES = (("AMSoftmax", 256, 192, 2), ("AMSoftmax", 4096, 192, 2), ("AMSoftmax", 128, 192, 5994),
                    ("OCSoftmax", 4096, 192, 1))


# ArcFace: the ECAPA-TDNN speaker heads (VoxCeleb2, and with speed perturbation) and a face head.
ARCFACE_SPEAKER = ((256, 192, 5994), (128, 192, 17982))
ARCFACE_FACE = {"cuda": (1024, 512, 93431), "cpu": (128, 512, 93431)}


def arcface_cases(device: str, dtypes) -> list[Case]:
    """ArcFace at the speaker shapes and one face shape (a smaller batch on CPU), all anchors (compiled too)."""
    face = ARCFACE_FACE["cuda" if device == "cuda" else "cpu"]
    return (_expand(["ArcFace"], ARCFACE_SPEAKER, dtypes, "speaker", {("ArcFace", *s) for s in ARCFACE_SPEAKER})
            + _expand(["ArcFace"], [face], dtypes, "face", {("ArcFace", *face)}))


# The representative subset `bench` runs by default (about a minute on 2 busy CPU cores): every loss at a deepfake
# head of two batch sizes (time against B), and AMSoftmax at a speaker head (time against C at B = 256).
SUBSET_FAKE = ((256, 192, 2), (4096, 192, 2))
SUBSET_SPEAKER = (256, 192, 5994)


def default_cases(device: str, quick: bool = False, dtypes=None) -> list[Case]:
    """The sweep `bench` runs: the representative subset when `quick` (the CLI's default), else the full sweep:
    deepfake (C=2, OC C=1), speaker (C=5994/17982) and, on GPU, face heads (C up to 1e6)."""
    if quick:
        dt = dtypes or (["bf16"] if device == "cuda" else ["fp32"])
        return (_expand(ALL, SUBSET_FAKE, dt, "deepfake", anchors=set(REFERENCE_SHAPES))
                + _expand(["AMSoftmax"], [SUBSET_SPEAKER], dt, "speaker"))
    if device == "cuda":
        # bf16 everywhere (the kernels' main target); fp32 on the reference shapes; torch.compile on
        # bf16 anchors only (each compile costs 10-30 s of the GPU check's 8 minutes).
        dt = dtypes or ["bf16"]
        fake = [(b, 192, 2) for b in (32, 256, 4096, 65536)] + [(65536, 160, 2), (65536, 1024, 2)]
        fake_anchor = set(REFERENCE_SHAPES) | {(n, 65536, 1024, _classes(n, 2)) for n in ALL}
        speaker = [(128, 192, 5994), (256, 192, 5994), (512, 192, 5994), (128, 192, 17982), (256, 192, 17982),
                   (256, 256, 5994),
                   (256, 256, 17982)]
        face = [(1024, 512, c) for c in (93431, 360232, 1_000_000)]
        fp32 = [] if dtypes else [Case(n, b, d, c, "fp32", "reference") for n, b, d, c in REFERENCE_SHAPES]
        return (_expand(ALL, fake, dt, "deepfake", fake_anchor)
                + _expand(MULTI, speaker, dt, "speaker", set(REFERENCE_SHAPES) | {(n, 256, 192, 5994) for n in MULTI})
                + _expand(MULTI, face, dt, "face") + fp32 + arcface_cases(device, dt))
    dt = dtypes or ["fp32"]
    fake = [(b, 192, 2) for b in (32, 256, 1024, 4096)] + [(1024, 160, 2), (1024, 1024, 2)]
    speaker = [(128, 192, 5994), (256, 192, 5994), (256, 192, 17982)]
    return (_expand(ALL, fake, dt, "deepfake", set(REFERENCE_SHAPES))
            + _expand(MULTI, speaker, dt, "speaker", set(REFERENCE_SHAPES)) + arcface_cases(device, dt))


def custom_cases(losses, shapes, dtypes) -> list[Case]:
    """Cases from explicit lists; every one is an anchor (torch.compile runs unless switched off)."""
    anchors = {(n, b, d, _classes(n, c)) for n in losses for b, d, c in shapes}
    return _expand(losses, shapes, dtypes, "custom", anchors)


def make_inputs(case: Case, device, copies: int = 1, seed: int = 0, requires_grad: bool = True):
    """`copies` independent (x [B, D], weight, targets [B]) triples for `case`; the weight is [C, D] for
    CrossEntropy and [D, C] otherwise. Leaves require grad; values are seeded, the same on every run."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    spec, dtype = LOSSES[case.loss], DTYPES[case.dtype]
    n_targets = 2 if case.loss == "OCSoftmax" else case.C
    x0 = torch.randn(case.B, case.D, generator=gen).to(device=device, dtype=dtype)
    wshape = (case.C, case.D) if spec.weight_cd else (case.D, case.C)
    w0 = (torch.randn(wshape, generator=gen) * (case.D ** -0.5 if spec.weight_cd else 1.0)).to(device, dtype)
    t0 = torch.randint(0, n_targets, (case.B,), generator=gen).to(device)
    out = []
    for i in range(copies):
        x, w = (x0, w0) if i == 0 else (x0.clone(), w0.clone())
        out.append((x.detach().requires_grad_(requires_grad), w.detach().requires_grad_(requires_grad),
                    t0 if i == 0 else t0.clone()))
    return out
