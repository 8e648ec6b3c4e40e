#!/usr/bin/env bash
# The main job: set up, then run the pipeline on the default dataset (mnist-5k, no download needed):
# embed (stage 1) -> audit -> synthesize (stage 2) -> sample. Output lands in out/.
# STEPS=... shortens or lengthens training (default 1500: about 10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
STEPS=${STEPS:-1500}
mkdir -p out
.venv/bin/mepf embed --data mnist-5k:train --backbone efficientnet-lite0 --epsilon 10 --delta 1e-5 \
  --out out/mnist5k-eps10.h5 --overwrite --allow-repeat --release-log out/releases.jsonl
.venv/bin/mepf audit out/mnist5k-eps10.h5 --release-log out/releases.jsonl
.venv/bin/mepf info out/mnist5k-eps10.h5
rm -rf out/runs/demo && mkdir -p out/runs
.venv/bin/mepf synthesize out/mnist5k-eps10.h5 --out out/runs/demo --steps "$STEPS"
.venv/bin/mepf sample out/runs/demo -n 1000 --out out/samples.npz --overwrite
echo "released file : out/mnist5k-eps10.h5 (audit: .venv/bin/mepf audit out/mnist5k-eps10.h5)"
echo "run folder    : out/runs/demo (options.json, stats.jsonl, grid-*.png, generator.pt)"
echo "samples       : out/samples.npz (1000 images, balanced labels)"
