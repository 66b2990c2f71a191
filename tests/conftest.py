"""Test device selection. On a machine without a GPU the Triton kernels run in the interpreter on CPU tensors;
DEEPFENSE_TEST_DEVICE=cuda (the GPU check) runs them compiled on CUDA instead."""

import os

TEST_DEVICE = os.environ.get("DEEPFENSE_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cuda":
    # triton.jit reads this when deepfense.kernels is first imported, which happens after conftest runs
    os.environ.setdefault("TRITON_INTERPRET", "1")
