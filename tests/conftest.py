"""Test device selection. On a machine without a GPU the Triton kernels run in the interpreter on CPU tensors;
DEEPFENSE_TEST_DEVICE=cuda (the GPU check) runs them compiled on CUDA instead."""

import os

TEST_DEVICE = os.environ.get("DEEPFENSE_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cuda":
    # triton.jit reads this when deepfense.kernels is first imported, which happens after conftest runs
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests must import this checkout. An installed DeepFense (a regular package with deepfense/__init__.py) hides a
# source tree's namespace portion, and an editable install of another checkout could then serve deepfense.* instead.
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_TREE = Path(__file__).resolve().parent.parent / "deepfense"
try:
    import deepfense.functional as _functional  # noqa: E402
except ImportError as _exc:
    raise pytest.UsageError(f"cannot import deepfense.functional from {_TREE.parent} ({_exc}); is the DeepFense "
                            f"framework installed in this Python? See README, 'Next to DeepFense'") from _exc
if Path(_functional.__file__).resolve().parent != _TREE:
    raise pytest.UsageError(f"the tests import {_functional.__file__}, not this checkout ({_TREE}); run them from the "
                            f"repository root in a Python without the DeepFense framework (README, 'Next to DeepFense')")
