"""`mepf embed --bad-records zero`: no one record decides whether a release happens. Written from the side of
someone who controls one record (an image file's bytes, an array record's values or label): under `zero` the
outcome, shapes and spec are those of the data without it, the sums are exactly those of the data with the black
image in its place (or without it, for a label outside the declared set), and the repeat check still sees the
data for what was embedded. Under the default `stop` the same record stops the run, naming it."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mepf.artifacts import load
from mepf.artifacts.errors import MepfError
from mepf.cli import main
from mepf.core.features import build_feature_map
from mepf.embed.files import ArraySource
from mepf.embed.release import accumulate
from mepf.embed.transform import Transform
from tests.conftest import make_images

TINY = ["--backbone", "resnet18", "--weights", "random", "--layers", "pixels"]  # a map that costs microseconds


def embed(data, out, log, *extra):
    return CliRunner().invoke(main, [str(a) for a in ("embed", "--data", data, "--out", out, "--epsilon", "1",
                                                      "--delta", "1e-6", "--release-log", log, "--quiet", *TINY,
                                                      "--force", *extra)])


def outcome(data, out, log, *extra):
    r = embed(data, out, log, *extra)
    if r.exit_code != 0:
        return ("error", r.stderr.strip().splitlines()[-1])
    rel = load(out)
    return ("file", rel.feature_spec, rel.data_spec, rel.ledger, {k: v.shape for k, v in rel.arrays.items()},
            rel.class_names)


def folder(root, n=3):
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
        for i, im in enumerate(make_images(n, seed=10 * k)):
            Image.fromarray(im[:, :, 0]).save(root / f"c{k}" / f"img{i}.png")
    return root


def png_bytes(seed=0):
    import io

    buf = io.BytesIO()
    Image.fromarray(make_images(1, seed=seed)[0, :, :, 0]).save(buf, "PNG")
    return buf.getvalue()


def hostile(kind: str, seed: int) -> bytes:
    """The bytes of one file a contributor sent, named .png or .jpg."""
    rng = np.random.default_rng(seed)
    good = png_bytes(seed)
    return {"random": rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes(),
            "empty": b"",
            "truncated": good[:int(rng.integers(1, len(good) - 1))],
            "png-header": good[:8] + rng.integers(0, 256, 200, dtype=np.uint8).tobytes(),
            "jpeg-header": b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
            "text": b"not an image at all\n",
            "good": good}[kind]


KINDS = ["random", "empty", "truncated", "png-header", "jpeg-header", "text", "good"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), where=st.sampled_from(["0", "m", "~"]), cls=st.integers(0, 1),
       suffix=st.sampled_from([".png", ".jpg"]), seed=st.integers(0, 999))
def test_under_zero_one_file_of_any_bytes_decides_no_outcome(tmp_path_factory, kind, where, cls, suffix, seed):
    tmp = tmp_path_factory.mktemp("zero")
    d = folder(tmp / "D")
    d2 = tmp / "D2"
    shutil.copytree(d, d2)
    (d2 / f"c{cls}" / f"{where}added{suffix}").write_bytes(hostile(kind, seed))  # first, in the middle or last
    declared = ["--image-size", "16", "--channels", "1", "--bad-records", "zero"]
    a = outcome(d, tmp / "a.h5", tmp / "la.jsonl", *declared)
    b = outcome(d2, tmp / "b.h5", tmp / "lb.jsonl", *declared)
    assert a[0] == "file" and a == b


@pytest.mark.parametrize("workers", ["0", "2"])
def test_an_undecodable_image_stops_the_run_by_default_and_is_black_under_zero(tmp_path, workers):
    """The mode reaches the decoding workers too (a copy of the source in another process)."""
    d = folder(tmp_path / "D")
    (d / "c0" / "broken.png").write_bytes(png_bytes()[:60])
    declared = ["--image-size", "16", "--channels", "1", "--workers", workers, "--batch-size", "2"]
    r = embed(d, tmp_path / "s.h5", tmp_path / "ls.jsonl", *declared)
    assert r.exit_code == 2 and "cannot read image" in r.stderr and "--bad-records zero" in r.stderr, r.stderr
    assert not (tmp_path / "s.h5").exists()
    r = embed(d, tmp_path / "z.h5", tmp_path / "lz.jsonl", *declared, "--bad-records", "zero")
    assert r.exit_code == 0, r.stderr
    r = embed(d, tmp_path / "again.h5", tmp_path / "lz.jsonl", *declared, "--bad-records", "zero")
    assert r.exit_code == 2 and "this dataset was already released" in r.stderr, r.stderr
    # embedded as black, it is still its own record to the log: not the black image, not another broken file
    for name, content in (("black.png", None), ("other.png", png_bytes()[:61])):
        (d / "c0" / "broken.png").unlink(missing_ok=True)
        (d / "c0" / "black.png").unlink(missing_ok=True)
        if content is None:
            Image.fromarray(np.zeros((1, 1), np.uint8)).save(d / "c0" / name)
        else:
            (d / "c0" / name).write_bytes(content)
        r = embed(d, tmp_path / f"{name}.h5", tmp_path / "lz.jsonl", *declared, "--bad-records", "zero")
        assert "this dataset was already released" not in r.stderr, r.stderr
        (d / "c0" / name).unlink()


@pytest.fixture(scope="module")
def pixels_map():
    extractor, spec = build_feature_map("resnet18", "random", ["pixels"], None, (8, 8), 1, 0)
    return extractor, spec


def exact(path, classes, pixels_map, mode):
    src = ArraySource(path, [str(i) for i in range(classes)])
    src.bad_records = mode
    extractor, spec = pixels_map
    return accumulate(src, Transform((8, 8), 1), extractor, "mean+second", spec["C1"], spec["C2"], 4,
                      progress=False, dim=spec["dim"], tag_key=b"k" * 32)


def same_sums(a, b):
    assert np.array_equal(a.counts, b.counts)
    assert all(np.array_equal(a.qsums[n].numpy(), b.qsums[n].numpy()) for n in a.qsums)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1.5, -0.01, 1e30])
@pytest.mark.parametrize("where", [0, 5, 10])
def test_a_float_record_with_a_bad_value_is_exactly_the_black_image_under_zero(tmp_path, pixels_map, value, where):
    rng = np.random.default_rng(1)
    x = rng.random((10, 8, 8)).astype(np.float32)
    y = np.arange(10) % 3
    bad = rng.random((8, 8)).astype(np.float32)
    bad[int(rng.integers(8)), int(rng.integers(8))] = value  # one value of one record
    for name, rec in (("bad", bad), ("black", np.zeros((8, 8), np.float32))):
        np.savez(tmp_path / f"{name}.npz", images=np.insert(x, where, rec, axis=0), labels=np.insert(y, where, 1))
    same_sums(exact(tmp_path / "bad.npz", 3, pixels_map, "zero"), exact(tmp_path / "black.npz", 3, pixels_map, "zero"))
    with pytest.raises(MepfError, match="NaN, inf or values outside"):
        exact(tmp_path / "bad.npz", 3, pixels_map, "stop")


@pytest.mark.parametrize("label", [3, -1, -2, 2 ** 40, np.iinfo(np.int64).min])
@pytest.mark.parametrize("where", [0, 5, 10])
def test_a_label_outside_the_set_adds_nothing_under_zero(tmp_path, pixels_map, label, where):
    """Not a row, not a count, not a record of the fingerprint: the sums, counts and digest are D's exactly."""
    x = np.random.default_rng(5).integers(0, 256, (10, 8, 8), dtype=np.uint8)
    y = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    np.savez(tmp_path / "d1.npz", images=np.insert(x, where, 255, axis=0),
             labels=np.insert(y.astype(np.int64), where, label))
    a, b = exact(tmp_path / "d.npz", 3, pixels_map, "zero"), exact(tmp_path / "d1.npz", 3, pixels_map, "zero")
    same_sums(a, b)
    assert a.fingerprint.hexdigest() == b.fingerprint.hexdigest()
    with pytest.raises(MepfError, match="outside 0..2"):
        exact(tmp_path / "d1.npz", 3, pixels_map, "stop")


