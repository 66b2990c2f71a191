"""build_loss / registry: the spec's YAML examples, every config form, and every config error."""

import pathlib

import pytest
import torch
import yaml

from deepfense.losses import (AMSoftmax, CrossEntropy, LossConfigError, MissingKeyError, MultiLoss, REQUIRED,
                              UnknownKeyError, UnknownLossError, WrongTypeError, build_loss, list_losses,
                              loss_signature, register_loss)
from deepfense.losses import config as loss_config
from loss_helpers import CLASSES

# The spec's four examples, copied verbatim from shared/spec/deepfense-losses-doc.txt.
SPEC_EXAMPLES = {
    "AMSoftmax": """
loss:
  type: AMSoftmax
  args:
    embedding_dim: 192
    n_classes: 2
    m: 0.3
    s: 30.0
""",
    "ASoftmax": """
loss:
  type: ASoftmax
  args:
    embedding_dim: 192
    m: 4
""",
    "OCSoftmax": """
loss:
  type: OCSoftmax
  args:
    embedding_dim: 192
    m_real: 0.5
    m_fake: 0.2
""",
    "CrossEntropy": """
loss:
  type: CrossEntropy
  args:
    embedding_dim: 192
    n_classes: 2
""",
}

EXPECTED_ATTRS = {
    "AMSoftmax": dict(embedding_dim=192, n_classes=2, m=0.3, s=30.0),
    "ASoftmax": dict(embedding_dim=192, n_classes=2, m=4, gamma=0.5, lambda_min=5.0, lambda_max=1500.0),
    "OCSoftmax": dict(embedding_dim=192, m_real=0.5, m_fake=0.2, alpha=20.0),
    "CrossEntropy": dict(embedding_dim=192, n_classes=2),
}


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Parameter initialisation draws from the global RNG: seed it so results do not depend on test order."""
    torch.manual_seed(0)


@pytest.fixture
def registry_snapshot():
    """Tests that register classes restore the global registry afterwards."""
    saved = dict(loss_config._REGISTRY)
    yield
    loss_config._REGISTRY.clear()
    loss_config._REGISTRY.update(saved)


@pytest.mark.parametrize("loss_type", list(SPEC_EXAMPLES))
def test_spec_yaml_examples_build_verbatim(loss_type):
    module = build_loss(SPEC_EXAMPLES[loss_type])
    assert type(module) is CLASSES[loss_type]
    for key, value in EXPECTED_ATTRS[loss_type].items():
        assert getattr(module, key) == value, key
    x, y = torch.randn(4, 192), torch.tensor([0, 1, 1, 0])
    assert torch.isfinite(module(x, y))


@pytest.mark.parametrize("loss_type", list(SPEC_EXAMPLES))
def test_yaml_file_path_str_and_pathlib(tmp_path, loss_type):
    path = tmp_path / "loss.yaml"
    path.write_text(SPEC_EXAMPLES[loss_type])
    assert type(build_loss(str(path))) is CLASSES[loss_type]
    assert type(build_loss(pathlib.Path(path))) is CLASSES[loss_type]


def test_missing_yaml_file_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="no_such_loss.yaml"):
        build_loss("no_such_loss.yaml")


def test_yaml_is_parsed_with_safe_load_only():
    # a python-object tag must be refused, not executed
    with pytest.raises(yaml.YAMLError):
        build_loss("loss: !!python/object/apply:os.getcwd []\n")


def test_flat_deepfense_form_and_weight():
    module = build_loss({"type": "AMSoftmax", "weight": 0.5, "embedding_dim": 16, "m": 0.2})
    assert isinstance(module, AMSoftmax) and module.loss_weight == 0.5 and module.m == 0.2


def test_spec_form_weight_in_args_or_beside_them():
    inside = build_loss({"type": "OCSoftmax", "args": {"embedding_dim": 8, "weight": 0.25}})
    beside = build_loss({"type": "OCSoftmax", "weight": 0.75, "args": {"embedding_dim": 8}})
    assert (inside.loss_weight, beside.loss_weight) == (0.25, 0.75)
    with pytest.raises(LossConfigError, match="'weight'"):
        build_loss({"type": "OCSoftmax", "weight": 1.0, "args": {"embedding_dim": 8, "weight": 2.0}})


def test_loss_and_model_loss_wrappers():
    entry = {"type": "CrossEntropy", "embedding_dim": 8, "n_classes": 3}
    assert build_loss({"loss": entry}).n_classes == 3
    # DeepFense's experiment layout: the loss list under model:, beside other sections
    multi = build_loss({"model": {"loss": [entry]}, "training": {"epochs": 1}})
    assert isinstance(multi, MultiLoss) and multi.losses[0].n_classes == 3


def test_list_builds_multiloss_with_weighted_sum():
    text = """
