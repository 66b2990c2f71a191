"""deepfense-losses next to the DeepFense framework (PyPI `deepfense` 0.2.2) in one fresh venv, both install orders,
each uninstalled in turn; DeepFense's own detector trained on the fused losses (tests/deepfense_pipeline.py); its
registry under use_fused_losses() (tests/coinstall_checks.py adapter); and DeepFense's own `train` and `test` commands
through `deepfense-losses deepfense` against DeepFense's losses (tests/deepfense_cli_pipeline.py).

The venv holds the running torch and what DeepFense's command line imports, installed as docs/deepfense.md says for a
torch DeepFense does not allow: DeepFense with --no-deps, its pure-Python needs in its own version ranges, and
torchaudio 2.11.1 without its native libraries when they do not load (the registry's builds need a CUDA torch).

Slow (a venv with torch and DeepFense's dependencies, ~8-10 min on one worker) and needs the package registry (pip), so
it carries the `install` marker and sits in the exhaustive tier (`-m exhaustive`), which CI runs after the README's
test command. Everything it builds lives in pytest's tmp folder, pip runs with --no-cache-dir: nothing is cached
outside the run.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.install, pytest.mark.xdist_group("coinstall")]  # one worker builds the venv
ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
DEEPFENSE = "deepfense==0.2.2"
# what DeepFense 0.2.2's `train`/`test` import, in its own version ranges (its METADATA), torchaudio aside
DEEPFENSE_CLI_NEEDS = ("numpy<2.2", "einops<1.0", "click>=8.0.0", "omegaconf>=2.0.6", "pandas<3.0", "pyarrow",
                       "soundfile", "scipy<1.16", "scikit-learn<1.8", "librosa<0.12", "matplotlib<4.0", "tqdm")
TORCHAUDIO = "torchaudio==2.11.1"  # the newest on the registry; imports without its native libraries


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


class Venv:
    """A fresh venv (no system site-packages: the system's editable deepfense-losses must not leak in)."""

    def __init__(self, path: Path, work: Path):
        self.path, self.work = path, work
        self.python = path / "bin" / "python"
        self.site = Path(_run([self.python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())

    def pip(self, *args):
        return _run([self.python, "-m", "pip", "--no-cache-dir", "--disable-pip-version-check", *args])

    def py(self, *args):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
        return _run([self.python, *args], cwd=self.work, env=env)  # outside the checkout: no source tree on sys.path

    def check(self, *what) -> dict:
        return json.loads(self.py(HERE / "coinstall_checks.py", *what).splitlines()[-1])

    def installed(self) -> set:
        return {line.split("==")[0].lower() for line in self.pip("freeze").split()}

    def ensure(self, ours=True, theirs=True):
        have = self.installed()
        if ours and "deepfense-losses" not in have:
            self.pip("install", "--no-deps", self.wheel)
        if theirs and "deepfense" not in have:
            self.pip("install", "--no-deps", self.deepfense_wheel)


@pytest.fixture(scope="session")
def venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coinstall")
    src = tmp / "src"  # build from a copy, so the checkout gets no build/ or egg-info
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".benchmarks", ".venv*", "bench",
                                                             "deepfense-bench-results"))
    # the running python's setuptools when it has one; else pip fetches one into an isolated build env
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--no-cache-dir", "-w", tmp / "dist", src])
    _run([sys.executable, "-m", "venv", tmp / "venv"])
    env = Venv(tmp / "venv", tmp)
    # the running torch build (a local wheel on the CI machines) and what DeepFense's command line imports
    env.pip("install", f"torch=={torch.__version__}", "pyyaml", *DEEPFENSE_CLI_NEEDS)
    env.pip("install", "--no-deps", TORCHAUDIO)
    loads = subprocess.run([env.python, "-c", "import torchaudio"], capture_output=True, text=True, cwd=tmp)
    if loads.returncode:  # the registry's torchaudio needs a CUDA torch's libraries: drop its own (docs/deepfense.md)
        assert "Could not load this library" in loads.stderr, loads.stderr[-2000:]
        for lib in (env.site / "torchaudio" / "lib").glob("*.so"):
            lib.unlink()
        env.py("-c", "import torchaudio")
    env.pip("download", "--no-deps", "-d", tmp / "dist", DEEPFENSE)
    env.wheel = next((tmp / "dist").glob("deepfense_losses-*.whl"))
    env.deepfense_wheel = next((tmp / "dist").glob("deepfense-0.2.2-*.whl"))
    return env


def _wheel_files(path):
    with zipfile.ZipFile(path) as z:
        return {n for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}


def test_wheel_owns_no_deepfense_file(venv):
    ours, theirs = _wheel_files(venv.wheel), _wheel_files(venv.deepfense_wheel)
    assert not ours & theirs, f"files both distributions install: {sorted(ours & theirs)}"
    assert "deepfense/__init__.py" in theirs and "deepfense/__init__.py" not in ours
    tracked = {str(p.relative_to(ROOT)) for p in (ROOT / "deepfense").rglob("*.py") if "__pycache__" not in p.parts}
    assert tracked == {n for n in ours if n.endswith(".py")}, "the wheel must ship every module of deepfense/"


def test_install_uninstall_matrix(venv):
    """ours alone -> + theirs -> - ours -> + ours (theirs first) -> - theirs; each state imports and trains."""
    scripts = venv.path / "bin"
    if "deepfense" in venv.installed():
        venv.pip("uninstall", "-y", "deepfense")
    venv.ensure(ours=True, theirs=False)
    alone = venv.check("ours")
    assert alone["version"] == "0.1.0" and alone["ours_file"].startswith(str(venv.site))
    for out in (_run([scripts / "deepfense-losses", "list"]), venv.py("-m", "deepfense", "list"),
                venv.py("-m", "deepfense.losses", "list")):
        assert "OCSoftmax(embedding_dim" in out
    absent = subprocess.run([scripts / "deepfense-losses", "deepfense", "list"], capture_output=True, text=True)
    assert absent.returncode == 2 and not absent.stdout, absent
    assert len(absent.stderr.strip().splitlines()) == 1 and "pip install --no-deps deepfense==0.2.2" in absent.stderr
    venv.ensure(ours=True, theirs=True)  # order 1: ours, then theirs
    both = venv.check("ours", "theirs")
    assert "deepfense.cli.main" in (scripts / "deepfense").read_text()  # their command stays theirs
    assert "OCSoftmax(embedding_dim" in _run([scripts / "deepfense-losses", "list"])
    for cmd in ([scripts / "deepfense-losses", "deepfense"], [venv.python, "-m", "deepfense.losses", "deepfense"]):
        listed = _run([*cmd, "list", "-t", "losses"], cwd=venv.work)  # DeepFense's own `list` command
        names = ("ArcFace", "AAMSoftmax", "CombinedMargin", "ASoftmax")
        assert all(f"• {name}\n" in listed for name in names), listed
    venv.pip("uninstall", "-y", "deepfense-losses")
    gone = venv.check("theirs", "absent-ours")
    assert gone["ours_absent"] and (venv.site / "deepfense" / "__init__.py").is_file()
    assert not (scripts / "deepfense-losses").exists() and (scripts / "deepfense").exists()
    venv.ensure(ours=True, theirs=True)  # order 2: theirs, then ours
    venv.check("ours", "theirs")
    venv.pip("uninstall", "-y", "deepfense")
    left = venv.check("ours")
    assert not (venv.site / "deepfense" / "__init__.py").exists() and not (scripts / "deepfense").exists()
    assert "OCSoftmax(embedding_dim" in venv.py("-m", "deepfense", "list")
    assert both["ours_file"] == left["ours_file"]


def test_deepfense_pipeline(venv):
    """DeepFense's ModularDetector from its config/train.yaml loss section (and ASoftmax, OCSoftmax sections) trains
    on the fused adapters with the loss, scores, EER and checkpoints of DeepFense's own losses."""
    venv.ensure(ours=True, theirs=True)
    out = json.loads(venv.py(HERE / "deepfense_pipeline.py").splitlines()[-1])
    print(json.dumps(out, indent=1))  # the measured numbers, for the report (pytest -s)
    for name, r in out.items():
        assert r["loss_rel_diff"] < 1e-6 and r["eval_loss_rel_diff"] < 1e-6, (name, r)
        assert r["score_max_diff"] < 1e-4 and r["roundtrip_score_max_diff"] < 1e-4, (name, r)
        assert r["eer_fused"] == r["eer_deepfense"] and r["state_dict_keys_equal"], (name, r)
    assert out["AMSoftmax+ASoftmax"]["asoftmax_step_fused"] == out["AMSoftmax+ASoftmax"]["asoftmax_iter_deepfense"]


def test_use_fused_losses_in_deepfense_registry(venv):
    """Twice is once (the same handle, no log line), the handle and `with` put DeepFense's classes back, ArcFace /
    AAMSoftmax / CombinedMargin build from flat keys, float labels pass, and a too-early detector is warned about and
    converted in place (same Parameter objects, DeepFense's next loss values)."""
    venv.ensure(ours=True, theirs=True)
    out = venv.check("adapter")
    assert out["same_handle"] and out["registry_log"] == [], out
    assert len(out["late_warnings"]) == 1 and "convert_losses(detector)" in out["late_warnings"][0], out
    assert out["built"] == {"ArcFace": "FusedArcFace", "AAMSoftmax": "FusedArcFace",
                            "CombinedMargin": "FusedCombinedMargin"}, out
    assert out["swapped"] == 2 and out["swapped_types"] == ["FusedAMSoftmax", "FusedASoftmax"], out
    assert out["same_parameters"] and out["restored"] and out["context_restored"], out
    for want, got in zip(*out["loss_expected_converted"]):
        assert abs(want - got) <= 1e-5 * abs(want), out
    assert out["float_label_loss"] > 0


def test_deepfense_cli_pipeline(venv, tmp_path):
    """DeepFense's `train` then `test` on a synthetic data set and a tiny local wav2vec2, per loss section: through
    `deepfense-losses deepfense` and through DeepFense alone, the same validation and test losses (1e-5 relative) and
    EERs, and each side's best checkpoint tested by both sides' `test` (a failed load writes no results)."""
    venv.ensure(ours=True, theirs=True)
    out = json.loads(venv.py(HERE / "deepfense_cli_pipeline.py", tmp_path / "work").splitlines()[-1])
    print(json.dumps(out, indent=1))  # the measured numbers, for the report (pytest -s)
    for name, r in out.items():
        if "val_theirs" not in r:  # ArcFace, CombinedMargin: the fused side only
            assert r["test_ours_on_ours"] and r["test_ours_on_ours"]["loss"] > 0, (name, r)
            continue
        assert r["val_loss_rel_diff"] < 1e-5 and r["test_loss_rel_diff"] < 1e-5, (name, r)
        assert [e for _, e in r["val_ours"]] == [e for _, e in r["val_theirs"]], (name, r)
        tests = [r[f"test_{a}_on_{b}"] for a in ("ours", "theirs") for b in ("ours", "theirs")]
        assert all(tests) and len({t["EER"] for t in tests}) == 1, (name, r)
        assert all(abs(t["loss"] - tests[0]["loss"]) <= 1e-5 * tests[0]["loss"] for t in tests), (name, r)