def test_a_dropped_record_cannot_make_a_repeat_look_like_new_data(tmp_path):
    x, y = np.random.default_rng(6).integers(0, 256, (12, 8, 8), dtype=np.uint8), np.arange(12) % 2
    np.savez(tmp_path / "d.npz", images=x, labels=y)
    np.savez(tmp_path / "d1.npz", images=np.insert(x, 3, 7, axis=0), labels=np.insert(y, 3, 9))
    log = tmp_path / "log.jsonl"
    zero = ["--classes", "2", "--bad-records", "zero"]
    assert embed(tmp_path / "d.npz", tmp_path / "a.h5", log, *zero).exit_code == 0
    r = embed(tmp_path / "d1.npz", tmp_path / "b.h5", log, *zero)
    assert r.exit_code == 2 and "this dataset was already released" in r.stderr, r.stderr


def test_every_record_dropped_is_still_a_release_of_noise(tmp_path):
    """Whether a release happens must not hang on the records that are kept: a dataset all of whose labels are
    outside the set releases (pure noise), as the same dataset plus one good record does."""
    x = np.random.default_rng(7).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.full(4, 5))
    np.savez(tmp_path / "d1.npz", images=np.concatenate([x, x[:1]]), labels=np.r_[np.full(4, 5), 0])
    a = outcome(tmp_path / "d.npz", tmp_path / "a.h5", tmp_path / "la.jsonl", "--classes", "2", "--bad-records", "zero")
    b = outcome(tmp_path / "d1.npz", tmp_path / "b.h5", tmp_path / "lb.jsonl", "--classes", "2",
                "--bad-records", "zero")
    assert a[0] == "file" and a == b


