"""The DeepFense suite: each loss head against DeepFense 0.2.2's own module built with the same options.

What a DeepFense user runs, cell by cell: loss x {no class weights, class weights} x {value checks at the library
default, checks off} x B x D, one training step each (forward, then backward into the embeddings and the head's
parameters), both modules on the same inputs and parameters. Steps are timed one by one in interleaved rounds (ours,
theirs, theirs, ours, ...), so a burst of a neighbour's load lands on both sides of a ratio; each side's median step
is reported, with the ratio theirs / ours (above 1: ours is faster). DeepFense's OCSoftmax and ASoftmax take no class
weights, so those cells are absent. The losses of the two modules are compared too (relative difference).

DeepFense 0.2.2 is loaded from its files (`deepfense.benchmark.upstream`): `pip install --no-deps --target DIR
deepfense==0.2.2` and DEEPFENSE_UPSTREAM=DIR, or an installed distribution.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

LOSSES = ("AMSoftmax", "ASoftmax", "OCSoftmax", "CrossEntropy")
WITH_CLASS_WEIGHTS = ("AMSoftmax", "CrossEntropy")  # DeepFense's OCSoftmax and ASoftmax take none
BATCHES = (8, 32, 256, 1024)
DIMS = (160, 1024)
CLASS_WEIGHTS = [0.3, 0.7]  # a deepfake head's bonafide / spoof weighting (DeepFense's AMSoftmax default is 0.5, 0.5)


def cells():
    """(loss, class_weights, checks, B, D) of every cell."""
    return [(loss, cw, checks, b, d) for loss in LOSSES for cw in ((False, True) if loss in WITH_CLASS_WEIGHTS
                                                                     else (False,))
            for checks in ("default", "off") for d in DIMS for b in BATCHES]


def _pair(loss: str, cw: bool, checks: str, D: int):
    """(ours, theirs): our module and DeepFense's, built with the same options and holding the same parameters."""
    from .. import losses
    from .upstream import loss_classes
    weights = CLASS_WEIGHTS if cw else None
    cfg = {"embedding_dim": D, "n_classes": 2, "class_weights": weights, "reduction": "mean"}
    validate = None if checks == "default" else False
    common = dict(class_weights=weights, validate=validate)
    if loss == "AMSoftmax":
        cfg.update(m=0.3, s=30.0)
        ours = losses.AMSoftmax(D, 2, m=0.3, s=30.0, **common)
    elif loss == "ASoftmax":
        cfg.update(m=4, gamma=0.5, lambda_min=5.0, lambda_max=1500.0)
        ours = losses.ASoftmax(D, 2, m=4, gamma=0.5, lambda_min=5.0, lambda_max=1500.0, **common)
    elif loss == "OCSoftmax":
        cfg.update(w_posi=0.9, w_nega=0.2, alpha=20.0)
        ours = losses.OCSoftmax(D, m_real=0.9, m_fake=0.2, alpha=20.0, **common)
    else:
        ours = losses.CrossEntropy(D, 2, **common)
    theirs = loss_classes()[loss](cfg)
    ours.load_state_dict(theirs.state_dict())  # DeepFense's parameter and class-weight keys load into ours
    return ours, theirs


def _step(module, x, t):
    for p in module.parameters():
        p.grad = None
    x.grad = None
    loss = module(x, t)
    loss.backward()
    return loss


def measure_cell(loss: str, cw: bool, checks: str, B: int, D: int, rounds: int, budget_s: float) -> dict:
    """Median step times of both modules over `rounds` interleaved rounds, and the losses' relative difference."""
    ours, theirs = _pair(loss, cw, checks, D)
    gen = torch.Generator().manual_seed(B * 7 + D)
    x = torch.randn(B, D, generator=gen).requires_grad_()
    t = torch.randint(0, 2, (B,), generator=gen)
    a, b = _step(ours, x, t).item(), _step(theirs, x, t).item()
    diff = abs(a - b) / max(abs(b), 1e-12)
    start = time.perf_counter()
    for _ in range(3):
        _step(theirs, x, t)
    one = (time.perf_counter() - start) / 3
    n = max(3, min(200, int(budget_s / max(one, 1e-6) / rounds / 2)))  # steps per side per round
    times = {"ours": [], "theirs": []}
    for r in range(rounds):
        for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
            module = ours if side == "ours" else theirs
            for _ in range(n):
                start = time.perf_counter()
                _step(module, x, t)
                times[side].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(loss=loss, class_weights=cw, checks=checks, B=B, D=D, ours_ms=med["ours"] * 1e3,
                theirs_ms=med["theirs"] * 1e3, speedup=med["theirs"] / med["ours"], loss_rel_diff=diff,
                steps=len(times["ours"]))


