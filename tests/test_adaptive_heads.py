"""The adaptive-margin face heads (AdaFace, MagFace, ElasticFace, CurricularFace) against float64 transcriptions of
the authors' heads (tests/published_heads.py): loss, dX and dW, the heads' state over several steps, the clamp
boundaries, float32 and bf16 inputs, a short training run, state_dict, YAML, and batches of one.

The heads hand per-sample margins to `functional.arcface_loss` (and t to `functional.curricular_face_loss`).
"""

import copy
import math

import pytest
import torch

import published_heads as pub
from backend_cases import DEVICE
from deepfense import functional as F
from deepfense.losses import AdaFace, CurricularFace, ElasticFace, MagFace, build_loss
from deepfense.losses.checks import LossConfigError

BACKENDS = ["reference", "torch", "triton"]
F64 = torch.float64


def rows_at(thetas, norms, C=5, D=16, seed=0, dtype=F64):
    """x [B, D] whose row i sits at angle thetas[i] from its target column and has norm norms[i]; W [D, C]; targets.
    Chosen angles put rows on each side of the heads' clamps and fallbacks."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, C, generator=gen, dtype=F64)
    w_hat = w / w.norm(dim=0)
    rows, targets = [], []
    for i, (theta, norm) in enumerate(zip(thetas, norms)):
        y = (i * 3) % C
        u = torch.randn(D, generator=gen, dtype=F64)
        u = u - (u @ w_hat[:, y]) * w_hat[:, y]
        rows.append((math.cos(theta) * w_hat[:, y] + math.sin(theta) * u / u.norm()) * norm)
        targets.append(y)
    return torch.stack(rows).to(dtype), w.to(dtype), torch.tensor(targets)


# angles from 0.02 to pi - 0.05: a target near its class (AdaFace's angle clip at 1e-3 when the margin is negative),
# ordinary rows, and rows past pi - m (the fallbacks, ElasticFace's theta + m beyond pi, CurricularFace's fallback)
THETAS = [0.02, 0.3, 1.0, 1.6, 2.3, math.pi - 0.6, math.pi - 0.3, math.pi - 0.05]


def _adaface_state(head):
    return {"batch_mean": head.batch_mean.clone(), "batch_std": head.batch_std.clone()}


class Pair:
    """One head and its transcription, stepped side by side on the same inputs."""

    def __init__(self, name, backend, dtype=F64, **opts):
        self.name, self.opts = name, opts
        self.state = None
        if name == "adaface":
            self.head = AdaFace(16, 5, backend=backend, **opts)
        elif name == "magface":
            self.head = MagFace(16, 5, backend=backend, **opts)
        elif name.startswith("elastic"):
            self.gen_head, self.gen_pub = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            self.head = ElasticFace(16, 5, backend=backend, generator=self.gen_head, **opts)
        else:
            self.head = CurricularFace(16, 5, backend=backend, **opts)
        # 16-bit runs keep the head's state in fp32 (as mixed precision does) and give the weight the input dtype
        self.head.to(dtype=torch.float32 if dtype.itemsize < 4 else dtype, device=DEVICE)
        self.head.mapper.to(dtype)
        if name == "adaface":
            self.state = {k: v.to(F64) for k, v in _adaface_state(self.head).items()}
        elif name == "curricular":
            self.state = {"t": self.head.t.to(F64).clone()}

    def published(self, x, w, t):
        """The transcription's (loss, new state) on float64 copies."""
        o = self.opts
        if self.name == "adaface":
            return pub.adaface(x / x.norm(dim=1, keepdim=True), x.norm(dim=1, keepdim=True), w, t, state=self.state,
                               **o)
        if self.name == "magface":
            return pub.magface(x, w, t, **o)
        if self.name.startswith("elastic"):
            return pub.elasticface(x, w, t, m=self.head.m, generator=self.gen_pub, **o)
        return pub.curricular_face(x, w, t, state=self.state, **o)

    def step(self, x, t):
        """Loss, dX, dW of the head and of the transcription (float64) on x; the transcription's state advances."""
        xh = x.detach().clone().requires_grad_()
        w = self.head.mapper.weight
        w.grad = None
        loss = self.head(xh, t)
        loss.backward()
        xp = x.detach().to(F64).requires_grad_()
        wp = w.detach().to(F64).requires_grad_()
        gold, self.state = self.published(xp, wp, t)
        gold.backward()
        return (loss, xh.grad, w.grad.clone()), (gold, xp.grad, wp.grad)


