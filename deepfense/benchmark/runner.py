"""The benchmark loop: every case x provider, with progress on stderr; returns rows and run metadata."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import re
import sys
import time

import torch

from .._version import version as package_version
from . import measure
from .cases import Case, traffic
from .providers import Provider, display_name


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
        model = found.group(1).strip() if found else model
    except OSError:  # not Linux
        pass
    return f"CPU {model} ({os.cpu_count()} cores)"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "deepfense": package_version()}
    for name, mod in (("triton", "triton"), ("pytorch-metric-learning", "pytorch_metric_learning"),
                      ("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy")):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:  # not installed
            out[name] = "absent"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out


def file_stem(name: str, sweep: str = "") -> str:
    """'<device slug>_<date>[-<sweep>]', e.g. cpu-amd-epyc-2-cores_2026-12-07-full."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48].strip("-")
    return f"{slug}_{datetime.date.today().isoformat()}" + (f"-{sweep}" if sweep else "")


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


ROUNDS = 4  # timed rounds per case; each round runs every provider once (the DeepFense suite takes more: see cli)


@contextlib.contextmanager
def _guard(row: dict, device: str):
    """A provider that cannot run a case is reported in its row (status 'error'), never fatal."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party provider is a table entry
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        row.update(status="error", reason=msg)
        log(f"    {row['provider']:<24} ERROR {msg[:200]}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def run(cases: list[Case], providers: list[Provider], device: str, *, warmup: int, reps: int, budget_s: float,
        compile_mode: str, errors: bool, time_limit: float | None = None, on_case=None,
        rounds: int = ROUNDS) -> list[dict]:
    """Measure every (case, provider). compile_mode: 'anchors' (torch.compile only on anchor cases), 'all', 'none'.
    Each provider's timed steps are split into `rounds` interleaved rounds.

    No new case starts after `time_limit` seconds (the rest are listed as skipped); `on_case(rows)` runs after each
    case, so partial results survive a run that is cut short.

    Absent providers and errors become rows with status 'absent' / 'error' and a reason; nothing aborts the run."""
    rows = []
    start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        nbytes, flops = traffic(case)
        if time_limit is not None and time.perf_counter() - start > time_limit:
            log(f"time limit {time_limit:.0f}s reached: {len(cases) - i + 1} cases not run")
            rows.append({"status": "truncated", "reason": f"{len(cases) - i + 1} cases not run (time limit)"})
            break
        log(f"[{i}/{len(cases)} {time.perf_counter() - start:5.0f}s] {case.label}")
        inputs = measure.make_inputs_rotated(case, device)
        golds, live = {}, []
        for prov in providers:
            row = {"loss": case.loss, "B": case.B, "D": case.D, "C": case.C, "dtype": case.dtype,
                   "family": case.family, "provider": display_name(prov, device), "baseline": prov.baseline,
                   "bytes": nbytes, "flops": flops}
            rows.append(row)
            reason = prov.absent(case, device)
            if reason is None and prov.compiled and not (compile_mode == "all" or
                                                         (compile_mode == "anchors" and case.anchor)):
                reason = "compile skipped for this shape (--compile all)"
            if reason is not None:
                row.update(status="absent", reason=reason)
                continue
            okey = tuple(sorted(prov.oracle.items()))
            with _guard(row, device):
                if errors and okey not in golds:
                    golds[okey] = measure.gold(case, device, prov.oracle)
                fn, step_s, fields = measure.prepare(case, prov, device, warmup=warmup, inputs=inputs,
                                                     ref=golds.get(okey))
                row.update(fields)
                live.append((row, fn, max(3, min(reps, int(budget_s / max(step_s, 1e-6)))), [], []))
        # Timed runs interleaved in rounds, so every provider sees the same machine (a neighbour's load, clocks).
        for rnd in range(rounds):
            for row, fn, n, fwd, bwd in live:
                if row.get("status") != "error":
                    with _guard(row, device):
                        f, b = measure.time_steps(fn, inputs, device, -(-n // rounds), first=rnd)
                        fwd += f
                        bwd += b
        for row, fn, n, fwd, bwd in live:
            if row.get("status") != "error":
                row.update(measure.medians(fwd, bwd), status="ok")
                comp = f" (+compile {row['compile_s']:.1f}s)" if "compile_s" in row else ""
                log(f"    {row['provider']:<24} fwd {row['fwd_ms']:9.3f} ms  fwd+bwd {row['fwdbwd_ms']:9.3f} ms"
                    f"{comp}  err {row.get('loss_err', float('nan')):.1e}/{row.get('grad_err', float('nan')):.1e}")
        del live
        del inputs, golds
        gc.collect()
        if on_case:
            on_case(rows)
    return rows

