"""Test device selection. On a machine without a GPU the Triton kernels run in the interpreter on CPU tensors;
DEEPFENSE_TEST_DEVICE=cuda (the GPU check) runs them compiled on CUDA instead."""

import os

TEST_DEVICE = os.environ.get("DEEPFENSE_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cuda":
    # triton.jit reads this when deepfense.kernels is first imported, which happens after conftest runs
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Triton versions whose interpreter was read and measured with the speed-up below (its private `_patch_lang`, the
# launch's and each helper call's patching, unchanged there). On any other version the tests run Triton's interpreter
# as it is: correct, about twice as slow on the kernel tests.
_INTERPRETER_SPEEDUP_VERIFIED = ("3.9.",)


def _patch_the_interpreter_once_per_launch():
    """The Triton interpreter patches triton.language's builtins (inspect.getmembers over tl, tl.tensor, tl.math) at
    every launch and again at every call of a @triton.jit helper inside it, whose scope it then drops: while the
    launch's patch is in force, a helper that sees no language module the launch has not patched yet changes
    nothing by patching again, yet those calls took about half of a kernel test's time. Such calls skip it; the
    others (a helper of triton.language.standard sees triton.language.core) patch as before, and the launch restores
    its patch as before.

    It wraps a private function, so it applies only on the Triton versions named in _INTERPRETER_SPEEDUP_VERIFIED and
    only when that function still has the shape it wraps; DEEPFENSE_TEST_INTERPRETER_SPEEDUP=0 switches it off."""
    import inspect

    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    real = getattr(interpreter, "_patch_lang", None)
    if (os.environ.get("DEEPFENSE_TEST_INTERPRETER_SPEEDUP", "1") == "0"
            or not triton.__version__.startswith(_INTERPRETER_SPEEDUP_VERIFIED)
            or not callable(real) or list(inspect.signature(real).parameters) != ["fn"]
            or not hasattr(getattr(interpreter, "_LangPatchScope", None), "restore")):
        return
    patched = set()  # the language modules patched since the current launch began; empty between launches

    class _Kept:
        def restore(self):
            pass

    langs_of = {}  # a function's language modules, by the function

    def patch_lang(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
            langs_of[fn] = langs
        if patched and langs <= patched:
            return _Kept()
        outer = not patched  # the launch's own call (GridExecutor restores its scope); else a helper's
        scope = real(fn)
        patched.update(langs)
        if outer:
            restore = scope.restore

            def restore_and_end():
                patched.clear()
                restore()
            scope.restore = restore_and_end
        return scope
    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_the_interpreter_once_per_launch()

# pytest-xdist (the README's test command runs one worker per core): each worker keeps torch to one thread, so two
# workers on two cores do not oversubscribe them
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

# torch.compile's on-disk caches key a graph by its forward ops, not by the Python backward a custom op registers: after
# a change to a deepfense op's schema a warm cache replays a backward built for the old one ("missing value for
# argument ..."). Each test session compiles into its own cache unless one is chosen.
_OWN_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="deepfense-tests-inductor-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_INDUCTOR_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)

# The tests must import this checkout. An installed DeepFense (a regular package with deepfense/__init__.py) hides a
# source tree's namespace portion, and an editable install of another checkout could then serve deepfense.* instead.
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_TREE = Path(__file__).resolve().parent.parent / "deepfense"
try:
    import deepfense.functional as _functional  # noqa: E402
except ImportError as _exc:
    raise pytest.UsageError(f"cannot import deepfense.functional from {_TREE.parent} ({_exc}); is the DeepFense "
                            f"framework installed in this Python? See docs/deepfense.md") from _exc
if Path(_functional.__file__).resolve().parent != _TREE:
    raise pytest.UsageError(f"the tests import {_functional.__file__}, not this checkout ({_TREE}); run them from the "
                            f"repository root in a Python without the DeepFense framework (docs/deepfense.md)")

# triton 3.4 (what torch 2.8 pins) rejects an fp64 tl.dot ("Unsupported lhs dtype fp64"); later versions compile it.
# The fp64 kernel tests then skip with that reason instead of failing; everything else runs on 3.4 too.
_FP64_DOT_TESTS = ("test_float64_matches_reference_tightly", "test_gradcheck_float64")


def _fp64_dot_error():
    """None when this triton runs an fp64 tl.dot (or triton is absent), else its error message."""
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _probe(X_ptr, Y_ptr):
        offs = tl.arange(0, 16)
        x = tl.load(X_ptr + offs[:, None] * 16 + offs[None, :])
        tl.store(Y_ptr + offs[:, None] * 16 + offs[None, :], tl.dot(x, x))

    x = torch.ones(16, 16, dtype=torch.float64, device=TEST_DEVICE)
    try:
        _probe[(1,)](x, torch.empty_like(x))
    except Exception as exc:  # noqa: BLE001 - only the "unsupported" answer turns into a skip
        return f"triton {triton.__version__} cannot run an fp64 tl.dot ({exc})" if "fp64" in str(exc) else None
    return None


# With pytest-xdist: the longest files start first, so no worker is left with one of them at the end while the other
# idles (the files whose tests share a module or session fixture mark themselves xdist_group, so that with
# --dist loadgroup, the README's test command, one worker builds the fixture once).
_LONGEST_FIRST = ("test_gpu_compile.py", "test_coinstall.py", "test_compile_and_bad_values.py")

# The exhaustive tier: sweeps whose every case costs minutes or builds something large. The README's test command
# leaves it out (each feature it checks is still checked there on representative cases); `-m exhaustive` runs only
# this tier, `--exhaustive` both; CI runs the README's command, then `-m exhaustive`. A test joins the tier with
# @pytest.mark.exhaustive; these, in files other work also changes, are named here by node id prefix.
_EXHAUSTIVE = (
    "tests/test_coinstall.py::",  # a fresh venv with torch, our wheel and DeepFense 0.2.2 (minutes; pip's registry)
    "tests/test_gpu_compile.py::test_every_planned_bf16_variant_compiles_for_hopper",  # every bf16 variant for sm_90:
    "tests/test_gpu_compile.py::test_no_planned_bf16_variant_spills",  # one compile of all of them, 1-2 min
    # every loss x C kind x reduction x dtype in one inductor graph, on the torch backend (the default tier compiles
    # the torch backend with ArcFace and the ASoftmax module, and this sweep on the Triton backend)
    "tests/test_compile_and_bad_values.py::test_inductor_fullgraph_matches_eager[torch]",
    # the large-head step budgets at every shape; the default tier keeps AMSoftmax at D = 192 (a 128 + 64 tail)
    "tests/test_work_budgets.py::test_large_head_launches_and_dot_work[am-64-128-",
    "tests/test_work_budgets.py::test_large_head_launches_and_dot_work[ce-",
    "tests/test_work_budgets.py::test_large_head_launches_and_dot_work[arc-",
    "tests/test_work_budgets.py::test_large_head_launches_and_dot_work[a-",
)


def pytest_addoption(parser):
    parser.addoption("--exhaustive", action="store_true",
                     help="also run the exhaustive tier (marker exhaustive; `-m exhaustive` runs it alone)")


def _runs_exhaustive(config) -> bool:
    return config.getoption("--exhaustive") or "exhaustive" in (config.option.markexpr or "")


def pytest_report_header(config):
    if not _runs_exhaustive(config):
        return "exhaustive tier left out: `-m exhaustive` runs it, `--exhaustive` runs both tiers"


@pytest.hookimpl(tryfirst=True)  # before -m reads the markers added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(_EXHAUSTIVE):
            item.add_marker(pytest.mark.exhaustive)
    if not _runs_exhaustive(config):
        left_out = [i for i in items if i.get_closest_marker("exhaustive")]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [i for i in items if not i.get_closest_marker("exhaustive")]
    chosen = [i for i in items if i.name.startswith(_FP64_DOT_TESTS) and "triton" in i.name]
    reason = _fp64_dot_error() if chosen else None
    for item in chosen if reason else ():
        item.add_marker(pytest.mark.skip(reason=reason[:200]))
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.path.name not in _LONGEST_FIRST)  # stable: the order within files stays
