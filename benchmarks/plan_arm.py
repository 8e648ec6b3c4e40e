"""One arm of a plan-value comparison (docs/results.md): a run at the main job's setting (1,500 steps unless
--steps is given, defaults, --precision auto) with the named values of the resolved plan replaced, so that the arm
without a change is today's code but for it. Evaluate it with `mepf evaluate RUN --reference mnist-5k:test -n 5000
--metrics accuracy,embedding`.

    .venv/bin/python benchmarks/plan_arm.py RELEASE.h5 RUN_DIR SEED upsample_folded=false [--steps N]
"""
import argparse
import dataclasses
import json

from mepf.synthesize import train as train_mod
from mepf.synthesize.precision import Precision, resolve
from mepf.synthesize.train import TrainOptions, start


def run_arm(release: str, out: str, seed: int, values: dict, steps: int = 1500):
    """Train one arm: auto's plan with `values` in place of its own."""
    fields = {f.name for f in dataclasses.fields(Precision)}
    unknown = set(values) - fields
    if unknown:
        raise SystemExit(f"no plan value {sorted(unknown)[0]!r}; the plan's are {', '.join(sorted(fields))}")
    train_mod.resolve = lambda precision, device: dataclasses.replace(resolve(precision, device), **values)
    t = start(TrainOptions(release=release, out=out, steps=steps, seed=seed, grid_every=0, snapshot_every=0),
              progress=False)
    assert all(getattr(t.precision, k) == v for k, v in values.items()), t.precision
    print(out, t.precision)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("release")
    ap.add_argument("run")
    ap.add_argument("seed", type=int)
    ap.add_argument("values", nargs="+", metavar="FIELD=JSON", help="e.g. upsample_folded=false")
    ap.add_argument("--steps", type=int, default=1500)
    a = ap.parse_args()
    values = {k: json.loads(v) for k, _, v in (item.partition("=") for item in a.values)}
    run_arm(a.release, a.run, a.seed, values, a.steps)


if __name__ == "__main__":
    main()