def test_check_lists_the_bad_files_and_offers_zero(tmp_path):
    d = folder(tmp_path / "D")
    (d / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    r = CliRunner().invoke(main, ["embed", "--data", str(d), "--check", "--quiet"])
    assert r.exit_code == 2 and "broken.jpg" in r.output and "--bad-records zero" in r.stderr, r.output + r.stderr


class Labelled:
    """A source of any kind as the pass sees it (a named dataset's reader, say): it yields labels as its files
    hold them, checked by the pass alone."""

    classes, description, bad_records = ["0", "1", "2"], "planted", "stop"

    def __init__(self, x, labels):
        self.x, self.y = x, labels

    def __len__(self):
        return len(self.y)

    def blocks(self, block_size, keep=None):
        for b, s in enumerate(range(0, len(self.y), block_size)):
            if keep is None or keep(b):
                yield b, self.x[s:s + block_size], np.asarray(self.y[s:s + block_size], dtype=np.int64)


@pytest.mark.parametrize("bad", [-1, -2, -3, 3, 10 ** 12])
def test_every_source_s_label_outside_the_set_is_one_rule(pixels_map, bad):
    """A label outside the set from any reader: refused under stop, dropped under zero, whatever its value (the
    first version dropped -2, its internal mark, from a named dataset even under stop, and refused -3 under zero)."""
    extractor, spec = pixels_map

    def run(x, labels, mode):
        src = Labelled(x, labels)
        src.bad_records = mode
        return accumulate(src, Transform((8, 8), 1), extractor, "mean+second", spec["C1"], spec["C2"], 4,
                          progress=False, dim=spec["dim"], tag_key=b"k" * 32)

    rng = np.random.default_rng(8)
    x, y = rng.integers(0, 256, (7, 8, 8, 1), dtype=np.uint8), [0, 1, 2, 0, 1, 2, 0]
    x1, y1 = np.insert(x, 3, rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), axis=0), y[:3] + [bad] + y[3:]
    with pytest.raises(MepfError, match="outside the 3 declared classes"):
        run(x1, y1, "stop")
    a, b = run(x, y, "zero"), run(x1, y1, "zero")
    same_sums(a, b)
    assert b.read == a.read + 1 and a.fingerprint.hexdigest() == b.fingerprint.hexdigest()


def test_a_release_of_no_records_repeats_no_one(tmp_path):
    """Two unrelated datasets whose every label is outside the set both embed nothing: the second is no repeat of
    the first (the first version refused it as 'already released', and accepted it plus one good record)."""
    rng = np.random.default_rng(9)
    for name in ("x", "y"):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), labels=np.full(4, 7))
    log = tmp_path / "log.jsonl"
    zero = ["--classes", "2", "--bad-records", "zero"]
    assert embed(tmp_path / "x.npz", tmp_path / "x.h5", log, *zero).exit_code == 0
    r = embed(tmp_path / "y.npz", tmp_path / "y.h5", log, *zero)
    assert r.exit_code == 0, r.stderr


def test_bad_records_are_told_apart_by_the_repeat_check(tmp_path):
    """Review 20: every zeroed record was the black image to the fingerprint, so two unrelated datasets that each
    held one bad record shared it, and one contributor's bad row decided a refusal."""
    rng = np.random.default_rng(10)
    p = rng.random((2, 8, 8)).astype(np.float32)
    p[1, 0, 0] = np.nan
    b = rng.random((5, 8, 8)).astype(np.float32)
    b[4, 3, 3] = np.inf
    np.savez(tmp_path / "p.npz", images=p, labels=np.array([0, 1]))
    np.savez(tmp_path / "b.npz", images=b, labels=np.arange(5) % 2)
    log, zero = tmp_path / "log.jsonl", ["--classes", "2", "--bad-records", "zero"]
    assert embed(tmp_path / "p.npz", tmp_path / "p.h5", log, *zero).exit_code == 0
    r = embed(tmp_path / "b.npz", tmp_path / "b.h5", log, *zero)
    assert r.exit_code == 0 and "earlier release" not in r.stderr, r.stderr


