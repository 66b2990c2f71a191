"""The benchmark machinery (deepfense.benchmark): byte/FLOP counts, scaling fits and the three CLI commands, on tiny
shapes so it stays a unit test (the real sweeps run with `python -m deepfense bench` / `pytest bench/`)."""

import json
import math
import os

import pytest

from deepfense.benchmark import cli, report
from deepfense.benchmark.cases import LOSSES, Case, default_cases, parse_shapes, traffic
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


def test_default_sweeps_hold_issue2_shapes_and_no_face_heads_on_cpu():
    cpu = {c.key[:4] for c in default_cases("cpu")}
    assert {("AMSoftmax", 256, 192, 2), ("AMSoftmax", 128, 192, 5994), ("OCSoftmax", 4096, 192, 1)} <= cpu
    assert max(c.C for c in default_cases("cpu")) < 10**5
    assert max(c.C for c in default_cases("cuda")) == 10**6
    assert parse_shapes("4x8x2,16x3x5") == [(4, 8, 2), (16, 3, 5)]


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


@pytest.mark.parametrize("bad", [["--losses", "NoSuchLoss"], ["--dtypes", "fp8"]])
def test_bench_rejects_bad_options(bad, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--quick", "--out", str(tmp_path), *bad])


def test_bench_restores_validation_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPFENSE_VALIDATE", raising=False)
    cli.main(["bench", "--shapes", "4x4x2", "--losses", "CrossEntropy", "--providers", "eager", "--compile", "none",
              "--reps", "3", "--no-errors", "--out", str(tmp_path), "--device", "cpu"])
    assert "DEEPFENSE_VALIDATE" not in os.environ
