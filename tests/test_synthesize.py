"""Stage 2: training from the released file alone, resume, refusals, feature-map parity, sampling."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mepf.artifacts import load
from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import content_checksum
from mepf.cli import main
from mepf.core.features import build_feature_map, feature_map_from_spec
from mepf.embed.datasets import named_source
from mepf.embed.files import ArraySource
from mepf.embed.release import accumulate, embed_to_file
from mepf.embed.transform import Transform
from mepf.synthesize import load_generator
from mepf.synthesize.objective import Target, embedding_distance
from mepf.synthesize.train import Trainer, TrainOptions, prepare, resume, start
from tests.conftest import Payload, fails_if_blocked

FAST = {"width": 32, "batch_size": 40, "grid_every": 0, "snapshot_every": 0, "log_every": 5, "device": "cpu"}


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    """A release made from 300 real MNIST digits (mnist-5k); the data file is deleted afterwards.
    eps=1000 keeps the noise floor of the distance low, so that learning is visible in a short run."""
    d = tmp_path_factory.mktemp("rel")
    xs, ys = [], []
    for x, y in named_source("mnist-5k:train").batches(500):
        xs.append(x), ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    idx = np.random.default_rng(0).permutation(len(x))[:300]
    np.savez(d / "private.npz", images=x[idx], labels=y[idx])
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=1)
    embed_to_file(ArraySource(d / "private.npz", [str(i) for i in range(10)]), Transform((28, 28), 1), ex, spec,
                  out=d / "r.h5", epsilon=1000, delta=1e-5, release_log_path=d / "log.jsonl", progress=False)
    (d / "private.npz").unlink()  # stage 2 must not need it
    return d / "r.h5"


def test_training_lowers_embedding_distance(release_file, tmp_path):
    opts = TrainOptions(release=str(release_file), out=str(tmp_path / "run"), steps=40, lr=1e-3, **FAST)
    release, ex, arch, dev = prepare(opts)
    target = Target(release, dev)
    from mepf.synthesize.train import Trainer

    before = Trainer(opts, release, ex, arch, dev)
    d0 = embedding_distance(before.G, ex, target, n=200)
    t = start(opts, progress=False)
    d1 = embedding_distance(t.G, ex, target, n=200)
    for m in ("S1", "S2"):
        assert d1[m] < 0.5 * d0[m], (m, d0, d1)
    run = tmp_path / "run"
    opts_json = json.loads((run / "options.json").read_text())
    assert opts_json["release_sha256"] == release.file_sha256 and opts_json["epsilon"] == release.epsilon
    stats = [json.loads(l) for l in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == list(range(5, 41, 5))
    assert {"dist_S1", "dist_S2", "mavg_loss", "steps_per_s"} <= set(stats[0])
    assert (run / "grid-0000040.png").is_file() and (run / "generator.pt").is_file()
    g = load_generator(run)
    assert g.epsilon == release.epsilon and g.info["release_sha256"] == release.file_sha256


def test_plain_objective_also_learns(release_file, tmp_path):
    opts = TrainOptions(release=str(release_file), out=str(tmp_path / "p"), steps=30, objective="plain", lr=1e-3,
                        **FAST)
    start(opts, progress=False)
    stats = [json.loads(l) for l in (tmp_path / "p" / "stats.jsonl").read_text().splitlines()]
    first, last = stats[0]["dist_S1"], stats[-1]["dist_S1"]
    assert last < 0.7 * first


def test_resume_is_bitwise_identical(release_file, tmp_path):
    base = dict(FAST, snapshot_every=10, ema=0.9)
    a = start(TrainOptions(release=str(release_file), out=str(tmp_path / "a"), steps=20, **base), progress=False)
    start(TrainOptions(release=str(release_file), out=str(tmp_path / "first"), steps=10, **base), progress=False)
    (tmp_path / "first").rename(tmp_path / "b")  # a moved run folder resumes where it now is
    b = resume(tmp_path / "b", steps=20, progress=False)
    assert not (tmp_path / "first").exists() and (tmp_path / "b" / "snapshot-0000020.pt").is_file()
    for ga, gb in ((a.G, b.G), (a.G_ema, b.G_ema)):
        for (ka, va), (kb, vb) in zip(ga.state_dict().items(), gb.state_dict().items()):
            assert ka == kb and torch.equal(va, vb), ka
    for m in a.mavg:
        assert torch.equal(a.mavg[m], b.mavg[m])
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


def test_cooldown_schedule_and_extending_a_constant_run(release_file, tmp_path):
    """cooldown: --lr until the last fifth of --steps, then linear to 0; a constant run of 8 steps resumed with
    --steps 20 --lr-schedule cooldown is bit-identical to a fresh 20-step cooldown run (how a long run is extended
    and then cooled down), and the lr each step used follows the schedule."""
    base = dict(FAST, snapshot_every=8)
    a = start(TrainOptions(release=str(release_file), out=str(tmp_path / "a"), steps=20, lr_schedule="cooldown",
                           **base), progress=False)
    start(TrainOptions(release=str(release_file), out=str(tmp_path / "b"), steps=8, **base), progress=False)
    b = resume(tmp_path / "b", changes={"lr_schedule": "cooldown"}, steps=20, progress=False)
    for (ka, va), (kb, vb) in zip(a.G.state_dict().items(), b.G.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    lr = a.opts.lr
    assert [a.lr_at(s) for s in (0, 15, 16, 17, 19, 20)] == pytest.approx([lr, lr, lr, 0.75 * lr, 0.25 * lr, 0.0])
    assert a.opt_g.param_groups[0]["lr"] == pytest.approx(0.25 * lr)  # the last step's
    assert json.loads((tmp_path / "b" / "options.json").read_text())["lr_schedule"] == "cooldown"


@pytest.mark.parametrize("precision", ["bf16-generator", "bf16"])
def test_resume_is_bitwise_identical_in_bf16(release_file, tmp_path, precision):
    """Within one precision plan, as in fp32: bf16 autocast and channels-last are deterministic on CPU."""
    base = dict(FAST, snapshot_every=5, precision=precision)
    a = start(TrainOptions(release=str(release_file), out=str(tmp_path / "a"), steps=10, **base), progress=False)
    start(TrainOptions(release=str(release_file), out=str(tmp_path / "b"), steps=5, **base), progress=False)
    b = resume(tmp_path / "b", steps=10, progress=False)
    assert a.precision == b.precision and a.precision.generator == "bf16"
    for (ka, va), (kb, vb) in zip(a.G.state_dict().items(), b.G.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    for m in a.mavg:
        assert torch.equal(a.mavg[m], b.mavg[m])


def test_weight_average_and_cosine_schedule(release_file, tmp_path):
    """The EMA follows its formula step by step and is what generator.pt holds; the cosine lr runs
    from --lr to 0 and is the lr each step used."""
    from mepf.synthesize.train import Trainer

    opts = TrainOptions(release=str(release_file), out=str(tmp_path / "e"), steps=8, ema=0.8, lr_schedule="cosine",
                        lr=1e-3, **FAST)
    release, ex, arch, dev = prepare(opts)
    t = Trainer(opts, release, ex, arch, dev)
    avg = [p.detach().clone() for p in t.G.parameters()]
    lrs = []
    for step in range(8):
        t.train_step()
        lrs.append(t.opt_g.param_groups[0]["lr"])
        d = min(0.8, (1 + step + 1) / (10 + step + 1))
        avg = [d * a + (1 - d) * p.detach() for a, p in zip(avg, t.G.parameters())]
    for a, pe in zip(avg, t.G_ema.parameters()):
        assert torch.allclose(a, pe, atol=1e-6)
    assert lrs[0] == 1e-3 and all(x > y > 0 for x, y in zip(lrs, lrs[1:])) and t.lr_at(8) == 0.0
    assert lrs[4] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert not all(torch.equal(p, q) for p, q in zip(t.G.parameters(), t.G_ema.parameters()))

    run = start(opts, progress=False)
    saved = load_generator(tmp_path / "e").module.state_dict()
    assert all(torch.equal(v, run.G_ema.state_dict()[k]) for k, v in saved.items())
    assert not all(torch.equal(v, run.G.state_dict()[k]) for k, v in saved.items())


def _rewrite(src, dst, edit):
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "r+") as f:
        edit(f)


def _with_spec(f, change):
    spec = json.loads(f["feature_spec"].asstr()[()])
    change(spec)
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    del f["feature_spec"]
    f.create_dataset("feature_spec", data=text, dtype=h5py.string_dtype("utf-8"))
    arrays = {n: f[n][()] for n in ("S1", "S2", "counts")}
    f.attrs["checksum_sha256"] = content_checksum(arrays, list(f["class_names"].asstr()[()]), text,
                                                  f["data_spec"].asstr()[()], f["ledger"].asstr()[()])


@pytest.mark.parametrize("case,message", [
    ("weights", "weights differ"), ("truncated", "truncated or corrupt"), ("checksum", "checksum mismatch"),
    ("schema", "schema version 7")])
def test_bad_release_refused_with_one_line(release_file, tmp_path, case, message):
    bad = tmp_path / "bad.h5"
    if case == "truncated":
        bad.write_bytes(release_file.read_bytes()[:5000])
    elif case == "weights":
        _rewrite(release_file, bad, lambda f: _with_spec(f, lambda s: s.update(weights_sha256="ab" * 32)))
    elif case == "checksum":
        _rewrite(release_file, bad, lambda f: f["S1"].__setitem__((0, 0), 5.0))
    else:
        _rewrite(release_file, bad, lambda f: f.attrs.__setitem__("schema_version", 7))
    r = CliRunner().invoke(main, ["synthesize", str(bad), "--out", str(tmp_path / "run"), "--steps", "2", "--quiet"])
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "run").exists()


def _test_digits(n: int) -> np.ndarray:
    """The first n mnist-5k:test images, uint8 (n, 28, 28, 1)."""
    return next(iter(named_source("mnist-5k:test").batches(n)))[0][:n]


def _assert_stages_agree(spec: dict, images: np.ndarray, tmp_path):
    """Stage 1's per-record vector (via the real accumulation of one record per class) equals stage 2's
    phi of the same image given as a float tensor, each through a map rebuilt from the file's spec."""
    np.savez(tmp_path / "ten.npz", images=images[:10], labels=np.arange(10))
    sums = accumulate(ArraySource(tmp_path / "ten.npz", [str(i) for i in range(10)]), Transform((28, 28), 1),
                      feature_map_from_spec(spec), "mean+second", spec["C1"], spec["C2"], batch_size=128,
                      progress=False)
    x = torch.from_numpy(images[:10]).permute(0, 3, 1, 2).float() / 255  # what a generator outputs
    fmap = feature_map_from_spec(spec)
    with torch.no_grad():
        phis = fmap.embed(x, ("S1", "S2"))
        assert torch.equal(fmap.phi("S2", x), phis["S2"])
    for m in ("S1", "S2"):
        np.testing.assert_allclose(sums.sums[m], phis[m].double().numpy(), atol=1e-6)


