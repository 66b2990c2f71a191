"""Compile every planned kernel launch for an NVIDIA GPU without a GPU; read registers, spills and occupancy from it.

The variants are the launches of representative training steps (deepfense/benchmark/launches.py: the launch plan's
kernel, constexprs, warps and stages; deepfake B=65536 D=1024 C=2, speaker 256x192x5994, face 1024x512x1e6, wide
1024x1024x8192; every loss, ArcFace (CombinedMargin) included; bf16 and fp32 at the precision
DEEPFENSE_FP32_PRECISION selects, tf32x3 by default), each lowered through Triton's NVIDIA pipeline to a cubin with
the ptxas shipped in the triton wheel. What is reported comes from that compiled code, three ways that must agree:
  - ptxas's own `-v` report of that compile: registers, spill stores / loads (bytes), stack frame (bytes);
  - `cuobjdump --dump-resource-usage` of the cubin: REG, STACK (spills live here), LOCAL, static SHARED;
  - the SASS (`cuobjdump -sass`): the number of STL / LDL (local-memory store / load) instructions.
Occupancy on the target (sm_90: 65,536 registers, 228 KB shared memory, 64 warps, 32 CTAs per SM) counts the
registers per warp in units of 256, and shared memory = static + Triton's dynamic (compiled metadata) + the 1 KB the
driver reserves per CTA. Any spill, any disagreement between the readers, or any compile failure fails the run.

Run: `python bench/compile_check.py [--arch 90] [--only TEXT] [--dtypes bf16,fp32] [--sub-centers K ...]
[--small-heads] [--no-steps]`: --sub-centers adds the speaker and face heads' AMSoftmax and ArcFace launches with K
sub-centres per class; --small-heads every loss's small-head launches at C = 1, 2, 3, 8, 16 with class weights, which
also fail above 128 registers. Exit status 2 when a variant does not compile, 1 when one spills (or the readers
disagree, or a small-head kernel passes its registers), else 0. `--self-test` compiles two probe kernels.
Needs TRITON_INTERPRET unset (it re-execs itself without it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter's functions cannot be compiled: start over without it (importing this module is fine)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepfense.benchmark.launches import H200_SMS, MARGINS, Step, representative_steps, step_launches  # noqa: E402
from deepfense.kernels import margin_ce, small_head_kernels  # noqa: E402
from deepfense.kernels import plan as P  # noqa: E402
from deepfense.kernels.plan import FP32_PRECISION  # noqa: E402
from deepfense.params import Margin  # noqa: E402

try:
    from triton._C.libtriton import native_specialize_impl  # noqa: E402
except ImportError:  # older triton: no specialisation hints (the compile is still valid, maybe less vectorised)
    native_specialize_impl = None

TOOLS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
TL_DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOATS = {"s", "m", "gamma", "m_real", "m_fake", "alpha", "eps"}
ACC_POINTERS = {"STATS_ptr", "PART_ptr", "DWP_ptr", "RED_ptr", "G_ptr", "BIAS_ptr", "CW_ptr", "LAM_ptr", "DB_ptr",
                "LOSS_ptr", "ROWW_ptr", "SAVED_ptr", "WS_ptr"}


@dataclass(frozen=True)
class SM:
    """Per-multiprocessor limits that bound occupancy (CUDA occupancy calculator, compute capability 9.0)."""

    regs: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    max_regs_per_thread: int = 255
    smem: int = 228 * 1024
    smem_unit: int = 128
    smem_reserved_per_cta: int = 1024
    warps: int = 64
    ctas: int = 32


SM90 = SM()


def occupancy(regs: int, num_warps: int, shared_bytes: int, sm: SM = SM90) -> tuple[int, float, str]:
    """(CTAs per SM, fraction of the SM's warp slots in use, the limiting resource) of a kernel using `regs` registers
    per thread, `num_warps` warps and `shared_bytes` shared memory per CTA."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / sm.reg_unit) * sm.reg_unit
    smem = math.ceil((shared_bytes + sm.smem_reserved_per_cta) / sm.smem_unit) * sm.smem_unit
    # on a tie the hardware's own ceilings (warps, CTAs) are named first: the kernel's use is then not what limits it
    limits = {"warps": sm.warps // num_warps, "CTAs": sm.ctas, "registers": (sm.regs // regs_per_warp) // num_warps,
              "shared": sm.smem // smem}
    limiter = min(limits, key=limits.get)
    ctas = limits[limiter]
    return ctas, ctas * num_warps / sm.warps, limiter


@dataclass
class Usage:
    """What the compiled kernel uses, per thread unless said. `agree` is False when the readers disagree."""

    regs: int
    spill_stores: int  # bytes, ptxas -v
    spill_loads: int  # bytes, ptxas -v
    stack: int  # bytes of stack frame (ptxas -v and cuobjdump STACK)
    local: int  # bytes of local memory (cuobjdump LOCAL)
    stl: int  # local-memory store instructions in the SASS
    ldl: int  # local-memory load instructions in the SASS
    shared: int  # bytes per CTA: static + Triton's dynamic
    agree: bool

    @property
    def spills(self) -> bool:
        """Register spills, as ptxas counts them. A stack frame without spills (e.g. libdevice's cosf keeps a small
        array there for its rare large-argument path) shows as stack and STL/LDL, and is reported, not failed."""
        return bool(self.spill_stores or self.spill_loads)


def parse_ptxas(log: str, name: str) -> dict:
    """Registers, spill bytes and stack frame of function `name` from a `ptxas -v` log."""
    start = log.find(f"Compiling entry function '{name}'")
    text = log[start:] if start >= 0 else log
    nums = {}
    for key, pattern in (("regs", r"Used (\d+) registers"), ("stack", r"(\d+) bytes stack frame"),
                         ("spill_stores", r"(\d+) bytes spill stores"), ("spill_loads", r"(\d+) bytes spill loads")):
        m = re.search(pattern, text)
        if m is None:
            raise ValueError(f"ptxas -v log has no {key!r} for {name}:\n{log[:2000]}")
        nums[key] = int(m.group(1))
    return nums


def read_cubin(cubin: bytes) -> dict:
    """REG, STACK, LOCAL, static SHARED (cuobjdump resource usage) and STL / LDL counts (SASS) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    out = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        m = re.search(rf"\b{key}:(\d+)", usage)
        if m is None:
            raise ValueError(f"cuobjdump resource usage has no {key}:\n{usage}")
        out[key] = int(m.group(1))
    out["STL"] = len(re.findall(r"\bSTL(?:\.\w+)*\s", sass))
    out["LDL"] = len(re.findall(r"\bLDL(?:\.\w+)*\s", sass))
    return out


def compile_and_read(src: ASTSource, target: GPUTarget, options: dict):
    """Compile `src` and read its resource usage. ptxas's report is Triton's own ptxas -v log of this compile (cache
    bypassed); where this triton cannot print it, ptxas -v runs again on the same PTX with Triton's flags."""
    knobs = getattr(triton, "knobs", None)
    saved = None
    if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
        saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(src, target=target, options=options)
    finally:
        if saved is not None:
            knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    log = buf.getvalue()
    name = compiled.metadata.name
    if "Used" not in log:
        log = _rerun_ptxas(compiled.asm["ptx"], target.arch)
    px, cb = parse_ptxas(log, name), read_cubin(compiled.asm["cubin"])
    # ptxas's report describes this cubin: same registers and stack, and spill bytes only with local instructions
    agree = (px["regs"] == cb["REG"] and px["stack"] == cb["STACK"]
             and (cb["STL"] > 0 or not px["spill_stores"]) and (cb["LDL"] > 0 or not px["spill_loads"]))
    usage = Usage(regs=cb["REG"], spill_stores=px["spill_stores"], spill_loads=px["spill_loads"], stack=cb["STACK"],
                  local=cb["LOCAL"], stl=cb["STL"], ldl=cb["LDL"], shared=cb["SHARED"] + compiled.metadata.shared,
                  agree=agree)
    return compiled, usage


def _rerun_ptxas(ptx: str, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([os.path.join(TOOLS, "ptxas"), "-lineinfo", "-v", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
    return res.stdout + res.stderr


# ---- the planned variants ------------------------------------------------------------------------------------------

# --sub-centers: the speaker and face heads (B, D, classes; the weight has classes * K columns), AMSoftmax and ArcFace
SUB_SHAPES = {"speaker": (256, 192, 5994), "face": (1024, 512, 1_000_000)}
SUB_LOSSES = ("AMSoftmax", "ArcFace")
# --small-heads: every loss at these class counts (OCSoftmax: 1), B = 65536, D = 1024, with class weights
SMALL_CS = (1, 2, 3, 8, 16)
SMALL_MAX_REGS = 128  # the small-head kernels' register ceiling: 25% occupancy at 4 warps (`plan.plan_small`)


@dataclass(frozen=True)
class Variant:
    """One planned launch to compile: its step, the launch (kernel, constexpr meta, warps, stages), the sub-centre
    count and whether class weights are given."""

    step: Step
    launch: object
    sub: int = 1
    class_weights: bool = False


def _arg_values(step: Step, sub: int = 1) -> dict:
    """Sample runtime values of the kernels' integer arguments for `step` on contiguous tensors (x [B, D]; W [D, C*K],
    CrossEntropy's fc.weight [C, D] seen transposed), so Triton's divisibility / ==1 specialisation matches a launch."""
    B, D, C = step.B, step.D, (1 if step.loss == "OCSoftmax" else step.C)
    w_d, w_c = (1, D) if step.loss == "CrossEntropy" else (C * sub, 1)
    return dict(B=B, D=D, C=C, stride_x_row=D, stride_x_col=1, stride_w_d=w_d, stride_w_c=w_c, stride_g=0,
                stride_dw_d=w_d, stride_dw_c=w_c, stride_dwp_d=w_d, stride_dwp_c=w_c, stride_dx_split=B * D,
                stride_dx_row=D, stride_p_d=w_d, stride_p_c=w_c)


def _signature(kernel, constexprs: dict, dtype: str, values: dict):
    """Triton signature and specialisation attributes of jit function `kernel` for inputs of `dtype`; a pointer
    given as a None constexpr is an absent tensor, as a launch passes it."""
    sig, attrs = {}, {}
    skip = {p.name for p in getattr(kernel, "params", ()) if getattr(p, "do_not_specialize", False)}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = "*" + ("fp32" if name in ACC_POINTERS else "i64" if name == "T_ptr" else dtype)
            desc = "D"
        elif name in FLOATS:
            sig[name], desc = "fp32", ""
        elif name in values and name not in skip and native_specialize_impl is not None:
            ty, desc = native_specialize_impl(BaseBackend, values[name], False, True, True)
            if ty == "constexpr":  # an argument equal to 1 becomes a constant, as at a launch
                sig[name] = "constexpr"
                constexprs = dict(constexprs, **{name: 1})
                continue
            sig[name] = ty
        else:
            sig[name], desc = "i32", ""
        if desc == "D" and native_specialize_impl is not None:
            attrs[(i,)] = BaseBackend.parse_attr(desc)
    return sig, attrs, constexprs


def _absent(v: Variant) -> set:
    """The pointers a launch of `v` passes as None: optional inputs the step does not have, and the outputs its plan's
    flags leave unwritten (as the launchers in deepfense/kernels/ops.py and small_head.py pass them)."""
    meta, margin = v.launch.meta, MARGINS[v.step.loss]
    out = set() if v.class_weights else {"CW_ptr"}
    if not v.step.has_bias:
        out.add("BIAS_ptr")
    if margin not in (Margin.ANGULAR, Margin.COMBINED):
        out.add("LAM_ptr")
    if v.launch.kernel == "_margin_ce_fwd_kernel":
        out |= {name for name, flag in (("PART_ptr", "SPLIT"), ("DX_ptr", "FUSE_DX"), ("DWP_ptr", "FUSE_DW"))
                if not meta[flag]}
    if v.launch.kernel == "_small_head_fwd_kernel":
        out.add("ROWW_ptr")  # reduction 'mean': the workspace instead of row weights
    return out


def _constexprs(v: Variant, kernel) -> dict:
    """The launch's constexprs: the plan's meta, None for the absent pointers, the flags `triton.heuristics` derives
    from them, and those a launcher sets from the step (the loss, dtypes, precision, sub-centres)."""
    step, jit = v.step, getattr(kernel, "fn", kernel)
    absent = _absent(v) & set(jit.arg_names)
    pointers = {name: (None if name in absent else "given") for name in jit.arg_names if name.endswith("_ptr")}
    derived = {flag: rule(pointers) for flag, rule in getattr(kernel, "values", {}).items()}
    step_meta = dict(MARGIN=int(MARGINS[step.loss]), DOT_DTYPE=step.dtype, ACC_DTYPE="fp32",
                     PRECISION=FP32_PRECISION if step.dtype == "fp32" else "ieee", SUB=v.sub,
                     HAS_XCOEF=step.loss != "CrossEntropy", HAS_BIAS=step.has_bias)
    out = {name: None for name in absent}
    for p in jit.params:
        if not p.is_constexpr:
            continue
        if p.name in derived:
            out[p.name] = derived[p.name]
        elif p.name in v.launch.meta or p.name in step_meta:
            value = v.launch.meta.get(p.name, step_meta.get(p.name))
            out[p.name] = TL_DTYPES.get(value, value) if p.name.endswith("_DTYPE") else value
        else:
            raise KeyError(f"{jit.__name__}: constexpr {p.name} is neither in the plan's meta nor a step default")
    return out


def _planned(dtypes, sub_centers=(), small_heads=False, steps=True):
    """Every Variant to compile: the representative steps' launches, the sub-centre heads' (K in sub_centers) and
    the small-head grid's."""
    if steps:
        for step in representative_steps(dtypes):
            for launch in step_launches(step):
                yield Variant(step, launch)
    for dtype in dtypes:
        for (B, D, C), loss, k in itertools.product(SUB_SHAPES.values(), SUB_LOSSES, sub_centers):
            torch_dtype = TORCH_DTYPES[dtype]
            for launch in P.plan(MARGINS[loss], B, D, C, torch_dtype, torch_dtype, n_sm=H200_SMS, gpu=True, sub=k):
                if launch.kernel != "_margin_ce_combine_kernel":  # the combine kernel has no sub-centre code
                    yield Variant(Step(loss, B, D, C, dtype), launch, sub=k)
        if small_heads:
            for C, loss in itertools.product(SMALL_CS, MARGINS):
                if loss != "OCSoftmax" or C == 1:  # one centre
                    step = Step(loss, 65536, 1024, C, dtype)
                    for launch in step_launches(step):
                        yield Variant(step, launch, class_weights=True)


def variants(dtypes=("bf16", "fp32"), sub_centers=(), small_heads=False, steps=True):
    """Unique (label, kernel, constexprs, dtype, num_warps, num_stages, values, steps, max_regs) over the planned
    launches (`_planned`)."""
    seen = {}
    for v in _planned(dtypes, sub_centers, small_heads, steps):
        launch, step = v.launch, v.step
        kernel = getattr(margin_ce, launch.kernel, None) or getattr(small_head_kernels, launch.kernel)
        const = _constexprs(v, kernel)
        values = _arg_values(step, v.sub)
        key = (launch.kernel, tuple(sorted((k, str(x)) for k, x in const.items())), step.dtype, launch.num_warps,
               launch.num_stages, tuple(sorted((k, _spec(x)) for k, x in values.items())))
        if key not in seen:
            short = launch.kernel.replace("_margin_ce_", "").replace("_kernel", "").strip("_")
            small = short.startswith("small_head_")
            short = short.replace("small_head_", "small-")
            extra = f"-K{v.sub}" if v.sub > 1 else f"-C{step.C}" if small and step.C != 2 else ""
            label = f"{short}-{step.loss}-{step.dtype}{extra}-{launch.num_warps}w"
            seen[key] = [label, getattr(kernel, "fn", kernel), const, step.dtype, launch.num_warps,
                         launch.num_stages, values, [], SMALL_MAX_REGS if small else None]
        seen[key][7].append(f"{step.loss} {step.B}x{step.D}x{step.C}" + (f" K={v.sub}" if v.sub > 1 else ""))
    labels = {}
    for v in seen.values():  # the same kernel/loss/dtype with other tiles: number them
        n = labels.setdefault(v[0], 0)
        labels[v[0]] = n + 1
        if n:
            v[0] = f"{v[0]}#{n + 1}"
    return [tuple(v) for v in seen.values()]


def _spec(v: int) -> str:
    return "1" if v == 1 else "D" if v % 16 == 0 else ""


# ---- known answers for the readers (tests/test_gpu_compile.py) ----------------------------------------------------

@triton.jit
def _probe_trivial_kernel(X_ptr, Y_ptr, BLOCK: tl.constexpr):
    """y = x + 1 over one block: a handful of registers, no stack."""
    offs = tl.arange(0, BLOCK)
    tl.store(Y_ptr + offs, tl.load(X_ptr + offs) + 1.0)


@triton.jit
def _probe_spill_kernel(X_ptr, Y_ptr, n, BLOCK: tl.constexpr):
    """A BLOCK-wide running product kept live across a loop: with one warp, BLOCK / 32 values per thread, so under
    maxnreg = 32 a BLOCK of 2048 (64 values per thread) must spill."""
    offs = tl.arange(0, BLOCK)
    acc = tl.load(X_ptr + offs)
    for i in range(n):
        acc = acc * tl.load(X_ptr + i + offs) + 1.0
    tl.store(Y_ptr + offs, acc)


def self_test(arch: int = 90) -> int:
    """Compile the two probe kernels and print what the readers find (the tests check the known answers)."""
    target = GPUTarget("cuda", arch, 32)
    probes = [("trivial", _probe_trivial_kernel, {"X_ptr": "*fp32", "Y_ptr": "*fp32", "BLOCK": "constexpr"},
               {"BLOCK": 128}, {"num_warps": 4}),
              ("spill", _probe_spill_kernel, {"X_ptr": "*fp32", "Y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
               {"BLOCK": 2048}, {"num_warps": 1, "maxnreg": 32})]
    for name, kernel, sig, const, opts in probes:
        _, u = compile_and_read(ASTSource(fn=kernel, signature=sig, constexprs=const), target, opts)
        ctas, occ, limiter = occupancy(u.regs, opts["num_warps"], u.shared)
        print(f"probe {name} regs={u.regs} spill_stores={u.spill_stores} spill_loads={u.spill_loads} "
              f"stack={u.stack} local={u.local} stl={u.stl} ldl={u.ldl} shared={u.shared} agree={u.agree} "
              f"spills={u.spills} ctas={ctas} occupancy={occ:.4f} limiter={limiter}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--only", default="", help="substring filter on the variant labels")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma list of input dtypes (bf16, fp16, fp32)")
    ap.add_argument("--sub-centers", type=int, nargs="*", default=[], metavar="K",
                    help="also the speaker and face heads' AMSoftmax / ArcFace launches with K > 1 sub-centres")
    ap.add_argument("--small-heads", action="store_true",
                    help=f"also every loss's small-head launches at C in {SMALL_CS} with class weights "
                         f"(more than {SMALL_MAX_REGS} registers fails)")
    ap.add_argument("--no-steps", action="store_true", help="skip the representative steps (with the options above)")
    ap.add_argument("--self-test", action="store_true", help="only compile the two probe kernels (known answers)")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(args.arch)
    if any(k < 2 for k in args.sub_centers):
        ap.error(f"--sub-centers takes counts K > 1, got {args.sub_centers}")
    target = GPUTarget("cuda", args.arch, 32)
    failures = broken = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}; registers/spills read from ptxas -v, cuobjdump "
          f"and the SASS of each compiled variant")
    print(f"{'':5s} {'variant':38s} {'regs':>4s} {'spill st/ld B':>13s} {'stack':>6s} {'STL/LDL':>9s} "
          f"{'smem KB':>7s} {'CTAs':>4s} {'occup':>6s} {'limit':9s} {'s':>5s}  used by")
    for label, kernel, const, dtype, warps, stages, values, steps, max_regs in variants(
            tuple(args.dtypes.split(",")), tuple(args.sub_centers), args.small_heads, not args.no_steps):
        if args.only not in label:
            continue
        t0 = time.perf_counter()
        try:
            sig, attrs, const2 = _signature(kernel, const, dtype, values)
            src = ASTSource(fn=kernel, signature=sig, constexprs=const2, attrs=attrs)
            _, u = compile_and_read(src, target, {"num_warps": warps, "num_stages": stages})
        except Exception as exc:  # report every variant, then fail
            broken += 1
            msg = str(exc).strip().splitlines()
            print(f"FAIL  {label:38s} {type(exc).__name__}: {' | '.join(msg[-3:])[:400]}", flush=True)
            continue
        ctas, occ, limiter = occupancy(u.regs, warps, u.shared)
        too_many = max_regs is not None and u.regs > max_regs
        bad = u.spills or not u.agree or too_many
        failures += bad
        status = ("DIFF" if not u.agree else "SPILL" if u.spills else "REGS" if too_many else "ok*" if u.stack
                  else "ok")
        print(f"{status:5s} {label:38s} {u.regs:4d} {u.spill_stores:6d}/{u.spill_loads:<6d} {u.stack:6d} "
              f"{u.stl:4d}/{u.ldl:<4d} {u.shared / 1024:7.1f} {ctas:4d} {occ:6.1%} {limiter:9s} "
              f"{time.perf_counter() - t0:5.1f}  {'; '.join(steps[:3])}{' ...' if len(steps) > 3 else ''}",
              flush=True)
    print("ok*: a stack frame without spills (local memory that is not a register spill); DIFF: the readers disagree; "
          f"REGS: a small-head kernel above {SMALL_MAX_REGS} registers")
    print(f"{broken} failed to compile, {failures} spilled, went over their registers or the readers disagreed")
    return 2 if broken else 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
