"""The DeepFense adapters (deepfense.losses.integrations.deepfense) without DeepFense installed: config handling and
its errors, DeepFense semantics (labels, scores, schedule), the margin heads and their ramp, state_dict keys, the
`deepfense` subcommand's answer when DeepFense is absent. DeepFense's real registry, detector and commands run in
tests/test_coinstall.py."""

import copy
import importlib.util
import logging
import sys
import types

import pytest
import torch

from deepfense.benchmark.cli import main as cli_main
from deepfense.losses.integrations import deepfense as integration
from deepfense.losses import AMSoftmax, ArcFace, CombinedMargin, MissingKeyError, UnknownKeyError
from deepfense.losses.integrations.deepfense import (ADAPTERS, FusedAMSoftmax, FusedArcFace, FusedASoftmax,
                                                     FusedCombinedMargin, FusedCrossEntropy, FusedOCSoftmax,
                                                     convert_losses, use_fused_losses)

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


# --- DeepFense's label habit: float labels (its AMSoftmax/ASoftmax call .long(), OCSoftmax multiplies by them) ------

@pytest.mark.parametrize("cls", [FusedAMSoftmax, FusedASoftmax, FusedOCSoftmax, FusedCrossEntropy, FusedArcFace,
                                 FusedCombinedMargin])
