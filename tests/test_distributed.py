"""Class-parallel losses (deepfense.distributed) against the single-process float64 reference.

Each test spawns its ranks once (gloo on CPU; a spawn costs seconds, so one spawn runs many cases) and every rank
checks its own slices: the loss, its rows of dX and its columns of dW / bias must equal the reference on the
concatenated batch with the full weight matrix within 1e-10 relative.
"""

from __future__ import annotations

import datetime
import gc
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deepfense import functional as F
from deepfense.distributed import class_slice, sharded_margin_loss, sum_comm_hook
from deepfense.params import LossParams, Margin

KINDS = ("AMSoftmax", "ASoftmax", "CrossEntropy")
TORCH_KINDS = KINDS + ("ArcFace",)  # ArcFace with a runtime-tensor margin
IGNORE = -100


def _close(actual, expected, what, rtol=1e-10):
    atol = rtol * max(expected.abs().max().item(), 1e-300) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _loss(kind, x, w, t, bias, **kw):
    """One functional call: w is [D, C] (CrossEntropy: [C, D] with bias)."""
    if kind == "AMSoftmax":
        return F.am_softmax_loss(x, w, t, m=0.35, s=16.0, **kw)
    if kind == "ArcFace":
        return F.arcface_loss(x, w, t, m=torch.tensor(0.4, dtype=torch.float64), s=16.0, fallback="wespeaker", **kw)
    if kind == "ASoftmax":
        kw.pop("label_smoothing", None)
        return F.a_softmax_loss(x, w, t, m=4, lam=torch.tensor(3.0, dtype=torch.float64), gamma=0.5, **kw)
    return F.cross_entropy_loss(x, w, t, bias=bias, **kw)


