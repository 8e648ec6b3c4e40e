"""Stage-2 speed, in one run with interleaved repeats. Prints figures, asserts nothing.

    .venv/bin/python benchmarks/synthesize_speed.py [RELEASE.h5] [--batch-size 100 --steps 10 --repeats 5]
                                                    [--baseline REV --cli-steps 60]

- the real training step at --precision auto (the plan it resolves to here), the same with each other way of
  taking class sums (index_add / one-hot product / fused with phi), without the extractor's batch norms
  folded into its convolutions, without the generator's upsampling folded into the convolutions after it, and at
  fp32;
- the bare cost: generator forward+backward plus extractor forward+backward (input gradient only) at the
  same batch, each at its fastest of fp32/bf16 x default/channels-last, and the step's ratio to it;
- with --baseline REV: `mepf synthesize` of commit REV against this build's, on the same release, same
  command, alternating (steps/s from each run's stats.jsonl after its first record);
- with --compile MODES: auto's step with both networks compiled as `mepf synthesize --compile MODE` does (one
  trainer per mode), its compile time (the first two steps, less two eager steps) printed apart from its step time;
- the roofline: each network case's floating-point work (torch's FlopCounterMode) against this machine's dense
  matmul rate in fp32 and bf16, measured in the same interleaved repeats, and the rate an fp32 extractor would need
  for a step with it to reach 0.85 x the bare cost.
Without RELEASE.h5 it first embeds mnist-5k:train (efficientnet-lite0, eps=10) into a temporary file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mepf.core.memory import keep_freed_memory
from mepf.synthesize.generators import Z_DIM, fold_upsampling
from mepf.synthesize.precision import CLASS_SUMS, legacy
from mepf.synthesize.train import Trainer, TrainOptions, prepare

ROOT = Path(__file__).resolve().parent.parent


def make_release(tmp: Path) -> Path:
    from mepf.embed.run import EmbedOptions, run_embed

    run_embed(EmbedOptions(data="mnist-5k:train", out=str(tmp / "r.h5"), epsilon=10, delta=1e-5,
                           release_log=str(tmp / "log.jsonl")), progress=False)
    return tmp / "r.h5"


def per_second(fn, n: int, sync) -> float:
    sync()
    s = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return n / (time.perf_counter() - s)


def network_cases(t: Trainer, batch: int, dev) -> dict:
    """Forward+backward of each network alone, per precision and memory format (the input gradient only for
    the frozen extractor)."""
    import copy

    spec = t.release.features
    z = torch.randn(batch, Z_DIM, device=dev)
    y = (torch.arange(batch) % t.arch["num_classes"]).to(dev)
    x0 = torch.rand(batch, spec.channels, spec.height, spec.width, device=dev)
    def gen_case(G, bf):
        def gen():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf):
                x = G(z, y)
            x.float().sum().backward()
        return gen

    cases = {}
    for cl in (False, True):
        fmt = torch.channels_last if cl else torch.contiguous_format
        G = copy.deepcopy(t.G).to(memory_format=fmt)
        E = copy.deepcopy(t.fmap).to(memory_format=fmt)
        for bf in (False, True):
            name = f"{'bf16' if bf else 'fp32'}{', channels-last' if cl else ''}"

            def ext(E=E, bf=bf, fmt=fmt):
                x = x0.contiguous(memory_format=fmt).requires_grad_(True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf):
                    out = E(x)
                out.float().sum().backward()

            cases[f"generator {name}"] = gen_case(G, bf)
            cases[f"extractor {name}"] = ext
    plain = fold_upsampling(copy.deepcopy(t.G).to(memory_format=torch.channels_last), False)
    for bf in (False, True):  # the generator as written, for the fold's share
        cases[f"generator {'bf16' if bf else 'fp32'}, channels-last, upsampling as written"] = gen_case(plain, bf)
    return cases


def matmul_cases(dev) -> dict:
    """A dense square matmul in fp32 and bf16: the machine's practical multiply-add rate, the roof."""
    n = 8192 if dev.type == "cuda" else 2048
    cases = {}
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a, b = (torch.randn(n, n, device=dev).to(dt) for _ in range(2))
        cases[f"matmul {name} {n}^3"] = lambda a=a, b=b: torch.mm(a, b)
    return cases


