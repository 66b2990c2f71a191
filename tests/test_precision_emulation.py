"""bench/precision_study.py's emulation of sm_90 tensor-core fp32 dots (the study that chose tf32x3): the operand
roundings are bit-exact on values whose answer is known, and the three precisions order as the hardware's do."""

import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the study runs in the interpreter"),
              pytest.mark.xdist_group("precision_emulation")]  # one worker runs the study


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("precision_study", os.path.join(ROOT, "bench", "precision_study.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["precision_study"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tf32_operand_roundings_bit_exact(study):
    # 1 + 2^-23 (the last fp32 mantissa bit) is lost by truncation; 1 + 2^-11 is exactly half a tf32 step:
    # truncation keeps 1, round-to-nearest-ties-away goes up to 1 + 2^-10
    x = np.array([1 + 2.0**-23, 1 + 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-10, np.inf], dtype=np.float32)
    assert study._tf32_truncate(x).tolist() == [1.0, 1.0, -1.0, 1 + 2.0**-10, np.inf]
    assert study._tf32_round_away(x).tolist() == [1.0, 1 + 2.0**-10, -(1 + 2.0**-10), 1 + 2.0**-10, np.inf]


def test_emulated_dots_order_as_the_hardware(study):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 192)).astype(np.float32)
    b = rng.standard_normal((192, 16)).astype(np.float32)
    c = np.zeros((16, 16), np.float32)
    gold = a.astype(np.float64) @ b.astype(np.float64)
    err = {p: np.abs(study.emulated_dot(a, b, c, p) - gold).max() for p in study.PRECISIONS}
    # tf32 keeps 10 mantissa bits: ~1e-3 relative per product; tf32x3 recovers about fp32's accuracy
    assert err["tf32"] > 30 * err["tf32x3"] and err["tf32x3"] < 3 * err["ieee"] + 1e-6, err
