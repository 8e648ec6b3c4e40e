# Written by mepf at ec2b872 (before the house moved), installed with: pip install --no-deps --target /tmp/oldmepf .
# Run in an empty folder; tests/test_compat.py reads what it wrote.
set -e
export PYTHONPATH=/tmp/oldmepf
PY=/work/main/.venv/bin/python
$PY -c "
import sys; sys.path.insert(0, '/work/main')
import numpy as np
from tests.conftest import make_images
np.savez('d.npz', images=make_images(40, seed=11), labels=np.arange(40) % 10)
"
TINY="--backbone resnet18 --weights random --layers pixels --pixel-weight 2 --feature-size 32"
$PY -m mepf embed --data d.npz --classes 10 --out release.h5 --epsilon 1 --delta 1e-5 --release-log log.jsonl --quiet $TINY
$PY -m mepf embed --data d.npz --classes 10 --out exact.h5 --epsilon inf --delta 1e-5 --release-log log2.jsonl --quiet --force $TINY
$PY -m mepf synthesize release.h5 --out run --steps 4 --width 8 --batch-size 20 --grid-every 0 --snapshot-every 2 --log-every 2 --quiet
$PY -m mepf sample run -n 20 --out samples.npz --seed 3
