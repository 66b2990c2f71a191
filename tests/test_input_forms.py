"""Input forms: small-int targets on every backend, one error for a foreign key however the loss is built, readable
NaN messages."""

import pytest
import torch

from deepfense import functional as F
from deepfense.losses import OCSoftmax, UnknownKeyError, build_loss


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_targets_behave_alike_on_every_backend(dtype):
    # 5 rows, 3 classes, in the interpreter for triton (conftest sets TRITON_INTERPRET on CPU)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 8, generator=g), torch.randn(8, 3, generator=g)
    t = torch.tensor([0, 2, 1, 1, 0])
    gold = F.am_softmax_loss(x, w, t, backend="reference")
    for backend in ("reference", "torch", "triton"):
        torch.testing.assert_close(F.am_softmax_loss(x, w, t.to(dtype), backend=backend), gold, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="target 200 is out of range"):
        F.am_softmax_loss(x, w, torch.tensor([0, 1, 200, 1, 0], dtype=torch.uint8), backend="torch")


def test_foreign_key_same_error_directly_and_through_yaml():
    with pytest.raises(UnknownKeyError) as direct:
        OCSoftmax(embedding_dim=4, n_classes=2)
    with pytest.raises(UnknownKeyError) as yaml_built:
        build_loss("loss:\n  type: OCSoftmax\n  args: {embedding_dim: 4, n_classes: 2}")
    assert str(direct.value) == str(yaml_built.value)
    assert "'n_classes'" in str(direct.value) and "OCSoftmax does not" in str(direct.value)
    assert "did you mean" not in str(direct.value)  # not 'class_weights': the key is another loss's, not a typo


def test_non_finite_weight_message_grammar():
    w = torch.randn(4, 3)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^weight contains NaN or Inf values$"):
        F.am_softmax_loss(torch.randn(2, 4), w, torch.tensor([0, 1]), backend="torch")
    x = torch.randn(2, 4)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="^embeddings contain NaN or Inf values$"):
        F.am_softmax_loss(x, torch.randn(4, 3), torch.tensor([0, 1]), backend="torch")


def test_install_requires_leave_torch_open():
    """A cap on torch makes pip replace a user's newer torch; CI pins the CPU build with constraints-cpu.txt."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent
    call = next(n for n in ast.walk(ast.parse((root / "setup.py").read_text())) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    reqs = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))
    torch_req = next(r for r in reqs if r.startswith("torch"))
    assert "<" not in torch_req and "~=" not in torch_req and "==" not in torch_req, torch_req
    assert "torch==" in (root / "constraints-cpu.txt").read_text()
    assert "-c constraints-cpu.txt" in (root / ".ci" / "run").read_text()
