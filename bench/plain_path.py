"""Where the plain torch-ops path stops paying: CrossEntropy and OCSoftmax heads (C = 2 / 1) on the CPU, one training
step (forward, backward into the embeddings and the weight), the plain path (`deepfense.torch_plain`) against the
closed-form Function (`deepfense.torch_backend`), interleaved, at B from 8 to 65536, D 160 and 1024, class weights on,
at each thread count asked for. `deepfense.torch_plain.CE_MAX_ROWS` and `OC_MAX_VALUES` are set from what this prints.

    python bench/plain_path.py [--threads 1,2] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deepfense import torch_backend, torch_plain
from deepfense.params import LossParams, Margin


def _steps(loss: str, B: int, D: int):
    gen = torch.Generator().manual_seed(B + D)
    x = torch.randn(B, D, generator=gen).requires_grad_()
    t = torch.randint(0, 2, (B,), generator=gen)
    cw = torch.tensor([0.3, 0.7])
    if loss == "ce":
        p = LossParams(Margin.NONE)
        w = (torch.randn(2, D, generator=gen) * D ** -0.5).requires_grad_()
        b = torch.zeros(2, requires_grad=True)
        plain = lambda: torch_plain.cross_entropy(x, w, b, t, cw, p)  # noqa: E731
        function = lambda: torch_backend.margin_loss(x, w.t(), b, t, cw, None, p)  # noqa: E731
    else:
        p = LossParams(Margin.ONE_CLASS, m_real=0.9, m_fake=0.2, alpha=20.0)
        w = torch.randn(D, 1, generator=gen).requires_grad_()
        plain = lambda: torch_plain.one_class(x, w, t, cw, p)  # noqa: E731
        function = lambda: torch_backend.margin_loss(x, w, None, t, cw, None, p)  # noqa: E731

    def step(fn):
        x.grad = w.grad = None
        fn().backward()
    return (lambda: step(plain)), (lambda: step(function))


def measure(loss: str, B: int, D: int, rounds: int) -> float:
    """Median Function step / median plain step (above 1: the plain path is faster)."""
    plain, function = _steps(loss, B, D)
    plain(), function()
    start = time.perf_counter()
    plain()
    n = max(2, min(100, int(0.05 / max(time.perf_counter() - start, 1e-6))))
    times = {plain: [], function: []}
    for r in range(rounds):
        for fn in (plain, function) if r % 2 == 0 else (function, plain):
            for _ in range(n):
                start = time.perf_counter()
                fn()
                times[fn].append(time.perf_counter() - start)
    return statistics.median(times[function]) / statistics.median(times[plain])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args()
    batches = [8, 32, 256, 1024, 2048, 4096, 16384, 65536]
    for threads in [int(v) for v in a.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\ntorch threads = {threads}: Function step / plain step (above 1: plain faster)")
        print("loss  D     " + " ".join(f"{b:>7d}" for b in batches))
        for loss in ("ce", "oc"):
            for D in (160, 1024):
                ratios = [measure(loss, B, D, a.rounds) for B in batches]
                print(f"{loss:5s} {D:<5d} " + " ".join(f"{r:7.2f}" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
