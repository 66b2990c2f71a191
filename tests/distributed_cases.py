"""The disagreement cases of tests/test_distributed_agreement.py, run by every rank of one 2-rank gloo group.

Each case takes (rank, backend), calls the sharded loss with inputs that differ by rank as the case says, and returns
(or raises) what that rank saw; EXPECT holds, per case, the (outcome, message fragment) every rank must report, or a
{rank: (outcome, fragment)} where the ranks' messages differ. Cases that must compute check their numbers themselves
(an AssertionError is then the outcome the test reports).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from deepfense import functional as F
from deepfense.distributed import class_slice, set_step
from deepfense.params import LossParams, Margin

# the fused kernels take these CPU tensors only in the Triton interpreter (tests/conftest.py sets it unless the tests
# run on CUDA, where tests/test_distributed.py's NCCL test covers the compiled kernels)
TORCH = ("torch",)
BOTH = TORCH + (("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ())
ROWS, N_CLASSES = 3, 8


def _inputs(rank, *, dim=6, dtype=torch.float64, n_classes=N_CLASSES, seed=0, rows=ROWS):
    """This rank's rows of one global batch and its class slice (leaves with gradients)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * rows, dim, generator=g, dtype=torch.float64)
    w = torch.randn(dim, n_classes, generator=g, dtype=torch.float64)
    t = torch.randint(0, n_classes, (2 * rows,), generator=g)
    c0, c1 = class_slice(n_classes, 2, rank)
    mine = slice(rank * rows, (rank + 1) * rows)
    return (x[mine].to(dtype).requires_grad_(), w[:, c0:c1].to(dtype).requires_grad_(), t[mine].clone(),
            (x, w, t))


def _am(x, w, t, backend, **kw):
    kw.setdefault("m", 0.35)
    kw.setdefault("s", 16.0)
    return F.am_softmax_loss(x, w, t, process_group=dist.group.WORLD, backend=backend, **kw)


def _differ(option, value0, value1):
    """A case in which rank 1 passes another `option` than rank 0."""
    def case(rank, backend):
        x, w, t, _ = _inputs(rank)
        _am(x, w, t, backend, **{option: value0 if rank == 0 else value1})
    return case


def _runtime_margin(kind):
    """Rank 1's runtime scalar differs: ASoftmax's lambda (its annealing step), ArcFace's tensor margin."""
    def case(rank, backend):
        x, w, t, _ = _inputs(rank)
        value = torch.tensor((3.0, 0.4)[kind == "ArcFace"] + rank, dtype=torch.float64)
        kw = dict(process_group=dist.group.WORLD, backend=backend)
        if kind == "ArcFace":
            F.arcface_loss(x, w, t, m=value, s=16.0, **kw)
        else:
            F.a_softmax_loss(x, w, t, m=4, lam=value, **kw)
    return case


def _dim(rank, backend):
    x, w, t, _ = _inputs(rank, dim=6 if rank == 0 else 5)
    _am(x, w, t, backend)


def _dtype(low):
    def case(rank, backend):
        x, w, t, _ = _inputs(rank, dtype=torch.float32 if rank == 0 else low)
        _am(x, w, t, backend)
    return case


def _class_weights(rank, backend):
    x, w, t, _ = _inputs(rank)
    cw = torch.ones(N_CLASSES, dtype=torch.float64)
    cw[3] += rank  # rank 1 weighs class 3 twice
    _am(x, w, t, backend, class_weights=cw)


def _declared_heads(rank, backend):
    """Heads built for 7 and 9 classes hold 4 columns each (rank 0 of 7, rank 1 of 9): the slices add up to 8."""
    from deepfense.losses import AMSoftmax
    torch.manual_seed(rank)
    head = AMSoftmax(6, 7 if rank == 0 else 9, backend=backend, process_group=dist.group.WORLD).double()
    x, _, t, _ = _inputs(rank)
    head(x, t)


