"""Turning measured rows into the report: derived columns, the markdown table, scaling fits, JSON, markdown, PNG."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from .cases import REFERENCE_SHAPES

COLUMNS = ["loss", "B", "D", "C", "dtype", "provider", "fwd ms", "fwd+bwd ms", "peak extra MB", "achieved",
           "% of ceiling", "x eager", "x compile", "loss err", "grad err"]


def derive(rows: list[dict], ceil: dict) -> None:
    """Add achieved rate, share of ceiling and speed-ups (fwd+bwd) to each measured row, in place.

    A case is memory-bound when its intensity (FLOPs / bytes) is under the ridge point (matmul FLOP/s / copy B/s);
    it then reports GB/s against the copy bandwidth, else TFLOP/s against the matmul rate of its dtype."""
    base = defaultdict(dict)
    for r in rows:
        if r.get("status") == "ok" and r.get("baseline"):
            base[_case_key(r)][r["baseline"]] = r["fwdbwd_ms"]
    for r in rows:
        if r.get("status") != "ok":
            continue
        sec = r["fwdbwd_ms"] / 1e3
        tflops = ceil["matmul_TFLOPs"].get(r["dtype"], math.nan)
        ridge = tflops * 1e12 / (ceil["copy_GBps"] * 1e9)
        if r["flops"] / r["bytes"] < ridge:
            r["rate"], r["rate_unit"] = r["bytes"] / sec / 1e9, "GB/s"
            r["share"] = r["rate"] / ceil["copy_GBps"]
        else:
            r["rate"], r["rate_unit"] = r["flops"] / sec / 1e12, "TFLOP/s"
            r["share"] = r["rate"] / tflops
        for kind in ("eager", "compile"):
            ref_ms = base[_case_key(r)].get(kind)
            r[f"x_{kind}"] = ref_ms / r["fwdbwd_ms"] if ref_ms else None


def _case_key(r):
    return (r["loss"], r["B"], r["D"], r["C"], r["dtype"])


def _f(v, fmt="{:.3g}"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def table(rows: list[dict]) -> str:
    """The markdown table: one line per measured (case, provider); errored providers show their error."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r["status"] == "truncated":
            lines.append(f"| {r['reason']} |" + " |" * (len(COLUMNS) - 1))
            continue
        head = [r["loss"], str(r["B"]), str(r["D"]), str(r["C"]), r["dtype"], r["provider"]]
        if r["status"] == "error":
            cells = head + [f"error: {r['reason'][:60]}"] + [""] * (len(COLUMNS) - 7)
        elif r["status"] != "ok":
            continue
        else:
            comp = f" (compile {r['compile_s']:.1f} s)" if r.get("compile_s") is not None else ""
            mem = "n/a" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.2f}"
            cells = head + [_f(r["fwd_ms"]), _f(r["fwdbwd_ms"]) + comp, mem,
                            f"{r['rate']:.3g} {r['rate_unit']}", f"{100 * r['share']:.1f}%",
                            _f(r.get("x_eager"), "{:.2f}x"), _f(r.get("x_compile"), "{:.2f}x"),
                            _f(r.get("loss_err"), "{:.1e}"), _f(r.get("grad_err"), "{:.1e}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def absent_note(rows: list[dict]) -> str:
    """One line per provider that was absent for a reason other than 'this loss only'."""
    seen = {}
    for r in rows:
        if r["status"] == "absent" and (r["reason"] == "CUDA only" or not r["reason"].endswith(" only")):
            seen.setdefault(r["provider"], r["reason"])
    return "; ".join(f"{p}: {why}" for p, why in seen.items()) or "none"


def _slope(points):
    """Least-squares slope of log y against log x."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def scaling(rows: list[dict]) -> list[dict]:
    """Slopes of log(fwd+bwd time) and log(peak memory) against log B (fixed D, C) and log C (fixed B, D).

    Two fits per series: over all points, and over its two largest points (the asymptotic cost, where fixed
    per-call overheads no longer hide it). A slope of 1 is linear growth; memory ~ 0 means it does not grow."""
    out = []
    for dim, fixed in (("B", ("D", "C")), ("C", ("B", "D"))):
        series = defaultdict(list)
        for r in rows:
            if r["status"] == "ok":
                series[(r["loss"], r["provider"], r["dtype"]) + tuple(r[k] for k in fixed)].append(r)
        for key, pts in series.items():
            pts.sort(key=lambda r: r[dim])
            if len({r[dim] for r in pts}) < 3:
                continue
            top = pts[-2:]
            out.append({"loss": key[0], "provider": key[1], "dtype": key[2], "dim": dim,
                        "fixed": dict(zip(fixed, key[3:])), "range": (pts[0][dim], pts[-1][dim]), "n": len(pts),
                        "time_all": _slope([(r[dim], r["fwdbwd_ms"]) for r in pts]),
                        "time_top": _slope([(r[dim], r["fwdbwd_ms"]) for r in top]),
                        "mem_top": _slope([(r[dim], r.get("peak_bytes")) for r in top])})
    return out


def scaling_table(fits: list[dict]) -> str:
    lines = ["| loss | provider | dtype | grows in | fixed | range | time slope (all) | time slope (top 2) | "
             "memory slope (top 2) |", "|---|---|---|---|---|---|---|---|---|"]
    for f in fits:
        fixed = ", ".join(f"{k}={v}" for k, v in f["fixed"].items())
        lines.append(f"| {f['loss']} | {f['provider']} | {f['dtype']} | {f['dim']} | {fixed} | "
                     f"{f['range'][0]}..{f['range'][1]} ({f['n']} pts) | {_f(f['time_all'], '{:.2f}')} | "
                     f"{_f(f['time_top'], '{:.2f}')} | {_f(f['mem_top'], '{:.2f}')} |")
    return "\n".join(lines)


def reference_table(rows: list[dict]) -> str:
    """The reference shapes: the deepfense providers against eager and compile (the comparison with DeepFense's own
    modules is `bench --suite deepfense`, measured side by side)."""
    lines = ["| loss | B | D | C | provider | fwd+bwd ms | x eager | x compile |", "|" + "---|" * 8]
    for r in rows:
        key = (r.get("loss"), r.get("B"), r.get("D"), r.get("C"))
        if r["status"] == "ok" and key in REFERENCE_SHAPES and r["dtype"] == "fp32":
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {r['provider']} | {_f(r['fwdbwd_ms'])} | "
                         f"{_f(r.get('x_eager'), '{:.2f}x')} | {_f(r.get('x_compile'), '{:.2f}x')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def busy(meta: dict) -> str:
    """A warning when other processes competed for the CPU (1-minute load average, this run's own load included)."""
    if meta["device"] != "cpu":
        return ""
    start, end, cpus = meta.get("load_start", 0.0), meta.get("load_end", 0.0), meta.get("cpus") or 1
    if start > 0.5 * cpus or end > cpus + 0.5:
        return (f"WARNING: the machine was busy (load average {start:.1f} at start, {end:.1f} at end, {cpus} CPUs): "
                f"other processes competed for the cores, so CPU times are inflated and noisy.")
    return ""


def versus_table(rows: list[dict], peer: str = "deepfense-0.2.2") -> str:
    """Each deepfense provider against `peer` on the same case: fwd+bwd ms and the speed ratio (peer ms / ours)."""
    peer_ms = {_case_key(r): r["fwdbwd_ms"] for r in rows if r["status"] == "ok" and r["provider"] == peer}
    lines = [f"| loss | B | D | C | dtype | provider | fwd+bwd ms | {peer} ms | speed vs {peer} |", "|" + "---|" * 9]
    for r in rows:
        theirs = peer_ms.get(_case_key(r)) if r["status"] == "ok" else None
        if theirs and r["provider"].startswith("deepfense["):
            lines.append(f"| {r['loss']} | {r['B']} | {r['D']} | {r['C']} | {r['dtype']} | {r['provider']} | "
                         f"{_f(r['fwdbwd_ms'])} | {_f(theirs)} | {theirs / r['fwdbwd_ms']:.2f}x |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown(meta: dict, rows: list[dict], fits: list[dict]) -> str:
    ceil = meta["ceilings"]
    mm = ", ".join(f"{k} {v:.3g}" for k, v in ceil["matmul_TFLOPs"].items())
    parts = [f"# deepfense bench: {meta['device_name']} ({meta['date']})", "",
             f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, "
             f"python {meta['versions']['python']}, deepfense {meta['versions']['deepfense']}; "
             f"{meta['threads']} threads.",
             f"Ceilings measured in this run: copy {ceil['copy_GBps']:.3g} GB/s (read+write), matmul TFLOP/s: {mm}.",
             f"Settings: {meta['settings']}", busy(meta), "", table(rows), "",
             "Times: medians after warm-up, device-synchronised, inputs rotated among copies; fwd is a training "
             "forward. Bytes = 2(BD + DC)*itemsize + 8B, FLOPs = 6BCD (minimal fused fwd+bwd; see "
             "deepfense/benchmark/cases.py). Errors: max-norm relative error against the float64 reference "
             "(pml-sphereface against lam=0, gamma=0: the function it computes).",
             f"Absent providers: {absent_note(rows)}.", "", "## Scaling", "", scaling_table(fits)]
    ref = reference_table(rows)
    if ref:
        parts += ["", "## Reference shapes (fwd+bwd)", "", ref]
    vs = versus_table(rows)
    if vs:
        parts += ["", "## Against DeepFense 0.2.2's modules (fwd+bwd, same run)", "", vs]
    return "\n".join(parts) + "\n"


def write(out_dir: str, stem: str, meta: dict, rows: list[dict], fits: list[dict], plot: bool = True) -> list[str]:
    """JSON + markdown (+ PNG when `plot` and matplotlib imports) under out_dir; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")]
    with open(paths[0], "w") as f:
        json.dump({"meta": meta, "rows": rows, "scaling": fits}, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(markdown(meta, rows, fits))
    png = plot_times(rows, os.path.join(out_dir, stem + ".png"), meta["device_name"]) if plot else None
    return paths + ([png] if png else [])


def _plot_panels(rows: list[dict]) -> list[tuple]:
    """(loss, dim, {(provider, dtype, fixed shape text): [(x, ms), ...]}) for every panel that has a series of at
    least two sizes: time against B (D, C fixed) and against C (B, D fixed), one panel per loss and dimension."""
    panels = []
    for dim, fixed in (("B", ("D", "C")), ("C", ("B", "D"))):
        for loss in sorted({r["loss"] for r in rows if r["status"] == "ok"}):
            series = defaultdict(list)
            for r in rows:
                if r["status"] == "ok" and r["loss"] == loss:
                    shape = ", ".join(f"{k}={r[k]}" for k in fixed)
                    series[(r["provider"], r["dtype"], shape)].append((r[dim], r["fwdbwd_ms"]))
            kept = {k: sorted(v) for k, v in series.items() if len({x for x, _ in v}) >= 2}
            if kept:
                panels.append((loss, dim, kept))
    return panels


def plot_times(rows: list[dict], path: str, title: str) -> str | None:
    """fwd+bwd time against B and against C, one panel per loss where the run has two sizes or more; providers by
    colour and fixed shapes by line style, explained in one legend below the panels (none covers the data)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import NullFormatter
    except Exception:  # matplotlib is optional
        return None
    panels = _plot_panels(rows)
    if not panels:
        return None
    providers = sorted({k[0] for _, _, series in panels for k in series})
    shapes = sorted({(dim, k[1], k[2]) for _, dim, series in panels for k in series})
    colour = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    style = {s: ("-", "--", ":", "-.")[i % 4] for i, s in enumerate(shapes)}
    handles = ([Line2D([], [], color=colour[p], marker="o", label=p) for p in providers]
               + [Line2D([], [], color="0.35", linestyle=style[s], label=f"{s[1]}, {s[2]}") for s in shapes])
    cols = min(3, len(panels))
    grid = -(-len(panels) // cols)
    legend_in = 0.22 * -(-len(handles) // 4) + 0.15  # inches below the panels for the legend's rows
    height = 3.6 * grid + 0.4 + legend_in
    fig, axes = plt.subplots(grid, cols, figsize=(4.6 * cols, height), squeeze=False)
    for ax, (loss, dim, series) in zip(axes.flat, panels):
        for (prov, dtype, shape), pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour[prov],
                    linestyle=style[(dim, dtype, shape)])
        ax.set(xscale="log", yscale="log", xlabel=dim, ylabel="fwd+bwd ms", title=f"{loss}: time vs {dim}")
        sizes = sorted({p[0] for pts in series.values() for p in pts})  # ticks at the measured sizes only
        ax.set_xticks(sizes, [f"{x:,}" for x in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
