"""deepfense: fused margin-softmax loss heads (AMSoftmax, ASoftmax, OCSoftmax, CrossEntropy) for PyTorch."""

__version__ = "0.1.0"