def _declared_call(rank, backend):
    """Both ranks declare 9 classes to the functional path, but their slices (4 columns each) add up to 8."""
    from deepfense.distributed import sharded_margin_loss
    x, w, t, _ = _inputs(rank)
    p = LossParams(Margin.ADDITIVE, s=16.0, m=0.35)
    sharded_margin_loss(x, w, None, t, None, None, p, dist.group.WORLD, backend=backend, n_classes=9)


def _negative_targets(rank, backend):
    """Every kept target of rank 1 is negative (and not ignore_index)."""
    x, w, t, _ = _inputs(rank)
    _am(x, w, t if rank == 0 else torch.full_like(t, -5), backend, validate=True)


def _unowned(validate):
    """Rank 0's first target is 9 (of 8 classes): no rank holds it."""
    def case(rank, backend):
        x, w, t, _ = _inputs(rank)
        if rank == 0:
            t[0] = 9
        out = {}
        for reduction in ("mean", "none"):
            x.grad = w.grad = None
            loss = _am(x, w, t, backend, reduction=reduction, validate=validate)
            loss.sum().backward()
            out[reduction] = dict(loss_nan=loss.isnan().reshape(-1).tolist(), dw_nan=bool(w.grad.isnan().all()),
                                  dx_nan_rows=x.grad.isnan().any(1).tolist())
            # as one process: the loss (its row with 'none') and the row's dX are NaN, and every dW column (the row
            # reaches all of them); the other rows' dX stay finite
            own_row = [rank == 0, False, False]
            assert out[reduction]["loss_nan"] == ([True] if reduction == "mean" else own_row), out
            assert out[reduction]["dw_nan"] and out[reduction]["dx_nan_rows"] == own_row, out
        return out
    return case


def _not_finite(what, reduction):
    """Rank 1's embeddings (or weight) hold a NaN."""
    def case(rank, backend):
        x, w, t, _ = _inputs(rank)
        if rank == 1:
            with torch.no_grad():
                (x if what == "x" else w)[1, 2] = float("nan")
        _am(x, w, t, backend, reduction=reduction, validate=True)
    return case


def _short_targets(rank, backend):
    x, w, t, _ = _inputs(rank)
    _am(x, w, t[:2] if rank == 1 else t, backend)


def _catch_and_continue(rank, backend):
    """Step 1 fails on rank 1 only (targets of the wrong length); both ranks catch and go on: steps 0 and 2 must
    still be the exact loss of the two ranks' batches of the same step."""
    got = []
    for step in range(3):
        x, w, t, (xa, wa, ta) = _inputs(rank, seed=step)
        try:
            loss = _am(x, w, t[:2] if (step == 1 and rank == 1) else t, backend)
        except ValueError as exc:
            got.append(str(exc)[:40])
            continue
        gold = F.am_softmax_loss(xa, wa, ta, m=0.35, s=16.0, backend="reference")
        torch.testing.assert_close(loss.double(), gold, rtol=1e-6, atol=1e-9)
        got.append(round(loss.item(), 6))
    assert isinstance(got[1], str) and not isinstance(got[2], str), got
    return dict(steps=got)


def _skipped_call(rank, backend):
    """Rank 1 raises before the loss at step 1, is caught, and calls the loss for step 2 while rank 0 calls it for
    step 1: the declared steps disagree on both ranks."""
    try:
        for step in (0, 1):
            if rank == 1 and step == 1:
                step = 2  # step 1 failed before the loss on this rank
            set_step(step)
            x, w, t, _ = _inputs(rank, seed=step)
            _am(x, w, t, backend)
    finally:
        set_step(None)  # the later cases declare no step


def _stray_collective(rank, backend):
    """Rank 1 runs a collective of its own while rank 0 calls the loss: rank 0 reads it as junk; the next call finds
    the call counts apart on both ranks."""
    from deepfense.distributed_checks import RECORD
    x, w, t, _ = _inputs(rank)
    if rank == 1:
        parts = [torch.empty(len(RECORD), dtype=torch.int64) for _ in range(2)]
        dist.all_gather(parts, torch.zeros(len(RECORD), dtype=torch.int64))
    else:
        try:
            _am(x, w, t, backend)
        except ValueError as exc:
            assert "sent no loss record" in str(exc), exc
    _am(x, w, t, backend)


