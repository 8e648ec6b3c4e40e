#!/usr/bin/env bash
# The main job: set up, then run the pipeline on the default dataset (mnist-5k, no download needed).
# Today that is stage 1 and the audit: embed -> audit -> info. Output lands in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/mepf embed --data mnist-5k:train --backbone efficientnet-lite0 --epsilon 10 --delta 1e-5 \
  --out out/mnist5k-eps10.h5 --overwrite --allow-repeat --release-log out/releases.jsonl
.venv/bin/mepf audit out/mnist5k-eps10.h5 --release-log out/releases.jsonl
.venv/bin/mepf info out/mnist5k-eps10.h5
echo "released file: out/mnist5k-eps10.h5 (audit it with: .venv/bin/mepf audit out/mnist5k-eps10.h5)"
