"""One arm of the batch-norm folding comparison (docs/results.md, "the extractor's batch norms folded"), the command
its records name: `plan_arm.py` with bn_folded set as given.

    .venv/bin/python benchmarks/bn_fold_arm.py RELEASE.h5 RUN_DIR SEED {0,1} [STEPS]
"""
import sys

from plan_arm import run_arm

if __name__ == "__main__":
    run_arm(sys.argv[1], sys.argv[2], int(sys.argv[3]), {"bn_folded": sys.argv[4] == "1"},
            int(sys.argv[5]) if len(sys.argv) > 5 else 1500)