def test_integral_float_labels_are_class_indices(cls):
    x, y = _data(1)
    head = cls({"embedding_dim": D})
    ref = copy.deepcopy(head)  # ASoftmax's step advances per forward: each copy sees the same step
    torch.testing.assert_close(head(x, y.float()), ref(x, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"whole class indices .* got 0\.5"):
        head(x, torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="whole class indices"):
        head(x, torch.tensor([0.0, 1.0, float("nan"), 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="integer tensor"):  # deepfense.losses' own rule without DeepFense semantics
        cls({"embedding_dim": D}, deepfense_semantics=False)(x, y.float())


# --- errors a DeepFense user understands --------------------------------------------------------------------------

def test_misspelt_required_key_names_the_key_and_the_typo():
    with pytest.raises(MissingKeyError, match=r"missing required key 'embedding_dim' \(the config has "
                                              r"'embeding_dim': did you mean 'embedding_dim'\?\)"):
        FusedAMSoftmax({"embeding_dim": 192, "n_classes": 2})
    with pytest.warns(UserWarning, match=r"'n_clases' is ignored: did you mean 'n_classes'\?"):
        FusedArcFace({"embedding_dim": D, "n_clases": 5})


def test_spec_form_says_deepfense_wants_flat_keys():
    with pytest.raises(UnknownKeyError, match=r"entries are flat: write the keys beside 'type'.*\['embedding_dim', "
                                              r"'n_classes'\]"):
        FusedOCSoftmax({"args": {"embedding_dim": D, "n_classes": 2}})


# --- ArcFace, AAMSoftmax, CombinedMargin from flat keys -----------------------------------------------------------

def test_margin_heads_from_flat_keys_match_deepfense_losses_modules():
    x, y = _data(2, n=9)
    y = y + (torch.arange(9) % 3 == 2).long()  # three classes
    for cls, ours, cfg in ((FusedArcFace, ArcFace, dict(m=0.3, s=16.0, sub_centers=3, fallback="pml")),
                           (FusedCombinedMargin, CombinedMargin, dict(m1=1.0, m2=0.2, m3=0.1, s=20.0, sub_centers=2,
                                                                      interclass_filtering_threshold=0.5))):
        head = cls({"type": cls.NAME, "weight": 0.5, "embedding_dim": D, "n_classes": 3, **cfg})
        plain = ours(D, 3, **cfg)
        plain.load_state_dict(head.state_dict(), strict=True)
        torch.testing.assert_close(head(x, y), plain(x, y), rtol=0, atol=0)
        assert head.mapper.weight.shape == (D, 3 * cfg["sub_centers"]) and head.loss_weight == 0.5
    assert ADAPTERS["AAMSoftmax"] is ADAPTERS["ArcFace"] is FusedArcFace


def test_margin_ramp_steps_on_training_forwards_and_resumes():
    cfg = {"embedding_dim": D, "n_classes": 2, "m": 0.0, "final_margin": 0.2, "increase_start_iter": 1,
           "fix_start_iter": 5, "increase_type": "linear"}
    head, (x, y) = FusedArcFace(cfg), _data(3)
    seen = []
    for _ in range(7):
        head(x, y)
        seen.append(head.m)
    assert seen == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    head.eval()
    head(x, y)  # validation does not advance it
    resumed = FusedArcFace(cfg)
    resumed.load_state_dict(head.state_dict(), strict=True)
    assert int(resumed.margin_step) == 7
    resumed(x, y)
    assert resumed.m == pytest.approx(0.2)
    combined = FusedCombinedMargin({"embedding_dim": D, "m3": 0.0, "final_margin": 0.3, "increase_start_iter": 0,
                                    "fix_start_iter": 0, "scheduled_margin": "m3"})
    combined(x, y)
    assert combined.m3 == pytest.approx(0.3) and combined.m2 == 0.5
    with pytest.raises(MissingKeyError, match="fix_start_iter"):
        FusedArcFace({"embedding_dim": D, "final_margin": 0.2, "increase_start_iter": 0})
    with pytest.warns(UserWarning, match="'final_margin' is ignored"):  # DeepFense's AMSoftmax has no ramp
        FusedAMSoftmax({"embedding_dim": D, "final_margin": 0.2})


# --- the command line without DeepFense -----------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("deepfense.utils") is not None, reason="DeepFense is installed here")
def test_deepfense_subcommand_without_deepfense_exits_2_with_one_line(capsys):
    assert cli_main(["deepfense", "train", "-c", "cfg.yaml"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("deepfense-losses deepfense: ") and "pip install --no-deps deepfense==0.2.2" in err


# --- the registration handle, on a stand-in of DeepFense 0.2.2's registry (the real one: tests/test_coinstall.py) ---

class _Registry:
    """DeepFense 0.2.2's `Registry` interface (deepfense/utils/registry.py): logs a warning when a name is replaced."""

    def __init__(self):
        self._registry = {}

    def register(self, name):
        def decorator(obj):
            if name in self._registry:
                logging.getLogger(__name__).warning(f"{name} already registered in Loss. Overwriting.")
            self._registry[name] = obj
            return obj
        return decorator

    def get(self, name):
        return self._registry[name]

    def list(self):
        return list(self._registry)

    def __contains__(self, name):
        return name in self._registry


class _TheirAMSoftmax(torch.nn.Module):
    """The state DeepFense's AMSoftmaxLoss holds: its config, mapper.weight [D, C], m_loss.weight [C]."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.mapper = torch.nn.Module()
        self.mapper.weight = torch.nn.Parameter(torch.randn(config["embedding_dim"], config["n_classes"]))
        self.m_loss = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 0.5]))


@pytest.fixture
def registry(monkeypatch):
    """A stand-in DeepFense: `deepfense.models` imports, `deepfense.utils.registry.LOSS_REGISTRY` holds its losses."""
    reg = _Registry()
    for name in ("AMSoftmax", "ASoftmax", "OCSoftmax", "CrossEntropy"):
        reg._registry[name] = type(f"Their{name}", (_TheirAMSoftmax,), {})
    utils = types.ModuleType("deepfense.utils.registry")
    utils.LOSS_REGISTRY = reg
    for name, mod in (("deepfense.models", types.ModuleType("deepfense.models")),
                      ("deepfense.utils", types.ModuleType("deepfense.utils")), ("deepfense.utils.registry", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(integration, "_ORIGINALS", {})
    monkeypatch.setattr(integration, "_ACTIVE", None)
    return reg


def test_registration_is_idempotent_quiet_and_undone(registry, caplog):
    own = dict(registry._registry)
    with caplog.at_level(logging.WARNING):
        handle = use_fused_losses()
        assert use_fused_losses() is handle
    assert caplog.records == []
    assert {n: registry.get(n) for n in ADAPTERS} == ADAPTERS
    assert use_fused_losses(deepfense_semantics=False) is handle  # semantics switched, DeepFense's classes still kept
    assert not registry.get("AMSoftmax").deepfense_semantics
    handle.restore()
    handle.restore()
    assert registry._registry == own and not handle.active
    with use_fused_losses() as again:
        assert again is not handle and registry.get("ArcFace") is FusedArcFace
    assert registry._registry == own and caplog.records == []


def test_too_late_warns_and_convert_keeps_parameters(registry):
    their = registry.get("AMSoftmax")({"embedding_dim": D, "n_classes": 2})
    detector = torch.nn.ModuleDict({"losses": torch.nn.ModuleList([their])})
    weight = their.mapper.weight
    with pytest.warns(UserWarning, match=r"1 DeepFense loss module\(s\) \(TheirAMSoftmax\).*convert_losses"):
        use_fused_losses()
    assert convert_losses(detector) == 1
    head = detector["losses"][0]
    assert type(head) is FusedAMSoftmax and head.mapper.weight is weight
    torch.testing.assert_close(head.class_weights, torch.tensor([0.5, 0.5]))
    assert convert_losses(detector) == 0
