"""The benchmark machinery (deepfense.benchmark): byte/FLOP counts, scaling fits and the three CLI commands, on tiny
shapes so it stays a unit test (the real sweeps run with `python -m deepfense bench` / `pytest bench/`)."""

import json
import math
import os

import pytest

from deepfense.benchmark import cli, report
from deepfense.benchmark.cases import LOSSES, Case, default_cases, traffic
from deepfense.benchmark.providers import REGISTRY


def test_traffic_counts_minimal_fused_step():
    # read x and W, write dX and dW (fp32: 4 bytes), targets 8 bytes each; 3 matmuls of 2BCD FLOPs.
    assert traffic(Case("AMSoftmax", 8, 4, 3)) == (2 * (8 * 4 + 4 * 3) * 4 + 8 * 8, 6 * 8 * 3 * 4)
    assert traffic(Case("AMSoftmax", 8, 4, 3, "bf16"))[0] == 2 * (8 * 4 + 4 * 3) * 2 + 8 * 8


def test_scaling_slope_recovers_power_law():
    rows = [{"status": "ok", "loss": "AMSoftmax", "provider": "p", "dtype": "fp32", "B": b, "D": 8, "C": 2,
             "fwdbwd_ms": 0.5 * b, "peak_bytes": 1000} for b in (32, 256, 4096)]
    (fit,) = report.scaling(rows)
    assert fit["dim"] == "B" and math.isclose(fit["time_all"], 1.0) and math.isclose(fit["mem_top"], 0.0,
                                                                                      abs_tol=1e-12)


def test_full_sweeps_hold_the_reference_shapes_and_no_face_heads_on_cpu():
    cpu = {c.key[:4] for c in default_cases("cpu")}
    assert {("AMSoftmax", 256, 192, 2), ("AMSoftmax", 128, 192, 5994), ("OCSoftmax", 4096, 192, 1)} <= cpu
    assert max(c.C for c in default_cases("cpu")) < 10**5
    assert max(c.C for c in default_cases("cuda")) == 10**6


def test_default_subset_covers_every_loss_at_two_batch_sizes():
    # the plot's time-vs-B panel needs two sizes per loss, its time-vs-C panel two class counts at one B
    subset = default_cases("cpu", quick=True)
    assert {c.loss for c in subset} == set(LOSSES) and len(subset) <= 12
    assert all(len({c.B for c in subset if c.loss == loss}) >= 2 for loss in LOSSES)
    assert len({c.C for c in subset if c.loss == "AMSoftmax" and c.B == 256}) >= 2