def _data(kind, sizes, n_classes, dim, *, weighted, ignored, seed=0, device="cpu", sub=1):
    """The global batch (same on every rank): x [N, D], targets [N], weight ([D, C * sub] with sub-centres), bias,
    class weights, upstream grads."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if n > 2:
        x[2] = 0.0  # a zero-norm row normalises to zero
    t = torch.randint(0, n_classes, (n,), generator=g)
    t[list(ignored)] = IGNORE
    shape = (n_classes, dim) if kind == "CrossEntropy" else (dim, n_classes * sub)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    bias = torch.randn(n_classes, generator=g, dtype=torch.float64) if kind == "CrossEntropy" else None
    cw = torch.rand(n_classes, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    up = torch.rand(n, generator=g, dtype=torch.float64) + 0.5  # non-unit upstream gradient for reduction='none'
    return [None if a is None else a.to(device) for a in (x, t, w, bias, cw, up)]


def _check_exact(rank, world, device, kind, sizes, n_classes, *, reduction="mean", smoothing=0.0, weighted=False,
                 ignored=(), dim=6, backend="auto", rtol=1e-10, sub=1, extra=None):
    x, t, w, bias, cw, up = _data(kind, sizes, n_classes, dim, weighted=weighted, ignored=ignored, device=device,
                                  sub=sub)
    kw = dict(class_weights=cw, reduction=reduction, label_smoothing=smoothing, ignore_index=IGNORE)
    if sub > 1:
        kw["sub_centers"] = sub
    kw.update(extra or {})
    leaves = [a.clone().requires_grad_() for a in (x, w, bias) if a is not None]
    gold = _loss(kind, leaves[0], leaves[1], t, leaves[2] if bias is not None else None, backend="reference", **kw)
    (gold * up).sum().backward() if reduction == "none" else (0.7 * gold).backward()

    r0, r1 = sum(sizes[:rank]), sum(sizes[: rank + 1])
    c0, c1 = class_slice(n_classes, world, rank)
    w_loc = (w[c0:c1] if kind == "CrossEntropy" else w[:, c0 * sub:c1 * sub]).clone().requires_grad_()
    b_loc = bias[c0:c1].clone().requires_grad_() if bias is not None else None
    x_loc = x[r0:r1].clone().requires_grad_()
    loss = _loss(kind, x_loc, w_loc, t[r0:r1], b_loc, process_group=dist.group.WORLD, backend=backend, **kw)
    (loss * up[r0:r1]).sum().backward() if reduction == "none" else (0.7 * loss).backward()

    case = f"{kind} rank {rank} sizes {sizes} C {n_classes} K {sub} {reduction} eps {smoothing} weighted {weighted}"
    _close(loss, gold[r0:r1] if reduction == "none" else gold, f"loss, {case}", rtol)
    _close(x_loc.grad, leaves[0].grad[r0:r1], f"dX, {case}", rtol)
    dw = leaves[1].grad[c0:c1] if kind == "CrossEntropy" else leaves[1].grad[:, c0 * sub:c1 * sub]
    _close(w_loc.grad, dw, f"dW, {case}", rtol)
    if bias is not None:
        _close(b_loc.grad, leaves[2].grad[c0:c1], f"db, {case}", rtol)


def _exact_cases(rank, world, device):
    uneven = (5, 3, 4)[:world]
    for kind in TORCH_KINDS:
        for reduction in ("mean", "sum", "none"):
            # uneven batches, ignored rows, class weights, label smoothing (not defined for ASoftmax)
            _check_exact(rank, world, device, kind, uneven, 7, reduction=reduction, weighted=True, ignored=(1, 6),
                         smoothing=0.0 if kind == "ASoftmax" else 0.1)
        _check_exact(rank, world, device, kind, (4,) * world, 2 * world + 1)  # plain options, equal batches
        _check_exact(rank, world, device, kind, (3,) + (0,) * (world - 1), world)  # empty ranks; one class per rank
        _check_exact(rank, world, device, kind, (2,) * world, 5, weighted=True,  # every row ignored: mean is 0
                     ignored=range(2 * world))
    for kind, sub in (("ArcFace", 3), ("AMSoftmax", 2)):  # sub-centres: each rank holds its classes' K columns
        _check_exact(rank, world, device, kind, (5, 3, 4)[:world], 7, reduction="none", weighted=True, ignored=(1,),
                     smoothing=0.1, sub=sub)
    for sub in (1, 2):  # insightface's interclass filtering: some non-target cosines of D = 6 rows exceed 0.3
        _check_exact(rank, world, device, "ArcFace", (5, 3, 4)[:world], 7, weighted=True, ignored=(1,), sub=sub,
                     extra=dict(interclass_filtering_threshold=0.3))


def _kernel_cases(rank, world, device):
    """Each rank's share on the fused kernels (the Triton interpreter here, compiled kernels on CUDA). The kernels take
    s, m and eps as fp32 scalars, hence 1e-6 rather than 1e-10; 40 classes span several 16-wide class tiles."""
    for kind in TORCH_KINDS:
        for reduction in ("mean", "none"):
            _check_exact(rank, world, device, kind, (5, 3, 4)[:world], 40, reduction=reduction, weighted=True,
                         ignored=(1, 6), smoothing=0.0 if kind == "ASoftmax" else 0.1, backend="triton", rtol=1e-6)
    _check_exact(rank, world, device, "ArcFace", (5, 3, 4)[:world], 40, reduction="mean", weighted=True,
                 ignored=(1,), smoothing=0.1, backend="triton", rtol=1e-6, sub=2)
    _check_exact(rank, world, device, "ArcFace", (5, 3, 4)[:world], 40, reduction="none", weighted=True,
                 ignored=(1,), backend="triton", rtol=1e-6, extra=dict(interclass_filtering_threshold=0.3))


def _sampling_case(rank, world, device):
    """Partial FC: reproducible under a seed, positives kept, and exactly the softmax over the kept classes."""
    kind, sizes, n_classes, dim = "AMSoftmax", (5, 3, 4)[:world], 40, 6
    x, t, w, _, cw, _ = _data(kind, sizes, n_classes, dim, weighted=True, ignored=(2,), device=device)
    r0, r1 = sum(sizes[:rank]), sum(sizes[: rank + 1])
    c0, c1 = class_slice(n_classes, world, rank)
    p = LossParams(Margin.ADDITIVE, s=16.0, m=0.35, ignore_index=IGNORE)
    losses, grads = [], []
    for _ in range(2):
        w_loc = w[:, c0:c1].clone().requires_grad_()
        gen = torch.Generator().manual_seed(1234 + 7)  # seed + step
        loss = sharded_margin_loss(x[r0:r1], w_loc, None, t[r0:r1], cw, None, p, dist.group.WORLD,
                                   sample_rate=0.25, generator=gen)
        loss.backward()
        losses.append(loss.detach())
        grads.append(w_loc.grad)
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1]), "sampling is not reproducible"
    kept = (grads[0] != 0).any(0).nonzero()[:, 0] + c0  # kept columns are those with a gradient
    parts = [torch.empty(n_classes, dtype=torch.long, device=device) for _ in range(world)]
    padded = torch.full((n_classes,), -1, dtype=torch.long, device=device)
    padded[: kept.numel()] = kept
    dist.all_gather(parts, padded)
    kept_all = torch.cat([q[q >= 0] for q in parts])
    assert set(t[t != IGNORE].tolist()) <= set(kept_all.tolist()), "a positive class was dropped"
    assert kept.numel() == max(math.ceil(0.25 * (c1 - c0)), t[(t >= c0) & (t < c1)].unique().numel())
    remap = torch.full((n_classes,), IGNORE, dtype=torch.long, device=device)
    remap[kept_all] = torch.arange(kept_all.numel(), device=device)
    t_kept = torch.where(t != IGNORE, remap[t.clamp_min(0)], t)
    # row weights stay those of the original targets: cw[kept_all][t_kept] == cw[t]
    gold = F.am_softmax_loss(x, w[:, kept_all], t_kept, m=0.35, s=16.0, class_weights=cw[kept_all],
                             ignore_index=IGNORE, backend="reference")
    _close(losses[0], gold, f"sampled loss, rank {rank}")


def _error_cases(rank, world, device):
    x, t, w, _, _, _ = _data("AMSoftmax", (3,) * world, 9, 4, weighted=False, ignored=(), device=device)
    c0, c1 = class_slice(9, world, rank)
    with pytest.raises(ValueError, match="tensor_split slice"):  # rank 0 passes the full matrix, the others a slice
        F.am_softmax_loss(x[:3], w if rank == 0 else w[:, c0:c1], t[:3], process_group=dist.group.WORLD)
    bad = t[:3].clone()
    bad[0] = 9
    with pytest.raises(ValueError, match="out of range"):  # raised on every rank: the gathered targets are checked
        F.am_softmax_loss(x[:3], w[:, c0:c1], bad if rank == 0 else t[:3], process_group=dist.group.WORLD)


class _Net(torch.nn.Module):
    """Backbone + loss head in one module, so DDP's forward (which arms its gradient all-reduce) runs both."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x, t):
        return self.head(self.backbone(x), t)


