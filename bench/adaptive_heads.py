"""The adaptive-margin face heads (AdaFace, MagFace, ElasticFace, CurricularFace) against their authors' formulations
(the float64 transcriptions in tests/published_heads.py, which the tests check our heads against).

Two tables:
  --parity  head x backend x input dtype: the largest error of the loss, dX and dW against the transcription in
            float64, relative to the largest value of each (small shapes: 64 x 64 x 200, the kernels' class loop
            runs several tiles; on a machine without CUDA the kernels run in the Triton interpreter).
  --bench   each head at a face shape (default 128 x 512 x 93431 fp32 on CPU, 1024 x 512 x 93431 on CUDA): our head
            on this device's default backend, the authors' formulation in plain PyTorch eager, and the same under
            torch.compile; median forward+backward ms over interleaved rounds, and the peak extra memory of one step
            (`deepfense.benchmark.measure.peak_memory`).

Run: `python bench/adaptive_heads.py --parity --bench [--shape B D C] [--rounds N] [--out FILE.md]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

if "--parity" in sys.argv and os.environ.get("TRITON_INTERPRET") is None:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels on CPU tensors (set before deepfense imports triton)

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import published_heads as pub  # noqa: E402
from deepfense.benchmark.measure import peak_memory  # noqa: E402
from deepfense.losses import AdaFace, ArcFace, CurricularFace, ElasticFace, MagFace  # noqa: E402
from deepfense.reference import arcface_ref  # noqa: E402

HEADS = ("AdaFace", "MagFace", "ElasticFace", "CurricularFace")


def _state(name, device, dtype):
    if name == "AdaFace":
        return {"batch_mean": torch.full((1,), 20.0, device=device, dtype=dtype),
                "batch_std": torch.full((1,), 100.0, device=device, dtype=dtype)}
    if name == "CurricularFace":
        return {"t": torch.zeros(1, device=device, dtype=dtype)}
    return None


def ours(name, D, C, backend, device, seed=0):
    """Our head (training mode, fresh state) as a function of (x, w, targets): w enters through functional_call."""
    gen = torch.Generator(device=device).manual_seed(seed)
    head = {"ArcFace": lambda: ArcFace(D, C, m=0.5, s=64.0, fallback="none", backend=backend),
            "AdaFace": lambda: AdaFace(D, C, backend=backend), "MagFace": lambda: MagFace(D, C, backend=backend),
            "ElasticFace": lambda: ElasticFace(D, C, generator=gen, backend=backend),
            "CurricularFace": lambda: CurricularFace(D, C, backend=backend)}[name]().to(device)

    def step(x, w, t):
        return torch.func.functional_call(head, {"mapper.weight": w}, (x, t))
    return step


def authors(name, device, seed=0):
    """The authors' formulation (tests/published_heads.py; ArcFace: insightface's, as `reference.arcface_ref`) as a
    function of (x, w, targets), fresh state (in the inputs' dtype)."""
    state = {}
    gen = torch.Generator(device=device).manual_seed(seed)

    def step(x, w, t):
        if not state:
            state["s"] = _state(name, device, x.dtype)
        if name == "ArcFace":
            return arcface_ref(x, w, t, m=0.5, s=64.0, fallback="none")
        if name == "AdaFace":
            norms = x.norm(dim=1, keepdim=True)
            return pub.adaface(x / norms, norms, w, t, state=state["s"])[0]
        if name == "MagFace":
            return pub.magface(x, w, t)[0]
        if name == "ElasticFace":
            return pub.elasticface(x, w, t, generator=gen)[0]
        return pub.curricular_face(x, w, t, state=state["s"])[0]
    return step


def inputs(B, D, C, device, dtype, seed=0):
    """Embeddings with norms spread over MagFace's [10, 110] and AdaFace's scaler range, a weight, targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * (torch.rand(B, 1, generator=g, dtype=torch.float64) * 110 + 5)
    w = torch.randn(D, C, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (B,), generator=g)
    return x.to(device, dtype), w.to(device, dtype), t.to(device)


def _grads(fn, x, w, t, dtype=None):
    x = x.detach().to(dtype or x.dtype).requires_grad_()
    w = w.detach().to(dtype or w.dtype).requires_grad_()
    loss = fn(x, w, t)
    loss.backward()
    return [loss.detach().double(), x.grad.double(), w.grad.double()]


def parity(device, B=64, D=64, C=200):
    backends = ("reference", "torch", "triton")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for name in HEADS:
        x, w, t = inputs(B, D, C, device, torch.float64)
        for dname, dtype in dtypes.items():
            # the gold of the inputs as rounded to this dtype: the table shows arithmetic error, not the inputs'
            xr, wr = x.to(dtype).double(), w.to(dtype).double()
            gold = _grads(authors(name, device), xr, wr, t)
            for backend in backends:
                got = _grads(ours(name, D, C, backend, device), xr, wr, t, dtype)
                errs = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, gold)]
                rows.append((name, backend, dname, *errs))
                print(f"  {name:14s} {backend:9s} {dname}: loss {errs[0]:.2e} dX {errs[1]:.2e} dW {errs[2]:.2e}",
                      flush=True)
    head = (f"Parity, {B} x {D} x {C}: max |ours - authors'| / max |authors'| per tensor, the authors' head in float64 "
            "on the inputs as rounded to the dtype. Kernels: "
            f"{'CUDA' if device == 'cuda' else 'the Triton interpreter on CPU'}.\n\n"
            "| head | backend | inputs | loss | dX | dW |\n|---|---|---|---|---|---|\n")
    return head + "".join(f"| {n} | {b} | {d} | {e0:.1e} | {e1:.1e} | {e2:.1e} |\n" for n, b, d, e0, e1, e2 in rows)


def bench(device, B, D, C, rounds):
    backend = "auto"
    lines = []
    for name in ("ArcFace",) + HEADS:  # ArcFace (one margin for the batch): the control
        x, w, t = inputs(B, D, C, device, torch.float32)
        torch._dynamo.reset()
        providers = {"deepfense": ours(name, D, C, backend, device), "authors eager": authors(name, device),
                     "authors compiled": torch.compile(authors(name, device))}
        times = {k: [] for k in providers}
        leaves = [(x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_())]
        for fn in providers.values():  # warm-up (and compile)
            for _ in range(2):
                fn(*leaves[0], t).backward()
        for _ in range(rounds):  # interleaved: each round times every provider once
            for k, fn in providers.items():
                xl, wl = leaves[0]
                xl.grad = wl.grad = None
                if device == "cuda":
                    torch.cuda.synchronize()
                a = time.perf_counter()
                fn(xl, wl, t).backward()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[k].append((time.perf_counter() - a) * 1e3)
        base = statistics.median(times["authors eager"])
        for k, fn in providers.items():
            xl, wl = leaves[0]
            mem = peak_memory(lambda a, b, c: fn(a, b, c), (xl, wl, t), device)
            med = statistics.median(times[k])
            lines.append((name, k, med, base / med, mem))
            print(f"  {name:14s} {k:17s} {med:9.1f} ms  x{base / med:5.2f}  peak {mem / 2**20 if mem else 0:8.1f} MiB",
                  flush=True)
    head = (f"Face shape {B} x {D} x {C} fp32, forward + backward, median of {rounds} interleaved rounds; speed-up "
            "against the authors' eager; peak extra memory of one step (gradients included). deepfense: our head on "
            "this device's default backend. ArcFace (m = 0.5, insightface's formula) is the control: one margin "
            "for the batch.\n\n"
            "| head | implementation | median ms | speed-up | peak MiB |\n|---|---|---|---|---|\n")
    return head + "".join(f"| {n} | {k} | {m:.1f} | {r:.2f}x | {mem / 2**20:.0f} |\n" for n, k, m, r, mem in lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("B", "D", "C"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", help="write the tables (markdown) here too")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import triton
    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, " \
                                                                  f"{torch.get_num_threads()} threads"
    text = [f"# Adaptive-margin heads\n\n{where}; torch {torch.__version__}, triton {triton.__version__}, "
            f"Python {platform.python_version()}.\n"]
    if args.parity:
        text.append(parity(device))
    if args.bench:
        B, D, C = args.shape or ((1024, 512, 93431) if device == "cuda" else (128, 512, 93431))
        text.append(bench(device, B, D, C, args.rounds))
    out = "\n".join(text)
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out)


if __name__ == "__main__":
    main()
