"""One arm of the batch-norm folding comparison (docs/results.md, "the extractor's batch norms folded"): a run at
the main job's setting (1,500 steps unless STEPS is given, defaults, --precision auto) with the plan's bn_folded set
as given, so that the arm without folding is today's code but for the fold. Evaluate it with `mepf evaluate RUN
--reference mnist-5k:test -n 5000 --metrics accuracy,embedding`.

    .venv/bin/python benchmarks/bn_fold_arm.py RELEASE.h5 RUN_DIR SEED {0,1} [STEPS]
"""
import dataclasses
import sys

from mepf.synthesize import train as train_mod
from mepf.synthesize.precision import resolve
from mepf.synthesize.train import TrainOptions, start


def main() -> None:
    release, out, seed, folded = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 1500
    train_mod.resolve = lambda precision, device: dataclasses.replace(resolve(precision, device), bn_folded=folded)
    t = start(TrainOptions(release=release, out=out, steps=steps, seed=seed, grid_every=0, snapshot_every=0),
              progress=False)
    assert t.precision.bn_folded == folded, t.precision
    print(out, t.precision)


if __name__ == "__main__":
    main()