@pytest.mark.parametrize("scale", ["0-255", "-1..1"])
@pytest.mark.parametrize("dtype", ["grid", np.float32, np.float64])
def test_data_on_a_wrong_scale_then_corrected_is_a_repeat(tmp_path, scale, dtype):
    """Reviews 20-22: float images on the 0-255 (or -1..1) scale under zero release black images with their real
    labels (S1 then tells the class counts); the corrected data, released next, was new data to the log, so the
    two budgets were not composed. A replaced record is the record its values encode on these scales, whether
    they are 8-bit images (the grid) or any floats, corrected in their own dtype."""
    y = np.arange(6) % 2
    if dtype == "grid":
        x = make_images(6, seed=11).astype(np.float32)
        raw = x if scale == "0-255" else (x / 255 - 0.5) / 0.5  # torchvision's Normalize(0.5, 0.5)
        raw, fixed = raw.astype(np.float64), x / 255
    else:
        u = np.random.default_rng(11).random((6, 8, 8)).astype(dtype)  # off the 1/255 grid
        raw = (u * 255 if scale == "0-255" else u * 2 - 1).astype(dtype)
        fixed = (raw / dtype(255) if scale == "0-255" else (raw + dtype(1)) / dtype(2)).astype(dtype)
    np.savez(tmp_path / "raw.npz", images=raw, labels=y)
    np.savez(tmp_path / "fixed.npz", images=fixed, labels=y)
    log, zero = tmp_path / "log.jsonl", ["--classes", "2", "--bad-records", "zero"]
    assert embed(tmp_path / "raw.npz", tmp_path / "raw.h5", log, *zero).exit_code == 0
    r = embed(tmp_path / "fixed.npz", tmp_path / "fixed.h5", log, *zero)
    assert r.exit_code == 2 and "this dataset was already released" in r.stderr, r.stderr


def test_a_replaced_record_is_the_same_whatever_its_container():
    """Review 21: the identity of a bad row hashed its dtype and raw bytes, so a float64 copy or an RGB copy with
    equal channels of the same data was new data to the log (record_hash folds both). (Data whose values float32
    cannot hold, corrected in float32, can still differ: the map is applied in float64, review 22.)"""
    from mepf.embed.fingerprint import record_hash, replaced_identity

    rng = np.random.default_rng(12)
    for row in (rng.random((8, 8, 1)) * 3 - 1, np.where(rng.random((8, 8, 1)) < 0.1, np.nan, rng.random((8, 8, 1))),
                np.full((8, 8, 1), -0.0) - rng.random((8, 8, 1))):
        row = row.astype(np.float32)
        base = replaced_identity(values=row)
        assert base == replaced_identity(values=row.astype(np.float64)) == replaced_identity(values=row[:, :, 0])
        assert base == replaced_identity(values=np.repeat(row.astype(np.float32), 3, axis=2))
        assert base != record_hash(np.zeros((8, 8, 1), np.uint8))
    neg = -np.zeros((8, 8, 1), np.float32)
    neg[0, 0, 0] = np.nan
    pos = np.zeros((8, 8, 1), np.float32)
    pos[0, 0, 0] = -np.float32(np.nan)
    assert replaced_identity(values=neg) == replaced_identity(values=pos)


def test_releases_of_no_records_are_not_composed_with_each_other(tmp_path):
    """Review 21: the audit added two unrelated releases whose every record was dropped (one empty digest)."""
    rng = np.random.default_rng(13)
    log, zero = tmp_path / "log.jsonl", ["--classes", "2", "--bad-records", "zero"]
    for name in ("x", "y"):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), labels=np.full(4, 7))
        assert embed(tmp_path / f"{name}.npz", tmp_path / f"{name}.h5", log, *zero).exit_code == 0
    r = CliRunner().invoke(main, ["audit", str(tmp_path / "y.h5"), "--release-log", str(log)])
    assert r.exit_code in (0, 1) and "2 release(s)" not in r.output, r.output


def test_a_png_above_the_decoding_cap_is_one_black_pixel_in_evaluate_too(tmp_path):
    """Review 22: once such a PNG was Replaced, evaluate's reader (a public reference folder) failed on it with a
    TypeError traceback; it reads it as stage 1 embeds it."""
    from mepf.embed.sources import open_source
    from mepf.evaluate.data import read_source
    from tests.test_hostile_inputs import png_1bit

    d = folder(tmp_path / "ref")
    png_1bit(d / "c0" / "huge.png", 20000, 10000)
    got = read_source(open_source(str(d), private=False), geometry=(8, 8, 1))
    assert got.images.shape == (7, 8, 8, 1) and sum(not im.any() for im in got.images) == 1
