"""bench/compile_check.py: the planned kernel variants compile for sm_90 without a GPU, and what it reads from the
compiled code (registers, spills, stack, occupancy) is right on kernels whose answer is known.

CI compiles the bf16 variants of the representative training steps (about 45 s on 2 cores); the fp32 variants take
four minutes more and their table is in docs/kernels.md (`python bench/compile_check.py`)."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "compile_check.py")
pytestmark = pytest.mark.xdist_group("gpu_compile")  # --dist loadgroup: one worker compiles the variants once
pytest.importorskip("triton.backends.nvidia", reason="the NVIDIA backend of triton is not installed")


def _module():
    spec = importlib.util.spec_from_file_location("compile_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["compile_check"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=600):
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_occupancy_on_sm90_known_answers():
    occ = _module().occupancy
    # 255 registers -> 8192 per warp -> 8 warps per SM -> two 4-warp CTAs: 12.5% (the reading)
    assert occ(255, 4, 0) == (2, 0.125, "registers")
    assert occ(128, 4, 0) == (4, 0.25, "registers")  # 4096 per warp -> 16 warps
    assert occ(32, 4, 0) == (16, 1.0, "warps")  # 64 warps / 4
    assert occ(32, 1, 0) == (32, 0.5, "CTAs")  # at most 32 CTAs per SM
    # 100 KB dynamic shared + 1 KB reserved per CTA: 2 CTAs in 228 KB
    assert occ(64, 4, 100 * 1024) == (2, 0.125, "shared")
    assert occ(121, 4, 0)[0] == 4  # 121 registers are allocated as 128 (units of 256 per warp)


def test_ptxas_log_parser():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
           "    288 bytes stack frame, 508 bytes spill stores, 504 bytes spill loads\n"
           "ptxas info    : Used 32 registers, used 0 barriers, 288 bytes cumulative stack size\n")
    assert _module().parse_ptxas(log, "k") == {"regs": 32, "stack": 288, "spill_stores": 508, "spill_loads": 504}


def _probe(out, name):
    line = next(ln for ln in out.splitlines() if ln.startswith(f"probe {name} "))
    return dict(kv.split("=") for kv in line.split()[2:])


def test_readers_on_kernels_with_known_answers():
    res = _run("--self-test", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    trivial, spill = _probe(res.stdout, "trivial"), _probe(res.stdout, "spill")
    # y = x + 1: a few registers, nothing on the stack, and occupancy bounded by the 64 warps of an SM
    assert int(trivial["regs"]) <= 24 and trivial["spills"] == "False" and trivial["stack"] == "0", trivial
    assert trivial["stl"] == trivial["ldl"] == "0" and trivial["occupancy"] == "1.0000", trivial
    # 64 live fp32 values per thread under maxnreg=32 must spill: every reader sees it, and they agree
    assert int(spill["regs"]) <= 32 and spill["spills"] == "True" and spill["agree"] == "True", spill
    assert int(spill["spill_stores"]) > 0 and int(spill["stack"]) > 0 and int(spill["stl"]) > 0, spill
    assert int(spill["ldl"]) > 0, spill


@pytest.fixture(scope="module")
def bf16_check():
    return _run("--dtypes", "bf16")


def test_every_planned_bf16_variant_compiles_for_hopper(bf16_check):
    out = bf16_check.stdout
    assert bf16_check.returncode != 2 and "\n0 failed to compile" in out, out[-3000:] + bf16_check.stderr[-3000:]
    rows = [ln for ln in out.splitlines() if re.match(r"^(ok\*?|SPILL|DIFF)\s", ln)]
    # every loss's forward and dX kernel at the deepfake, speaker and face shapes, plus dW and the split combine
    assert len(rows) >= 20 and not any(ln.startswith("DIFF") for ln in rows), out


def test_no_planned_bf16_variant_spills(bf16_check):
    # every bf16 launch of the representative steps compiles at its planned warps without a
    # register spill (exit status 1 and a SPILL row otherwise); ok* rows (libdevice's cosf stack array) are not spills
    rows = [ln for ln in bf16_check.stdout.splitlines() if re.match(r"^(ok\*?|SPILL|DIFF)\s", ln)]
    assert rows and not any(ln.startswith("SPILL") for ln in rows), bf16_check.stdout[-3000:]
    assert bf16_check.returncode == 0, bf16_check.stdout[-3000:]


def test_gpu_check_script_parses_and_fits_eight_minutes():
    # the one-call GPU check cannot run here: its syntax, and the timeouts of its CUDA steps summing under 8 minutes
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    text = open(script).read()
    start = text.index("    DEV=cuda")
    cuda = text[start:text.index("\nfi\n", start)]
    budgets = [int(n) for n in re.findall(r"timeout (\d+)", cuda)]
    assert len(budgets) == 7 and sum(budgets) < 480, budgets
