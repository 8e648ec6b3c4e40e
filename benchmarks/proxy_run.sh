#!/usr/bin/env bash
# One tuning run on the public proxy (mnist-5k), as used to choose stage-2 settings (docs/results.md):
# train from the main job's release with the given synthesize options, then accuracy and embedding
# distance of 5,000 samples against mnist-5k:test. Needs out/mnist5k-eps10.h5 (bash scripts/main_job.sh),
# or another mnist-5k:train release named by RELEASE=path (REF=... another reference, e.g. the
# intensity proxy's bench/dim/test.npz from benchmarks/intensity_proxy.py).
#   bash benchmarks/proxy_run.sh base --steps 800
#   bash benchmarks/proxy_run.sh ema --steps 800 --ema 0.999 --lr-schedule cosine
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1; shift
OUT=bench/proxy
mkdir -p "$OUT"
rm -rf "$OUT/run-$NAME" "$OUT/report-$NAME"
.venv/bin/mepf synthesize "${RELEASE:-out/mnist5k-eps10.h5}" --out "$OUT/run-$NAME" --grid-every 0 --snapshot-every 0 "$@"
.venv/bin/mepf evaluate "$OUT/run-$NAME" --reference "${REF:-mnist-5k:test}" --out "$OUT/report-$NAME" -n 5000 \
  --metrics accuracy,embedding --json --quiet
