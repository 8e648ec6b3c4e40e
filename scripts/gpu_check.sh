#!/usr/bin/env bash
# On a CUDA machine, one command: set up, show the device, run the tests that need CUDA (marked `cuda`,
# skipped elsewhere), then the embed benchmark on the GPU. Prints the figures to record in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
# PY, MEPF and NO_SETUP=1: a machine whose python already holds mepf (scripts/gpu_offline.sh)
[ -n "${NO_SETUP:-}" ] || bash scripts/setup.sh
PY=${PY:-.venv/bin/python}
MEPF=${MEPF:-.venv/bin/mepf}
$PY - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.device_count()} device(s)")
PYEOF
[ -n "${SKIP_TESTS:-}" ] || $PY -m pytest -q -m cuda -rs tests
$PY benchmarks/embed_throughput.py --backbone vgg19 --weights random --image-size 32 --device cuda --workers 0,4 --memory-sizes ""
$PY benchmarks/embed_throughput.py --backbone efficientnet-lite0 --image-size 32 --device cuda --workers 0,4 --memory-sizes ""
TMP=$(mktemp -d)
$MEPF embed --data mnist-5k:train --out "$TMP/r.h5" --epsilon 10 --delta 1e-5 --device cuda \
  --release-log "$TMP/log.jsonl" --quiet
$PY benchmarks/synthesize_speed.py "$TMP/r.h5" --device cuda --steps 50 --repeats 3
$MEPF embed --data mnist-5k:train --image-size 32 --backbone vgg19 --weights random --out "$TMP/v.h5" \
  --epsilon 10 --delta 1e-5 --device cuda --release-log "$TMP/log2.jsonl" --quiet
$PY benchmarks/synthesize_speed.py "$TMP/v.h5" --device cuda --steps 20 --repeats 3
