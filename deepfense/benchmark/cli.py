"""Command line: `deepfense-losses bench | check | list` (also `python -m deepfense` / `python -m deepfense.losses`).

torch, triton and the measuring modules are imported inside the commands that use them, so `--help` and `list`
answer without the ~1.5 s torch import.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

# Names for --help and `list` without importing torch; tests/test_benchmark_cli.py checks them against cases.py and
# the loss registry.
LOSS_NAMES = ('AMSoftmax', 'ASoftmax', 'OCSoftmax', 'CrossEntropy', 'ArcFace')
DTYPE_NAMES = ("fp32", "fp16", "bf16", "fp64")
# The config keys each loss takes (constructor keywords less process_group, a runtime object, and label_smoothing
# where the loss rejects it), with their defaults; ... marks a required key.
LOSS_KEYS = {
    "AAMSoftmax": dict(embedding_dim=..., n_classes=2, m=0.2, s=32.0, fallback='wespeaker', straight_through=False,
                       sub_centers=1, weight=1.0, class_weights=None, reduction='mean', ignore_index=-100,
                       label_smoothing=0.0, bonafide_label=1, backend='auto', validate=None),
    "AMSoftmax": dict(embedding_dim=..., n_classes=2, m=0.3, s=30.0, weight=1.0, class_weights=None, reduction='mean',
                      ignore_index=-100, label_smoothing=0.0, bonafide_label=1, backend='auto', sub_centers=1,
                      validate=None),
    "ASoftmax": dict(embedding_dim=..., n_classes=2, m=4, gamma=0.5, lambda_min=5.0, lambda_max=1500.0, weight=1.0,
                     class_weights=None, reduction='mean', ignore_index=-100, bonafide_label=1, backend='auto',
                     lambda_gamma=0.1, lambda_power=1.0, validate=None),
    "AdaFace": dict(embedding_dim=..., n_classes=2, m=0.4, h=0.333, s=64.0, t_alpha=0.01, weight=1.0,
                    class_weights=None, reduction='mean', ignore_index=-100, label_smoothing=0.0, bonafide_label=1,
                    backend='auto', validate=None),
    "ArcFace": dict(embedding_dim=..., n_classes=2, m=0.2, s=32.0, fallback='wespeaker', straight_through=False,
                    sub_centers=1, weight=1.0, class_weights=None, reduction='mean', ignore_index=-100,
                    label_smoothing=0.0, bonafide_label=1, backend='auto', validate=None),
    "CombinedMargin": dict(embedding_dim=..., n_classes=2, m1=1.0, m2=0.5, m3=0.0, s=64.0,
                           interclass_filtering_threshold=0.0, fallback='none', straight_through=False, sub_centers=1,
                           weight=1.0, class_weights=None, reduction='mean', ignore_index=-100, label_smoothing=0.0,
                           bonafide_label=1, backend='auto', validate=None),
    "CrossEntropy": dict(embedding_dim=..., n_classes=2, weight=1.0, class_weights=None, reduction='mean',
                         ignore_index=-100, label_smoothing=0.0, bonafide_label=1, backend='auto', validate=None),
    "CurricularFace": dict(embedding_dim=..., n_classes=2, m=0.5, s=64.0, weight=1.0, class_weights=None,
                           reduction='mean', ignore_index=-100, label_smoothing=0.0, bonafide_label=1, backend='auto',
                           validate=None),
    "ElasticFace": dict(embedding_dim=..., n_classes=2, form='arc', m=None, std=0.05, s=64.0, plus=False,
                        generator=None, weight=1.0, class_weights=None, reduction='mean', ignore_index=-100,
                        label_smoothing=0.0, bonafide_label=1, backend='auto', validate=None),
    "MagFace": dict(embedding_dim=..., n_classes=2, s=64.0, l_a=10.0, u_a=110.0, l_margin=0.45, u_margin=0.8,
                    lambda_g=35.0, easy_margin=True, weight=1.0, class_weights=None, reduction='mean',
                    ignore_index=-100, label_smoothing=0.0, bonafide_label=1, backend='auto', validate=None),
    "OCSoftmax": dict(embedding_dim=..., m_real=0.5, m_fake=0.2, alpha=20.0, weight=1.0, class_weights=None,
                      reduction='mean', ignore_index=-100, bonafide_label=1, backend='auto', w_posi=None, w_nega=None,
                      r_real=None, r_fake=None, validate=None),
}
from .args import Parser, UsageError, comma_list, count_list, names, positive, shapes

DEFAULT_OUT = "deepfense-bench-results"  # under the current folder; bench/results/ keeps the committed reference run
SUITE_NAMES = ("deepfense",)  # cases.SUITES, named here so --help imports no torch
# The subset (the default sweep) against plain PyTorch only: torch.compile and the peers (pytorch-metric-learning) take
# minutes to compile or import on a busy 2-core machine, so they come with --full.
SUBSET_PROVIDERS = ("deepfense", "eager", "F.linear_cross_entropy")


def _parser():
    p = Parser(prog="deepfense-losses", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="benchmark every loss against eager, torch.compile and the installed peers")
    b.add_argument("--losses", type=names(LOSS_NAMES), help=f"comma list from {list(LOSS_NAMES)} (default: all)")
    b.add_argument("--shapes", type=shapes,
                   help="comma list of BxDxC, e.g. 256x192x2,128x192x5994 (replaces the sweep)")
    b.add_argument("--B", type=count_list, help="comma list of batch sizes (with --D and --C, replaces the sweep)")
    b.add_argument("--D", type=count_list, help="comma list of embedding dims")
    b.add_argument("--C", type=count_list, help="comma list of class counts")
    b.add_argument("--dtypes", type=names(DTYPE_NAMES),
                   help=f"comma list from {list(DTYPE_NAMES)} (default: fp32 on CPU, bf16 on CUDA)")
    b.add_argument("--providers", help="comma list of provider names (default: all; see `list`)")
    b.add_argument("--suite", choices=SUITE_NAMES,
                   help="a named sweep: 'deepfense' = each loss head against DeepFense 0.2.2's own module with "
                        "the same options: with and without class weights, value checks at the default and off, "
                        "B 8/32/256/1024, D 160/1024, at torch's default threads and at 1 (--threads N: only N)")
    b.add_argument("--full", action="store_true",
                   help="the whole sweep, with torch.compile on its anchor shapes and every installed peer (CPU: "
                        "minutes); default: a representative subset against eager PyTorch, about a minute")
    b.add_argument("--compile", choices=["anchors", "all", "none"], default=None,
                   help="which shapes get torch.compile(reference): anchors (default with --full, --shapes, --B), "
                        "all, none (default for the subset)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    b.add_argument("--out", default=DEFAULT_OUT,
                   help=f"results folder (default ./{DEFAULT_OUT}, created in the current folder)")
    b.add_argument("--threads", type=positive(int),
                   help="torch CPU threads for the run (default: torch's; 1 keeps a shared machine's load from "
                        "stalling the intra-op thread pool)")
    b.add_argument("--reps", type=positive(int), default=None, help="max timed iterations per measurement")
    b.add_argument("--time-limit", type=positive(float), help="start no new case after this many seconds")
    b.add_argument("--no-errors", action="store_true", help="skip the float64 reference errors")
    b.add_argument("--validate", action="store_true",
                   help="force deepfense's synchronous value checks on (DEEPFENSE_VALIDATE=1; off by default, "
                        "library default with --suite)")
    b.add_argument("--plan", action="store_true",
                   help="print each case's launch plan with counted work and a predicted H200 roofline time; no run")
    b.add_argument("--sm-count", type=positive(int),
                   help="multiprocessors to plan for (default: the GPU's, else 132: H200)")
    b.add_argument("--no-roofline", action="store_true", help="on CUDA, skip the per-launch roofline lines")
    c = sub.add_parser("check", help="the fused path against the float64 reference: PASS/FAIL per loss")
    c.add_argument("--device", choices=["cpu", "cuda"])
    c.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "reference"])
    c.add_argument("--no-interpreter", action="store_true", help="on CPU, skip the Triton-interpreter child run")
    li = sub.add_parser("list", help="the losses with their config keys (--providers: also the benchmark providers)")
    li.add_argument("--providers", action="store_true",
                    help="also probe which benchmark providers run here (imports torch and the peers: a few seconds)")
    sub.add_parser("deepfense", add_help=False, help="DeepFense's own command line (train, test, list, ...) on the "
                   "fused losses: `deepfense-losses deepfense train -c cfg.yaml`")  # main() hands it the rest
    return p


def _device(name):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: this machine has no CUDA device that torch {torch.__version__} can use; "
                         f"leave --device out to run on the CPU")
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_bench(a) -> int:
    """Run the benchmark; deepfense's per-call value checks are off meanwhile (DEEPFENSE_VALIDATE=0), at the library
    default with --suite, and forced on with --validate; the setting is restored after."""
    saved = os.environ.get("DEEPFENSE_VALIDATE")
    if a.validate:
        os.environ["DEEPFENSE_VALIDATE"] = "1"
    elif not a.suite:
        os.environ["DEEPFENSE_VALIDATE"] = "0"
    try:
        return _bench(a)
    finally:
        if saved is None:
            os.environ.pop("DEEPFENSE_VALIDATE", None)
        else:
            os.environ["DEEPFENSE_VALIDATE"] = saved


def _bench(a) -> int:
    import torch

    from . import measure, report, runner
    from .cases import custom_cases, default_cases
    from .providers import select
    device = _device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    losses = a.losses or list(LOSS_NAMES)
    shapes = a.shapes
    if a.B or a.D or a.C:
        shapes = (shapes or []) + [(b, d, c) for b in a.B or [256] for d in a.D or [192] for c in a.C or [2]]
    subset = not (a.full or a.suite or shapes)
    if a.suite:
        from . import deepfense_suite
        return deepfense_suite.main(a.out, [a.threads] if a.threads else [None, 1], log=runner.log)
    if shapes:
        cases = custom_cases(losses, shapes, a.dtypes or (["bf16"] if device == "cuda" else ["fp32"]))
    else:
        cases = [c for c in default_cases(device, subset, a.dtypes) if c.loss in losses]
    if a.plan:
        return _print_plans(cases, a.sm_count or _sms(device))
    compile_mode = a.compile or ("none" if subset else "anchors")
    reps = a.reps or (10 if subset else 30 if device == "cpu" else 50)
    budget = 0.15 if subset else (0.4 if device == "cpu" else 0.1)
    rounds = runner.ROUNDS
    try:
        providers = select(comma_list(a.providers) or (list(SUBSET_PROVIDERS) if subset else None))
    except ValueError as exc:
        raise UsageError(f"--providers: {exc}") from None
    if not a.plan:
        try:
            os.makedirs(a.out, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out {a.out}: cannot create it ({exc.strerror})") from None
    runner.log(f"deepfense bench on {runner.device_name(device)}: {len(cases)} cases x {len(providers)} providers")
    ceil = measure.ceilings(device, sorted({c.dtype for c in cases}))
    runner.log(f"ceilings: copy {ceil['copy_GBps']:.3g} GB/s, matmul TFLOP/s {ceil['matmul_TFLOPs']}")
    meta = {"device": device, "device_name": runner.device_name(device), "date": datetime.date.today().isoformat(),
            "versions": runner.versions(), "threads": torch.get_num_threads(), "ceilings": ceil,
            "load_start": os.getloadavg()[0], "cpus": os.cpu_count(),
            "settings": f"{'subset' if subset else 'full' if not shapes else 'custom'} sweep, compile="
                        f"{compile_mode}, reps<={reps} in {rounds} rounds, time budget {budget}s/measurement, "
                        f"DEEPFENSE_VALIDATE={os.environ.get('DEEPFENSE_VALIDATE', 'unset (library default)')}"}
    stem = runner.file_stem(meta["device_name"], "full" if a.full and not shapes else "")

    def finish(rows, final=False):
        meta["load_end"] = os.getloadavg()[0]
        report.derive(rows, ceil)
        fits = report.scaling(rows)
        paths = report.write(a.out, stem, meta, rows, fits, plot=final)
        return fits, paths

    rows = runner.run(cases, providers, device, warmup=2 if subset else 3, reps=reps, budget_s=budget,
                      compile_mode=compile_mode, errors=not a.no_errors, time_limit=a.time_limit, on_case=finish,
                      rounds=rounds)
    fits, paths = finish(rows, final=True)
    print(report.markdown(meta, rows, fits))
    runner.log("wrote " + ", ".join(paths))
    if report.busy(meta):
        runner.log(report.busy(meta))
    if device == "cuda" and not a.no_roofline:
        _print_roofline(cases, a.sm_count or _sms(device))
    return 0


def _sms(device: str) -> int:
    if device != "cuda":
        return 132
    import torch
    return torch.cuda.get_device_properties(0).multi_processor_count


def _print_plans(cases, sm_count: int) -> int:
    from .roofline import format_plan, step_of
    for case in cases:
        print(format_plan(step_of(case), sm_count) + "\n")
    return 0


ROOFLINE_BUDGET_S = 25.0  # profiling every case of a sweep would double the GPU check's bench time


def _print_roofline(cases, sm_count: int):
    """Per-launch achieved rates of the fused path (profiled kernel times) against the roofline of its counts; the
    deepfake, speaker and face heads first, no new case after ROOFLINE_BUDGET_S seconds."""
    from . import runner
    from .roofline import measure_kernels, roofline_lines, step_of
    key = {(65536, 1024, 2), (256, 192, 5994), (1024, 512, 1_000_000)}
    cases = sorted(cases, key=lambda c: (c.B, c.D, c.C) not in key and (c.B, c.D, 2) not in key)
    start = time.perf_counter()
    for i, case in enumerate(cases):
        if time.perf_counter() - start > ROOFLINE_BUDGET_S:
            runner.log(f"roofline: stopped after {i} of {len(cases)} cases (time budget {ROOFLINE_BUDGET_S:.0f} s)")
            break
        try:
            times = measure_kernels(case)
        except Exception as exc:  # a failed profile leaves the lines labelled unmeasured
            runner.log(f"roofline {case.label}: profile failed ({type(exc).__name__}: {exc})")
            times = None
        for line in roofline_lines(step_of(case), times, sm_count):
            print(line)


def _key_text(key, default) -> str:
    return key if default is ... else f"{key}={default!r}"


def cmd_list(a) -> int:
    print("Losses (config keys with defaults; YAML: {type: NAME, args: {...}} or DeepFense's flat form):")
    for name, keys in LOSS_KEYS.items():
        print(f"  {name}({', '.join(_key_text(k, v) for k, v in keys.items())})")
    if not a.providers:
        print("Benchmark providers: `list --providers` probes which run on this machine (imports torch).")
        return 0
    from .cases import default_cases
    from .providers import PROVIDERS, display_name
    device = _device(None)
    print(f"Benchmark providers on {device}:")
    for p in PROVIDERS:
        reasons = {p.absent(c, device) for c in default_cases(device, quick=True)}
        state = "available" if None in reasons else f"absent ({sorted(r for r in reasons if r)[0]})"
        print(f"  {display_name(p, device):<24} {state}")
    return 0


def main(argv=None) -> int:
    """Run one command; returns the exit status. A bad argument is one line on stderr and status 2 (argparse's own
    errors and UsageError alike); a reader that closes the pipe (`| head`) ends the run quietly."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # piped output is buffered: a reader that went away shows up here
        return status
    except UsageError as exc:
        print(f"deepfense-losses: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("deepfense-losses: interrupted", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["deepfense"]:  # every argument after it is DeepFense's
        from ..losses.integrations.deepfense import run_deepfense
        return run_deepfense(argv[1:])
    a = _parser().parse_args(argv)
    if a.cmd == "bench":
        return cmd_bench(a)
    if a.cmd == "check":
        from .check import main as check_main
        return check_main(_device(a.device), a.backend, interpreter_child=not a.no_interpreter)
    return cmd_list(a)


if __name__ == "__main__":
    sys.exit(main())
