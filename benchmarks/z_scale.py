"""Does sampling a trained generator at a wider (or narrower) latent, z ~ N(0, s^2 I), change what the downstream
classifiers learn from its samples? A post-processing choice (no privacy cost): each scale's n class-balanced
samples (the same seed, so the same z times s) are evaluated like stage 3's accuracy, against a held-out reference.

    .venv/bin/python benchmarks/z_scale.py GENERATOR --scales 1,1.2,1.4 --reference fashion-mnist:val-5k --out DIR

Tune on a validation hold-out (fashion-mnist:val-5k), never on the reported test split. Prints one row per scale
and writes DIR/z_scale.json."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mepf.evaluate.evaluation import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generator")
    ap.add_argument("--scales", default="1,1.2,1.4")
    ap.add_argument("--reference", default="fashion-mnist:val-5k")
    ap.add_argument("--out", required=True)
    ap.add_argument("-n", type=int, default=60000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    scales = [float(s) for s in a.scales.split(",")]
    if not all(s > 0 for s in scales):
        ap.error("--scales: positive numbers")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in scales:
        t0 = time.perf_counter()
        rep = evaluate(a.generator, a.reference, out / f"report-z{s:g}", n=a.n, metrics=["accuracy"], seed=a.seed,
                       overwrite=True, progress=False, z_scale=s)  # n class-balanced samples at this scale
        acc = rep["metrics"]["accuracy"]
        rows.append({"z_scale": s, **acc, "generator": a.generator, "reference": a.reference, "n": a.n,
                     "seed": a.seed, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"z scale {s:g}: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()), flush=True)
        (out / "z_scale.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
