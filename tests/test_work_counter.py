"""The work counter (tests/work_counter.py) on kernels whose launches, bytes and multiply-adds are known by hand:
a counter that cannot fail would make the work budgets meaningless."""

import pytest
import torch
import triton
import triton.language as tl

from backend_cases import DEVICE
from work_counter import WorkCounter

if DEVICE == "cuda":
    pytest.skip("the counter instruments the Triton interpreter", allow_module_level=True)


@triton.jit
def _copy_kernel(X_ptr, Y_ptr, n, TWICE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X_ptr + offs, mask=offs < n, other=0.0)
    if TWICE:
        x += tl.load(X_ptr + offs, mask=offs < n, other=0.0)
    tl.store(Y_ptr + offs, x, mask=offs < n)


@triton.jit
def _dot_kernel(A_ptr, B_ptr, C_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(B_ptr + rk[:, None] * N + rn[None, :])
    tl.store(C_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@pytest.mark.parametrize("n,twice", [(20, False), (10, False), (20, True)])
def test_masked_loads_and_stores_counted_by_hand(n, twice):
    """n fp32 elements in 16-wide blocks: masked-off lanes are not bytes moved; a second read counts twice."""
    x, y = torch.randn(n), torch.empty(n)
    with WorkCounter() as wc:
        _copy_kernel[(triton.cdiv(n, 16),)](x, y, n, TWICE=twice, BLOCK=16)
    assert wc.grids() == [("_copy_kernel", (triton.cdiv(n, 16),))]
    assert wc.loaded("X_ptr") == (2 if twice else 1) * 4 * n and wc.loaded() == wc.loaded("X_ptr")
    assert wc.stored("Y_ptr") == 4 * n and wc.stored() == 4 * n
    assert wc.macs == 0
    torch.testing.assert_close(y, x * (2 if twice else 1))


def test_dot_multiply_adds_and_tile_bytes_counted_by_hand():
    M, N, K = 16, 32, 64
    a, b, c = torch.randn(M, K), torch.randn(K, N), torch.empty(M, N)
    with WorkCounter() as wc:
        for _ in range(3):
            _dot_kernel[(2, 1)](a, b, c, M=M, N=N, K=K)  # two programs each, three launches
    assert wc.grids() == [("_dot_kernel", (2, 1))] * 3
    assert wc.macs == 3 * 2 * M * N * K
    assert wc.loaded("A_ptr") == 3 * 2 * M * K * 4 and wc.loaded("B_ptr") == 3 * 2 * K * N * 4
    assert wc.stored("C_ptr") == 3 * 2 * M * N * 4
    torch.testing.assert_close(c, a @ b)


def test_nothing_counted_outside_the_context():
    x, y = torch.randn(8), torch.empty(8)
    with WorkCounter() as wc:
        pass
    _copy_kernel[(1,)](x, y, 8, TWICE=False, BLOCK=16)
    assert wc.launches == [] and wc.loaded() == 0
