#!/usr/bin/env bash
# Print the path of a Python >= 3.12 with numpy, h5py, scipy and autodp (in .venv-newer), for the tests of
# stage 1's torch-free reading under a newer Python than the main venv's (zipfile's seek changed in 3.12).
# Prints nothing where no such interpreter can be found or set up; that test is then skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv-newer/bin/python ] && .venv-newer/bin/python -c "import numpy, h5py, scipy, autodp" 2>/dev/null; then
  echo "$PWD/.venv-newer/bin/python"; exit 0
fi
for py in python3.13 python3.12 /root/.pyenv/versions/3.13*/bin/python3 /root/.pyenv/versions/3.12*/bin/python3; do
  command -v "$py" >/dev/null 2>&1 || continue
  "$py" -c "import sys; sys.exit(sys.version_info < (3, 12))" 2>/dev/null || continue
  rm -rf .venv-newer
  if "$py" -m venv .venv-newer >/dev/null 2>&1 \
      && .venv-newer/bin/pip install -q numpy h5py scipy autodp >/dev/null 2>&1; then
    echo "$PWD/.venv-newer/bin/python"; exit 0
  fi
done
echo "note: no Python >= 3.12 could be set up; the newer-Python reading test will be skipped" >&2
