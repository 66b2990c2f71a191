"""The README's test command (`-n auto --dist loadgroup`) builds each shared expensive fixture once: the tests of a
module marked `pytestmark = pytest.mark.xdist_group(NAME)` all run on one worker. Checked on the installed pytest and
pytest-xdist (the `dev` extra pins the major versions where this holds), in a throwaway project of its own."""

import importlib
import subprocess
import sys

import pytest

pytest.importorskip("xdist", reason="pytest-xdist is not installed (the `dev` extra has it)")

_GROUPED = '''
import os, time, pytest
pytestmark = pytest.mark.xdist_group("shared")

@pytest.mark.parametrize("i", range(6))
def test_grouped(i, tmp_path_factory):
    time.sleep(0.05)
    (tmp_path_factory.getbasetemp().parent / f"grouped-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])
'''

_OTHERS = '''
import os, time, pytest

@pytest.mark.parametrize("i", range(6))
def test_other(i, tmp_path_factory):
    time.sleep(0.05)
    (tmp_path_factory.getbasetemp().parent / f"other-{i}").write_text(os.environ["PYTEST_XDIST_WORKER"])
'''


def test_loadgroup_runs_a_marked_module_on_one_worker(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_grouped.py").write_text(_GROUPED)
    (project / "test_others.py").write_text(_OTHERS)
    (project / "pytest.ini").write_text("[pytest]\n")  # not this repository's settings or conftest
    runs = tmp_path / "runs"  # each worker's temp folder is a child of --basetemp: the tests write their worker here
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                           "loadgroup", f"--basetemp={runs}"], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    grouped = {p.read_text() for p in runs.glob("grouped-*")}
    everyone = grouped | {p.read_text() for p in runs.glob("other-*")}
    assert len(list(runs.glob("grouped-*"))) == 6 and len(grouped) == 1, grouped
    assert everyone == {"gw0", "gw1"}, everyone  # both workers ran tests: the group was not one by accident


@pytest.mark.parametrize("module, group", [("test_gpu_compile", "gpu_compile"), ("test_coinstall", "coinstall")])
def test_shared_fixture_modules_are_one_group(module, group):
    """The modules whose tests share a module-scoped fixture (the sm_90 compile of every variant, the co-install
    venv) mark themselves as one group, at module level, where pytest-xdist reads it."""
    try:
        marks = importlib.import_module(module).pytestmark
    except pytest.skip.Exception as exc:  # the module skips itself here (e.g. no NVIDIA backend in triton)
        pytest.skip(f"{module} is skipped on this machine: {exc}")
    marks = marks if isinstance(marks, list) else [marks]
    assert [m.args for m in marks if m.name == "xdist_group"] == [(group,)], marks
