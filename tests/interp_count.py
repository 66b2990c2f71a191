"""A small work counter for the Triton interpreter: launches with their grids, the bytes loaded and stored through
each kernel argument's tensor (masked-off elements excluded; arguments sharing a storage are one entry, their names
joined by '|'), and the elements of 3-D multiplies (the small-head kernels' broadcast multiply-adds). Used by
tests/test_small_head.py's budget tests until the general counter (tests/work_counter.py, k8) lands."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import torch
from triton.runtime import interpreter as I


@dataclass
class LaunchWork:
    kernel: str
    grid: Tuple[int, ...]
    loaded: Dict[str, int] = field(default_factory=dict)  # bytes per pointer argument
    stored: Dict[str, int] = field(default_factory=dict)
    products: int = 0  # elements of 3-D multiplies


@contextlib.contextmanager
def count_work():
    """Yields a list that receives one LaunchWork per kernel launch run while the context is active."""
    launches: List[LaunchWork] = []
    regions: List[Tuple[str, int, int]] = []
    orig_call, orig_load, orig_store, orig_mul = (I.GridExecutor.__call__, I.InterpreterBuilder.create_masked_load,
                                                  I.InterpreterBuilder.create_masked_store,
                                                  I.InterpreterBuilder.create_fmul)

    def account(book, ptrs, mask, itemsize):
        addr, live = np.asarray(ptrs.data).ravel(), np.asarray(mask.data, dtype=bool).ravel()
        addr = np.broadcast_to(addr, live.shape) if addr.size == 1 else addr
        for name, lo, hi in regions:
            n = int(np.count_nonzero(live & (addr >= lo) & (addr < hi)))
            if n:
                book[name] = book.get(name, 0) + n * itemsize

    def call(self, *args, **kwargs):
        names = self.fn.__code__.co_varnames[:self.fn.__code__.co_argcount]
        spans: Dict[Tuple[int, int], List[str]] = {}  # arguments sharing a storage (a dummy pointer) count once
        for name, arg in list(zip(names, args)) + list(kwargs.items()):
            if isinstance(arg, torch.Tensor) and arg.numel():
                lo = arg.untyped_storage().data_ptr()
                spans.setdefault((lo, lo + arg.untyped_storage().nbytes()), []).append(name)
        regions[:] = [("|".join(n), lo, hi) for (lo, hi), n in spans.items()]
        grid = self.grid if isinstance(self.grid, tuple) else tuple(self.grid)
        launches.append(LaunchWork(self.fn.__name__, grid))
        return orig_call(self, *args, **kwargs)

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        out = orig_load(self, ptrs, mask, other, cache_policy, is_volatile)
        account(launches[-1].loaded, ptrs, mask, out.data.dtype.itemsize)
        return out

    def store(self, ptrs, value, mask, cache_policy):
        account(launches[-1].stored, ptrs, mask, value.data.dtype.itemsize)
        return orig_store(self, ptrs, value, mask, cache_policy)

    def mul(self, lhs, rhs):
        out = orig_mul(self, lhs, rhs)
        if out.data.ndim == 3:
            launches[-1].products += out.data.size
        return out

    I.GridExecutor.__call__, I.InterpreterBuilder.create_masked_load = call, load
    I.InterpreterBuilder.create_masked_store, I.InterpreterBuilder.create_fmul = store, mul
    try:
        yield launches
    finally:
        I.GridExecutor.__call__, I.InterpreterBuilder.create_masked_load = orig_call, orig_load
        I.InterpreterBuilder.create_masked_store, I.InterpreterBuilder.create_fmul = orig_store, orig_mul
