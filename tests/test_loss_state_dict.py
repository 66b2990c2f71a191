"""state_dict: our round trips, and DeepFense 0.2.2-shaped loss-head checkpoints loading with strict=True and giving
DeepFense's losses, gradients and scores (formulas in loss_helpers, re-derived from the peer's behaviour)."""

import io

import pytest
import torch

from deepfense.losses import AMSoftmax, ASoftmax, build_loss
from loss_helpers import LOSS_TYPES, make, backend_params, df_logits, df_loss

# DeepFense config values used by the DeepFense-formula side (its OCSoftmax names the margins w_posi / w_nega)
DF_CFG = {"AMSoftmax": dict(m=0.3, s=30.0), "ASoftmax": dict(m=4, gamma=0.5, lambda_min=5, lambda_max=1500),
          "OCSoftmax": dict(alpha=20.0, w_posi=0.5, w_nega=0.2), "CrossEntropy": {}}
OWN_KEYS = {"AMSoftmax": {"mapper.weight"}, "ASoftmax": {"mapper.weight", "step"}, "OCSoftmax": {"mapper.weight"},
            "CrossEntropy": {"fc.weight", "fc.bias"}}


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Parameter initialisation draws from the global RNG: seed it so results do not depend on test order."""
    torch.manual_seed(0)


def deepfense_state(loss_type, dim, n_classes, class_weights, generator):
    """A state dict as DeepFense 0.2.2 saves it: trained (non-unit) mapper columns, class weights in its
    nn.CrossEntropyLoss (m_loss for AMSoftmax, criterion for CrossEntropy), no ASoftmax schedule state."""
    if loss_type == "CrossEntropy":
        state = {"fc.weight": torch.randn(n_classes, dim, generator=generator),
                 "fc.bias": torch.randn(n_classes, generator=generator)}
        if class_weights is not None:
            state["criterion.weight"] = torch.tensor(class_weights)
        return state
    cols = 1 if loss_type == "OCSoftmax" else n_classes
    state = {"mapper.weight": 3 * torch.randn(dim, cols, generator=generator)}
    if loss_type == "AMSoftmax" and class_weights is not None:
        state["m_loss.weight"] = torch.tensor(class_weights)
    return state


@pytest.mark.parametrize("with_weights", [False, True], ids=["no-class-weights", "class-weights"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_round_trip_keys_and_outputs(loss_type, with_weights):
    cw = [0.3, 0.7] if with_weights else None
    module = make(loss_type, 7, class_weights=cw)
    keys = set(module.state_dict())
    assert keys == OWN_KEYS[loss_type] | ({"class_weights"} if with_weights else set())
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    loaded = make(loss_type, 7)  # built without class weights: the buffer is adopted from the dict
    loaded.load_state_dict(torch.load(buffer), strict=True)
    x, y = torch.randn(5, 7), torch.tensor([0, 1, 1, 0, 1])
    torch.testing.assert_close(loaded(x, y), module(x, y), rtol=0, atol=0)
    torch.testing.assert_close(loaded.get_score(x), module.get_score(x), rtol=0, atol=0)
    assert set(loaded.state_dict()) == keys


# (n_classes, DeepFense class weights): its AMSoftmax default [0.5, 0.5]; none; unequal weights over 3 classes
DF_CASES = {"default-weights": (2, [0.5, 0.5]), "no-weights": (2, None), "3-classes": (3, [0.2, 0.3, 0.5])}


def _df_params():
    """DeepFense's ASoftmax/OCSoftmax take no class weights or reduction (always an unweighted mean), and OCSoftmax
    has one centre whatever n_classes: only the combinations DeepFense has."""
    for loss_type in LOSS_TYPES:
        for case, (n_classes, weights) in DF_CASES.items():
            for reduction in ("mean", "sum", "none"):
                if loss_type in ("ASoftmax", "OCSoftmax") and (weights is not None or reduction != "mean"):
                    continue
                if loss_type == "OCSoftmax" and n_classes != 2:
                    continue
                yield pytest.param(loss_type, n_classes, weights, reduction, id=f"{loss_type}-{case}-{reduction}")


@pytest.mark.parametrize("backend_device", backend_params())
@pytest.mark.parametrize("loss_type, n_classes, class_weights, reduction", list(_df_params()))
def test_deepfense_state_dict_gives_deepfense_losses_grads_and_scores(loss_type, n_classes, class_weights,
                                                                      reduction, backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(7)
    state = deepfense_state(loss_type, 11, n_classes, class_weights, g)
    module = make(loss_type, 11, n_classes, reduction=reduction, backend=backend)
    module.load_state_dict(state, strict=True)
    module.to(device)
    x = torch.randn(9, 11, dtype=torch.float64, generator=g).to(device).requires_grad_()
    y = torch.randint(0, n_classes, (9,), generator=g).to(device)
    state64 = {k: v.double().to(device) for k, v in state.items()}
    cfg = DF_CFG[loss_type]
    # DeepFense's renorm divides by (|w| + 1e-7), so its columns are unit only to ~1e-7 / |w| (~1e-8 here): float64
    # agreement is to that level, not to 1e-15
    tol = dict(rtol=1e-5, atol=1e-6) if backend == "triton" else dict(rtol=1e-7, atol=1e-8)

    ours = module(x, y)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    theirs = df_loss(loss_type, x, y, state64, cfg, reduction=reduction)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(grad_ours, grad_theirs, **tol)

    logits = df_logits(loss_type, x.detach(), state64, cfg)
    torch.testing.assert_close(module.get_logits(x.detach()), logits, **tol)
    if loss_type == "OCSoftmax":
        expected_score = logits[:, 0]
    elif n_classes == 2:  # CrossEntropy: the full ratio logit_bona - logit_spoof, where DeepFense gives logit_bona
        expected_score = logits[:, 1] - logits[:, 0]
    else:
        expected_score = logits
    torch.testing.assert_close(module.get_score(x.detach()), expected_score, **tol)


def test_deepfense_asoftmax_schedule_starts_at_one_after_loading():
    g = torch.Generator().manual_seed(3)
    state = deepfense_state("ASoftmax", 8, 3, None, g)
    module = ASoftmax(8, n_classes=3, backend="reference")
    module.load_state_dict(state, strict=True)  # no 'step' in a DeepFense dict
    assert int(module.step) == 0
    x, y = torch.randn(6, 8, dtype=torch.float64, generator=g), torch.tensor([0, 1, 2, 2, 1, 0])
    state64 = {k: v.double() for k, v in state.items()}
    for iteration in (1, 2, 3):  # DeepFense's counter after its increment
        torch.testing.assert_close(module(x, y), df_loss("ASoftmax", x, y, state64, DF_CFG["ASoftmax"],
                                                         iteration=iteration), rtol=1e-9, atol=1e-10)
        # tight: DeepFense's ASoftmax divides by the renormed column norm, which cancels renorm's 1e-7


def test_missing_step_keeps_the_current_schedule():
    module = ASoftmax(4, backend="reference")
    module.step.fill_(42)
    module.load_state_dict({"mapper.weight": torch.randn(4, 2)}, strict=True)
    assert int(module.step) == 42


def test_deepfense_detector_loss_list_loads_into_multiloss():
    # DeepFense's detector keeps its heads in `losses` (a ModuleList): the losses.* part of a checkpoint loads as is
    g = torch.Generator().manual_seed(5)
    cfg = [{"type": "AMSoftmax", "embedding_dim": 6, "weight": 1.0},
           {"type": "CrossEntropy", "embedding_dim": 6, "n_classes": 2, "weight": 0.5, "class_weights": [1.0, 3.0]}]
    detector_state = {"losses.0." + k: v for k, v in deepfense_state("AMSoftmax", 6, 2, [0.5, 0.5], g).items()}
    detector_state.update({"losses.1." + k: v for k, v in deepfense_state("CrossEntropy", 6, 2, [1.0, 3.0],
                                                                           g).items()})
    multi = build_loss(cfg)
    multi.load_state_dict(detector_state, strict=True)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([1, 0, 0, 1, 1])
    state0 = {k[len("losses.0."):]: v.double() for k, v in detector_state.items() if k.startswith("losses.0.")}
    state1 = {k[len("losses.1."):]: v.double() for k, v in detector_state.items() if k.startswith("losses.1.")}
    expected = (df_loss("AMSoftmax", x, y, state0, DF_CFG["AMSoftmax"])
                + 0.5 * df_loss("CrossEntropy", x, y, state1, {}))
    torch.testing.assert_close(multi(x, y), expected, rtol=1e-7, atol=1e-8)  # renorm's 1e-7, as above


@pytest.mark.parametrize("state, text", [
    ({"mapper.weight": torch.randn(4, 2), "m_loss.weight": torch.ones(3)}, "expected 2 class weights"),
    ({"mapper.weight": torch.randn(4, 2), "m_loss.weight": torch.ones(2), "class_weights": torch.ones(2)},
     "several keys"),
    ({"mapper.weight": torch.randn(4, 3)}, "size mismatch"),
    ({"mapper.weight": torch.randn(4, 2), "m_loss.bias": torch.ones(2)}, "Unexpected key"),
], ids=["wrong-length", "two-weight-keys", "wrong-shape", "unexpected-key"])
def test_bad_state_dicts_are_refused(state, text):
    module = AMSoftmax(4)
    with pytest.raises(RuntimeError, match=text):
        module.load_state_dict(state, strict=True)