def test_bench_writes_table_json_and_markdown(tmp_path, capsys):
    rc = cli.main(["bench", "--shapes", "16x8x3", "--losses", "AMSoftmax,OCSoftmax", "--providers",
                   "deepfense,eager", "--compile", "none", "--reps", "3", "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| AMSoftmax | 16 | 8 | 3 | fp32 | deepfense[" in out and "| OCSoftmax | 16 | 8 | 1 | fp32 | eager |" in out
    (js,) = tmp_path.glob("*.json")
    rows = [r for r in json.loads(js.read_text())["rows"] if r["status"] == "ok"]
    assert len(rows) == 4 and all(r["grad_err"] < 1e-4 for r in rows)
    assert list(tmp_path.glob("*.md"))


def test_absent_provider_is_reported_not_run():
    assert REGISTRY["cce"].absent(Case("CrossEntropy", 4, 4, 4), "cpu") == "CUDA only"
    assert REGISTRY["pml-cosface"].absent(Case("CrossEntropy", 4, 4, 4), "cpu") == "AMSoftmax only"


def test_list_and_check(capsys):
    assert cli.main(["list"]) == 0
    assert "AMSoftmax" in capsys.readouterr().out
    rc = cli.main(["check", "--device", "cpu", "--backend", "reference", "--no-interpreter"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(lines) == len(LOSSES) and all(line.startswith("PASS") for line in lines)


def _cli(argv, capsys):
    """(exit status, stderr) of one in-process CLI call; argparse's own errors exit through SystemExit."""
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    (["bench", "--shapes", "12x"], "'12x' is not BxDxC"),
    (["bench", "--shapes", "256x192x0", "--plan"], "'256x192x0' is not BxDxC"),  # C = 0 divided by zero in --plan
    (["bench", "--B", "0", "--plan"], "--B: '0'"),
    (["bench", "--C", "1.5"], "--C: '1.5'"),
    (["bench", "--losses", "NoSuchLoss"], "--losses: NoSuchLoss is not one of"),
    (["bench", "--dtypes", "fp8"], "--dtypes: fp8 is not one of"),
    (["bench", "--threads", "0"], "--threads: '0'"),
    (["bench", "--time-limit", "-1"], "--time-limit: '-1'"),
    (["bench", "--shapes", "4x4x2", "--providers", "nope"], "--providers: unknown provider(s) ['nope']"),
    (["bench", "--full", "--quick"], "unrecognized arguments: --quick"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    ([], "required: cmd"),
])
def test_bad_argument_is_one_line_and_status_2(argv, names, capsys):
    status, err = _cli(argv, capsys)
    assert status == 2 and err.startswith("deepfense-losses") and err.count("\n") == 1, err
    assert names in err and "Traceback" not in err, err


def test_unwritable_out_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where the results folder would go")
    status, err = _cli(["bench", "--shapes", "4x4x2", "--out", str(tmp_path / "taken")], capsys)
    assert status == 2 and err.count("\n") == 1 and "--out" in err and "cannot create it" in err, err


@pytest.mark.parametrize("command", ["bench", "check"])
def test_device_cuda_without_cuda_says_so(command, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine that has a GPU
    status, err = _cli([command, "--device", "cuda"], capsys)
    assert status == 2 and err.count("\n") == 1 and "--device cuda" in err and "no CUDA device" in err, err


def _subprocess_cli(*args, **kw):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "deepfense.losses", *args], stderr=subprocess.PIPE, text=True,
                          timeout=120, **kw)


def test_bad_argument_in_a_process_prints_no_traceback():
    import subprocess
    proc = _subprocess_cli("bench", "--B", "0", "--plan", stdout=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_closed_pipe_ends_quietly():
    # `deepfense-losses list | head -1`, made deterministic: the reader has gone before the first write
    read, write = os.pipe()
    os.close(read)
    try:
        proc = _subprocess_cli("list", stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr


def test_plot_panels_are_the_ones_with_data():
    # OCSoftmax has one class: no time-vs-C panel for it (an empty panel before), one for AMSoftmax (C = 2 and 5994)
    rows = [{"status": "ok", "loss": loss, "provider": "eager", "dtype": "fp32", "B": b, "D": 192, "C": c,
             "fwdbwd_ms": 1.0} for loss, b, c in (("AMSoftmax", 256, 2), ("AMSoftmax", 4096, 2),
                                                   ("AMSoftmax", 256, 5994), ("OCSoftmax", 256, 1),
                                                   ("OCSoftmax", 4096, 1))]
    panels = report._plot_panels(rows)
    assert [(loss, dim) for loss, dim, _ in panels] == [("AMSoftmax", "B"), ("OCSoftmax", "B"), ("AMSoftmax", "C")]
    assert all(len(pts) >= 2 for _, _, series in panels for pts in series.values())


def test_bench_restores_validation_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    cli.main(["bench", "--shapes", "4x4x2", "--losses", "CrossEntropy", "--providers", "eager", "--compile", "none",
              "--reps", "3", "--no-errors", "--out", str(tmp_path), "--device", "cpu"])
    assert "DEEPFENSE_VALIDATE" not in os.environ


def test_cli_names_and_keys_match_the_code():
    """`--help` and `list` use static names (no torch import); they must match cases.py and the loss registry."""
    from deepfense.benchmark.cases import DTYPES, LOSSES
    from deepfense.losses import REQUIRED, LossConfigError, get_loss_class, list_losses, loss_signature
    assert cli.LOSS_NAMES == tuple(LOSSES) and cli.DTYPE_NAMES == tuple(DTYPES)
    for name in list_losses():
        keys = {k: (... if v is REQUIRED else v) for k, v in loss_signature(name).items() if k != "process_group"}
        try:
            get_loss_class(name)(embedding_dim=4, label_smoothing=0.1)
        except LossConfigError:  # the loss rejects label smoothing: `list` must not offer it
            keys.pop("label_smoothing")
        row = "dict(" + ", ".join(f"{k}={v!r}" for k, v in keys.items()) + ")"
        assert cli.LOSS_KEYS.get(name) == keys, f"cli.LOSS_KEYS[{name!r}] must be {row}"
    assert sorted(cli.LOSS_KEYS) == list_losses(), "cli.LOSS_KEYS lists a loss that is not registered"


def test_help_and_list_import_no_torch():
    import subprocess
    import sys
    code = ("import sys; from deepfense.benchmark import cli; cli.main(['list']); "
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    help_code = code.replace("cli.main(['list'])", "cli._parser().format_help()")
    subprocess.run([sys.executable, "-c", help_code], check=True, capture_output=True)


def test_bench_default_out_is_untracked():
    assert cli._parser().parse_args(["bench"]).out == "deepfense-bench-results"


def test_deepfense_suite_holds_its_cells():
    """Every loss x {class weights where DeepFense takes them} x {checks default, off} x B 8..1024 x D 160/1024."""
    from deepfense.benchmark.deepfense_suite import cells
    full = cells()
    assert len(full) == (2 + 1 + 1 + 2) * 2 * 4 * 2 == len(set(full))
    assert ("CrossEntropy", True, "off", 1024, 1024) in full and ("OCSoftmax", False, "default", 8, 160) in full
    assert not any(loss in ("OCSoftmax", "ASoftmax") and cw for loss, cw, *_ in full)


def test_deepfense_suite_cell_runs_both_modules(monkeypatch):
    """One cell end to end on DeepFense 0.2.2's module when its files are at hand (DEEPFENSE_UPSTREAM)."""
    from deepfense.benchmark import deepfense_suite, upstream
    if upstream.loss_classes() is None:
        pytest.skip("DeepFense 0.2.2 not found (DEEPFENSE_UPSTREAM unset)")
    row = deepfense_suite.measure_cell("CrossEntropy", True, "default", 8, 16, rounds=2, budget_s=0.01)
    assert row["loss_rel_diff"] < 1e-6 and row["ours_ms"] > 0 and row["theirs_ms"] > 0


_FAKE_LOSS = """
from deepfense.utils.registry import register_loss
from deepfense.models.base_model import BaseLoss


@register_loss("{name}")
class {cls}(BaseLoss):
    pass
"""


def test_upstream_loader_leaves_our_package_in_place(tmp_path, monkeypatch):
    """DeepFense 0.2.2's loss files load from their folder without running its models/__init__.py (torchaudio) and
    without replacing our `deepfense` in sys.modules (a stand-in tree with its layout; no download in tests)."""
    import sys
    from deepfense.benchmark import upstream
    pkg = tmp_path / "deepfense"
    (pkg / "models" / "losses").mkdir(parents=True)
    (pkg / "utils").mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('the upstream package must not be imported')\n")
    (pkg / "models" / "__init__.py").write_text("import torchaudio_that_is_not_installed\n")
    (pkg / "utils" / "registry.py").write_text("def register_loss(name):\n    return lambda cls: cls\n")
    (pkg / "models" / "base_model.py").write_text("import torch\n\nclass BaseLoss(torch.nn.Module):\n"
                                                  "    def __init__(self, config):\n        super().__init__()\n")
    for loss, (fname, cls) in upstream._FILES.items():
        (pkg / "models" / "losses" / f"{fname}.py").write_text(_FAKE_LOSS.format(name=loss, cls=cls))
    ours = sys.modules["deepfense"]
    monkeypatch.setenv("DEEPFENSE_UPSTREAM", str(tmp_path))
    upstream.loss_classes.cache_clear()
    try:
        classes = upstream.loss_classes()
    finally:
        upstream.loss_classes.cache_clear()
    assert {k: v.__name__ for k, v in classes.items()} == {k: v[1] for k, v in upstream._FILES.items()}
    assert sys.modules["deepfense"] is ours and "deepfense.models" not in sys.modules
    assert sys.modules["deepfense.benchmark.upstream"] is upstream


_UPSTREAM = os.environ.get("DEEPFENSE_UPSTREAM", "")


@pytest.mark.skipif(not os.path.isdir(os.path.join(_UPSTREAM, "deepfense", "models", "losses")),
                    reason="DeepFense 0.2.2 is not unpacked: `pip install --no-deps --target DIR deepfense==0.2.2` and "
                           "set DEEPFENSE_UPSTREAM=DIR (CI does)")
@pytest.mark.parametrize("loss", ["AMSoftmax", "ASoftmax", "OCSoftmax", "CrossEntropy"])
def test_upstream_provider_computes_our_loss(loss):
    """DeepFense 0.2.2's module, as the provider sets it up, computes the same loss and gradients as ours."""
    import torch
    from deepfense.benchmark.cases import LOSSES, make_inputs
    case = Case(loss, 9, 16, 1 if loss == "OCSoftmax" else 2)
    (x, w, t), = make_inputs(case, "cpu")
    step = REGISTRY["deepfense-0.2.2"].build(case)
    theirs = step(x, w, t)
    theirs.backward()
    got = (theirs.detach(), x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    ours = LOSSES[loss].functional(x, w, t, **LOSSES[loss].options)
    ours.backward()
    for a, b in zip(got, (ours.detach(), x.grad, w.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
