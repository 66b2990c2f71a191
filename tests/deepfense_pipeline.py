"""DeepFense 0.2.2's own ModularDetector, built from its bundled config/train.yaml loss section, trained on DeepFense's
losses and on the fused adapters side by side; prints one JSON line of measured differences.

Run inside the co-install venv (tests/test_coinstall.py::test_deepfense_pipeline). The frontend (wav2vec2, a 300M
model download) and backend are replaced by small stand-ins registered in DeepFense's registries; the loss section is
DeepFense's own, unchanged. Float64 throughout, so the comparison is not lost in fp32 rounding.
"""

import copy
import json
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

import deepfense.models  # registers DeepFense's components
from deepfense.models.base_model import BaseBackend, BaseFrontend
from deepfense.models.detector import ModularDetector
from deepfense.utils.registry import LOSS_REGISTRY, register_backend, register_frontend

from deepfense.losses.integrations.deepfense import ADAPTERS, use_fused_losses

SAMPLES, FEATS = 64, 16


@register_frontend("TinyFrontend")
class TinyFrontend(BaseFrontend):
    """[B, SAMPLES] 'waveform' -> [B, SAMPLES // 16, FEATS] frames."""

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(16, FEATS)

    def forward(self, x, mask=None):
        return torch.tanh(self.proj(x.view(x.shape[0], -1, 16)))


@register_backend("TinyBackend")
class TinyBackend(BaseBackend):
    """Mean-pooled frames -> [B, embedding_dim]."""

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(FEATS, config["embedding_dim"])

    def forward(self, feats):
        return self.proj(feats.mean(1))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, SAMPLES, generator=g, dtype=torch.float64) + 0.06 * (2 * y[:, None] - 1)  # bonafide (1) and spoof differ a little
    return x, y


def eer(scores, labels):
    """Equal error rate of 1-D scores (higher = bonafide, label 1)."""
    order = torch.argsort(scores, descending=True)
    lab = labels[order].double()
    tpr = torch.cumsum(lab, 0) / lab.sum()
    fpr = torch.cumsum(1 - lab, 0) / (1 - lab).sum()
    i = torch.argmin(torch.abs((1 - tpr) - fpr))
    return float(((1 - tpr[i]) + fpr[i]) / 2)


def one_d(scores):
    return scores if scores.ndim == 1 else scores[:, 1] - scores[:, 0]


def build(model_cfg, seed=0):
    torch.manual_seed(seed)
    return ModularDetector(copy.deepcopy(model_cfg)).double()


def run(model_cfg, theirs, steps=25, eval_every=5):
    """Train a DeepFense-loss detector and a fused one from the same weights; returns the measured differences."""
    LOSS_REGISTRY._registry.update(theirs)
    ref = build(model_cfg)
    use_fused_losses()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = build(model_cfg)
    assert all(isinstance(m, tuple(ADAPTERS.values())) for m in fused.losses)
    fused.load_state_dict(ref.state_dict(), strict=True)  # a DeepFense checkpoint into the fused detector
    opts = [torch.optim.Adam(d.parameters(), lr=1e-3, weight_decay=1e-4) for d in (ref, fused)]
    (xt, yt), (xv, yv) = data(32 * steps, 1), data(400, 2)
    worst_loss = worst_eval = 0.0
    for step in range(steps):
        xb, yb = xt[32 * step:32 * (step + 1)], yt[32 * step:32 * (step + 1)]
        losses = []
        for det, opt in zip((ref, fused), opts):
            det.train()
            opt.zero_grad()
            loss = det.compute_loss(det(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        worst_loss = max(worst_loss, float(abs(losses[0] - losses[1]) / abs(losses[0])))
        if step % eval_every == eval_every - 1:  # a validation pass in eval mode, as DeepFense's trainer does
            vals = []
            for det in (ref, fused):
                det.eval()
                with torch.no_grad():
                    vals.append(det.compute_loss(det(xv), yv))
            worst_eval = max(worst_eval, float(abs(vals[0] - vals[1]) / abs(vals[0])))
    with torch.no_grad():
        ref.eval(), fused.eval()
        s_ref, s_fused = ref(xv)["scores"], fused(xv)["scores"]
        LOSS_REGISTRY._registry.update(theirs)
        back = build(model_cfg, seed=1)
        back.load_state_dict(fused.state_dict(), strict=True)  # the fused checkpoint back into DeepFense's detector
        back.eval()
        s_back = back(xv)["scores"]
        main = fused.losses[0]
        logits = main.get_logits(fused(xv)["embeddings"])
    extra = {}
    if logits.shape[1] == 2:  # the EER our own two-class score (logit difference) would give on the same weights
        extra["eer_logit_difference"] = eer(logits[:, 1] - logits[:, 0], yv)
    steps_ref = [m.iter for m in ref.losses if hasattr(m, "iter")]
    if steps_ref:  # DeepFense's ASoftmax counts every forward, the validation passes included
        extra["asoftmax_iter_deepfense"] = steps_ref[0]
        extra["asoftmax_step_fused"] = int([m.step for m in fused.losses if hasattr(m, "step")][0])
    return {"loss_rel_diff": worst_loss, "eval_loss_rel_diff": worst_eval, "final_loss": float(losses[1]),
            "score_max_diff": float((s_ref - s_fused).abs().max()), "eer_deepfense": eer(one_d(s_ref), yv),
            "eer_fused": eer(one_d(s_fused), yv), "roundtrip_score_max_diff": float((s_back - s_fused).abs().max()),
            "state_dict_keys_equal": sorted(ref.state_dict()) == sorted(fused.state_dict()), **extra}


def main():
    theirs = dict(LOSS_REGISTRY._registry)
    cfg = yaml.safe_load((Path(deepfense.models.__file__).parent.parent / "config" / "train.yaml").read_text())
    model = cfg["model"]
    dim = model["loss"][0]["embedding_dim"]
    model["frontend"] = {"type": "TinyFrontend", "args": {}}
    model["backend"] = {"type": "TinyBackend", "args": {"embedding_dim": dim}}
    out = {"train.yaml": run(model, theirs)}
    # ASoftmax (as the second loss: DeepFense's ASoftmax.forward has no `logits` argument, so it cannot be the main
    # loss there) with validation passes in between, which advance DeepFense's schedule; and OCSoftmax.
    model["loss"] = [{"type": "AMSoftmax", "weight": 1.0, "embedding_dim": dim, "n_classes": 2, "s": 30.0, "m": 0.4},
                     {"type": "ASoftmax", "weight": 0.5, "embedding_dim": dim, "n_classes": 2, "m": 4}]
    out["AMSoftmax+ASoftmax"] = run(model, theirs)
    model["loss"] = [{"type": "OCSoftmax", "weight": 1.0, "embedding_dim": dim, "w_posi": 0.9, "w_nega": 0.2,
                      "alpha": 20.0}]
    out["OCSoftmax"] = run(model, theirs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