def run(threads: int | None, rounds: int = 20, budget_s: float = 0.6, log=print) -> dict:
    """Every cell at `threads` torch threads (None: torch's default), as a report dict."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    rows = []
    try:
        todo = cells()
        for i, cell in enumerate(todo):
            rows.append(measure_cell(*cell, rounds=rounds, budget_s=budget_s))
            r = rows[-1]
            log(f"[{i + 1}/{len(todo)}] {r['loss']:12s} cw={'yes' if r['class_weights'] else 'no ':3s} "
                f"checks={r['checks']:7s} B={r['B']:5d} D={r['D']:5d}: ours {r['ours_ms']:.3f} ms, "
                f"DeepFense {r['theirs_ms']:.3f} ms, x{r['speedup']:.2f}")
        return {"threads": torch.get_num_threads(), "rows": rows}
    finally:
        torch.set_num_threads(saved)


def markdown(report: dict) -> str:
    """One table per thread setting: a row per (loss, class weights, checks), a column per (D, B)."""
    lines = []
    for table in report["tables"]:
        rows = table["rows"]
        shapes = sorted({(r["D"], r["B"]) for r in rows})
        lines += [f"### torch threads = {table['threads']}", "",
                  "ratio = DeepFense's median step / ours (above 1: ours is faster); fwd+bwd, CPU, fp32", "",
                  "| loss | class weights | checks | " + " | ".join(f"D={d} B={b}" for d, b in shapes) + " |",
                  "|---|---|---|" + "---:|" * len(shapes)]
        keys = []
        for r in rows:
            key = (r["loss"], r["class_weights"], r["checks"])
            if key not in keys:
                keys.append(key)
        for key in keys:
            by_shape = {(r["D"], r["B"]): r for r in rows if (r["loss"], r["class_weights"], r["checks"]) == key}
            cols = [f"{by_shape[s]['speedup']:.2f}" if s in by_shape else "" for s in shapes]
            lines.append(f"| {key[0]} | {'yes' if key[1] else 'no'} | {key[2]} | " + " | ".join(cols) + " |")
        worst = min(rows, key=lambda r: r["speedup"])
        lines += ["", f"Lowest ratio {worst['speedup']:.2f} ({worst['loss']}, class weights "
                      f"{'yes' if worst['class_weights'] else 'no'}, checks {worst['checks']}, B={worst['B']}, "
                      f"D={worst['D']}); largest loss difference to DeepFense "
                      f"{max(r['loss_rel_diff'] for r in rows):.1e} (relative).", ""]
    return "\n".join(lines)


def main(out_dir: str, threads_list, log=print) -> int:
    """Run the suite at each thread setting, print the tables and write JSON + markdown under `out_dir`."""
    from . import runner
    from .upstream import loss_classes
    if loss_classes() is None:
        log("DeepFense 0.2.2 not found: pip install --no-deps --target DIR deepfense==0.2.2 and set "
            "DEEPFENSE_UPSTREAM=DIR (see deepfense/benchmark/upstream.py)")
        return 2
    report = {"device_name": runner.device_name("cpu"), "versions": runner.versions(), "cpus": os.cpu_count(),
              "load_start": os.getloadavg()[0], "tables": []}
    for threads in threads_list:
        report["tables"].append(run(threads, log=log))
    report["load_end"] = os.getloadavg()[0]
    text = (f"# DeepFense suite on {report['device_name']} ({report['cpus']} CPUs)\n\n"
            f"Versions: {report['versions']}; load average {report['load_start']:.2f} at start, "
            f"{report['load_end']:.2f} at end.\n\n" + markdown(report))
    print(text)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, runner.file_stem(report["device_name"], "deepfense-suite"))
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)
    log(f"wrote {stem}.json, {stem}.md")
    return 0