def _ddp_cases(rank, world, device):
    """A replicated head under DDP equals one process on the concatenated batch; a sharded head with a DDP backbone
    gives the backbone 1/world of the global gradient, or all of it with `sum_comm_hook`."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from deepfense.losses import AMSoftmax

    dim, n_classes, sizes = 6, 7, (4,) * world
    x, t, w, _, _, _ = _data("AMSoftmax", sizes, n_classes, dim, weighted=False, ignored=(), device=device)
    r0, r1 = rank * 4, rank * 4 + 4  # equal kept rows per rank: the mean of local means is the global mean

    def build():
        torch.manual_seed(0)
        return _Net(torch.nn.Linear(dim, dim), AMSoftmax(dim, n_classes)).double()

    single, model = build(), build()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (single, model)]
    single(x, t).backward()
    # DDP averages over ranks; each rank's loss is its local mean: equal batches make that the global mean
    ddp = DDP(model)  # keep a reference: a collected DDP object takes its gradient all-reduce with it
    ddp(x[r0:r1], t[r0:r1]).backward()
    for opt in opts:
        opt.step()
    for (name, a), b in zip(model.named_parameters(), single.parameters()):
        _close(a, b, f"parameter {name} after a DDP step, rank {rank}")

    uneven = (5, 3, 4)[:world]
    x, t, w, _, _, _ = _data("AMSoftmax", uneven, n_classes, dim, weighted=False, ignored=(0,), device=device)
    r0, r1 = sum(uneven[:rank]), sum(uneven[: rank + 1])
    c0, c1 = class_slice(n_classes, world, rank)
    torch.manual_seed(1)
    gold_bb = torch.nn.Linear(dim, dim).double()
    w_full = w.clone().requires_grad_()
    F.am_softmax_loss(gold_bb(x), w_full, t, backend="reference").backward()
    for hook in (None, sum_comm_hook):
        torch.manual_seed(1)
        bb = DDP(torch.nn.Linear(dim, dim).double())
        if hook is not None:
            bb.register_comm_hook(None, hook)
        w_loc = w[:, c0:c1].clone().requires_grad_()
        F.am_softmax_loss(bb(x[r0:r1]), w_loc, t[r0:r1], process_group=dist.group.WORLD).backward()
        factor = 1.0 if hook is not None else 1.0 / world
        _close(bb.module.weight.grad, factor * gold_bb.weight.grad, f"backbone grad, hook {hook}, rank {rank}")
        _close(w_loc.grad, w_full.grad[:, c0:c1], f"sharded head grad under DDP backbone, rank {rank}")
    # DDP objects sit in reference cycles: free them while the process group lives, or a garbage collection after
    # destroy_process_group can tear down their gloo work and abort the process
    del ddp, bb
    gc.collect()


def _module_cases(rank, world, device):
    """Sharded modules hold their rank's slice; loaded from a full module's slices they reproduce its loss and grads."""
    from deepfense.losses import AMSoftmax, ASoftmax, CrossEntropy

    dim, n_classes, sizes = 5, 9, (4, 2, 3)[:world]
    x, t, *_ = _data("AMSoftmax", sizes, n_classes, dim, weighted=False, ignored=(0,), device=device)
    r0, r1 = sum(sizes[:rank]), sum(sizes[: rank + 1])
    c0, c1 = class_slice(n_classes, world, rank)
    kw = dict(class_weights=[1.0 + 0.1 * c for c in range(n_classes)])
    for cls in (AMSoftmax, ASoftmax, CrossEntropy):
        extra = {} if cls is ASoftmax else dict(label_smoothing=0.05)
        torch.manual_seed(0)  # the same full module on every rank
        full = cls(dim, n_classes, backend="reference", **kw, **extra).double().to(device)
        part = cls(dim, n_classes, process_group=dist.group.WORLD, **kw, **extra).double().to(device)
        for (name, a), b in zip(part.named_parameters(), full.parameters()):
            with torch.no_grad():  # fc.weight / fc.bias are [C, ...]; mapper.weight is [D, C]
                a.copy_(b[:, c0:c1] if name == "mapper.weight" else b[c0:c1])
        x_loc = x[r0:r1].clone().requires_grad_()
        _close(part(x_loc, t[r0:r1]), full(x, t), f"{cls.__name__} module loss, rank {rank}")
        part(x_loc, t[r0:r1]).backward()
        full(x, t).backward()
        for (name, a), b in zip(part.named_parameters(), full.parameters()):
            _close(a.grad, b.grad[:, c0:c1] if name == "mapper.weight" else b.grad[c0:c1],
                   f"{cls.__name__} {name} grad, rank {rank}")


CASES = {"exact": (_exact_cases, _module_cases, _sampling_case, _error_cases), "ddp": (_ddp_cases,),
         "kernels": (_kernel_cases,)}


def _worker(rank, world, store, backend, names):
    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name in names:
            for case in CASES[name]:
                case(rank, world, device)
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world, backend, *names):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), backend, names), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])  # 3 ranks: classes and batches that do not split evenly
def test_sharded_matches_single_process(tmp_path, world):
    # the fused kernels run on these gloo (CPU) ranks only through the interpreter; on a GPU machine the NCCL test
    # below covers them
    kernels = ("kernels",) if os.environ.get("TRITON_INTERPRET") == "1" else ()
    _spawn(tmp_path, world, "gloo", "exact", *(("ddp",) if world == 2 else kernels))


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="the NCCL check needs 2 CUDA devices (NCCL cannot run two ranks on one GPU)")
def test_sharded_nccl(tmp_path):
    _spawn(tmp_path, 2, "nccl", "exact", "kernels")


def test_oc_softmax_is_not_shardable():
    with pytest.raises(ValueError, match="OCSoftmax"):
        sharded_margin_loss(torch.randn(2, 3), torch.randn(3, 1), None, torch.tensor([0, 1]), None, None,
                            LossParams(Margin.ONE_CLASS), None)


def test_class_slice_is_tensor_split_order():
    for n_classes, world in ((10, 3), (7, 7), (1_000_000, 8), (5, 2)):
        chunks = torch.tensor_split(torch.arange(n_classes), world)
        assert [class_slice(n_classes, world, r) for r in range(world)] == \
            [(int(c[0]), int(c[-1]) + 1) for c in chunks]