def flops(fn) -> int:
    """Floating-point operations of one call (a multiply-add is two), as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def roofline(rate: dict, work: dict, target: float = 0.85) -> None:
    """Each network case's achieved rate against this machine's matmul rate of its precision, and the rate an fp32
    extractor would need for a step with it to reach `target` x the bare cost (from each case's best repeat: noise
    only adds time)."""
    roof = {k.split()[1]: work[k] * v for k, v in rate.items() if k.startswith("matmul")}
    for k, v in rate.items():
        if k in work and not k.startswith("matmul"):
            prec = "bf16" if "bf16" in k else "fp32"
            print(f"  {k:60s} {work[k] / 1e9:7.1f} GFLOP  {work[k] * v / 1e9:7.1f} GFLOP/s = "
                  f"{work[k] * v / roof[prec]:4.2f} x the {prec} matmul rate")
    g = min((k for k in rate if k.startswith("generator")), key=lambda k: 1 / rate[k])
    e = min((k for k in rate if k.startswith("extractor")), key=lambda k: 1 / rate[k])
    e32 = min((k for k in rate if k.startswith("extractor fp32")), key=lambda k: 1 / rate[k])
    bare = 1 / rate[g] + 1 / rate[e]
    budget = bare / target - 1 / rate[g]  # seconds left for the fp32 extractor if the step were nothing else
    need = work[e32] / budget
    print(f"roofline (bests): matmul {roof['fp32'] / 1e9:.0f} GFLOP/s fp32, {roof['bf16'] / 1e9:.0f} bf16. For a step "
          f"with an fp32 extractor to reach {target} x the bare cost ({1000 * bare:.1f} ms), even with nothing but the "
          f"two networks in it, the fp32 extractor ({work[e32] / 1e9:.1f} GFLOP) must take at most "
          f"{1000 * budget:.1f} ms: {need / 1e9:.0f} GFLOP/s, {need / roof['fp32']:.2f} x the fp32 matmul rate and "
          f"{need / (work[e32] * rate[e32]):.2f} x the rate it runs at now ({1000 / rate[e32]:.1f} ms)")


def cli_rate(python: list, env: dict, release: str, out: Path, steps: int, batch: int) -> float:
    """steps/s of one `mepf synthesize` run, from its stats.jsonl (the first record, with start-up, left out)."""
    cmd = python + ["synthesize", release, "--out", str(out), "--steps", str(steps), "--log-every", "10",
                    "--grid-every", "0", "--snapshot-every", "0", "--batch-size", str(batch), "--quiet"]
    # run from the output's folder: from the repository, `python -c` would import the working tree's mepf first
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=out.parent)
    recs = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines() if line]
    return statistics.median(r["steps_per_s"] for r in recs[1:])


def baseline_build(rev: str, tmp: Path) -> Path:
    """Commit REV's mepf installed (no dependencies) into a folder of its own, to be put first on PYTHONPATH."""
    src, target = tmp / "src", tmp / "site"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    src.mkdir()
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(src)], check=True)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("release", nargs="?")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10, help="steps per measurement")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats (medians are printed)")
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--baseline", metavar="REV", help="also time `mepf synthesize` of this commit")
    ap.add_argument("--cli-steps", type=int, default=60, help="steps of each `mepf synthesize` run")
    ap.add_argument("--compile", default="", metavar="MODES",
                    help="comma-separated torch.compile modes to time auto's step with, e.g. "
                         "default,reduce-overhead (CUDA graphs: CUDA only)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    release = a.release or str(make_release(tmp))
    keep_freed_memory()  # as Trainer.fit does; before every measurement, so that they compare
    trainers = {}
    for precision in ("auto", "fp32"):
        opts = TrainOptions(release=release, out=str(tmp / "run"), batch_size=a.batch_size, width=a.width,
                            device=a.device, precision=precision)
        rel, fmap, arch, dev = prepare(opts)
        trainers[precision] = Trainer(opts, rel, fmap, arch, dev)
    opts = TrainOptions(release=release, out=str(tmp / "run"), batch_size=a.batch_size, width=a.width,
                        device=a.device)
    rel, fmap, arch, dev = prepare(opts)
    trainers["before"] = Trainer(opts, rel, fmap, arch, dev, legacy("auto", dev))  # as the code before issue 27
    auto = trainers["auto"].precision
    # auto's plan but for one value: each fold it makes left out, each other way of taking the class sums
    variants = {name: {k: False} for name, k in (("batch norms not folded", "bn_folded"),
                                                 ("upsampling not folded", "upsample_folded")) if getattr(auto, k)}
    variants.update({f"class sums {other}": {"class_sums": other} for other in CLASS_SUMS if other != auto.class_sums})
    for name, changes in variants.items():
        rel, fmap, arch, dev = prepare(opts)
        trainers[f"auto, {name}"] = Trainer(opts, rel, fmap, arch, dev, replace(auto, **changes))
    t = trainers["auto"]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cases = {f"step {k}": tr.train_step for k, tr in trainers.items()}
    cases.update(network_cases(t, a.batch_size, dev))
    cases.update(matmul_cases(dev))
    work = {k: flops(fn) for k, fn in cases.items() if k.split()[0] in ("generator", "extractor", "matmul")}
    for fn in cases.values():  # warm-up
        per_second(fn, 2, sync)
    compile_s = {}
    for mode in [m.strip() for m in a.compile.split(",") if m.strip()]:
        copts = replace(opts, compile=mode)
        rel, fmap, arch, dev = prepare(copts)
        tc = Trainer(copts, rel, fmap, arch, dev, t.precision)  # as `mepf synthesize --compile MODE` trains
        name = f"step auto, compiled {mode}"
        cases[name] = tc.train_step
        # the first two steps' seconds, compiling included; two eager steps are taken off below
        compile_s[mode] = 2 / per_second(tc.train_step, 2, sync)
        print(f"compiled {mode}: first two steps {compile_s[mode]:.1f} s", flush=True)
    rates = {k: [] for k in cases}
    for _ in range(a.repeats):
        for k, fn in cases.items():
            rates[k].append(per_second(fn, a.steps, sync))
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = {k: max(v) for k, v in rates.items()}  # a shared machine's noise only adds time
    spec = rel.features
    print(f"{spec.backbone} D={spec.dim}, {spec.channels}x{spec.height}x{spec.width}, generator {arch['name']} width "
          f"{arch['width']}, batch {a.batch_size}, device {dev}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; medians (and bests) of {a.repeats} interleaved repeats of {a.steps} steps")
    for k, v in med.items():
        print(f"  {k:40s} {v:7.2f} it/s  {1000 / v:7.1f} ms  (best {1000 / best[k]:7.1f} ms)")
    print(f"auto resolves to: {t.precision}")
    for what, r in (("medians", med), ("bests", best)):
        g = min((k for k in r if k.startswith("generator")), key=lambda k: 1 / r[k])
        e = min((k for k in r if k.startswith("extractor")), key=lambda k: 1 / r[k])
        bare_ms = 1000 / r[g] + 1000 / r[e]
        step_ms = 1000 / r["step auto"]
        print(f"{what}: bare cost (fastest {g} + fastest {e}) {bare_ms:.1f} ms; step auto {step_ms:.1f} ms = "
              f"{bare_ms / step_ms:.2f} x bare; fp32 step {1000 / r['step fp32']:.1f} ms; the computation before "
              f"issue 27 (--precision auto then) {1000 / r['step before']:.1f} ms: auto is "
              f"{r['step auto'] / r['step before']:.2f} x faster")
    roofline(best, work)
    step_ms = 1000 / med["step auto"]
    for mode, first in compile_s.items():
        step = 1000 / med[f"step auto, compiled {mode}"]
        sec = first - 2 * step_ms / 1000
        print(f"compiled {mode}: compile time {sec:.1f} s (first two steps, less two eager ones), then {step:.1f} ms "
              f"a step against {step_ms:.1f} eager: {step_ms / step:.2f} x; pays after "
              f"{sec / max((step_ms - step) / 1000, 1e-9):.0f} steps" if step < step_ms else
              f"compiled {mode}: compile time {sec:.1f} s, then {step:.1f} ms a step against {step_ms:.1f} eager: "
              f"no gain")
    if a.baseline:
        site = baseline_build(a.baseline, tmp)
        env_old = {**os.environ, "PYTHONPATH": str(site)}
        py = [sys.executable, "-c", "import sys; from mepf.cli import main; sys.argv[0] = 'mepf'; main()"]
        runs = {a.baseline: [], "this build": []}
        for i in range(3):
            runs[a.baseline].append(cli_rate(py, env_old, release, tmp / f"old{i}", a.cli_steps, a.batch_size))
            runs["this build"].append(cli_rate(py, dict(os.environ), release, tmp / f"new{i}",
                                               a.cli_steps, a.batch_size))
        old, new = (statistics.median(v) for v in runs.values())
        print(f"mepf synthesize ({a.cli_steps} steps, defaults, 3 alternating runs each): {a.baseline} "
              f"{old:.2f} steps/s, this build {new:.2f} steps/s: {new / old:.2f} x")


if __name__ == "__main__":
    main()