def _ddp_head(rank, backend):
    """An evenly split head inside DDP: DDP copies rank 0's slice over rank 1's."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from deepfense.losses import AMSoftmax
    torch.manual_seed(rank)  # different slices before DDP
    head = DDP(AMSoftmax(6, N_CLASSES, backend=backend, process_group=dist.group.WORLD).double())
    x, _, t, _ = _inputs(rank)
    try:
        head(x, t)
    finally:
        del head


def _zero_class_rank(rank, backend):
    from deepfense.losses import AMSoftmax
    AMSoftmax(6, 1, backend=backend, process_group=dist.group.WORLD)


def _consistent_counts(rank, backend):
    """The agreement adds no collective and no host sync: a forward made three all-gathers, two all-reduces and one
    host sync (four tensor reads with the value checks: the record, the targets' min and max, the loss) before it
    existed; now the same collectives and one read (two with the checks: the targets' range rides in the record).
    Backward's are unchanged. Host syncs are counted as tensor reads (item, tolist, bool, int, float)."""
    counts = {}

    def counting(owner, name, key):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counts[key] = counts.get(key, 0) + 1
            return real(*args, **kwargs)
        setattr(owner, name, wrapper)
        return real

    saved = [(dist, n, counting(dist, n, n)) for n in ("all_gather", "all_reduce", "reduce_scatter")]
    saved += [(torch.Tensor, n, counting(torch.Tensor, n, "host sync")) for n in ("item", "tolist", "__bool__",
                                                                                 "__int__", "__float__")]
    seen = {}
    try:
        for validate in (False, True):
            x, w, t, _ = _inputs(rank, seed=5)
            counts.clear()
            loss = _am(x, w, t, backend, validate=validate)
            seen[f"forward, validate={validate}"] = dict(counts)
            counts.clear()
            loss.backward()
            seen[f"backward, validate={validate}"] = dict(counts)
    finally:
        for owner, name, real in saved:
            setattr(owner, name, real)
    forward = {"all_gather": 3, "all_reduce": 2}
    assert seen == {"forward, validate=False": {**forward, "host sync": 1},
                    "backward, validate=False": {"reduce_scatter": 1},
                    "forward, validate=True": {**forward, "host sync": 2},
                    "backward, validate=True": {"reduce_scatter": 1}}, seen
    return seen


CASES = {  # name: (case, backends)
    "embedding dim 6 vs 5": (_dim, BOTH),
    "fp32 vs fp64": (_dtype(torch.float64), BOTH),
    "fp32 vs bf16": (_dtype(torch.bfloat16), BOTH),
    "label smoothing 0 vs 0.1": (_differ("label_smoothing", 0.0, 0.1), BOTH),
    "m 0.35 vs 0.2": (_differ("m", 0.35, 0.2), BOTH),
    "s 16 vs 30": (_differ("s", 16.0, 30.0), BOTH),
    "ASoftmax lambda 3 vs 4": (_runtime_margin("ASoftmax"), BOTH),
    "ArcFace tensor m 0.4 vs 1.4": (_runtime_margin("ArcFace"), BOTH),
    "class weights differ": (_class_weights, BOTH),
    "reduction mean vs sum": (_differ("reduction", "mean", "sum"), BOTH),
    "reduction mean vs none": (_differ("reduction", "mean", "none"), BOTH),
    "ignore_index -100 vs -1": (_differ("ignore_index", -100, -1), BOTH),
    "heads for n_classes 7 vs 9": (_declared_heads, BOTH),
    "n_classes 9 declared, slices of 8": (_declared_call, TORCH),
    "unowned target, checks off": (_unowned(False), BOTH),
    "unowned target, checks on": (_unowned(True), BOTH),
    "negative targets on rank 1, checks on": (_negative_targets, TORCH),
    "NaN embeddings on rank 1, none": (_not_finite("x", "none"), BOTH),
    "NaN embeddings on rank 1, mean": (_not_finite("x", "mean"), BOTH),
    "NaN weight on rank 1, mean": (_not_finite("w", "mean"), BOTH),
    "targets 2 != batch 3 on rank 1": (_short_targets, BOTH),
    "catch and continue": (_catch_and_continue, BOTH),
    "call skipped on rank 1 (set_step)": (_skipped_call, BOTH),
    "stray collective on rank 1": (_stray_collective, TORCH),
    "sharded head inside DDP": (_ddp_head, TORCH),
    "1 class over 2 ranks": (_zero_class_rank, TORCH),
    "collectives and host syncs": (_consistent_counts, BOTH),
}

EXPECT = {
    "embedding dim 6 vs 5": ("ValueError", "ranks disagree on embedding_dim: rank 0 has 6; rank 1 has 5"),
    "fp32 vs fp64": ("ValueError", "embeddings dtype: rank 0 has torch.float32; rank 1 has torch.float64"),
    "fp32 vs bf16": ("ValueError", "embeddings dtype: rank 0 has torch.float32; rank 1 has torch.bfloat16"),
    "label smoothing 0 vs 0.1": ("ValueError", "ranks disagree on label_smoothing: rank 0 has 0.0; rank 1 has 0.1"),
    "m 0.35 vs 0.2": ("ValueError", "ranks disagree on m: rank 0 has 0.35; rank 1 has 0.2"),
    "s 16 vs 30": ("ValueError", "ranks disagree on s: rank 0 has 16.0; rank 1 has 30.0"),
    "ASoftmax lambda 3 vs 4": ("ValueError", "ranks disagree on runtime margins (ASoftmax lambda; ArcFace's tensor s, "
                                              "m, m3): rank 0 has (3.0, 0.0, 0.0); rank 1 has (4.0, 0.0, 0.0)"),
    "ArcFace tensor m 0.4 vs 1.4": ("ValueError", "rank 0 has (16.0, 0.4, 0.0); rank 1 has (16.0, 1.4, 0.0)"),
    "class weights differ": ("ValueError", "ranks disagree on class_weights (checksum)"),
    "reduction mean vs sum": ("ValueError", "reduction: rank 0 has 'mean'; rank 1 has 'sum'"),
    "reduction mean vs none": ("ValueError", "reduction: rank 0 has 'mean'; rank 1 has 'none'"),
    "ignore_index -100 vs -1": ("ValueError", "ignore_index: rank 0 has -100; rank 1 has -1"),
    "heads for n_classes 7 vs 9": ("ValueError", "ranks disagree on declared n_classes: rank 0 has 7; rank 1 has 9"),
    "n_classes 9 declared, slices of 8": ("ValueError", "slices add up to 8 classes, but on rank 0 its head was built "
                                                        "for 9"),
    "unowned target, checks off": ("ok", '"dw_nan": true'),
    "unowned target, checks on": ("ValueError", "target 9 on rank 0 is out of range"),
    "negative targets on rank 1, checks on": ("ValueError", "target -5 on rank 1 is out of range"),
    "NaN embeddings on rank 1, none": ("ValueError", "NaN or Inf values in the embeddings on rank 1"),
    "NaN embeddings on rank 1, mean": ("ValueError", "NaN or Inf values in the embeddings on rank 1"),
    "NaN weight on rank 1, mean": ("ValueError", "NaN or Inf values in the weight on rank 1"),
    "targets 2 != batch 3 on rank 1": {0: ("ValueError", "rank 1 rejected its inputs"),
                                       1: ("ValueError", "batch size mismatch: embeddings have 3 rows, targets 2")},
    "catch and continue": ("ok", '"steps"'),
    "call skipped on rank 1 (set_step)": ("ValueError", "declared steps (set_step): rank 0 has 1; rank 1 has 2"),
    "stray collective on rank 1": ("ValueError", "sharded loss calls made: rank 0 has"),
    "sharded head inside DDP": ("ValueError", "every rank holds the same weight slice"),
    "1 class over 2 ranks": ("ValueError", "1 classes cannot be split over 2 ranks"),
    "collectives and host syncs": ("ok", "forward"),
}
