"""The B x D part of a training step alone: features -> per-class sums of phi1 and phi2, forward+backward.
Prints figures, asserts nothing.

    .venv/bin/python benchmarks/class_sums_speed.py [--dim 303104 --batch 100 --classes 10 --repeats 15]

Interleaved medians of: one copy of the features (the memory-bandwidth floor of one B x D pass), the plan's
`index_add` (fused phi, then per-class index_add), `fused` (phi and the sums in one autograd step that writes no
phi row), and the same computation as one torch.compile'd function (not a plan value: measured to decide whether
compiling it would pay; its compile time is printed apart). The default dimension is VGG19's at 32 px.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mepf.core.features import norm_target, phi_class_sums, phi_fused
from mepf.core.memory import keep_freed_memory


def compiled_sums(k: int):
    """phi1/phi2 and their class sums as one pure function for torch.compile, with _Phi's row rule (a row
    whose norm is zero or not finite adds zero and has a zero gradient), and no host sync."""

    def sums(f, y, t1, t2):
        n1 = torch.linalg.vector_norm(f, dim=1, keepdim=True)
        bad = ~(torch.isfinite(n1) & (n1 > 0))
        f = torch.where(bad, 0.0, f)
        n1 = torch.where(bad, 1.0, n1)
        p1 = f * torch.where(bad, 0.0, t1 / n1)
        m = f.abs().amax(dim=1, keepdim=True).detach()
        v = (f / torch.where(m > 0, m, 1.0)).square()
        n2 = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        p2 = v * torch.where(bad, 0.0, t2 / torch.where(bad, 1.0, n2))
        z = f.new_zeros(k, f.shape[1])
        return z.index_add(0, y, p1), z.index_add(0, y, p2)

    return torch.compile(sums)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=303104)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    b, d, k = a.batch, a.dim, a.classes
    f0 = torch.randn(b, d).relu_() + 0.01 * torch.randn(b, d)  # post-ReLU-like activations
    y = torch.randint(0, k, (b,))
    g1, g2 = torch.randn(k, d), torch.randn(k, d)
    t1, t2 = norm_target(1.0, d), norm_target(1.0, d)
    comp = compiled_sums(k)

    def run(sums_of):
        f = f0.detach().requires_grad_()
        torch.autograd.backward(list(sums_of(f)), [g1, g2])
        return f.grad

    def index_add(f):
        p1, p2 = phi_fused(f, 1.0, 1.0)
        return (p1.new_zeros(k, d).index_add(0, y, p1), p2.new_zeros(k, d).index_add(0, y, p2))

    cases = {"one copy of f (floor of one pass)": lambda: f0.clone(),
             "index_add (the CPU plan)": lambda: run(index_add),
             "fused": lambda: run(lambda f: phi_class_sums(f, y, k, 1.0, 1.0)),
             "torch.compile of phi + index_add": lambda: run(lambda f: comp(f, y, t1, t2))}
    s = time.perf_counter()
    ref, got = run(index_add), cases["torch.compile of phi + index_add"]()
    compile_s = time.perf_counter() - s
    print(f"B={b} D={d} K={k}, {torch.get_num_threads()} threads, torch {torch.__version__}; first compiled call "
          f"(compile + run) {compile_s:.1f} s; compiled vs index_add gradient: max |diff| / max |grad| = "
          f"{float((got - ref).abs().max() / ref.abs().max()):.1e}")
    times: dict = {}
    for _ in range(a.repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"  {name:36s} {1000 * statistics.median(ts):8.1f} ms")


if __name__ == "__main__":
    main()
