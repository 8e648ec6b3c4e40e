"""Fashion-MNIST quality benchmark (design section 5): the full pipeline per epsilon, one command.

60,000 training images are the private data; the 10,000 test images are used for evaluation only.
Per eps (default 1, 10 and inf = the non-private baseline on the same code path): embed (efficientnet-
lite0, delta 1e-5, add/remove, labelled) -> synthesize -> evaluate (CNN, LogisticRegression and MLP
accuracy on --n-synthetic samples; FID of --fid-samples against the test set). Writes results.json and
results.md (a markdown table) under --out, and prints the table.

    .venv/bin/python benchmarks/quality.py                      # the protocol (hours on 2 CPU cores)
    .venv/bin/python benchmarks/quality.py --eps 10 --steps 300 --n-synthetic 2000 --fid-samples 500  # smoke

Data: torchvision's download where a network exists, else the Debian package dataset-fashion-mnist
(installed here if missing and possible); the script says which files it used.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from mepf.artifacts.errors import MepfError
from mepf.core.device import resolve_device
from mepf.embed.datasets import DEBIAN_FASHION_DIRS, named_source
from mepf.embed.run import EmbedOptions, run_embed
from mepf.evaluate.data import read_source
from mepf.evaluate.evaluation import evaluate
from mepf.evaluate.inception import checked_probe_error, load_inception
from mepf.synthesize.objective import check_weight
from mepf.synthesize.options import GENERATOR_NAMES, LR_SCHEDULES
from mepf.synthesize.train import TrainOptions, resume, start

# DPImageBench (CCS 2025; FETA-Pro: arXiv 2601.06368): accuracy of a classifier trained on synthetic FMNIST, eps=1 / 10
PUBLISHED = [
    ("FETA-Pro", 83.4, 88.2, 11.3), ("DP-FETA", 81.7, 87.3, 13.2), ("PrivImage", 79.9, 87.1, 5.3),
    ("DPDM", 76.4, 85.6, 17.1), ("DP-Kernel", 68.4, 70.0, 74.2), ("DP-MERF", 62.2, 62.2, 106.4)]


def fashion_source(data_root):
    try:
        return named_source("fashion-mnist:train", data_root)
    except MepfError:
        if shutil.which("apt-get") and not any(Path(d).is_dir() for d in DEBIAN_FASHION_DIRS):
            print("fashion-mnist not found: installing the Debian package dataset-fashion-mnist")
            subprocess.run("apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist", shell=True,
                           check=False)
        return named_source("fashion-mnist:train", data_root)


def fid_reference_subset(out: Path, n: int, data_root) -> Path:
    """The first n Fashion-MNIST test images as an .npz: a smaller FID reference when CPU time is short."""
    path = out / f"fashion-mnist-test-first{n}.npz"
    if not path.is_file():
        test = read_source(named_source("fashion-mnist:test", data_root))
        np.savez(path, images=test.images[:n], labels=test.labels[:n])
    return path


def write_table(out: Path, rows: list) -> list:
    """results.md, rewritten after every eps so that an interrupted run keeps its finished rows."""
    lines = ["| eps | seed | setting | CNN acc | LogReg acc | MLP acc | trained on | FID (samples vs test images) | "
             "embed | train | steps | lr | evaluate | device | commit |",
             "| --- " * 15 + "|"]
    for r in rows:
        fid = f"{r['fid']:.1f} ({r['fid_samples']} vs {r['fid_reference']})" if r["fid"] is not None else "not run"
        embed = "?" if r["embed_s"] is None else f"{r['embed_s']:.0f}"
        lines.append(f"| {r['epsilon']} | {r.get('seed', 0)} | {r.get('setting', '')} | {100 * r['cnn']:.1f}% | "
                     f"{100 * r['logreg']:.1f}% | {100 * r['mlp']:.1f}% | "
                     f"{r['n_synthetic']:,} synthetic | {fid} | {embed} s | {r['train_s'] / 60:.1f} min | "
                     f"{r['steps']} | {r['lr']} | {r['eval_s'] / 60:.1f} min | {r['device']} | {r['commit']} |")
    lines += ["", "Published (DPImageBench, CCS 2025), accuracy eps=1 / eps=10, FID eps=10:"]
    lines += [f"- {n}: {a1} / {a10}" + (f", FID {f}" if f else "") for n, a1, a10, f in PUBLISHED]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return lines


def first100_name(z_scale: float = 1.0) -> str:
    """The file beside a committed generator with the first 100 of a draw at z_scale (one per scale)."""
    return "samples-first100.npz" if z_scale == 1 else f"samples-first100-z{z_scale:g}.npz"


def record_samples(gen_path: Path, n: int, seed: int, z_scale: float = 1.0) -> dict:
    """Draw n samples of `seed` at z_scale (the evaluation's draw), store the first 100 beside the generator and
    return the row's `samples` field (n, seed, z_scale, SHA-256 of images and labels)."""
    import hashlib

    from mepf.synthesize import load_generator

    images, labels = load_generator(gen_path).sample(n, seed=seed, z_scale=z_scale)
    np.savez_compressed(gen_path.parent / first100_name(z_scale), images=images[:100], labels=labels[:100])
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels.astype("<i8")).tobytes())
    return {"n": n, "seed": seed, "sha256": h.hexdigest(), **({"z_scale": z_scale} if z_scale != 1 else {})}


