"""The typed feature spec (artifacts/feature_spec.py): what the release stores, read back field by field, and the
one feature-map object stage 2 builds from it."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mepf.artifacts import load
from mepf.artifacts.errors import MepfError
from mepf.artifacts.feature_spec import FeatureSpec
from mepf.cli import main
from mepf.core.features import build_feature_map, feature_map_from_spec, normalise
from tests.conftest import make_images

DOC = Path(__file__).resolve().parents[1] / "docs" / "artifact-format.md"
#: stored keys that are documentation of the map rather than inputs to it: kept in `stored`, not typed
DESCRIPTIVE = {"mode", "norm_target", "versions"}


@pytest.fixture(scope="module")
def release_eps1(tmp_path_factory):
    """A release written by `mepf embed` with a resize and a pixels layer: every optional key present."""
    d = tmp_path_factory.mktemp("spec")
    np.savez(d / "d.npz", images=make_images(20, seed=3), labels=np.arange(20) % 10)
    r = CliRunner().invoke(main, [str(a) for a in (
        "embed", "--data", d / "d.npz", "--classes", "10", "--out", d / "r.h5", "--epsilon", "1", "--delta", "1e-5",
        "--release-log", d / "log.jsonl", "--quiet", "--backbone", "resnet18", "--weights", "random",
        "--layers", "pixels,stem", "--pixel-weight", "2", "--feature-size", "32x32")])
    assert r.exit_code == 0, r.output + r.stderr
    return d / "r.h5"


def _doc_keys() -> set:
    section = DOC.read_text().split("## `feature_spec`", 1)[1].split("\n## ", 1)[0]
    return {k for row in re.findall(r"^\| (`[^|]+`) \|", section, re.M) for k in re.findall(r"`([^`]+)`", row)}


def test_every_documented_key_is_typed_or_descriptive():
    fields = {f.name for f in dataclasses.fields(FeatureSpec)} - {"stored"}
    typed_as = {"input": {"height", "width", "channels"}}
    keys = _doc_keys()
    assert keys >= {"backbone", "C1", "C2", "dim", "input", "resize"}  # the doc's table was read
    for key in keys - DESCRIPTIVE:
        assert typed_as.get(key, {key}) <= fields, key
    assert fields <= keys | {"height", "width", "channels"}


def test_a_release_spec_reads_back_typed_and_stored_unchanged(release_eps1):
    r = load(release_eps1)
    spec = r.features
    assert spec.as_json() == r.feature_spec and spec.as_json() is not spec.stored
    assert (spec.C1, spec.C2, spec.dim) == (r.feature_spec["C1"], r.feature_spec["C2"], r.feature_spec["dim"])
    assert spec.image_size == tuple(r.data_spec["transform"]["image_size"]) and spec.layers == tuple(
        r.feature_spec["layers"])
    assert spec.norm("S1") == spec.C1 and spec.norm("S2") == spec.C2
    assert spec.resize == (32, 32) and spec.pixel_weight == 2.0
    assert spec.backbone in spec.summary() and f"D={spec.dim}" in spec.summary()


@pytest.mark.parametrize("change", [
    {"C1": -1.0}, {"dim": 0}, {"pooling": "max"}, {"input": {"height": 28, "width": 28, "channels": 2}},
])
def test_an_invalid_spec_is_refused_in_one_line(change):
    _, spec = build_feature_map("resnet18", "random", image_size=(32, 32))
    with pytest.raises(MepfError) as e:
        FeatureSpec.from_json({**spec, **change})
    assert "\n" not in str(e.value) and "feature_spec" in str(e.value)


def test_older_spec_without_resize_or_pixel_weight():
    _, spec = build_feature_map("resnet18", "random", image_size=(32, 32))
    old = {k: v for k, v in spec.items() if k not in ("resize", "pixel_weight")}
    typed = FeatureSpec.from_json(old)
    assert typed.resize is None and typed.pixel_weight is None and typed.as_json() == old


def test_the_feature_map_carries_its_spec_and_phi(eff28):
    ex, spec = eff28
    fmap = feature_map_from_spec(FeatureSpec.from_json({**spec, "C2": 3.0}))
    assert fmap.spec.C2 == 3.0 and fmap.spec.layers == tuple(spec["layers"])
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        out = fmap.embed(x, ("S1", "S2"))
        f = ex(x).float()
    torch.testing.assert_close(out["S1"], normalise(f, spec["C1"], torch.float32))
    torch.testing.assert_close(out["S2"].norm(dim=1), torch.full((5,), 3.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["S2"], normalise(f * f, 3.0, torch.float32), rtol=1e-5, atol=1e-8)
