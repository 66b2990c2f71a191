"""What the ranks of a class-parallel loss must agree on, checked inside the one small all-gather each step makes.

Before any collective whose size depends on the inputs, every rank sends a fixed-length int64 record (`RECORD`): its
batch size and class count (which the step needs anyway), the embedding dim and dtypes, every loss option, the
runtime margins, a checksum of the class weights, its targets' range, whether its local checks passed, and a call
counter. One all-gather and one host sync later every rank holds every record and runs the same checks on them
(`settle`), so a disagreement raises the same error on every rank, naming the field and the ranks. The failure modes
this replaces: gloo aborting a process on mismatched collective sizes, a rank waiting to the process-group timeout
for a peer that has raised, and silently different "global" losses.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .inputs import check_tensors, resolve_backend
from .params import REDUCTIONS, LossParams, Margin, RowMargin

__all__ = ["RECORD", "Agreement", "DeclaredGroup", "class_slice", "rank_slice", "check_local", "build_record",
           "gather", "exchange", "settle", "set_step", "raise_not_finite"]

_MAGIC = 0x64664C53  # marks a loss record: a record paired with another collective's payload reads as junk
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_HASHED_COLUMNS = 64  # of the weight slice, for the DDP check: random slices differ in any of them
_NO_TARGET = (2 ** 62, -2 ** 62)  # (min, max) of a rank without kept targets: inside any range check
_FLOATS = frozenset({"s", "m", "gamma", "m1", "m3", "filter", "smoothing", "sample_rate", "lam0", "lam1", "lam2"})

# host fields (known without reading tensor values), then device fields (reductions, no host sync)
_HOST = ("magic", "call", "step", "ok", "validate", "rows", "classes", "declared", "dim", "x_dtype", "w_dtype",
         "bias", "margin", "s", "m", "gamma", "m1", "m3", "fallback", "filter", "straight_through", "sub_centers",
         "smoothing", "reduction", "ignore_index", "sample_rate", "cw_entries", "w_hashed")
_DEVICE = ("cw_hash", "w_hash", "target_min", "target_max", "lam0", "lam1", "lam2")
RECORD = _HOST + _DEVICE

# what every rank must hold equal, in the order a disagreement is reported, with the name the error uses
_AGREED = (("dim", "embedding_dim"), ("x_dtype", "embeddings dtype"), ("w_dtype", "weight dtype"),
           ("bias", "bias (given or None)"), ("margin", "loss"), ("s", "s"), ("m", "m"), ("gamma", "gamma"),
           ("m1", "m1"), ("m3", "m3"), ("fallback", "fallback"), ("filter", "interclass_filtering_threshold"),
           ("straight_through", "straight_through"), ("sub_centers", "sub_centers"), ("smoothing", "label_smoothing"),
           ("reduction", "reduction"), ("ignore_index", "ignore_index"), ("sample_rate", "sample_rate"),
           ("lam", "runtime margins (ASoftmax lambda; ArcFace's tensor s, m, m3)"),
           ("cw_entries", "class_weights entries"), ("cw_hash", "class_weights (checksum)"),
           ("declared", "declared n_classes"))

_calls: dict = {}  # per process group: how many records this process has sent
_steps: dict = {}  # per process group: the training step the caller declared (`set_step`)
_hashed = weakref.WeakValueDictionary()  # id -> weight (or the parameter it views) whose checksum went out once


def class_slice(n_classes: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's classes: the `torch.tensor_split(torch.arange(n_classes), world)[rank]` order."""
    base, extra = divmod(n_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def rank_slice(n_classes: int, group) -> tuple[int, int]:
    """[start, stop) of the calling rank's classes in `group` (`class_slice` order). Raises when the rank would hold
    no class, so a sharded head with fewer classes than ranks fails where it is built, not at its first forward."""
    world = dist.get_world_size(group)
    if n_classes < world:
        raise ValueError(f"{n_classes} classes cannot be split over {world} ranks: each rank needs at least one")
    return class_slice(n_classes, world, dist.get_rank(group))


@dataclass(frozen=True)
class DeclaredGroup:
    """A process group with the global class count a sharded head was built for. Passed as `process_group` (the loss
    heads do), it makes every rank check that the ranks' slices add up to `n_classes` and that they all declared it."""

    group: object
    n_classes: int


def check_local(x, w_dc, bias, targets, class_weights, p: LossParams, sample_rate, backend) -> bool:
    """This rank's own checks (shapes, dtypes, devices, options; no tensor values read). Returns whether the rank's
    share runs on the fused kernels."""
    if class_weights is not None and not (isinstance(class_weights, torch.Tensor) and class_weights.dim() == 1):
        raise ValueError("class_weights must be a 1-D tensor: the weights of all C classes, the same on every rank")
    check_tensors(x, w_dc.t() if p.margin == Margin.NONE else w_dc, bias, targets, class_weights, p,
                  None if class_weights is None else class_weights.shape[0])
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return resolve_backend(backend, x.device) == "triton"


def set_step(step, group=None) -> None:
    """Declare the training step of this process's next sharded loss calls on `group` (None: the default group);
    step None withdraws the declaration.

    The step travels in the record: a rank that raised before the loss, was caught and went on to the next step then
    meets its peers' previous step, and every rank raises instead of pairing two steps' batches. Optional: without it
    the ranks can only notice a call whose collectives were paired with other collectives (see docs/distributed.md).
    """
    key = dist.group.WORLD if group is None else group
    if step is None:
        _steps.pop(key, None)
    else:
        _steps[key] = int(step)


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _checksum(t: torch.Tensor) -> torch.Tensor:
    """0-dim int64: an order-sensitive checksum of t's bits. Integer sums wrap, so it is exact and the same on every
    rank whatever the reduction order; float sums are not."""
    bits = t.detach().reshape(-1).view(_INT_VIEW[t.element_size()]).long()
    return (bits * torch.arange(1, 2 * bits.numel(), 2, device=t.device)).sum()


@dataclass(frozen=True)
class Agreement:
    """What the records settle: every rank's batch size and class count, and whether the value checks run."""

    sizes: tuple
    widths: tuple
    validate: bool

    @property
    def n_classes(self) -> int:
        return sum(self.widths)


def build_record(group, device, p, *, ok, validate, x=None, w_dc=None, bias=None, targets=None, class_weights=None,
                 lam=None, sample_rate=1.0, declared=None) -> torch.Tensor:
    """This rank's [len(RECORD)] int64 record on `device`. With ok=False (a local check failed) only the host fields
    that need no input are filled: the peers then raise naming this rank."""
    key = dist.group.WORLD if group is None else group
    host = dict.fromkeys(_HOST, 0)
    host.update(magic=_MAGIC, call=_calls.get(key, 0) + 1, step=_steps.get(key, -1), ok=int(ok), margin=int(p.margin),
                s=p.s, m=p.m, gamma=p.gamma, m1=p.m1, m3=p.m3, fallback=int(p.fallback), filter=p.filter_threshold,
                straight_through=int(p.straight_through), sub_centers=p.sub_centers, smoothing=p.label_smoothing,
                reduction=REDUCTIONS.index(p.reduction), ignore_index=p.ignore_index, declared=-1)
    device_part = torch.zeros(len(_DEVICE), dtype=torch.int64, device=device)
    if ok:
        base = w_dc if w_dc._base is None else w_dc._base  # CrossEntropy passes a fresh fc.weight.t() each call
        first = _hashed.get(id(base)) is not base
        host.update(validate=int(validate), sample_rate=float(sample_rate), declared=-1 if declared is None else
                    int(declared), rows=x.shape[0], classes=w_dc.shape[1] // p.sub_centers, dim=x.shape[1],
                    x_dtype=_code(x.dtype), w_dtype=_code(w_dc.dtype), bias=int(bias is not None),
                    cw_entries=-1 if class_weights is None else class_weights.shape[0], w_hashed=int(first))
        parts = [torch.zeros((), dtype=torch.int64, device=device)] * 2
        if class_weights is not None:
            parts[0] = _checksum(class_weights.to(torch.float64))
        if first:  # the first call with this weight: a sharded head inside DDP has equal slices (a few columns tell)
            _hashed[id(base)] = base
            parts[1] = _checksum(w_dc[:, :_HASHED_COLUMNS])
        t, keep = targets.long(), targets != p.ignore_index
        if t.numel():
            parts += [torch.where(keep, t, _NO_TARGET[0]).amin(), torch.where(keep, t, _NO_TARGET[1]).amax()]
        else:
            parts += [torch.tensor(v, device=device) for v in _NO_TARGET]
        lam_t = torch.zeros(3, dtype=torch.float64, device=device)
        if lam is not None:
            flat = torch.as_tensor(lam).detach().to(device=device, dtype=torch.float64)
            if flat.dim() == 2:  # CombinedMargin's [4, N]: s, m2 and m3 where shared (per-sample values differ)
                shared = [not p.row_margins & f for f in (RowMargin.S, RowMargin.M2, RowMargin.M3)]
                flat = flat[[0, 2, 3], 0] * torch.tensor(shared, dtype=torch.float64, device=device)
            flat = flat.reshape(-1)[:3]
            lam_t[: flat.numel()] = flat
        device_part = torch.cat([torch.stack(parts), lam_t.view(torch.int64)])
    host_part = [_bits(v) if k in _FLOATS else int(v) for k, v in host.items()]
    record = torch.cat([torch.tensor(host_part, dtype=torch.int64, device=device), device_part])
    _calls[key] = host["call"]  # counted once the record exists: a failed attempt is rebuilt with ok=False
    return record


def _code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def gather(t: torch.Tensor, group) -> torch.Tensor:
    """[world, *t.shape]: every rank's t (the same shape on every rank), in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def exchange(record: torch.Tensor, group) -> list:
    """All-gather the records; one host sync. Returns one dict per rank, 'lam' as a 3-tuple; floats stay as their
    bits, so they compare exactly (NaN included) and `_show` decodes them."""
    out = []
    for row in gather(record, group).tolist():
        rec = dict(zip(RECORD, row))
        rec["lam"] = (rec.pop("lam0"), rec.pop("lam1"), rec.pop("lam2"))
        out.append(rec)
    return out


def _show(key, value) -> str:
    if key in _FLOATS:
        return repr(_float(value))
    if key == "lam":
        return repr(tuple(map(_float, value)))
    if key in ("x_dtype", "w_dtype"):
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "another dtype"
    if key == "reduction":
        return repr(REDUCTIONS[value]) if 0 <= value < len(REDUCTIONS) else repr(value)
    if key == "margin":
        return Margin(value).name if value in tuple(Margin) else repr(value)
    if key in ("cw_hash", "w_hash"):
        return f"{value & (2 ** 64 - 1):016x}"
    if key == "bias":
        return "given" if value else "None"
    return repr(value)


def _by_value(records, key) -> str:
    """'rank 0 has 6; rank 1 has 5' (ranks that share a value listed together)."""
    groups: dict = {}
    for r, rec in enumerate(records):
        groups.setdefault(rec[key], []).append(r)
    return "; ".join(f"{'ranks' if len(rs) > 1 else 'rank'} {', '.join(map(str, rs))} "
                     f"{'have' if len(rs) > 1 else 'has'} {_show(key, v)}" for v, rs in groups.items())


def _out_of_step(what: str) -> ValueError:
    return ValueError(f"the ranks' collectives are out of step ({what}): a call failed on some ranks only and was "
                      f"caught, so one rank's collective met another's. Stop every rank (see docs/distributed.md)")


def settle(records: list, group, local_error) -> Agreement:
    """Run the agreement checks on every rank's record; every rank raises the same ValueError on the same records,
    except that a rank whose own local check failed raises that error (`local_error`), its peers one naming it."""
    rank = dist.get_rank(group)
    world = len(records)
    junk = [r for r, rec in enumerate(records) if rec["magic"] != _MAGIC]
    if junk:
        raise _out_of_step(f"rank{'s' if len(junk) > 1 else ''} {', '.join(map(str, junk))} sent no loss record")
    failed = [r for r, rec in enumerate(records) if not rec["ok"]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} rejected "
                         f"{'their' if len(failed) > 1 else 'its'} inputs of the sharded loss (the error is raised "
                         f"there); every rank raises so that none waits in a collective")
    for key, what in (("call", "sharded loss calls made"), ("step", "declared steps (set_step)")):
        if len({rec[key] for rec in records}) > 1:
            if key == "call":  # the ranks meet here again: count on together once every rank has raised
                _calls[dist.group.WORLD if group is None else group] = max(rec[key] for rec in records)
            raise _out_of_step(f"{what}: {_by_value(records, key)}")
    for key, name in _AGREED:
        if len({rec[key] for rec in records}) > 1:
            raise ValueError(f"ranks disagree on {name}: {_by_value(records, key)}")
    agreement = Agreement(tuple(rec["rows"] for rec in records), tuple(rec["classes"] for rec in records),
                          any(rec["validate"] for rec in records))
    n_classes = agreement.n_classes
    if n_classes < world:
        raise ValueError(f"{n_classes} classes cannot be split over {world} ranks: each rank needs at least one")
    expected = [b - a for a, b in (class_slice(n_classes, world, r) for r in range(world))]
    if list(agreement.widths) != expected:
        raise ValueError(f"each rank must hold its torch.tensor_split slice of the {n_classes} classes: expected "
                         f"widths {expected}, got {list(agreement.widths)}")
    for key, name in (("declared", "its head was built for"), ("cw_entries", "its class_weights have")):
        wrong = [r for r, rec in enumerate(records) if rec[key] not in (-1, n_classes)]
        if wrong:
            raise ValueError(f"the ranks' weight slices add up to {n_classes} classes, but on rank {wrong[0]} "
                             f"{name} {records[wrong[0]][key]}")
    if agreement.validate:
        for r, rec in enumerate(records):
            lo, hi = rec["target_min"], rec["target_max"]  # lo > hi: the rank has no kept target
            if lo <= hi and (lo < 0 or hi >= n_classes):
                raise ValueError(f"target {lo if lo < 0 else hi} on rank {r} is out of range: targets must be in "
                                 f"[0, {n_classes}) or ignore_index ({records[0]['ignore_index']})")
    if world > 1 and all(rec["w_hashed"] for rec in records) and len({rec["w_hash"] for rec in records}) == 1 \
            and len(set(agreement.widths)) == 1:
        raise ValueError("every rank holds the same weight slice: a sharded head inside DistributedDataParallel (DDP "
                         "copies rank 0's parameters over the others; wrap only the backbone) or slices initialised "
                         "from one seed on every rank (seed each rank differently, or load a full weight's slices)")
    return agreement


def raise_not_finite(x, w_dc, bias, group) -> None:
    """Every rank found the global loss non-finite (it is the same on every rank): one all-gather of each rank's
    input finiteness (only on this failure path), then the same error on every rank naming the culprits."""
    names = ("embeddings", "weight", "bias")
    flags = torch.tensor([t is not None and not bool(torch.isfinite(t.detach()).all()) for t in (x, w_dc, bias)],
                         dtype=torch.int64, device=x.device)
    culprits = [f"{names[i]} on rank {r}" for r, row in enumerate(gather(flags, group).tolist())
                for i, bad in enumerate(row) if bad]
    if culprits:
        raise ValueError(f"NaN or Inf values in the {', '.join(culprits)}")
    raise ValueError("the loss is not finite although every rank's inputs are; check the scale parameters (s, alpha, "
                     "lam)")
