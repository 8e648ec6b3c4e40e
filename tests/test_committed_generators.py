"""The generators committed beside the results rows (docs/results/generators/) are the ones that produced them:
each draws, for the row's seed and latent scale, the images stored with it (the first 100 of the evaluation's
draw)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mepf.synthesize import load_generator

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)


def _rows():
    return [(p.name, r) for p in sorted((ROOT / "docs" / "results").glob("*.json"))
            for r in json.loads(p.read_text())["results"] if r.get("generator")]


def test_there_are_committed_generators():
    assert _rows(), "no results row names its generator (benchmarks/quality.py --keep-generators)"


@pytest.mark.parametrize("source,row", _rows(), ids=[r["generator"].split("/")[-2] for _, r in _rows()])
def test_committed_generator_draws_the_rows_samples(source, row):
    path = ROOT / row["generator"]
    assert "samples" in row, f"{source}: a row that names its generator names its draw (quality.record_samples)"
    z = row["samples"].get("z_scale", 1.0)
    assert z == row.get("z_scale", 1.0), f"{source}: the row's samples are not its evaluation's draw"
    stored = np.load(path.parent / quality.first100_name(z))
    g = load_generator(path)
    images, labels = g.sample(100, seed=row["samples"]["seed"], z_scale=z)
    assert (labels == stored["labels"]).all()
    # the same computation; another CPU's kernels may round a pixel differently, never more
    diff = np.abs(images.astype(int) - stored["images"].astype(int))
    assert diff.max() <= 2 and (diff == 0).mean() > 0.999, (source, diff.max(), (diff == 0).mean())
    opts = json.loads((path.parent / "options.json").read_text())
    assert opts["seed"] == row["seed"] and opts["steps"] == row["steps"]
    assert g.info["epsilon"] == pytest.approx(float(row["epsilon"]), rel=1e-3)