def test_feature_map_is_the_same_in_both_stages(release_file, tmp_path):
    _assert_stages_agree(load(release_file).feature_spec, _test_digits(10), tmp_path)


def test_sample_outputs(release_file, tmp_path):
    start(TrainOptions(release=str(release_file), out=str(tmp_path / "run"), steps=2, **FAST), progress=False)
    r = CliRunner()
    assert r.invoke(main, ["sample", str(tmp_path / "run"), "-n", "95", "--out", str(tmp_path / "a.npz"),
                           "--seed", "3"]).exit_code == 0
    assert r.invoke(main, ["sample", str(tmp_path / "run" / "generator.pt"), "-n", "95", "--out",
                           str(tmp_path / "b.npz"), "--seed", "3"]).exit_code == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (95, 28, 28) and a["images"].dtype == np.uint8 and a["labels"].dtype == np.int64
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert sorted(np.bincount(a["labels"])) == [9] * 5 + [10] * 5
    res = r.invoke(main, ["sample", str(tmp_path / "run"), "-n", "20", "--out", str(tmp_path / "pngs"), "--seed", "4"])
    assert res.exit_code == 0 and "(a folder of PNGs)" in res.output
    assert "sample: done" in res.stderr and "write PNGs: done" in res.stderr  # progress, as lines off a terminal
    quiet = r.invoke(main, ["sample", str(tmp_path / "run"), "-n", "20", "--out", str(tmp_path / "q.v2"), "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and (tmp_path / "q.v2" / ".mepf-samples").is_file()
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [".mepf-samples"] + [f"{i}_{i}" for i in range(10)]
    assert len(list((tmp_path / "pngs").rglob("*.png"))) == 20
    c = r.invoke(main, ["sample", str(tmp_path / "run"), "-n", "95", "--out", str(tmp_path / "c.npz"), "--seed", "4"])
    assert c.exit_code == 0 and not np.array_equal(np.load(tmp_path / "c.npz")["images"], a["images"])
    prior = r.invoke(main, ["sample", str(tmp_path / "run"), "-n", "50", "--out", str(tmp_path / "p.npz"),
                            "--labels", "prior"])
    assert prior.exit_code == 0


def test_sample_overwrite_replaces_only_samples(release_file, tmp_path, monkeypatch):
    """--overwrite of a PNG folder replaces the whole folder: a run folder given as --out was deleted with its
    generator and snapshots, and anyone's files in the folder with it (review 15); names alone matched other tools'
    folders of numbered PNGs (review 16). Only a folder mepf sample marked, holding nothing else, is replaced;
    '.' and a folder where an .npz is meant are one line."""
    start(TrainOptions(release=str(release_file), out=str(tmp_path / "run"), steps=2, **FAST), progress=False)

    def sample(out, *extra):
        return CliRunner().invoke(main, ["sample", str(tmp_path / "run"), "-n", "12", "--out", str(out), *extra])

    def refused(r, message):
        assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr

    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    refused(sample(tmp_path / "run", "--overwrite"), "it is a training run folder")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    frames = tmp_path / "frames"  # ffmpeg's %06d.png, EDM's 000000/000000.png: named as samples, not ours
    (frames / "0").mkdir(parents=True)
    (frames / "0" / "000000.png").write_bytes(b"x")
    (frames / "000001.png").write_bytes(b"y")
    refused(sample(frames, "--overwrite"), "has no .mepf-samples marker")
    assert (frames / "0" / "000000.png").read_bytes() == b"x" and (frames / "000001.png").exists()
    assert sample(tmp_path / "s").exit_code == 0 and len(list((tmp_path / "s").rglob("*.png"))) == 12
    refused(sample(tmp_path / "s"), "already exists; pass --overwrite")
    again = sample(tmp_path / "s", "--overwrite", "-n", "5")
    assert again.exit_code == 0 and len(list((tmp_path / "s").rglob("*.png"))) == 5
    (tmp_path / "s" / "0_0" / "notes.txt").write_text("mine")
    refused(sample(tmp_path / "s", "--overwrite"), "holds 0_0, which mepf sample does not write")
    assert (tmp_path / "s" / "0_0" / "notes.txt").read_text() == "mine"
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "empty").mkdir()
    refused(sample(tmp_path / "empty", "--overwrite"), "has no .mepf-samples marker")  # a mount point, say: kept
    monkeypatch.chdir(tmp_path / "s")  # '.' below is this folder of samples, never the repository
    refused(sample(".", "--overwrite"), "name the .npz, or a new folder")
    refused(sample(tmp_path / "dir.npz", "--overwrite"), "is a folder, where")
    assert sample(tmp_path / "DIR.NPZ").exit_code == 0  # an .npz whatever the suffix's case (was a PNG folder)
    assert np.load(tmp_path / "DIR.NPZ")["images"].shape == (12, 28, 28)


def test_files_that_are_not_generators_say_what_they_are(release_file, tmp_path):
    """A snapshot was "not an mepf generator (version 1)", with no fix; a samples .npz given to info printed torch
    internals and hinted at pickles (review 15)."""
    start(TrainOptions(release=str(release_file), out=str(tmp_path / "run"),
                       steps=1, **{**FAST, "snapshot_every": 1}), progress=False)
    snap = tmp_path / "run" / "snapshot-0000001.pt"
    r = CliRunner()
    assert r.invoke(main, ["sample", str(tmp_path / "run"), "-n", "4", "--out", str(tmp_path / "s.npz")]).exit_code == 0
    for args, message in ((["info", snap], "is a training snapshot (to resume from), not a generator; pass the run "
                                           f"folder {tmp_path / 'run'} or its generator.pt"),
                          (["sample", snap, "-n", "2", "--out", tmp_path / "x.npz"], "is a training snapshot"),
                          (["info", tmp_path / "s.npz"], "is an .npz of images (samples or data), not a release")):
        res = r.invoke(main, [str(a) for a in args])
        assert res.exit_code == 2 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_sample_z_scale_feeds_the_same_latent_scaled(release_file, tmp_path):
    """--z-scale s draws the generator's images of s * z for the very z of the default draw (labels unchanged);
    s = 1 is the default draw bit for bit; a scale that is not a number in (0, 100] is one line, no file (1e39
    overflowed float32 and wrote all-black images, review 47 L5)."""
    start(TrainOptions(release=str(release_file), out=str(tmp_path / "run"), steps=2, **FAST), progress=False)
    g = load_generator(tmp_path / "run")
    base, y = g.sample(30, seed=5)
    same, y1 = g.sample(30, seed=5, z_scale=1.0)
    wide, y2 = g.sample(30, seed=5, z_scale=1.5)
    assert np.array_equal(base, same) and np.array_equal(y, y1) and np.array_equal(y, y2)
    assert not np.array_equal(base, wide)
    z = torch.randn(30, g.arch["z_dim"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = g.module.eval()(1.5 * z, torch.as_tensor(y)).float()
    by_hand = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(by_hand.astype(int) - wide.astype(int)).max() <= 1
    r = CliRunner()
    ok = r.invoke(main, ["sample", str(tmp_path / "run"), "-n", "30", "--seed", "5", "--z-scale", "1.5", "--out",
                         str(tmp_path / "w.npz")])
    assert ok.exit_code == 0, ok.output + ok.stderr
    assert np.array_equal(np.load(tmp_path / "w.npz")["images"], wide[..., 0])
    for bad in ("0", "-1", "nan", "inf", "1e39", "100.5"):
        res = r.invoke(main, ["sample", str(tmp_path / "run"), "-n", "5", "--z-scale", bad, "--out",
                              str(tmp_path / "bad.npz")])
        assert res.exit_code == 2 and "--z-scale" in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert not (tmp_path / "bad.npz").exists()


def test_sample_in_dpimagebench_form(release_file, tmp_path):
    """gen.npz as DPImageBench's eval.py reads it: x float32 (N, C, H, W) in [0, 1], y integer labels, classes
    balanced; the same images as the mepf .npz of the same seed."""
    start(TrainOptions(release=str(release_file), out=str(tmp_path / "run"), steps=2, **FAST), progress=False)
    r = CliRunner()
    args = ["sample", str(tmp_path / "run"), "-n", "30", "--seed", "4"]
    assert r.invoke(main, args + ["--out", str(tmp_path / "gen.npz"), "--format", "dpimagebench"]).exit_code == 0
    assert r.invoke(main, args + ["--out", str(tmp_path / "m.npz")]).exit_code == 0
    gen, ours = np.load(tmp_path / "gen.npz"), np.load(tmp_path / "m.npz")
    assert sorted(gen.files) == ["x", "y"]
    x, y = gen["x"], gen["y"]
    assert x.dtype == np.float32 and x.shape == (30, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert np.issubdtype(y.dtype, np.integer) and np.bincount(y, minlength=10).tolist() == [3] * 10
    np.testing.assert_array_equal(x, ours["images"][:, None].astype(np.float32) / 255)
    np.testing.assert_array_equal(y, ours["labels"])
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))  # as their loader wraps it
    assert ds[0][0].shape == (1, 28, 28)
    from mepf.evaluate.data import load_synthetic

    back = load_synthetic(str(tmp_path / "gen.npz"), 30)  # evaluate reads it (and DPImageBench's own gen.npz) back
    np.testing.assert_array_equal(back.images[..., 0], ours["images"])
    np.testing.assert_array_equal(back.labels, y)
    for extra, message in ((["--out", str(tmp_path / "folder")], "writes an .npz"),
                           (["--out", str(tmp_path / "p.npz"), "--labels", "prior"], "class-balanced")):
        bad = r.invoke(main, args + ["--format", "dpimagebench"] + extra)
        assert bad.exit_code == 2 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
        assert not Path(extra[1]).exists()


def test_dry_run_writes_nothing(release_file, tmp_path):
    r = CliRunner().invoke(main, ["synthesize", str(release_file), "--out", str(tmp_path / "run"), "--dry-run"])
    resolved = json.loads(r.output)
    assert r.exit_code == 0 and resolved["generator_arch"]["name"] == "conv"
    defaults = TrainOptions(release="", out="")
    assert (resolved["lr"], resolved["steps"]) == (defaults.lr, defaults.steps)  # CLI and library agree
    assert not (tmp_path / "run").exists()


def test_resnet_generator_on_rgb_32(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(40) % 2)
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", image_size=(32, 32), channels=3)
    embed_to_file(ArraySource(tmp_path / "rgb.npz", ["a", "b"]), Transform((32, 32), 3), ex, spec,
                  out=tmp_path / "rgb.h5", epsilon=10, delta=1e-3, release_log_path=tmp_path / "l.jsonl",
                  progress=False)
    t = start(TrainOptions(release=str(tmp_path / "rgb.h5"), out=str(tmp_path / "run"), steps=2, generator="resnet",
                           **dict(FAST, width=16, batch_size=8)), progress=False)
    assert t.arch["name"] == "resnet"
    images, labels = load_generator(tmp_path / "run").sample(6, seed=1)
    assert images.shape == (6, 32, 32, 3) and list(labels) == [0, 1, 0, 1, 0, 1]


def test_every_release_embed_writes_is_one_a_generator_trains_from(tmp_path):
    """embed wrote 48 px releases that `--generator auto` (resnet above 32 px, powers of two only) refused, with no
    word of conv; and a 16x12 one no generator draws (review 42 F3). auto now takes conv there; embed refuses a
    geometry no generator draws, through the library too, before any record is read."""
    ex, spec = build_feature_map("resnet18", "random", ["pixels"], image_size=(48, 48), channels=1)
    np.savez(tmp_path / "d.npz", images=np.random.default_rng(0).integers(0, 256, (12, 48, 48), dtype=np.uint8))
    embed_to_file(ArraySource(tmp_path / "d.npz", None), Transform((48, 48), 1), ex, spec, out=tmp_path / "r48.h5",
                  epsilon=10, delta=1e-3, release_log_path=tmp_path / "l.jsonl", progress=False)
    opts = TrainOptions(release=str(tmp_path / "r48.h5"), out=str(tmp_path / "run"), steps=1, **FAST)
    assert prepare(opts)[2]["name"] == "resnet"  # 6 x 2^3: see test_every_trainable_side_builds_its_generator
    assert prepare(dataclasses.replace(opts, generator="conv"))[2]["name"] == "conv"
    start(dataclasses.replace(opts, generator="conv"), progress=False)  # as auto resolved at 48 px before 6a122d9
    saved = json.loads((tmp_path / "run" / "options.json").read_text())
    (tmp_path / "run" / "options.json").write_text(json.dumps({**saved, "generator": "auto"}))
    assert resume(tmp_path / "run", steps=2, progress=False).arch["name"] == "conv"  # not re-resolved (review 45)
    ex, spec = build_feature_map("resnet18", "random", ["pixels"], image_size=(16, 12), channels=1)
    with pytest.raises(MepfError, match="draw square images, not 16x12: no generator could be trained"):
        embed_to_file(ArraySource(tmp_path / "d.npz", None), Transform((16, 12), 1), ex, spec, out=tmp_path / "r.h5",
                      epsilon=10, delta=1e-3, release_log_path=tmp_path / "l2.jsonl", progress=False)
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / "l2.jsonl").exists()


def test_every_trainable_side_builds_its_generator():
    """resnet drew powers of two only, so `auto` took conv at 224 px (two upsamplings from a 56 x 56 start) and at
    1020 px (a first layer of about 0.9 x 10^9 weights, review 43 F10). resnet now draws start x 2^k (start 4..15);
    conv draws up to 512 px; a side neither draws is refused at embed (trainable_geometry_problem)."""
    from mepf.artifacts.schema import CONV_MAX_SIDE, resnet_start, trainable_geometry_problem
    from mepf.synthesize.generators import build_generator, default_generator

    for side in range(8, 1025, 4):
        geometry = resnet_start(side)
        if geometry is not None:
            start, ups = geometry
            assert start * 2 ** ups == side and 4 <= start <= 15 and ups >= 1
            assert start < 8 or start % 2  # the smallest start: one more doubling would start below 4
        assert (trainable_geometry_problem(side, side) is None) == (side <= CONV_MAX_SIDE or geometry is not None)
        if trainable_geometry_problem(side, side) is None and side > 32:
            assert default_generator(side) == ("conv" if geometry is None else "resnet")
    assert [resnet_start(s) for s in (8, 64, 1024)] == [(4, 1), (4, 4), (4, 8)]  # committed generators' shapes
    assert "not 1020" in trainable_geometry_problem(1020, 1020)
    for side, name in ((12, "resnet"), (48, "resnet"), (96, "resnet"), (144, "resnet"), (224, "resnet"),
                       (260, "conv"), (28, "conv"), (48, "conv"), (20, "conv-cbn")):
        g = build_generator({"name": name, "image_size": side, "channels": 3, "num_classes": 2, "z_dim": 100,
                             "width": 8}).eval()
        assert g(torch.randn(2, 100), torch.tensor([0, 1])).shape == (2, 3, side, side), (side, name)
    with pytest.raises(MepfError, match="draw up to 512 px .got 516.; --generator resnet draws larger"):
        build_generator({"name": "conv", "image_size": 516, "channels": 1, "num_classes": 1, "z_dim": 100,
                         "width": 8})
    with pytest.raises(MepfError, match=r"resnet generator draws sizes s x 2\^k .* \(got 68\); --generator conv"):
        build_generator({"name": "resnet", "image_size": 68, "channels": 1, "num_classes": 1, "z_dim": 100,
                         "width": 8})


def test_class_conditional_norm_generator(release_file, tmp_path):
    """conv-cbn: each class's scale and shift are its own parameters (a class absent from a batch gets no
    gradient), and the run trains, snapshots and samples like conv."""
    from mepf.synthesize.generators import build_generator
    g = build_generator({"name": "conv-cbn", "image_size": 28, "channels": 1, "num_classes": 3, "z_dim": 100,
                         "width": 16})
    z, y = torch.randn(8, 100), torch.tensor([0, 1] * 4)
    g(z, y).sum().backward()
    scale = g.n1.scale.weight.grad
    assert scale[:2].abs().sum(1).min() > 0 and scale[2].abs().sum() == 0
    with torch.no_grad():  # a class's shift moves only that class's images
        g.eval()
        before = g(z, y)
        g.n2.shift.weight[1] += 1.0
        after = g(z, y)
    assert torch.equal(before[y == 0], after[y == 0]) and not torch.equal(before[y == 1], after[y == 1])
    unlabelled = build_generator({"name": "conv-cbn", "image_size": 28, "channels": 1, "num_classes": 1,
                                  "z_dim": 100, "width": 16})
    assert unlabelled(z).shape == (8, 1, 28, 28)
    t = start(TrainOptions(release=str(release_file), out=str(tmp_path / "run"), steps=2, generator="conv-cbn",
                           **FAST), progress=False)
    assert t.arch == {**t.arch, "name": "conv-cbn", "width": 32}
    images, labels = load_generator(tmp_path / "run").sample(20, seed=1)
    assert images.shape[0] == 20 and sorted(np.bincount(labels)) == [2] * 10


def test_cli_resume_extends_a_run(release_file, tmp_path):
    run = tmp_path / "run"
    r = CliRunner()
    first = r.invoke(main, ["synthesize", str(release_file), "--out", str(run), "--steps", "3", "--width", "16",
                            "--batch-size", "20", "--log-every", "1", "--device", "cpu", "--quiet"])
    assert first.exit_code == 0 and "inherits (1000, 1e-05)-DP" in first.output
    res = r.invoke(main, ["synthesize", "--resume", str(run), "--steps", "5", "--quiet"])
    assert res.exit_code == 0 and "step 5" in res.output
    assert [json.loads(l)["step"] for l in (run / "stats.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    again = r.invoke(main, ["synthesize", str(release_file), "--out", str(run), "--quiet"])
    assert again.exit_code == 2 and "--resume" in again.stderr


def test_feature_size_release_trains_a_native_size_generator(tmp_path):
    """embed --feature-size 56 on 28 px data: stage 1's per-record vectors equal stage 2's phi of the same
    28 px images (both upsample inside the one feature map), and the generator still draws 28 px images."""
    images = _test_digits(20)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(20) % 10)
    r = CliRunner().invoke(main, ["embed", "--data", str(tmp_path / "d.npz"), "--classes", "10", "--out",
                                  str(tmp_path / "r.h5"), "--epsilon", "10", "--delta", "1e-3", "--feature-size", "56",
                                  "--force",  # 20 records: the noisy count may fall near 0, which --delta checks
                                  "--release-log", str(tmp_path / "log.jsonl"), "--quiet"])
    assert r.exit_code == 0, r.output
    spec = load(tmp_path / "r.h5").feature_spec
    assert spec["input"]["height"] == 28 and spec["resize"]["height"] == 56
    assert "at 56x56" in CliRunner().invoke(main, ["info", str(tmp_path / "r.h5")]).output
    _assert_stages_agree(spec, images, tmp_path)
    start(TrainOptions(release=str(tmp_path / "r.h5"), out=str(tmp_path / "run"), steps=2, **FAST), progress=False)
    assert load_generator(tmp_path / "run").sample(4, seed=0)[0].shape == (4, 28, 28, 1)


def test_generator_from_a_nonprivate_baseline_is_called_so(tmp_path):
    np.savez(tmp_path / "d.npz", images=_test_digits(20), labels=np.arange(20) % 10)
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=1)
    embed_to_file(ArraySource(tmp_path / "d.npz", [str(i) for i in range(10)]), Transform((28, 28), 1), ex, spec,
                  out=tmp_path / "inf.h5", epsilon=float("inf"), delta=1e-5, release_log_path=tmp_path / "l.jsonl",
                  progress=False)
    r = CliRunner().invoke(main, ["synthesize", str(tmp_path / "inf.h5"), "--out", str(tmp_path / "run"), "--steps",
                                  "1", "--width", "16", "--batch-size", "10", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0 and "NON-PRIVATE" in r.output and "inherits" not in r.output


def test_shared_generator_or_snapshot_cannot_run_code(release_file, tmp_path):
    opts = TrainOptions(release=str(release_file), out=str(tmp_path / "run"), steps=4, **dict(FAST, snapshot_every=2))
    start(opts, progress=False)
    run = tmp_path / "run"
    marker = tmp_path / "pwned"
    good = torch.load(run / "generator.pt", weights_only=True)  # what mepf writes loads as tensors and metadata
    torch.save({**good, "note": Payload(marker)}, run / "generator.pt")
    r = CliRunner().invoke(main, ["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.npz")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "never pickled objects" in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "s.npz").exists()
    snap = sorted(run.glob("snapshot-*.pt"))[-1]
    state = torch.load(snap, weights_only=True)
    torch.save({**state, "note": Payload(marker)}, snap)
    r = CliRunner().invoke(main, ["synthesize", "--resume", str(run), "--steps", "6", "--quiet"])
    assert r.exit_code == 2 and "snapshot" in r.stderr and "never pickled objects" in r.stderr, r.stderr
    assert not marker.exists()
    # a weight as a stride-0 view of one number: the right shape in a few bytes, refused before it is used
    gen = {k: (torch.zeros((), dtype=v.dtype).expand(v.shape) if v.is_floating_point() else v)
           for k, v in state["generator"].items()}
    torch.save({**state, "generator": gen}, snap)
    r = CliRunner().invoke(main, ["synthesize", "--resume", str(run), "--steps", "6", "--quiet"])
    assert r.exit_code == 2 and "snapshot" in r.stderr and "declare more bytes" in r.stderr, r.stderr
    # a set: torch's loader rebuilds it, and resuming deep-copies (and casts) what Adam's state holds
    torch.save({**state, "opt_g": {**state["opt_g"], "state": {**state["opt_g"]["state"], 0: {
        **state["opt_g"]["state"][0], "extra": {torch.zeros((), dtype=torch.float64).expand(10 ** 9)}}}}}, snap)
    r = CliRunner().invoke(main, ["synthesize", "--resume", str(run), "--steps", "6", "--quiet"])
    assert r.exit_code == 2 and "snapshot" in r.stderr and "a function or class no file" in r.stderr, r.stderr


def _steps_on_a_target_off_layer(opts, dims, layer, k=3):
    """Generator weights after k steps of two trainers from one seed, the second's target changed everywhere
    but `layer`'s coordinates."""
    from mepf.synthesize.train import Trainer

    out = []
    for changed in (False, True):
        release, ex, arch, dev = prepare(opts)
        t = Trainer(opts, release, ex, arch, dev)
        if changed:
            start_ = sum(d for n, d in list(dims.items())[:list(dims).index(layer)])
            keep = torch.zeros(t.target.means["S1"].shape[1], dtype=torch.bool)
            keep[start_:start_ + dims[layer]] = True
            for m in t.target.means:
                t.target.means[m][:, ~keep] += 0.01
        for _ in range(k):
            t.train_step()
        out.append(t.G.state_dict())
    return out


@pytest.mark.parametrize("objective", ["mavg", "plain"])
def test_layer_weights_match_only_the_weighted_layers(release_file, tmp_path, objective):
    """--layer-weights stem..block15=0,block3=2 trains on block3 alone: a target that differs everywhere else gives
    bitwise the same generator; without the weights the same change moves it."""
    from mepf.synthesize.objective import layer_weight_vector

    ex, _ = prepare(TrainOptions(release=str(release_file), out=str(tmp_path / "x"), **FAST))[1:3]
    dims = ex.layer_dims(28, 28)
    only = TrainOptions(release=str(release_file), out=str(tmp_path / "a"), objective=objective,
                        layer_weights={"stem..block15": 0, "block3": 2.0}, **FAST)
    w = layer_weight_vector(only.layer_weights, dims)
    assert set(w.unique().tolist()) == {0.0, 2.0} and int((w == 2).sum()) == dims["block3"]
    a, b = _steps_on_a_target_off_layer(only, dims, "block3")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = TrainOptions(release=str(release_file), out=str(tmp_path / "b"), objective=objective, **FAST)
    a, b = _steps_on_a_target_off_layer(plain, dims, "block3")
    assert not all(torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_layer_weight_vector_reads_names_and_ranges():
    from mepf.synthesize.objective import layer_weight_vector

    dims = {"pixels": 2, "a": 3, "b": 1, "c": 2}
    assert layer_weight_vector({}, dims) is None and layer_weight_vector({"a..c": 1.0}, dims) is None
    w = layer_weight_vector({"a..c": 0.5, "b": 3.0, "pixels": 0.0}, dims)  # later entries win over a range
    assert w.tolist() == [0, 0, 0.5, 0.5, 0.5, 3, 0.5, 0.5]
    for bad, msg in [({"d": 1.0}, "names 'd'.*pixels, a, b, c"), ({"c..a": 1.0}, "comes before"),
                     ({"a..z": 1.0}, "names 'z'"), ({"a": float("nan")}, "finite"), ({"b": -1.0}, ">= 0"),
                     ({"pixels..c": 0.0}, "every layer weight 0")]:
        with pytest.raises(MepfError, match=msg):
            layer_weight_vector(bad, dims)


@pytest.mark.parametrize("weights,msg", [({"S2": -1.0}, ">= 0"), ({"S1": float("nan")}, "finite"),
                                         ({"S1": float("inf")}, "finite"), ({"S1": "2"}, "finite"),
                                         ({"S1": 0.0, "S2": 0.0}, "every moment weight 0")])
def test_moment_weights_given_in_python_are_checked(release_file, tmp_path, weights, msg):
    """TrainOptions built in Python meet the same rule as the CLI's --moment-weights (finite, >= 0, one above 0)."""
    with pytest.raises(MepfError, match=msg):
        prepare(TrainOptions(release=str(release_file), out=str(tmp_path / "r"), moment_weights=weights, **FAST))


def test_layer_weights_on_the_command_line(release_file, tmp_path):
    run = CliRunner().invoke
    r = run(main, ["synthesize", str(release_file), "--out", str(tmp_path / "r"), "--layer-weights", "stem=2,x=1",
                   "--dry-run"])
    assert r.exit_code != 0 and "'x'" in r.output and "block15" in r.output and "Traceback" not in r.output
    r = run(main, ["synthesize", str(release_file), "--out", str(tmp_path / "r"), "--layer-weights", "stem=inf"])
    assert r.exit_code == 2 and "finite number >= 0" in r.output
    r = run(main, ["synthesize", str(release_file), "--out", str(tmp_path / "r"), "--layer-weights",
                   "stem=2,block5..block15=0.5", "--steps", "4", "--width", "16", "--batch-size", "20", "--quiet"])
    assert r.exit_code == 0, r.output
    opts = json.loads((tmp_path / "r" / "options.json").read_text())
    assert opts["layer_weights"] == {"stem": 2.0, "block5..block15": 0.5}
    r = run(main, ["synthesize", "--resume", str(tmp_path / "r"), "--steps", "6", "--quiet"])
    assert r.exit_code == 0 and "resumed" in r.output, r.output


def test_run_folder_files_from_someone_else_are_read_bounded_and_without_waiting(tmp_path):
    """A run folder passed to `mepf info` / `evaluate` / resume: an options.json larger than any run's (sparse,
    8 TiB) or a FIFO is one line, never read whole or waited on; a damaged stats.jsonl line is one line."""
    import os

    from mepf.synthesize import run_folder

    run = tmp_path / "run"
    run.mkdir()
    with open(run / run_folder.OPTIONS, "wb") as f:
        f.truncate(8 << 40)
    r = CliRunner().invoke(main, ["info", str(run)])
    assert r.exit_code != 0 and "options.json cannot be read" in r.output and r.output.strip().count("\n") == 0
    (run / run_folder.OPTIONS).unlink()
    os.mkfifo(run / run_folder.OPTIONS)
    os.mkfifo(run / run_folder.STATS)

    with fails_if_blocked():
        r = CliRunner().invoke(main, ["info", str(run)])
        assert r.exit_code != 0 and r.output.strip().count("\n") == 0, r.output  # no run folder: one line
        with pytest.raises(MepfError, match="not a plain file"):
            list(run_folder.iter_stats(run))
    (run / run_folder.STATS).unlink()
    (run / run_folder.STATS).write_text('{"step": 50, "dist_S1": 0.1}\n{"step": \n')
    with pytest.raises(MepfError, match="line 2 is not a stats record"):
        list(run_folder.iter_stats(run))
    (run / run_folder.STATS).write_text('{"step": 50, "dist_S1": 0.1}\n\n{"step": 100}\n')
    assert [r["step"] for _, r in run_folder.iter_stats(run)] == [50, 100]
    # a last record whose write a full disk or a kill cut short (no newline): no record, not a damaged folder, so
    # the resume the failure's message names works (review 48)
    (run / run_folder.STATS).write_text('{"step": 50, "dist_S1": 0.1}\n{"step": 100, "dist_S1": 0.0')
    assert [r["step"] for _, r in run_folder.iter_stats(run)] == [50]


def test_an_extra_term_enters_the_generators_loss(release_file, tmp_path, monkeypatch):
    """Trainer.extra_term (benchmarks/gram_oracle.py's hook): its loss moves the generator the way it pulls (here:
    brighter images, against the dark digits of the release) and its statistics reach stats.jsonl; unset, nothing
    of it is recorded."""
    from mepf.synthesize.train import Trainer

    def brighter(trainer, x, y):
        return -100 * x.mean(), {"dist_extra": x.mean().detach()}

    def brightness(run):
        return [r["dist_extra"] for r in map(json.loads, (tmp_path / run / "stats.jsonl").read_text().splitlines())]

    opts = {"release": str(release_file), "steps": 30, "lr": 1e-2, **FAST}
    start(TrainOptions(out=str(tmp_path / "a"), **opts), progress=False)
    assert "dist_extra" not in (tmp_path / "a" / "stats.jsonl").read_text()
    monkeypatch.setattr(Trainer, "extra_term", brighter)
    start(TrainOptions(out=str(tmp_path / "b"), **opts), progress=False)
    seen = brightness("b")
    assert len(seen) == 6 and seen[-1] > 0.9 > seen[0], seen


@pytest.mark.parametrize("objective,weights", [("mavg", {}), ("plain", {}),
                                               ("mavg", {"layer_weights": {"block3": 0.3},
                                                         "moment_weights": {"S1": 0.7, "S2": 3.1}})])
def test_a_batch_with_every_class_trains_as_the_selected_rows_did(release_file, tmp_path, monkeypatch, objective,
                                                                   weights):
    """Every class in the batch (a balanced batch of at least K): the objective uses the class means without a
    mask (no row copies, no device wait per use), bitwise the same steps as selecting every row through the mask
    (as runs before it did; tests/test_compat.py resumes a recorded one). Weights that are not powers of two, so
    that a reordered product would show. A batch without some class keeps its mask, and its distance is the mean
    over the classes present only."""
    from mepf.synthesize import train as train_mod
    from mepf.synthesize.objective import fake_embeddings, squared_distance
    from mepf.synthesize.train import Trainer

    masks = []

    def spy(*args, **kwargs):
        fake = fake_embeddings(*args, **kwargs)
        masks.extend(p for _, p in fake.values())
        return fake

    def steps(opts, embed):
        monkeypatch.setattr(train_mod, "fake_embeddings", embed)
        t = Trainer(opts, *prepare(opts))
        for _ in range(3):
            t.train_step()
        return t.G.state_dict(), {m: v.detach().clone() for m, v in t.mavg.items()}

    def every_row_selected(*args, **kwargs):
        return {m: (mu, torch.ones(len(mu), dtype=torch.bool) if p is None else p)
                for m, (mu, p) in fake_embeddings(*args, **kwargs).items()}

    opts = TrainOptions(release=str(release_file), out=str(tmp_path / "a"), objective=objective, **weights, **FAST)
    (g, mavg), (g_mask, mavg_mask) = steps(opts, spy), steps(opts, every_row_selected)
    assert masks and all(p is None for p in masks)
    assert all(torch.equal(g[k], g_mask[k]) for k in g) and all(torch.equal(mavg[m], mavg_mask[m]) for m in mavg)

    rel, fmap, _, dev = prepare(opts)
    target = Target(rel, dev)
    y = torch.tensor([0, 2, 2, 5, 7, 7])
    x = torch.rand(len(y), 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fake = fake_embeddings(fmap, x, y, target)
    dist = squared_distance(target, fake)
    for m, (mu, p) in fake.items():
        assert p.tolist() == [c in (0, 2, 5, 7) for c in range(target.num_classes)]
        expect = sum(float(((target.means[m][c] - mu[c]) ** 2).sum()) for c in (0, 2, 5, 7)) / 4
        assert float(dist[m]) == pytest.approx(expect, rel=1e-5)


def test_options_given_in_python_may_be_numpy_numbers(release_file, tmp_path):
    """TrainOptions built in Python from numpy values (a sweep's np.float64 lr) are numbers; a bool or a string
    is not (options_problem: review 10)."""
    from mepf.synthesize.options import options_problem

    good = TrainOptions(release=str(release_file), out=str(tmp_path / "r"), lr=np.float64(3e-4), ema=np.float32(0.5),
                        steps=np.int64(2), **FAST)
    assert options_problem(good) is None
    start(good, progress=False)  # options.json written: plain JSON numbers
    saved = json.loads((tmp_path / "r" / "options.json").read_text())
    assert (saved["lr"], saved["ema"], saved["steps"]) == (3e-4, 0.5, 2)
    weighted = TrainOptions(release=str(release_file), out=str(tmp_path / "w"), steps=2,
                            moment_weights={"S1": np.float32(1.0), "S2": np.float64(0.5)}, **FAST)
    start(weighted, progress=False)  # numbers inside the weights too (review 11)
    t = resume(tmp_path / "w", changes={"lr": np.float32(2e-4)}, steps=np.int64(3), progress=False)
    assert t.step == 3 and json.loads((tmp_path / "w" / "options.json").read_text())["steps"] == 3
    with pytest.raises(MepfError, match="option lr"):
        resume(tmp_path / "w", changes={"lr": float("nan")}, steps=4, progress=False)
    for bad in ({"lr": True}, {"steps": 2.0}, {"steps": True}, {"lr": "1e-3"}, {"lr": float("nan")}):
        assert options_problem(TrainOptions(release="r", out="o", **{**FAST, **bad})) is not None, bad


def test_balanced_labels_cover_every_class_at_any_batch_size(release_file, tmp_path):
    """Each batch held classes 0 .. b-1 (shuffled): at --batch-size 4 on 10 classes, 6 were never trained, and at
    14 classes 0-3 were drawn twice as often, on every step and rank, without a word (review 44 H1). A batch that
    is a multiple of K is drawn as before (so runs resume as they ran); others start each step at a class drawn from
    the seed and the step, ranks taking the next b each, so the global batch is balanced and no class left out."""
    from mepf.core.distributed import Ranks

    opts = TrainOptions(release=str(release_file), out=str(tmp_path / "run"), **FAST)
    t = Trainer(opts, *prepare(opts))
    for b in (4, 14):
        counts = torch.zeros(10)
        for step in range(500):
            t.step = step
            counts += torch.bincount(t.sample_labels(b), minlength=10)
        assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean(), (b, counts)
    t.step = 7
    ranks = []
    for r in range(3):  # three ranks of 4: one global batch of 12 from one start, each class at least once
        t.ranks = Ranks(rank=r, world=3)
        ranks.append(t.sample_labels(4))
    assert sorted(torch.bincount(torch.cat(ranks), minlength=10).tolist()) == [1] * 8 + [2] * 2
    t.ranks = Ranks()
    t.precision = dataclasses.replace(t.precision, labels_rotated=False)  # a run recorded before: as it drew them
    assert set(t.sample_labels(4).tolist()) == {0, 1, 2, 3}
    t.rng.manual_seed(opts.seed + 1)
    g = torch.Generator().manual_seed(opts.seed + 1)
    assert torch.equal(t.sample_labels(20), (torch.arange(20) % 10)[torch.randperm(20, generator=g)])


def test_sampling_more_images_than_memory_holds_is_one_line(release_file, tmp_path):
    """-n sets the size of the labels and latents, drawn before the out-of-memory guard: a traceback (review 44 L3)."""
    t = start(TrainOptions(release=str(release_file), out=str(tmp_path / "run"), steps=1, **FAST), progress=False)
    with pytest.raises(MepfError, match="do not fit in this machine's memory"):
        load_generator(tmp_path / "run").sample(10 ** 12)
    assert t.step == 1


def test_sampling_batches_are_bounded_by_the_generators_activations_not_only_its_images():
    """At 128 px a batch of 100 resnet samples took 7.6 GB: batches were bounded by the images' bytes alone (review
    50 M2). They are now bounded by about 1 GiB of activations too (width channels at the image size), and the
    images do not depend on the batches they were drawn in."""
    from mepf.synthesize.checkpoint import TrainedGenerator
    from mepf.synthesize.generators import Z_DIM, build_generator

    arch = {"name": "conv", "image_size": 64, "channels": 3, "num_classes": 2, "z_dim": Z_DIM, "width": 512}
    g = TrainedGenerator(build_generator(arch), arch, {"label_prior": [0.5, 0.5]})
    seen = []
    images, labels = g.sample(20, on_batch=seen.append)
    assert seen == [16, 4]  # (1 << 30) // (32 * 64 * 64 * 512)
    small, same = g.sample(20, batch_size=3)
    np.testing.assert_array_equal(small, images)
    np.testing.assert_array_equal(same, labels)
