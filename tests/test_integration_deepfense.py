"""The DeepFense adapters (deepfense.losses.integrations.deepfense) without DeepFense installed: config handling,
DeepFense semantics, state_dict keys. DeepFense's real detector runs in tests/test_coinstall.py."""

import importlib.util

import pytest
import torch

from deepfense.losses import AMSoftmax
from deepfense.losses.integrations.deepfense import (FusedAMSoftmax, FusedASoftmax, FusedCrossEntropy, FusedOCSoftmax,
                                                     use_fused_losses)

D = 8


def _data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_cross_entropy_score_and_state_dict_keys():
    head = FusedCrossEntropy({"embedding_dim": D, "n_classes": 2, "weight": 0.5, "class_weights": [0.1, 0.9]})
    x, _ = _data()
    assert set(head.state_dict()) == {"fc.weight", "fc.bias", "criterion.weight"}
    torch.testing.assert_close(head.get_score(x), head.get_logits(x)[:, 1])  # DeepFense's logit[bonafide]
    ours = FusedCrossEntropy({"embedding_dim": D, "n_classes": 2}, deepfense_semantics=False)
    ours.load_state_dict({k: v for k, v in head.state_dict().items() if k.startswith("fc.")}, strict=True)
    logits = ours.get_logits(x)
    torch.testing.assert_close(ours.get_score(x), logits[:, 1] - logits[:, 0])


def test_am_softmax_default_class_weights_and_weight_not_applied():
    head = FusedAMSoftmax({"embedding_dim": D, "n_classes": 2, "weight": 0.25})
    plain = AMSoftmax(D, 2, class_weights=[0.5, 0.5])
    plain.load_state_dict(head.state_dict(), strict=True)  # m_loss.weight -> class_weights
    assert set(head.state_dict()) == {"mapper.weight", "m_loss.weight"}
    x, y = _data()
    torch.testing.assert_close(head(x, y), plain(x, y))  # the detector applies `weight`, never the adapter
    assert FusedAMSoftmax({"embedding_dim": D, "n_classes": 5}).class_weights is None


def test_a_softmax_step_advances_in_eval_and_is_not_saved():
    head = FusedASoftmax({"embedding_dim": D, "n_classes": 2, "m": 4, "iter": 7, "lamb": 1500})
    x, y = _data()
    assert int(head.step) == 7 and "step" not in head.state_dict()
    head.eval()
    head(x, y)
    head.train()
    head(x, y)
    assert int(head.step) == 9
    ours = FusedASoftmax({"embedding_dim": D}, deepfense_semantics=False).eval()
    ours(x, y)
    assert int(ours.step) == 0 and "step" in ours.state_dict()


def test_ignored_keys_warn_and_are_ignored():
    cfg = {"embedding_dim": D, "w_posi": 0.9, "w_nega": 0.2, "alpha": 20.0, "reduction": "sum", "in_planes": D,
           "typo_key": 1}
    with pytest.warns(UserWarning) as rec:
        head = FusedOCSoftmax(cfg)
    text = " ".join(str(w.message) for w in rec)
    assert "'reduction' is ignored" in text and "'typo_key' is ignored" in text and "in_planes" not in text
    assert head.reduction == "mean" and head.m_real == 0.9 and head.m_fake == 0.2
    with pytest.warns(UserWarning, match="typo_key"):
        assert FusedOCSoftmax(cfg, deepfense_semantics=False).reduction == "sum"


@pytest.mark.skipif(importlib.util.find_spec("deepfense.utils") is not None, reason="DeepFense is installed here")
def test_use_fused_losses_without_deepfense_says_what_to_install():
    with pytest.raises(ImportError, match="pip install --no-deps deepfense==0.2.2"):
        use_fused_losses()
