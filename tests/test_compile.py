"""`mepf synthesize --compile`: both networks compiled by torch.compile for training (inductor, a real C++ build on
the CPU): the same computation as eager, compile time reported apart in stats.jsonl, resume bit-exact within one
mode, the mode changeable on resuming, refusals. A feature map cut at EfficientNet's block2 keeps compiling short."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mepf.artifacts.errors import MepfError
from mepf.cli import main
from mepf.core.features import build_feature_map
from mepf.embed.datasets import named_source
from mepf.embed.files import ArraySource
from mepf.embed.release import embed_to_file
from mepf.embed.transform import Transform
from mepf.synthesize import load_generator
from mepf.synthesize.train import COMPILE_STEPS, TrainOptions, prepare, resume, start

FAST = {"width": 16, "batch_size": 20, "grid_every": 0, "snapshot_every": 0, "log_every": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def small_release(tmp_path_factory):
    """200 real MNIST digits through EfficientNet-Lite0 up to block2 (real weights), eps = 1000."""
    d = tmp_path_factory.mktemp("compile")
    x, y = next(iter(named_source("mnist-5k:train").batches(200)))
    np.savez(d / "private.npz", images=x, labels=y)
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", layers=["stem", "block1", "block2"],
                                 image_size=(28, 28), channels=1)
    embed_to_file(ArraySource(d / "private.npz", [str(i) for i in range(10)]), Transform((28, 28), 1), ex, spec,
                  out=d / "r.h5", epsilon=1000, delta=1e-5, release_log_path=d / "log.jsonl", progress=False)
    return d / "r.h5"


def _records(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


def test_compiled_training_computes_what_eager_does(small_release, tmp_path):
    """The first step (same weights, same batch) gives eager's distances to rounding; compile_s is reported once,
    in the first record after the compiling steps; the generator saved is the plain module (no compiled wrapper
    in its state dict) and samples."""
    eager = start(TrainOptions(release=str(small_release), out=str(tmp_path / "e"), steps=4, **FAST), progress=False)
    comp = start(TrainOptions(release=str(small_release), out=str(tmp_path / "c"), steps=4, compile="default",
                              **FAST), progress=False)
    assert comp.g_train is not comp.G and eager.g_train is eager.G
    re, rc = _records(tmp_path / "e"), _records(tmp_path / "c")
    assert [r["step"] for r in rc] == [r["step"] for r in re] == [1, 2, 3, 4]
    for m in ("dist_S1", "dist_S2"):
        assert rc[0][m] == pytest.approx(re[0][m], rel=1e-4), m
        assert re[0][m] != 0
    assert [r["step"] for r in rc if "compile_s" in r] == [COMPILE_STEPS + 1]
    assert rc[COMPILE_STEPS]["compile_s"] > 0 and not any("compile_s" in r for r in re)
    assert json.loads((tmp_path / "c" / "options.json").read_text())["compile"] == "default"
    g = load_generator(tmp_path / "c")
    _same_weights(g.module, comp.G)  # keys as eager's: the compiled wrapper is not what is saved
    assert list(g.module.state_dict()) == list(eager.G.state_dict())
    images, labels = g.sample(10)
    assert images.shape == (10, 28, 28, 1) and images.std() > 0


def test_compiled_resume_is_bitwise_identical_and_the_mode_can_change(small_release, tmp_path):
    """Within one mode a resumed run equals an uninterrupted one bit for bit (the same kernels are built again);
    --compile given again on resuming takes effect and is recorded as a change."""
    base = dict(FAST, snapshot_every=3, compile="default")
    a = start(TrainOptions(release=str(small_release), out=str(tmp_path / "a"), steps=6, **base), progress=False)
    start(TrainOptions(release=str(small_release), out=str(tmp_path / "b"), steps=3, **base), progress=False)
    b = resume(tmp_path / "b", steps=6, progress=False)
    _same_weights(a.G, b.G)
    for m in a.mavg:
        assert torch.equal(a.mavg[m], b.mavg[m])
    # each process compiles, and reports it after its own first COMPILE_STEPS steps
    assert [r["step"] for r in _records(tmp_path / "b") if "compile_s" in r] == [3, 6]
    c = resume(tmp_path / "b", changes={"compile": "none"}, steps=7, progress=False)
    assert c.g_train is c.G and c.opts.compile == "none"
    saved = json.loads((tmp_path / "b" / "options.json").read_text())
    assert saved["compile"] == "none"
    assert {"step": 6, "option": "compile", "from": "default", "to": "none"} in saved["changes"]
    assert [r["step"] for r in _records(tmp_path / "b") if "compile_s" in r] == [3, 6]


def test_compile_refusals(small_release, tmp_path, monkeypatch):
    """An unknown mode, and on the CPU no C++ compiler for inductor: one line each, before any file is written."""
    with pytest.raises(MepfError, match="--compile must be one of none, default"):
        prepare(TrainOptions(release=str(small_release), out=str(tmp_path / "x"), compile="fast", **FAST))
    r = CliRunner().invoke(main, ["synthesize", str(small_release), "--out", str(tmp_path / "y"), "--compile", "fast"])
    assert r.exit_code == 2 and "--compile" in r.output
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder with no compiler in it
    with pytest.raises(MepfError, match=r"needs a C\+\+ compiler .* install g\+\+ or leave --compile none"):
        prepare(TrainOptions(release=str(small_release), out=str(tmp_path / "z"), compile="default", **FAST))
    prepare(TrainOptions(release=str(small_release), out=str(tmp_path / "z"), **FAST))  # eager needs none
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_cli_compile_and_resume_with_another_mode(small_release, tmp_path):
    """Through the CLI: --compile reaches options.json and --dry-run; given again on resuming it is a change."""
    run = tmp_path / "run"
    common = ["--width", "16", "--batch-size", "20", "--grid-every", "0", "--log-every", "1", "--device", "cpu",
              "--quiet"]
    r = CliRunner().invoke(main, ["synthesize", str(small_release), "--out", str(run), "--steps", "3", "--compile",
                                  "default", "--dry-run", *common])
    assert r.exit_code == 0 and json.loads(r.output)["compile"] == "default" and not run.exists()
    r = CliRunner().invoke(main, ["synthesize", str(small_release), "--out", str(run), "--steps", "3", "--compile",
                                  "default", *common])
    assert r.exit_code == 0, r.output
    assert [r["step"] for r in _records(run) if "compile_s" in r] == [3]
    r = CliRunner().invoke(main, ["synthesize", "--resume", str(run), "--steps", "4", "--compile", "none", "--quiet"])
    assert r.exit_code == 0, r.output
    saved = json.loads((run / "options.json").read_text())
    assert saved["compile"] == "none"
    assert {"step": 3, "option": "compile", "from": "default", "to": "none"} in saved["changes"]
