"""Counts the work of Triton launches as the interpreter executes them (TRITON_INTERPRET=1).

Per launch: the kernel, its grid, the `tl.dot` multiply-adds as executed (padding included: M x N x K of every dot
on every program), and the bytes each pointer argument loads and stores from global memory (masked-off elements
excluded; a load is attributed to the argument whose storage holds its first unmasked address).

    with WorkCounter() as wc:
        loss_fn(...).backward()
    wc.launches  # [Record(kernel, grid, macs, loaded={arg: bytes}, stored={arg: bytes})]
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
from triton.runtime import interpreter as I


@dataclass
class Record:
    kernel: str
    grid: Tuple[int, ...]
    macs: int = 0
    loaded: Dict[str, int] = field(default_factory=dict)
    stored: Dict[str, int] = field(default_factory=dict)
    ranges: List[Tuple[int, int, str]] = field(default_factory=list, repr=False)

    @property
    def programs(self) -> int:
        return int(np.prod(self.grid))

    def arg_of(self, addresses: np.ndarray) -> str:
        a = int(addresses.min())
        for lo, hi, name in self.ranges:
            if lo <= a < hi:
                return name
        return "?"


class WorkCounter:
    """Context manager patching the interpreter's launch, masked load/store and dot (see the module docstring)."""

    def __init__(self):
        self.launches: List[Record] = []
        self._current: List[Record] = []

    # -- totals --------------------------------------------------------------------------------------------------
    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.launches)

    def loaded(self, arg: str = None) -> int:
        return sum(b for r in self.launches for k, b in r.loaded.items() if arg is None or k == arg)

    def stored(self, arg: str = None) -> int:
        return sum(b for r in self.launches for k, b in r.stored.items() if arg is None or k == arg)

    def grids(self):
        return [(r.kernel, r.grid) for r in self.launches]

    # -- patching ------------------------------------------------------------------------------------------------
    def __enter__(self):
        counter = self
        ge, ib = I.GridExecutor, I.InterpreterBuilder
        self._saved = (ge.__call__, ge._init_args_hst, ib.create_masked_load, ib.create_masked_store, ib.create_dot)
        call, init_args, load, store, dot = self._saved

        def patched_call(executor, *args, **kwargs):
            grid = executor.grid if not callable(executor.grid) else None
            rec = Record(executor.fn.__name__, tuple(int(g) for g in grid) if grid is not None else ())
            counter._current.append(rec)
            try:
                return call(executor, *args, **kwargs)
            finally:
                counter._current.pop()
                counter.launches.append(rec)

        def patched_init(executor, args_dev, kwargs):
            args_hst, kwargs_hst = init_args(executor, args_dev, kwargs)
            if counter._current:
                named = inspect.getcallargs(executor.fn, *args_hst, **kwargs_hst)
                for name, arg in named.items():
                    if hasattr(arg, "untyped_storage"):
                        st = arg.untyped_storage()
                        if st.nbytes():
                            counter._current[-1].ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes(), name))
            return args_hst, kwargs_hst

        def count(ptrs, mask, into):
            rec = counter._current[-1] if counter._current else None
            m = np.broadcast_to(mask.data, ptrs.data.shape)
            n = int(m.sum())
            if rec is not None and n:
                item = np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize
                name = rec.arg_of(ptrs.data[m])
                into(rec)[name] = into(rec).get(name, 0) + n * item

        def patched_load(builder, ptrs, mask, other, *rest):
            count(ptrs, mask, lambda r: r.loaded)
            return load(builder, ptrs, mask, other, *rest)

        def patched_store(builder, ptrs, value, mask, *rest):
            count(ptrs, mask, lambda r: r.stored)
            return store(builder, ptrs, value, mask, *rest)

        def patched_dot(builder, a, b, d, *rest):
            if counter._current:
                sa, sb = a.data.shape, b.data.shape
                counter._current[-1].macs += int(np.prod(sa[:-1])) * int(sb[-1]) * int(sa[-1])
            return dot(builder, a, b, d, *rest)

        ge.__call__, ge._init_args_hst = patched_call, patched_init
        ib.create_masked_load, ib.create_masked_store, ib.create_dot = patched_load, patched_store, patched_dot
        return self

    def __exit__(self, *exc):
        ge, ib = I.GridExecutor, I.InterpreterBuilder
        ge.__call__, ge._init_args_hst, ib.create_masked_load, ib.create_masked_store, ib.create_dot = self._saved
        return False

    def table(self) -> str:
        """One line per launch: kernel, grid, GEMM multiply-adds, bytes loaded / stored per argument."""
        lines = []
        for r in self.launches:
            lines.append(f"{r.kernel} grid={r.grid} macs={r.macs} loaded={r.loaded} stored={r.stored}")
        return "\n".join(lines)


def count_step(loss: str, B: int, D: int, C: int, dtype=None, reduction: str = "mean", seed: int = 0):
    """Count one training step (forward + backward of x and w) of `loss` ('am', 'a', 'oc', 'ce') on the Triton path.

    Returns (counter, summary) where summary holds: launches, grids, gemm (executed dot multiply-adds / (B D C)),
    x_reads (bytes of x loaded / x's bytes), bytes_ratio (all bytes moved / the minimum: read x and w once, write dX
    and dW once).
    """
    import torch
    from backend_cases import FUNCS, make_case, options

    dtype = dtype or torch.float32
    case = make_case(loss, B, D, C, dtype, seed=seed)
    C = case["w"].shape[0 if loss == "ce" else 1]
    x, w = case["x"].requires_grad_(), case["w"].requires_grad_()
    with WorkCounter() as wc:
        FUNCS[loss](x, w, case["t"], backend="triton", **options(loss, reduction=reduction)).backward()
    item = x.element_size()
    minimum = 2 * (B * D + D * C) * item
    summary = dict(launches=len(wc.launches), grids=wc.grids(), gemm=wc.macs / (B * D * C),
                   x_reads=wc.loaded("X_ptr") / (B * D * item),
                   bytes_ratio=(wc.loaded() + wc.stored()) / minimum)
    return wc, summary


if __name__ == "__main__":  # python3 tests/work_counter.py am 256 192 5994 [bf16]; set DEEPFENSE_TILES=gpu first
    import os
    import sys

    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(__file__))
    import torch

    loss, B, D, C = sys.argv[1], *map(int, sys.argv[2:5])
    dt = torch.bfloat16 if sys.argv[5:] == ["bf16"] else torch.float32
    counter, summ = count_step(loss, B, D, C, dt)
    print(counter.table())
    print(summ)