def keep_generator(run: Path, dest: Path, n: int, seed: int, z_scale: float = 1.0, release: Path | None = None) -> dict:
    """Copy the run's generator.pt and options.json to dest (committed beside the results), with the first 100
    of its n samples of `seed` (the evaluation's draw) as an .npz: a check that the committed generator is the
    one behind the row; and its release (public by design), which `mepf evaluate` finds beside the generator, so
    that a reader's evaluation checks the generator's guarantee. Returns the row's fields that name it."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("generator.pt", "options.json"):
        shutil.copyfile(run / name, dest / name)
    if release is not None:  # (never a baseline's: its sums are exact, which nothing may release)
        shutil.copyfile(release, dest / "release.h5")
    samples = record_samples(dest / "generator.pt", n, seed, z_scale)
    root = Path(__file__).resolve().parent.parent
    where = dest.resolve().relative_to(root) if dest.resolve().is_relative_to(root) else dest
    return {"generator": str(where / "generator.pt"), "samples": samples}


def kept_elsewhere(dest: Path, run: Path) -> bool:
    """dest holds a kept generator that is not this run's (e.g. a committed one behind a published row)."""
    kept, ours = dest / "generator.pt", run / "generator.pt"
    return kept.exists() and not (ours.is_file() and filecmp.cmp(kept, ours, shallow=False))


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eps", default="1,10,inf")
    ap.add_argument("--seeds", default="0", help="comma-separated; each seed is a fresh release and a fresh training "
                    "seed (FID for the first seed of each eps only)")
    ap.add_argument("--setting", default="default", help="a name for the configuration, stored in every row")
    ap.add_argument("--data", default="fashion-mnist:train", choices=["fashion-mnist:train", "fashion-mnist:train-55k"],
                    help="The private set: all 60,000 training images, or DPImageBench's 55,000 (their 5,000-image "
                    "validation hold-out never enters mepf embed).")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--steps", type=int, default=16000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=TrainOptions.lr,
                    help="Generator Adam lr (the tool's default, chosen as docs/results.md says).")
    ap.add_argument("--lr-mavg", type=float, default=TrainOptions.lr_mavg)
    ap.add_argument("--lr-schedule", default="constant", choices=list(LR_SCHEDULES))
    ap.add_argument("--ema", type=float, default=0.0, help="Generator weight average decay (0: off).")
    ap.add_argument("--generator", default="auto", choices=["auto", *GENERATOR_NAMES],
                    help="as mepf synthesize --generator (auto: conv at 28 px)")
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--layer-weights", default="", help="as mepf synthesize --layer-weights, e.g. stem=3")
    ap.add_argument("--n-synthetic", type=int, default=60000)
    ap.add_argument("--z-scale", type=float, default=1.0, help="sample at z ~ N(0, s^2 I), as mepf sample --z-scale")
    ap.add_argument("--fid-samples", type=int, default=10000)
    ap.add_argument("--fid-reference", type=int, default=10000,
                    help="FID against the first N test images (10000: all; fewer when CPU time is short).")
    ap.add_argument("--cnn-epochs", type=int, default=8)
    ap.add_argument("--skip-fid", action="store_true", help="Accuracy only (FID costs ~25 min of CPU per 10k).")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench/fashion-mnist")
    ap.add_argument("--keep-generators", default="docs/results/generators",
                    help="Copy each row's generator (generator.pt, options.json, its first 100 samples) under this "
                    "folder, named by setting, eps and seed, and name it in the row ('' : do not).")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(a.device)
    src = fashion_source(a.data_root)
    if not a.skip_fid:  # fail now, not after hours of training
        checked_probe_error(load_inception(None, "cpu"), None)
    print(f"private data: {a.data} from {getattr(src, 'image_file', '?')}")
    results = out / "results.json"
    rows = json.loads(results.read_text())["results"] if results.exists() else []  # an interrupted run goes on
    lines = []
    seeds = [int(s) for s in a.seeds.split(",")]
    try:  # the values now, the names against the feature map when training starts (before it trains)
        layer_weights = {k.strip(): float(w) for k, _, w in (p.partition("=") for p in a.layer_weights.split(",") if p)}
        for key, w in layer_weights.items():
            check_weight("--layer-weights", key, w)
    except (ValueError, MepfError) as e:
        ap.error(f"--layer-weights {a.layer_weights}: give finite NAME=WEIGHT pairs >= 0, e.g. stem=3 ({e})")
    done = {(r["epsilon"], r.get("seed"), r.get("setting")) for r in rows}
    pending = [(seed, eps, tag, f"eps{tag}-seed{seed}") for seed in seeds for eps in map(float, a.eps.split(","))
               for tag in ["inf" if math.isinf(eps) else f"{eps:g}"] if (tag, seed, a.setting) not in done]
    for *_, name in pending if a.keep_generators else []:  # checked before hours of training
        dest = Path(a.keep_generators) / f"{a.setting}-{name}"
        if kept_elsewhere(dest, out / f"run-{name}"):
            raise SystemExit(f"{dest} already holds a kept generator (a committed one is behind a published row): "
                             "give --keep-generators another folder (or '' to keep none), or another --setting")
    for seed, eps, tag, name in pending:
        rel, run = out / f"release-{name}.h5", out / f"run-{name}"
        embed_s = None  # made by an earlier, interrupted invocation: not timed here
        if rel.exists():
            from mepf.artifacts import load

            made_of = load(rel).data_spec.get("dataset")
            if made_of != a.data:
                raise SystemExit(f"{rel} is a release of {made_of}, not of --data {a.data}: use another --out")
        else:
            t0 = time.perf_counter()
            run_embed(EmbedOptions(data=a.data, data_root=a.data_root, out=str(rel), epsilon=eps,
                                   delta=a.delta, backbone=a.backbone, device=a.device, allow_repeat=True,
                                   release_log=str(out / "releases.jsonl")))
            embed_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if (run / "options.json").exists() and not (run / "generator.pt").exists():
            # continue the interrupted run from its last snapshot; also how a finished run is extended: copy
            # its release-*.h5, releases.jsonl(.key) and run-* folder into a new --out (else a fresh release is
            # embedded, spending budget), delete the copy's generator.pt, give a larger --steps and e.g.
            # --lr-schedule cooldown (given again on every later invocation: resume applies it)
            resume(str(run), {"lr_schedule": a.lr_schedule}, steps=a.steps)
        elif not (run / "generator.pt").exists():
            shutil.rmtree(run, ignore_errors=True)
            start(TrainOptions(release=str(rel), out=str(run), steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                               lr_mavg=a.lr_mavg, lr_schedule=a.lr_schedule, ema=a.ema, generator=a.generator,
                               width=a.width, layer_weights=layer_weights, device=a.device, seed=seed,
                               grid_every=max(1, a.steps // 4),
                               snapshot_every=max(1, a.steps // 8)))
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with_fid = not a.skip_fid and seed == seeds[0]
        full_fid = with_fid and a.fid_reference >= 10000
        rep = evaluate(str(run), "fashion-mnist:test", out / f"report-{name}", n=a.n_synthetic,
                       fid_samples=a.fid_samples, data_root=a.data_root, device=dev, cnn_epochs=a.cnn_epochs,
                       release_log=out / "releases.jsonl", seed=seed, z_scale=a.z_scale,
                       metrics=None if full_fid else ["accuracy", "embedding"])
        m = rep["metrics"]
        if with_fid and not full_fid:
            fid_rep = evaluate(str(run), str(fid_reference_subset(out, a.fid_reference, a.data_root)),
                               out / f"report-{name}-fid", n=a.fid_samples, data_root=a.data_root, device=dev,
                               release_log=out / "releases.jsonl", metrics=["fid"], z_scale=a.z_scale)
            m.update({k: v for k, v in fid_rep["metrics"].items() if k.startswith("fid")})
        eval_s = time.perf_counter() - t0
        stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines() if line.strip()]
        # training time from the run's own record (steps between records / their rate, and any compiling
        # beyond its steps, compile_s): right across resumes
        train_s = sum((b["step"] - a_["step"]) / b["steps_per_s"] + b.get("compile_s", 0.0)
                      for a_, b in zip([{"step": 0}] + stats, stats))
        rows.append({"epsilon": tag, "seed": seed, "setting": a.setting, "data": a.data, "delta": a.delta,
                     "cnn": m["accuracy"]["cnn"], "logreg": m["accuracy"]["logreg"], "mlp": m["accuracy"]["mlp"],
                     "fid": m.get("fid"), "fid_samples": m.get("fid_samples"),
                     "fid_reference": min(a.fid_reference, 10000) if with_fid else None,
                     "embedding_distance": m.get("embedding_distance"), "n_synthetic": a.n_synthetic,
                     "embed_s": embed_s,
                     "train_s": train_s, "train_steps_per_s": float(np.median([s["steps_per_s"] for s in stats])),
                     "eval_s": eval_s, "steps": a.steps, "lr": a.lr, "lr_schedule": a.lr_schedule,
                     "layer_weights": layer_weights or None, "z_scale": a.z_scale,
                     "generator_arch": json.loads((run / "options.json").read_text()).get("generator_arch"),
                     "device": str(dev) + ("" if dev.type != "cpu" else f" ({torch.get_num_threads()} threads)"),
                     "protocol": "mepf", "commit": commit()})
        if a.keep_generators:
            rows[-1].update(keep_generator(run, Path(a.keep_generators) / f"{a.setting}-{name}", a.n_synthetic,
                                           seed, a.z_scale, release=rel if math.isfinite(eps) else None))
        results.write_text(json.dumps({"settings": vars(a), "results": rows}, indent=2))
        lines = write_table(out, rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
