"""Shared helpers of the loss-module tests: which backends can run here, and the DeepFense 0.2.2 formulas.

The DeepFense formulas are re-derived from the peer's documented behaviour (mapper columns renormalised in forward,
cosines clamped, nn.CrossEntropyLoss / softplus on top), written independently of our reference, so the
compatibility tests compare against an outside definition rather than against our own oracle.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from deepfense.losses import AMSoftmax, ASoftmax, CrossEntropy, OCSoftmax

LOSS_TYPES = ("AMSoftmax", "ASoftmax", "OCSoftmax", "CrossEntropy")
CLASSES = {"AMSoftmax": AMSoftmax, "ASoftmax": ASoftmax, "OCSoftmax": OCSoftmax, "CrossEntropy": CrossEntropy}


def make(loss_type, dim, n_classes=2, **kwargs):
    """Build a loss head; n_classes is dropped for OCSoftmax, which has one centre."""
    if loss_type != "OCSoftmax":
        kwargs["n_classes"] = n_classes
    return CLASSES[loss_type](embedding_dim=dim, **kwargs)


def _has_attr(module: str, attr: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), attr)
    except Exception:  # a half-written or broken backend module counts as absent
        return False


def backend_params():
    """pytest params of (backend, device): 'reference' always, 'torch' once it exists, 'triton' compiled on CUDA when
    DEEPFENSE_TEST_DEVICE=cuda (the GPU check) or in the interpreter on CPU when TRITON_INTERPRET=1 (conftest sets it
    on machines without a GPU)."""
    out = [pytest.param(("reference", "cpu"), id="reference")]
    if importlib.util.find_spec("deepfense.torch_backend") and _has_attr("deepfense.torch_backend", "margin_loss"):
        out.append(pytest.param(("torch", "cpu"), id="torch"))
    if os.environ.get("DEEPFENSE_TEST_DEVICE") == "cuda" and torch.cuda.is_available():
        out.append(pytest.param(("triton", "cuda"), id="triton-cuda"))
    elif os.environ.get("TRITON_INTERPRET") == "1":
        out.append(pytest.param(("triton", "cpu"), id="triton-interpret"))
    return [p for p in out if p.values[0][0] != "triton" or _has_attr("deepfense.kernels", "large_head_loss")]


def targets_for(loss_type: str, batch: int, n_classes: int, generator=None) -> torch.Tensor:
    """Random valid targets: OCSoftmax is binary whatever n_classes is."""
    high = 2 if loss_type == "OCSoftmax" else n_classes
    return torch.randint(0, high, (batch,), generator=generator)


# ---- DeepFense 0.2.2 formulas (float64), from the peer's behaviour -------------------------------------------------

def _df_cos(x, w, divide_w_norm=False):
    """DeepFense's cosine: columns renormalised to unit length, divide by |x|, clamp to [-1, 1]."""
    w = w.renorm(2, 1, 1e-5).mul(1e5)
    cos = x.mm(w) / x.pow(2).sum(1).pow(0.5).view(-1, 1)
    if divide_w_norm:  # ASoftmax also divides by the (already unit) column norms
        cos = cos / w.pow(2).sum(0).pow(0.5).view(1, -1)
    return cos.clamp(-1, 1)


def df_logits(loss_type, x, state, cfg):
    """DeepFense's get_logits for `state` (its state-dict tensors) and config values `cfg`."""
    if loss_type == "CrossEntropy":
        return x @ state["fc.weight"].t() + state["fc.bias"]
    if loss_type == "AMSoftmax":
        return cfg["s"] * _df_cos(x, state["mapper.weight"])
    if loss_type == "ASoftmax":
        return _df_cos(x, state["mapper.weight"], True) * x.pow(2).sum(1).pow(0.5).view(-1, 1)
    return _df_cos(x, state["mapper.weight"])


def df_loss(loss_type, x, y, state, cfg, *, iteration=1, reduction="mean"):
    """DeepFense's forward loss. `iteration` is its ASoftmax counter after the increment (1 on the first call)."""
    cw = state.get("m_loss.weight", state.get("criterion.weight"))
    if loss_type == "CrossEntropy":
        return F.cross_entropy(df_logits(loss_type, x, state, cfg), y, weight=cw, reduction=reduction)
    if loss_type != "OCSoftmax":
        onehot = F.one_hot(y, state["mapper.weight"].shape[1]).bool()
    if loss_type == "AMSoftmax":
        cos = _df_cos(x, state["mapper.weight"])
        out = torch.where(onehot, cfg["s"] * (cos - cfg["m"]), cfg["s"] * cos)
        return F.cross_entropy(out, y, weight=cw, reduction=reduction)
    if loss_type == "ASoftmax":
        m = cfg["m"]
        cos = _df_cos(x, state["mapper.weight"], True)
        cheb = {1: cos, 2: 2 * cos**2 - 1, 3: 4 * cos**3 - 3 * cos, 4: 8 * cos**4 - 8 * cos**2 + 1,
                5: 16 * cos**5 - 20 * cos**3 + 5 * cos}[m]
        k = (m * cos.acos() / 3.14159265).floor()
        phi = (-1.0) ** k * cheb - 2 * k
        xn = x.pow(2).sum(1).pow(0.5).view(-1, 1)
        lamb = max(cfg["lambda_min"], cfg["lambda_max"] / (1 + 0.1 * iteration))
        out = torch.where(onehot, xn * cos - xn * cos / (1 + lamb) + xn * phi / (1 + lamb), xn * cos)
        logp = F.log_softmax(out, dim=1).gather(1, y.view(-1, 1)).view(-1)
        return (-(1 - logp.detach().exp()) ** cfg["gamma"] * logp).mean()
    cos = _df_cos(x, state["mapper.weight"])
    t = y.view(-1, 1).to(x.dtype)
    out = cfg["alpha"] * (cfg["w_posi"] - cos) * t - cfg["alpha"] * (cfg["w_nega"] - cos) * (1 - t)
    return F.softplus(out).mean()
