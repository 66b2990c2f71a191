"""deepfense-losses next to the DeepFense framework (PyPI `deepfense` 0.2.2) in one fresh venv, both install orders,
each uninstalled in turn; and DeepFense's own detector trained on the fused losses (tests/deepfense_pipeline.py).

Slow (a venv with torch, ~1-2 min) and needs the package registry (pip), so it carries the `install` marker:
`pytest -m "not install"` deselects it locally; CI and the README's test command run it. Everything it builds lives in
pytest's tmp folder, pip runs with --no-cache-dir: nothing is cached outside the run.
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
    # the running torch build (a local wheel on the CI machines), numpy and einops for DeepFense's model package
    env.pip("install", f"torch=={torch.__version__}", "numpy", "einops", "pyyaml")
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
    venv.ensure(ours=True, theirs=True)  # order 1: ours, then theirs
    both = venv.check("ours", "theirs")
    assert "deepfense.cli.main" in (scripts / "deepfense").read_text()  # their command stays theirs
    assert "OCSoftmax(embedding_dim" in _run([scripts / "deepfense-losses", "list"])
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