HEADS = {
    # AdaFace with a running std of 1 (batch_std preset below) so that the scaler clips at -1 and +1
    "adaface": dict(t_alpha=0.01),
    "magface": dict(),
    "magface-hard": dict(easy_margin=False),
    "elastic-arc": dict(form="arc", std=0.3),  # a wide spread: some draws carry theta + m past pi
    "elastic-cos": dict(form="cos"),
    "elastic-arc-plus": dict(form="arc", plus=True),
    "elastic-cos-plus": dict(form="cos", plus=True),
    "curricular": dict(),
}
# the norms: AdaFace's straddle its preset mean (20, std 1: scalers clipped at both ends and inside); MagFace's lie
# below l_a = 10, inside, and above u_a = 110 (no gradient through the clamped norm there)
NORMS = {"adaface": [1.0, 19.5, 20.0, 21.0, 60.0, 20.3, 3.0, 19.0],
         "magface": [5.0, 10.5, 30.0, 60.0, 109.0, 150.0, 80.0, 45.0]}


def _pair(key, backend, dtype=F64):
    opts = dict(HEADS[key])
    pair = Pair(key.split("-")[0] if not key.startswith("elastic") else key, backend, dtype, **opts)
    if key == "adaface":
        pair.head.batch_std.fill_(1.0)
        pair.state["batch_std"].fill_(1.0)
    return pair


def _case(key, seed, dtype=F64):
    norms = NORMS.get(key.split("-")[0], [1.0, 2.0, 0.5, 3.0, 1.5, 1.0, 0.7, 2.5])
    x, w, t = rows_at(THETAS, norms, seed=seed, dtype=dtype)
    return x.to(DEVICE), t.to(DEVICE)


def _close(got, gold, rtol, what):
    scale = gold.abs().max().clamp_min(1e-12)
    err = (got.to(F64) - gold).abs().max()
    assert err <= rtol * scale, f"{what}: max error {float(err):.3g} > {rtol:g} x max|gold| {float(scale):.3g}"


# Under the Triton interpreter every call is slow: the default tier runs the kernels on one case of each code path
# (AdaFace's clamps, a per-row fallback threshold, per-row angular margins sorted by plus, CurricularFace); the
# exhaustive tier runs the rest
_KERNEL_PATHS = ("adaface", "magface-hard", "elastic-arc-plus", "curricular")
HEAD_BACKENDS = [pytest.param(k, b, marks=[pytest.mark.exhaustive] if b == "triton" and k not in _KERNEL_PATHS else [])
                 for k in HEADS for b in BACKENDS]

# float64: the backends agree with the transcription to rounding; the kernels hold s, m and eps in fp32
F64_RTOL = {"reference": 1e-9, "torch": 1e-9, "triton": 1e-5}


@pytest.mark.parametrize("key, backend", HEAD_BACKENDS)
def test_head_matches_published_over_steps(key, backend):
    """Three training steps on fresh rows at the clamp and fallback boundaries: loss, dX (through the margins: MagFace's
    norm and g, AdaFace's normalisation) and dW equal the transcription's, and so does the state after each step."""
    pair = _pair(key, backend)
    for step in range(3):
        x, t = _case(key, seed=step)
        ours, gold = pair.step(x, t)
        for name, a, b in zip(("loss", "dX", "dW"), ours, gold):
            _close(a, b, F64_RTOL[backend], f"{key} step {step} {name}")
        if pair.state is not None:
            for k, v in pair.state.items():
                _close(getattr(pair.head, k), v.reshape(1), 1e-12, f"{key} step {step} {k}")


@pytest.mark.parametrize("key", ["adaface", "magface", "elastic-arc", "curricular"])
def test_float32_inputs_against_the_float64_transcription(key):
    """fp32 embeddings and weight (fp32 buffers) on the torch backend: within float32 rounding of the transcription.
    Random rows, away from the discontinuous fallbacks, where a rounding may take the other branch."""
    pair = _pair(key, "torch", torch.float32)
    gen = torch.Generator().manual_seed(5)
    for step in range(2):
        x = (torch.randn(12, 16, generator=gen) * (30.0 if key == "magface" else 1.0)).to(DEVICE)
        t = torch.randint(0, 5, (12,), generator=gen).to(DEVICE)
        ours, gold = pair.step(x, t)
        for name, a, b in zip(("loss", "dX", "dW"), ours, gold):
            assert a.dtype == torch.float32
            _close(a, b, 2e-4, f"{key} fp32 {name}")