loss:
  - type: AMSoftmax
    weight: 1.0
    embedding_dim: 12
  - type: OCSoftmax
    weight: 0.5
    embedding_dim: 12
  - type: CrossEntropy
    args: {embedding_dim: 12}
"""
    multi = build_loss(text)
    assert isinstance(multi, MultiLoss) and multi.loss_weights == [1.0, 0.5, 1.0]  # weight defaults to 1.0
    x, y = torch.randn(6, 12), torch.tensor([0, 1, 1, 0, 1, 0])
    a, o, c = (loss(x, y) for loss in multi.losses)
    torch.testing.assert_close(multi(x, y), a + 0.5 * o + c)
    torch.testing.assert_close(multi(x, y, logits=torch.zeros(6, 2)), a + 0.5 * o + c)  # logits accepted, ignored
    # scores and logits come from the first (main) entry
    torch.testing.assert_close(multi.get_score(x), multi.losses[0].get_score(x))
    torch.testing.assert_close(multi.get_logits(x), multi.losses[0].get_logits(x))


def test_list_losses_and_signatures():
    assert set(list_losses()) >= {"AMSoftmax", "ASoftmax", "OCSoftmax", "CrossEntropy"}
    sig = loss_signature("AMSoftmax")
    assert sig["embedding_dim"] is REQUIRED
    assert (sig["n_classes"], sig["m"], sig["s"], sig["weight"], sig["backend"]) == (2, 0.3, 30.0, 1.0, "auto")
    assert (loss_signature("OCSoftmax")["m_real"], loss_signature("OCSoftmax")["m_fake"]) == (0.5, 0.2)
    assert loss_signature("ASoftmax")["m"] == 4


E = 8  # a small embedding_dim for the error cases


# (config, error class, key the error must name, text the message must contain)
CONFIG_ERRORS = [
    # unknown type: names the nearest and the registered ones
    ({"type": "AMSoftMax", "embedding_dim": E}, UnknownLossError, "type", "did you mean 'AMSoftmax'"),
    ({"type": "Triplet", "embedding_dim": E}, UnknownLossError, "type",
     "AMSoftmax, ASoftmax, AdaFace, ArcFace, CombinedMargin, CrossEntropy, CurricularFace"),
    # misspelt / unknown keys, flat and spec form, with the nearest valid key
    ({"type": "AMSoftmax", "embeding_dim": E}, UnknownKeyError, "embeding_dim", "did you mean 'embedding_dim'"),
    ({"type": "CrossEntropy", "args": {"embedding_dim": E, "n_class": 2}}, UnknownKeyError, "n_class",
     "did you mean 'n_classes'"),
    ({"type": "OCSoftmax", "args": {"embedding_dim": E, "m_reel": 0.9}}, UnknownKeyError, "m_reel",
     "did you mean 'm_real'"),
    ({"type": "ASoftmax", "embedding_dim": E, "lamda_min": 1}, UnknownKeyError, "lamda_min",
     "did you mean 'lambda_min'"),
    ({"type": "AMSoftmax", "args": {"embedding_dim": E}, "m": 0.2}, UnknownKeyError, "m", "under 'args'"),
    # missing keys
    ({"type": "AMSoftmax", "args": {"n_classes": 2}}, MissingKeyError, "embedding_dim", "embedding_dim"),
    ({"embedding_dim": E}, MissingKeyError, "type", "'type'"),
    # wrong types
    ({"type": "AMSoftmax", "embedding_dim": E, "s": "30"}, WrongTypeError, "s", "number"),
    ({"type": "AMSoftmax", "embedding_dim": E, "n_classes": True}, WrongTypeError, "n_classes", "integer"),
    ({"type": "AMSoftmax", "embedding_dim": "192"}, WrongTypeError, "embedding_dim", "integer"),
    ({"type": "CrossEntropy", "embedding_dim": E, "class_weights": "0.5,0.5"}, WrongTypeError, "class_weights", "list"),
    ({"type": "AMSoftmax", "args": [E]}, WrongTypeError, "args", "mapping"),
    # out of range
    ({"type": "AMSoftmax", "embedding_dim": E, "s": 0}, LossConfigError, "s", "> 0"),
    ({"type": "AMSoftmax", "embedding_dim": E, "s": -30.0}, LossConfigError, "s", "> 0"),
    ({"type": "AMSoftmax", "embedding_dim": E, "m": -0.3}, LossConfigError, "m", ">= 0"),
    ({"type": "CrossEntropy", "embedding_dim": E, "n_classes": 0}, LossConfigError, "n_classes", ">= 1"),
    ({"type": "AMSoftmax", "embedding_dim": 0}, LossConfigError, "embedding_dim", ">= 1"),
    ({"type": "AMSoftmax", "embedding_dim": 19.5}, LossConfigError, "embedding_dim", "integer"),
    ({"type": "ASoftmax", "embedding_dim": E, "m": 0}, LossConfigError, "m", "integer >= 1"),
    ({"type": "ASoftmax", "embedding_dim": E, "m": -1}, LossConfigError, "m", "integer >= 1"),
    ({"type": "ASoftmax", "embedding_dim": E, "m": 2.5}, LossConfigError, "m", "integer >= 1"),
    ({"type": "ASoftmax", "embedding_dim": E, "gamma": -1}, LossConfigError, "gamma", ">= 0"),
    ({"type": "ASoftmax", "embedding_dim": E, "lambda_min": -5}, LossConfigError, "lambda_min", ">= 0"),
    ({"type": "OCSoftmax", "embedding_dim": E, "alpha": 0}, LossConfigError, "alpha", "> 0"),
    ({"type": "OCSoftmax", "embedding_dim": E, "m_real": 1.5}, LossConfigError, "m_real", "<= 1"),
    ({"type": "OCSoftmax", "embedding_dim": E, "m_fake": -2}, LossConfigError, "m_fake", ">= -1"),
    ({"type": "OCSoftmax", "embedding_dim": E, "m_real": 0.9, "w_posi": 0.9}, LossConfigError, "m_real", "give one"),
    ({"type": "AMSoftmax", "embedding_dim": E, "class_weights": [1, 2, 3]}, LossConfigError, "class_weights",
     "2 entries"),
    ({"type": "OCSoftmax", "embedding_dim": E, "class_weights": [1.0]}, LossConfigError, "class_weights", "2 entries"),
    ({"type": "CrossEntropy", "embedding_dim": E, "class_weights": [1, -1]}, LossConfigError, "class_weights",
     ">= 0"),
    ({"type": "AMSoftmax", "embedding_dim": E, "reduction": "avg"}, LossConfigError, "reduction", "'mean'"),
    ({"type": "ASoftmax", "embedding_dim": E, "label_smoothing": 0.1}, LossConfigError, "label_smoothing",
     "not supported"),
    ({"type": "OCSoftmax", "embedding_dim": E, "label_smoothing": 0.1}, LossConfigError, "label_smoothing",
     "not supported"),
    ({"type": "AMSoftmax", "embedding_dim": E, "label_smoothing": 1.5}, LossConfigError, "label_smoothing", "<= 1"),
    ({"type": "AMSoftmax", "embedding_dim": E, "bonafide_label": 2}, LossConfigError, "bonafide_label", "0..1"),
    ({"type": "AMSoftmax", "embedding_dim": E, "backend": "cuda"}, LossConfigError, "backend", "'triton'"),
    ({"type": "AMSoftmax", "embedding_dim": E, "weight": -1}, LossConfigError, "weight", ">= 0"),
]


@pytest.mark.parametrize("cfg, error, key, text", CONFIG_ERRORS,
                         ids=[f"{c.get('type', 'no-type')}-{k}-{i}" for i, (c, _, k, _t) in enumerate(CONFIG_ERRORS)])
def test_config_errors_name_the_key(cfg, error, key, text):
    with pytest.raises(error) as info:
        build_loss(cfg)
    assert isinstance(info.value, ValueError)  # every config error can also be caught as one ValueError
    assert info.value.key == key
    assert key in str(info.value) and text in str(info.value), str(info.value)


# value errors (not key errors) of flat configs: the constructors raise them too, so direct use is checked the same
DIRECT_ERRORS = [c for c in CONFIG_ERRORS if c[1] in (LossConfigError, WrongTypeError) and "args" not in c[0]]


@pytest.mark.parametrize("cfg, error, key, text", DIRECT_ERRORS)
def test_direct_construction_gives_the_same_value_errors(cfg, error, key, text):
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    with pytest.raises(error) as info:
        CLASSES[cfg["type"]](**kwargs)
    assert info.value.key == key and text in str(info.value)


def test_list_error_names_the_entry():
    with pytest.raises(UnknownKeyError, match=r"loss\[1\].*'alfa'.*did you mean 'alpha'"):
        build_loss([{"type": "AMSoftmax", "embedding_dim": E}, {"type": "OCSoftmax", "embedding_dim": E, "alfa": 3}])


@pytest.mark.parametrize("cfg", [None, "", [], 42, "just a string"])
def test_empty_or_non_mapping_config(cfg):
    with pytest.raises(LossConfigError):
        build_loss(cfg)


def test_register_loss_rejects_duplicates_and_non_modules(registry_snapshot):
    with pytest.raises(LossConfigError, match="already registered"):
        register_loss("AMSoftmax")(CrossEntropy)
    with pytest.raises(WrongTypeError, match="nn.Module"):
        register_loss("NotAModule")(dict)
    register_loss("AMSoftmax", override=True)(CrossEntropy)
    assert isinstance(build_loss({"type": "AMSoftmax", "embedding_dim": E}), CrossEntropy)


def test_custom_loss_required_key_and_weight_without_argument(registry_snapshot):
    @register_loss("NoWeightArg")
    class NoWeightArg(torch.nn.Module):  # takes no `weight`: build_loss keeps it as loss_weight
        def __init__(self, embedding_dim: int, n_classes: int):
            super().__init__()
            self.n_classes = n_classes

        def forward(self, embeddings, targets):
            return embeddings.sum() * 0

    with pytest.raises(MissingKeyError, match="'n_classes'"):
        build_loss({"type": "NoWeightArg", "embedding_dim": E})
    module = build_loss({"type": "NoWeightArg", "embedding_dim": E, "n_classes": 3, "weight": 0.1})
    assert module.loss_weight == 0.1
    multi = build_loss([{"type": "AMSoftmax", "embedding_dim": E}, {"type": "NoWeightArg", "embedding_dim": E,
                                                                     "n_classes": 3, "weight": 0.1}])
    x, y = torch.randn(3, E), torch.tensor([0, 1, 0])
    torch.testing.assert_close(multi(x, y, logits=torch.zeros(3, 2)), multi.losses[0](x, y))


def test_docs_custom_loss_snippet_runs_as_written(registry_snapshot):
    # the snippet itself, taken from docs/losses.md, so the docs cannot drift; then check it does what they say
    doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "losses.md"
    assert "## Adding custom losses" in doc.read_text(), "docs/losses.md must have an 'Adding custom losses' section"
    section = doc.read_text().split("## Adding custom losses", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    ns = {}
    exec(compile(code, str(doc), "exec"), ns)
    assert "CenterLoss" in list_losses()
    am, center = ns["loss_fn"].losses
    emb, y = ns["embeddings"], ns["targets"]
    expected = am(emb, y) + 0.01 * (emb - center.centers[y]).pow(2).sum(1).mean()
    torch.testing.assert_close(ns["loss"], expected)
    assert ns["scores"].shape == (8,) and center.centers.grad is not None
    assert ns["loss_fn"].loss_weights == [1.0, 0.01]