@pytest.mark.parametrize("key", ["adaface", "magface", "elastic-arc", "curricular"])
def test_bf16_on_triton(key):
    """bf16 inputs on the kernels: |triton - gold| <= 2 |reference_bf16 - gold| + 1e-2 max|gold| (house rule)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(8, 16, generator=gen).to(DEVICE, torch.bfloat16)
    t = torch.randint(0, 5, (8,), generator=gen).to(DEVICE)
    results, weights = {}, None
    for backend in ("reference", "triton"):
        pair = _pair(key, backend, torch.bfloat16)
        if weights is None:
            weights = pair.head.state_dict()
        pair.head.load_state_dict(weights)  # both heads start from the same weight and state
        results[backend] = pair.step(x, t)
    for i, name in enumerate(("loss", "dX", "dW")):
        gold = results["reference"][1][i]
        fast, same = results["triton"][0][i].to(F64), results["reference"][0][i].to(F64)
        bound = 2 * (same - gold).abs() + 1e-2 * gold.abs().max()
        assert ((fast - gold).abs() <= bound).all(), f"{key} bf16 {name}"


@pytest.mark.parametrize("key", ["adaface", "magface", "elastic-cos-plus", "curricular"])
def test_training_run_tracks_the_transcription(key):
    """20 SGD steps of a linear embedder + head against the same model built on the transcription: the two losses
    agree at every step (the state, the draws and the parameters evolve together)."""
    torch.manual_seed(3)
    pair = _pair(key, "torch")
    embed = torch.nn.Linear(6, 16, dtype=F64).to(DEVICE)
    with torch.no_grad():
        embed.weight.mul_(20.0 if key.startswith(("magface", "adaface")) else 1.0)
    twin_embed, twin_w = copy.deepcopy(embed), pair.head.mapper.weight.detach().clone().requires_grad_()
    opt = torch.optim.SGD(list(embed.parameters()) + list(pair.head.parameters()), lr=0.05)
    twin_opt = torch.optim.SGD(list(twin_embed.parameters()) + [twin_w], lr=0.05)
    gen = torch.Generator().manual_seed(4)
    inputs, labels = torch.randn(32, 6, generator=gen, dtype=F64), torch.randint(0, 5, (32,), generator=gen)
    losses = []
    for step in range(20):
        batch = torch.arange(8) + 8 * (step % 4)
        x, t = inputs[batch].to(DEVICE), labels[batch].to(DEVICE)
        opt.zero_grad()
        loss = pair.head(embed(x), t)
        loss.backward()
        opt.step()
        twin_opt.zero_grad()
        gold, pair.state = pair.published(twin_embed(x), twin_w, t)
        gold.backward()
        twin_opt.step()
        loss, gold = float(loss.detach()), float(gold.detach())
        assert abs(loss - gold) <= 1e-8 * max(1.0, abs(gold)), f"{key} step {step}: {loss} vs {gold}"
        losses.append(loss)
    assert losses[16] < losses[0], f"the run does not train: {losses}"  # steps 0 and 16 see the same batch


def test_adaface_statistics_update_in_training_only_and_skip_a_single_row():
    """The two decisions of the AdaFace docstring: eval forwards and batches of one row keep the statistics (the
    authors' unbiased std of one row is NaN); a training batch of two moves them."""
    head = AdaFace(16, 5, backend="reference").double().to(DEVICE)
    x, t = _case("adaface", seed=1)
    before = _adaface_state(head)
    head.eval()
    assert torch.isfinite(head(x, t))
    head.train()
    loss_one = head(x[:1], t[:1])
    assert torch.isfinite(loss_one)
    for k, v in before.items():
        assert torch.equal(getattr(head, k), v), f"{k} moved"
    head(x[:2], t[:2])
    assert not torch.equal(head.batch_mean, before["batch_mean"]) and torch.isfinite(head.batch_std).all()


def test_curricular_t_updates_in_training_only():
    head = CurricularFace(16, 5, backend="reference").double().to(DEVICE)
    x, t = _case("curricular", seed=1)
    head.eval()
    head(x, t)
    assert float(head.t) == 0.0
    head.train()
    head(x, t)
    assert float(head.t) != 0.0
    head.t.fill_(0.25)
    head(x, torch.full_like(t, -100))  # every row ignored: t stays
    assert float(head.t) == 0.25


@pytest.mark.parametrize("key", ["magface", "elastic-arc", "curricular"])
def test_batch_of_one_matches_published(key):
    pair = _pair(key, "reference")
    x, t = _case(key, seed=2)
    ours, gold = pair.step(x[3:4], t[3:4])
    for name, a, b in zip(("loss", "dX", "dW"), ours, gold):
        _close(a, b, 1e-9, f"{key} B=1 {name}")


@pytest.mark.parametrize("cls", [AdaFace, CurricularFace])
def test_state_dict_round_trip(cls):
    """The running state is in the state_dict and a fresh head loaded from it continues identically."""
    head = cls(16, 5, backend="reference").double()
    x, t = _case("adaface" if cls is AdaFace else "curricular", seed=0)
    for _ in range(2):
        head(x, t)
    state = head.state_dict()
    keys = {"batch_mean", "batch_std"} if cls is AdaFace else {"t"}
    assert keys <= set(state) and "mapper.weight" in state
    twin = cls(16, 5, backend="reference").double()
    twin.load_state_dict(state)
    assert torch.equal(head(x, t), twin(x, t))
    for k in keys:
        assert torch.equal(getattr(head, k), getattr(twin, k))


YAML = {
    "AdaFace": "loss: {type: AdaFace, args: {embedding_dim: 16, n_classes: 5, m: 0.4, h: 0.333, t_alpha: 0.01}}",
    "MagFace": "loss: {type: MagFace, args: {embedding_dim: 16, n_classes: 5, l_a: 10, u_a: 110, lambda_g: 35}}",
    "ElasticFace": "loss: {type: ElasticFace, args: {embedding_dim: 16, n_classes: 5, form: cos, plus: true}}",
    "CurricularFace": "loss: {type: CurricularFace, args: {embedding_dim: 16, n_classes: 5, m: 0.5, s: 64}}",
}


@pytest.mark.parametrize("name", list(YAML))
def test_yaml_builds_each_head(name):
    head = build_loss(YAML[name] + "\n")
    assert type(head).__name__ == name and head.mapper.weight.shape == (16, 5)
    if name == "ElasticFace":
        assert (head.form, head.m, head.plus) == ("cos", 0.35, True)


@pytest.mark.parametrize("cls, key, value", [
    (AdaFace, "t_alpha", 1.5), (AdaFace, "m", -0.1), (MagFace, "lambda_g", -1.0), (MagFace, "u_a", 5.0),
    (ElasticFace, "form", "tan"), (ElasticFace, "generator", 3), (CurricularFace, "m", 3.0),
    (CurricularFace, "s", 0.0)])
def test_bad_options_are_refused_on_construction(cls, key, value):
    with pytest.raises(LossConfigError) as info:
        cls(16, 5, **{key: value})
    assert info.value.key == key


@pytest.mark.parametrize("cls", [AdaFace, MagFace, ElasticFace, CurricularFace])
def test_deepfense_adapter_builds_each_head_from_flat_keys(cls):
    """DeepFense's registry (after use_fused_losses) builds the heads from flat config entries; with the same
    weight and state the adapter's loss is the module's."""
    from deepfense.losses.integrations.deepfense_adapters import ADAPTERS
    name = cls.__name__
    head = ADAPTERS[name]({"type": name, "weight": 0.5, "embedding_dim": 16, "n_classes": 5})
    assert isinstance(head, cls) and head.loss_weight == 0.5 and head.mapper.weight.shape == (16, 5)
    plain = cls(16, 5)
    plain.load_state_dict(head.state_dict(), strict=True)  # the running state travels under the same keys
    if cls is ElasticFace:
        head.generator, plain.generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x, t = _case("adaface", seed=0, dtype=torch.float32)
    assert torch.equal(head(x, t), plain(x, t))


@pytest.mark.parametrize("cls", [AdaFace, MagFace, ElasticFace, CurricularFace])
def test_reductions_and_ignored_rows(cls):
    """'none' gives one loss per row whose mean and sum are 'mean' and 'sum' (MagFace's g included); an ignored row
    changes nothing but its own entry, which is 0. Eval mode and a reseeded generator keep state and draws fixed."""
    head = cls(16, 5, backend="reference").double().eval()
    x, t = _case("magface" if cls is MagFace else "adaface", seed=3)
    t[2] = -100

    def loss(reduction, rows=slice(None)):
        head.reduction = reduction
        if cls is ElasticFace:
            head.generator = torch.Generator().manual_seed(0)
        return head(x[rows], t[rows])

    rows = loss("none")
    assert rows.shape == (8,) and float(rows.detach()[2]) == 0.0
    _close(loss("sum"), rows.sum(), 1e-12, "sum")
    _close(loss("mean"), rows.sum() / 7, 1e-12, "mean")
    if cls is not ElasticFace:  # (ElasticFace's draws follow the row count)
        kept = torch.tensor([0, 1, 3, 4, 5, 6, 7])
        _close(loss("none", kept), rows[kept], 1e-12, "without the ignored row")
