"""The released file: nothing forbidden in it, noise of the declared scale, round trip, tampering,
single pass over the data, the owner's release log and the delta < 1/n rule."""
from __future__ import annotations

import errno
import json
import os
import re

import h5py
import numpy as np
import pytest
import torch

from mepf.artifacts import load
from mepf.artifacts.audit import audit
from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import content_checksum, file_sha256
from mepf.embed import release_log
from mepf.embed.files import ArraySource, FolderSource
from mepf.embed.release import accumulate, embed_to_file
from mepf.embed.transform import Transform

LEDGER_KEYS = {"private", "relation", "relation_text", "releases", "composition", "mu", "accountant", "target",
               "achieved",
               "noise", "post_processing"}
RELEASE_KEYS = {"name", "mechanism", "shape", "sensitivity", "sensitivity_formula", "sigma", "weight"}
FEATURE_KEYS = {"backbone", "weights", "weight_source", "weight_seed", "weights_sha256", "layers", "pixel_weight",
                "pooling", "input", "resize", "preprocessing", "mode", "C1", "C2", "norm_target", "dim", "versions"}
DATA_KEYS = {"dataset", "labelled", "num_classes", "transform", "moments"}


def run(source, extractor_spec, out, log, **kw):
    """Embed with test defaults. force=True: with a dozen records the noisy n can fall near 0 and the
    (correct) delta < 1/n refusal would make tests flaky; test_delta_must_be_below_one_over_n covers it."""
    ex, spec = extractor_spec
    kw = {"epsilon": 10.0, "delta": 1e-3, "force": True, **kw}
    return embed_to_file(source, Transform((28, 28), 1), ex, spec, out=out, release_log_path=log, progress=False,
                         batch_size=8, **kw)


def walk(path):
    """Every (name, value) in the file: root and dataset attributes and every dataset."""
    items = []
    with h5py.File(path, "r") as f:
        items += [(f"@{k}", v) for k, v in f.attrs.items()]

        def visit(name, obj):
            items.extend((f"{name}@{k}", v) for k, v in obj.attrs.items())
            if isinstance(obj, h5py.Dataset):
                items.append((name, obj.asstr()[()] if obj.dtype.kind == "O" else obj[()]))

        f.visititems(visit)
    return items


def json_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from json_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from json_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_forbidden_content_absent(tmp_path, image_folder, labelled_npz, eff28):
    log = tmp_path / "log.jsonl"
    for name, source in (("folder", FolderSource(image_folder)), ("npz", ArraySource(labelled_npz[0], ["a", "b",
                                                                                                       "c"]))):
        out = tmp_path / f"{name}.h5"
        run(source, eff28, out, log)
        exact = accumulate(source, Transform((28, 28), 1), eff28[0], "mean+second", 1.0, 1.0, 8, progress=False)
        entry = release_log.read_log(log)[-1]
        forbidden_text = [str(tmp_path), "secret_clinic", "patient_", ".png", labelled_npz[0].name,
                          entry["fingerprint"]]
        for where, value in walk(out):
            if isinstance(value, str):
                texts = [value]
            else:
                texts = [str(v) for v in np.ravel(value)] if np.ndim(value) else [str(value)]
            for t in texts:
                for bad in forbidden_text:
                    assert bad not in t, f"{bad!r} found in {where}"
        r = load(out)
        # only documented fields and keys (a new field must be reviewed and documented first)
        assert set(r.ledger) == LEDGER_KEYS and all(set(x) == RELEASE_KEYS for x in r.ledger["releases"])
        assert set(r.feature_spec) == FEATURE_KEYS and set(r.data_spec) == DATA_KEYS  # read_raw refuses any other field
        # no exact n, no exact counts, no un-noised statistic
        n = exact.n
        assert n not in list(json_numbers(r.ledger)) + list(json_numbers(r.data_spec))
        counts = r.arrays["counts"]
        assert not np.allclose(counts, exact.counts) and not np.allclose(counts, np.round(counts))
        for m in ("S1", "S2"):
            d = np.linalg.norm(r.arrays[m].astype(np.float64) - exact.sums[m], axis=1)
            sigma = {x["name"]: x["sigma"] for x in r.ledger["releases"]}[m]
            assert (d > 0.9 * sigma * np.sqrt(r.arrays[m].shape[1])).all()
        assert r.ledger["noise"]["seed_stored"] is False


def test_noise_has_declared_scale_and_differs_between_runs(tmp_path, labelled_npz, eff28):
    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    log = tmp_path / "log.jsonl"
    a = load(run(src, eff28, tmp_path / "a.h5", log, epsilon=1.0).path)
    b = load(run(src, eff28, tmp_path / "b.h5", log, epsilon=1.0, allow_repeat=True).path)
    exact = accumulate(src, Transform((28, 28), 1), eff28[0], "mean+second", 1.0, 1.0, 8, progress=False)
    sig = {x["name"]: x["sigma"] for x in a.ledger["releases"]}
    for m in ("S1", "S2"):
        z = (a.arrays[m].astype(np.float64) - exact.sums[m]) / sig[m]
        assert abs(z.mean()) < 5 / np.sqrt(z.size)
        assert 0.97 < z.std() < 1.03
        diff = (a.arrays[m].astype(np.float64) - b.arrays[m]) / (sig[m] * np.sqrt(2))
        assert 0.97 < diff.std() < 1.03
    zc = (a.arrays["counts"] - exact.counts) / sig["counts"]
    assert np.all(np.abs(zc) < 6)


def test_round_trip_and_tampering(tmp_path, labelled_npz, eff28):
    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    out = run(src, eff28, tmp_path / "r.h5", tmp_path / "log.jsonl", relation="replace-one").path
    r = load(out)
    assert audit(out).ok
    sens = {x["name"]: x["sensitivity"] for x in r.ledger["releases"]}
    assert sens == pytest.approx({"S1": 2.0, "S2": 2.0, "counts": np.sqrt(2)})
    assert r.class_names == ["a", "b", "c"] and r.arrays["S1"].dtype == np.float32
    assert r.class_means()["S1"].shape == (3, r.feature_spec["dim"])

    # a flipped byte inside S1's stored data
    flipped = tmp_path / "flipped.h5"
    flipped.write_bytes(out.read_bytes())
    with h5py.File(flipped, "r") as f:
        offset = f["S1"].id.get_offset()
    data = bytearray(flipped.read_bytes())
    data[offset + 1001] ^= 0x40
    flipped.write_bytes(bytes(data))
    rep = audit(flipped)
    assert not rep.ok and not dict((n, o) for n, o, _ in rep.checks)["checksum"]
    with pytest.raises(MepfError, match="checksum"):
        load(flipped)

    # an edited epsilon in the ledger, with the checksum naively recomputed to match
    edited = tmp_path / "edited.h5"
    edited.write_bytes(out.read_bytes())
    with h5py.File(edited, "r+") as f:
        led = json.loads(f["ledger"].asstr()[()])
        led["achieved"]["epsilon"] = led["target"]["epsilon"] = 0.5
        text = json.dumps(led, sort_keys=True, separators=(",", ":"))
        del f["ledger"]
        f.create_dataset("ledger", data=text, dtype=h5py.string_dtype("utf-8"))
        arrays = {n: f[n][()] for n in ("S1", "S2", "counts")}
        f.attrs["checksum_sha256"] = content_checksum(arrays, list(f["class_names"].asstr()[()]),
                                                      f["feature_spec"].asstr()[()], f["data_spec"].asstr()[()], text)
    rep = audit(edited)
    failed = {n for n, o, _ in rep.checks if not o}
    assert "checksum" not in failed and {"eps:autodp", "eps:closed-form"} <= failed

    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(MepfError, match="truncated or corrupt"):
        load(truncated)


class CountingFolder(FolderSource):
    """The real folder source, writing one line per image decode to a file (so that decodes in DataLoader
    worker processes count too)."""

    def __init__(self, root, counter):
        super().__init__(root)
        self.counter = str(counter)

    def _read_image(self, path, *identity):
        with open(self.counter, "a") as f:
            f.write(f"{path}\n")
        return super()._read_image(path, *identity)


def decodes(counter):
    from collections import Counter

    return Counter(counter.read_text().splitlines()) if counter.exists() else Counter()


@pytest.mark.parametrize("workers", [0, 2])
def test_each_record_read_exactly_once(tmp_path, image_folder, eff28, workers):
    src = CountingFolder(image_folder, tmp_path / "decodes.txt")
    ex, spec = eff28
    embed_to_file(src, Transform((28, 28), 1), ex, spec, out=tmp_path / "x.h5", epsilon=10.0, delta=1e-3, force=True,
                  release_log_path=tmp_path / "log.jsonl", progress=False, batch_size=5, workers=workers)
    n = decodes(tmp_path / "decodes.txt")
    assert len(n) == 12 and set(n.values()) == {1}


@pytest.mark.parametrize("world,workers", [(2, 0), (3, 2)])
def test_blocks_are_shared_by_ranks_and_workers_without_overlap(tmp_path, image_folder, world, workers):
    from mepf.embed.loader import loader, shard_size

    counter = tmp_path / "decodes.txt"
    src = CountingFolder(image_folder, counter)
    seen = []
    for rank in range(world):  # what each rank's loader yields, with its own workers
        mine = sum(len(x) for x, y, h in loader(src, Transform((28, 28), 1), 2, workers, rank, world))
        assert mine == shard_size(len(src), 2, rank, world)
        seen.append(mine)
    assert sum(seen) == 12 and set(decodes(counter).values()) == {1} and len(decodes(counter)) == 12


def test_exact_sums_do_not_depend_on_workers(tmp_path, labelled_npz, eff28):
    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    a = accumulate(src, Transform((28, 28), 1), eff28[0], "mean+second", 1.0, 1.0, 8, progress=False, workers=0)
    b = accumulate(src, Transform((28, 28), 1), eff28[0], "mean+second", 1.0, 1.0, 8, progress=False, workers=2)
    for m in ("S1", "S2"):
        assert torch.equal(a.qsums[m], b.qsums[m])
    assert a.fingerprint.hexdigest() == b.fingerprint.hexdigest() and (a.counts == b.counts).all()


def test_repeat_release_refused_then_composed(tmp_path, labelled_npz, eff28):
    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    log = tmp_path / "log.jsonl"
    run(src, eff28, tmp_path / "one.h5", log)
    with pytest.raises(MepfError, match="already released"):
        run(src, eff28, tmp_path / "two.h5", log)
    assert not (tmp_path / "two.h5").exists()
    run(src, eff28, tmp_path / "two.h5", log, allow_repeat=True)
    entries = release_log.read_log(log)
    assert len(entries) == 2 and entries[0]["fingerprint"] == entries[1]["fingerprint"] and entries[1]["repeat"]
    from mepf.artifacts.audit import composed_total

    total = composed_total(entries, 1e-3)
    assert total["releases"] == 2 and 10.0 < total["epsilon"] < 20.0
    assert total["relation"] == "add-remove" and not total["relations_mixed"]
    run(src, eff28, tmp_path / "three.h5", log, allow_repeat=True, relation="replace-one")
    entries = release_log.read_log(log)
    assert entries[2]["relation"] == "replace-one"
    # each mu is for its own relation: the total holds under add-remove, where replace-one is no weaker
    assert composed_total(entries[2:], 1e-3)["relation"] == "replace-one"
    mixed = composed_total(entries, 1e-3)
    assert mixed["relation"] == "add-remove" and mixed["relations_mixed"]
    assert composed_total([{**entries[0], "relation": "other"}], 1e-3)["relation"] is None
    assert composed_total([entries[0], {**entries[1], "relation": ["add-remove"]}], 1e-3)["relation"] is None
    from click.testing import CliRunner

    from mepf.cli import main

    a = CliRunner().invoke(main, ["audit", str(tmp_path / "three.h5"), "--release-log", str(log)])
    assert "3 release(s) that share records with it composed" in a.output and "-DP under add-remove" in a.output
    assert "not under replace-one" in a.output


class DuringThePass(ArraySource):
    """A source that runs `then` once, while its records are read: another process acting on the same log."""

    def __init__(self, path, classes, then):
        super().__init__(path, classes)
        self.then = then

    def blocks(self, block_size, keep=None):
        if self.then:
            self.then, then = None, self.then
            then()
        yield from super().blocks(block_size, keep)


def test_a_release_of_the_same_data_during_the_pass_is_a_repeat(tmp_path, labelled_npz, eff28):
    """Two embeds of the same data on one log, the second finishing first: the check is made again, under
    the log's lock, when the release is written, so they cannot both pass it as first releases."""
    log = tmp_path / "log.jsonl"
    other = lambda: run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "other.h5", log)  # noqa: E731
    with pytest.raises(MepfError, match="already released"):
        run(DuringThePass(labelled_npz[0], ["a", "b", "c"], other), eff28, tmp_path / "mine.h5", log)
    assert not (tmp_path / "mine.h5").exists() and len(release_log.read_log(log)) == 1

    log2 = tmp_path / "log2.jsonl"
    other = lambda: run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "o2.h5", log2)  # noqa: E731
    run(DuringThePass(labelled_npz[0], ["a", "b", "c"], other), eff28, tmp_path / "m2.h5", log2, allow_repeat=True)
    entries = release_log.read_log(log2)
    assert len(entries) == 2 and not entries[0]["repeat"] and entries[1]["repeat"]
    assert entries[0]["key_id"] == entries[1]["key_id"]  # one key for the log, whichever run made it

    log3 = tmp_path / "log3.jsonl"
    gone = lambda: log3.unlink()  # noqa: E731
    with pytest.raises(MepfError, match="cannot be opened.*nothing was released"):
        run(DuringThePass(labelled_npz[0], ["a", "b", "c"], gone), eff28, tmp_path / "m3.h5", log3)
    assert not (tmp_path / "m3.h5").exists()


def test_the_release_is_checked_and_logged_under_the_lock(tmp_path, labelled_npz, eff28, monkeypatch, capfd):
    """While the file is written the log is locked against other embeds; one that finds it locked says it
    waits, and goes on when the lock is let go."""
    import fcntl
    import threading

    log = tmp_path / "log.jsonl"
    seen = []

    def probing_append(path, entry, **kw):  # the real append, after a second open of the log tries the lock
        assert not (tmp_path / "a.h5").exists()  # the entry goes in before the release is put in place
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("free")
        except BlockingIOError:
            seen.append("held")
        finally:
            os.close(fd)
        return append(path, entry, **kw)

    append = release_log.append
    monkeypatch.setattr(release_log, "append", probing_append)
    run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", log)
    assert seen == ["held"] and len(release_log.read_log(log)) == 1

    entered = threading.Event()

    def second():
        with release_log.locked(log):
            entered.set()

    with release_log.locked(log):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.5)  # blocked while the lock is held
    assert entered.wait(10)
    t.join()
    assert "waiting for another mepf embed" in capfd.readouterr().err


def test_a_log_that_cannot_be_locked_stops_the_run_before_it_reads(tmp_path, labelled_npz, eff28, monkeypatch):
    import fcntl

    class Counting(ArraySource):
        read = 0

        def blocks(self, block_size, keep=None):
            Counting.read += 1
            yield from super().blocks(block_size, keep)

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(MepfError, match="cannot be locked.*local disk"):
        run(Counting(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", tmp_path / "log.jsonl")
    assert Counting.read == 0 and not (tmp_path / "a.h5").exists()


def test_an_interrupt_while_logging_leaves_no_release(tmp_path, labelled_npz, eff28, monkeypatch):
    def interrupted(path, entry, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(release_log, "append", interrupted)
    out = tmp_path / "owner"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out / "a.h5", out / "log.jsonl")
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "log.jsonl.key"]  # no release, no temporary key


def test_no_byte_of_the_release_is_on_disk_before_its_log_entry(tmp_path, labelled_npz, eff28, monkeypatch):
    """A kill (SIGKILL, OOM, power loss) before the entry is appended must leave no release anywhere: a noisy
    file the log does not show would be a second, uncounted draw beside the next run's. Before the entry the
    release has no name; at most (where the kernel will not link an unnamed file, as here) its temporary holds
    the zeros reserved for it."""
    from mepf.artifacts import staging

    def named_bytes():
        return {p.name: set(p.read_bytes()) for p in out.iterdir() if p.name.startswith(".")}

    out = tmp_path / "owner"
    out.mkdir()
    for links in (True, False):
        if not links or staging._links(out):
            with pytest.MonkeyPatch.context() as m:
                m.setattr(staging, "_links", lambda folder, links=links: links and staging._links(folder))
                with staging.staged_release(out / "s.h5", {"S1": np.ones((1, 4))}, ["all"], {}, {}, {}) as sha:
                    assert all(b <= {0} for b in named_bytes().values()) and not (out / "s.h5").exists()
            assert file_sha256(out / "s.h5") == sha and named_bytes() == {}
            (out / "s.h5").unlink()
    seen = []

    def append(path, entry, **kw):
        seen.append(named_bytes())
        return real(path, entry, **kw)

    real = release_log.append
    monkeypatch.setattr(release_log, "append", append)
    res = run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out / "a.h5", out / "log.jsonl")
    assert len(seen) == 1 and all(b <= {0} for b in seen[0].values()) and not list(out.glob("*.h5"))[1:]
    assert file_sha256(out / "a.h5") == res.sha256 == release_log.read_log(out / "log.jsonl")[0]["output_sha256"]


def test_a_release_that_cannot_be_written_fails_before_its_entry(tmp_path, labelled_npz, eff28, monkeypatch):
    """A full disk or a folder that cannot be written must fail before the entry: after it, the budget would be
    counted for a release that never existed and the next run would be a repeat (review 10)."""
    import errno

    from mepf.artifacts import staging

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging, "_write_release", full)
    with pytest.raises(MepfError, match=r"could not be written to .*\(No space left on device\); free space") as e:
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", tmp_path / "log.jsonl")
    assert "log entry stands" not in str(e.value) and release_log.read_log(tmp_path / "log.jsonl") == []
    assert not (tmp_path / "a.h5").exists() and not list(tmp_path.glob(".a.h5.tmp*"))


def test_a_disk_without_room_for_the_copy_fails_before_the_entry(tmp_path, labelled_npz, eff28, monkeypatch):
    """Where the kernel will not link the unnamed file (EXDEV, as here), it is copied to its name after the entry:
    a disk with room for one copy but not two spent the budget and wrote nothing (review 11). The copy's space is
    now reserved before the entry; a kill there leaves zeros under a temporary name, never noisy bytes."""
    import errno

    from mepf.artifacts import staging

    monkeypatch.setattr(staging, "_links", lambda folder: False)  # the copy path, whatever this kernel allows
    real = os.posix_fallocate
    seen = []

    def no_room(fd, offset, size):
        seen.append(size)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(MepfError, match=r"could not be written to .*\(No space left on device\); free space") as e:
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", tmp_path / "log.jsonl")
    assert seen and "log entry stands" not in str(e.value) and release_log.read_log(tmp_path / "log.jsonl") == []
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob(".a.h5.tmp*"))
    monkeypatch.setattr(os, "posix_fallocate", real)
    zeros = []

    def append(path, entry, **kw):  # at the entry: the reserved temporary holds zeros only
        (t,) = tmp_path.glob(".a.h5.tmp-*")
        zeros.append(set(t.read_bytes()) == {0})
        return real_append(path, entry, **kw)

    real_append = release_log.append
    monkeypatch.setattr(release_log, "append", append)
    res = run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", tmp_path / "log.jsonl")
    assert zeros == [True] and file_sha256(tmp_path / "a.h5") == res.sha256


def test_an_interrupt_after_the_entry_says_what_was_released(tmp_path, labelled_npz, eff28, monkeypatch):
    """Ctrl-C or SIGTERM once the entry stands: before the rename nothing is released but the spend counts (a
    new run is a repeat); just after it, the release is complete, and the message must not invite a second draw."""
    from mepf.artifacts import staging
    from mepf.artifacts.errors import Interrupted

    log, out = tmp_path / "log.jsonl", tmp_path / "a.h5"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt) as e:  # a plain one would say nothing was released
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out, log)
    assert isinstance(e.value, Interrupted)
    assert re.search("logged, before it was put in place at .*counts as spent.*--allow-repeat", str(e.value))
    assert not out.exists() and not list(tmp_path.glob(".a.h5.tmp*")) and len(release_log.read_log(log)) == 1
    monkeypatch.undo()
    real = staging.fsync_folder
    monkeypatch.setattr(staging, "fsync_folder", lambda d: real(d) if not out.exists() else
                        (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt) as e:
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out, log, allow_repeat=True)
    assert isinstance(e.value, Interrupted)
    assert f"the release was written to {out} and logged: it is complete" in str(e.value)
    assert file_sha256(out) == release_log.read_log(log)[1]["output_sha256"]


def test_a_signal_once_the_entry_stands_finishes_the_release_and_one_before_it_releases_nothing(
        tmp_path, labelled_npz, eff28, monkeypatch):
    """SIGTERM (Slurm's preemption) or Ctrl-C between the entry and the rename dropped a release whose budget the
    log already counts (review 10): it is now held until the release is in place. One during the write, before
    the entry, releases nothing."""
    import signal

    from mepf.artifacts import staging
    from mepf.artifacts.errors import Interrupted

    log, out = tmp_path / "log.jsonl", tmp_path / "a.h5"
    real_append, real_write = release_log.append, staging._write_release

    def append_then_sigterm(*a, **kw):
        real_append(*a, **kw)
        os.kill(os.getpid(), signal.SIGTERM)  # twice: torchrun's agent forwards Slurm's SIGTERM, one preemption
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(release_log, "append", append_then_sigterm)
    with pytest.raises(Interrupted, match="written to .* and logged: it is complete") as e:
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out, log)
    assert e.value.signum == signal.SIGTERM and "back up all three" in str(e.value)  # the run's notes kept
    assert file_sha256(out) == release_log.read_log(log)[0]["output_sha256"]
    monkeypatch.setattr(release_log, "append", real_append)

    def sigint_while_writing(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        return real_write(*a, **kw)

    monkeypatch.setattr(staging, "_write_release", sigint_while_writing)
    with pytest.raises(Interrupted, match="before the release was logged: nothing was released"):
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "b.h5", log, allow_repeat=True)
    assert not (tmp_path / "b.h5").exists() and len(release_log.read_log(log)) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_log_replaced_while_held_releases_nothing(tmp_path, labelled_npz, eff28, monkeypatch):
    """An editor's save renames a new log over the one this run locked and checked: the entry would land in
    the old file, out of sight of the next run's repeat check, so nothing is released."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"hand": "edited"}\n')

    def replaced_then_append(path, entry, **kw):
        os.link(log, tmp_path / "log.jsonl~")  # the editor keeps the old file as its backup
        copy = tmp_path / "log.jsonl.swp"
        copy.write_bytes(log.read_bytes())
        os.replace(copy, log)
        return append(path, entry, **kw)

    append = release_log.append
    monkeypatch.setattr(release_log, "append", replaced_then_append)
    with pytest.raises(MepfError, match="was replaced while this run held it.*nothing was released"):
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", log)
    assert not (tmp_path / "a.h5").exists() and not list(tmp_path.glob(".a.h5.tmp*"))
    assert release_log.read_log(log) == release_log.read_log(tmp_path / "log.jsonl~") == [{"hand": "edited"}]
    monkeypatch.setattr(release_log, "append", append)
    run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", log)
    assert len(release_log.read_log(log)) == 2 and (tmp_path / "a.h5").exists()


def test_a_killed_writers_release_file_is_swept_and_a_live_ones_kept(tmp_path):
    """A release written under its temporary name by a run killed before the rename is a whole noisy release
    that no log may show: a later sweep removes it. A live writer's (it holds a lock on it) is left alone."""
    import subprocess
    import sys

    from mepf.artifacts.staging import sweep_stale_temporaries

    out = str(tmp_path / "a.h5")
    script = (f"import os, time, numpy as np\nfrom mepf.artifacts.staging import staged_release\n"
              f"os.replace = lambda *a: (print('written', flush=True), time.sleep(120))\n"  # held before its rename
              f"with staged_release({out!r}, {{'S1': np.ones((1, 4))}}, ['all'], {{}}, {{}}, {{}}):\n    pass\n")
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "TRUE"}  # HDF5's own lock must not fight the writer's
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert writer.stdout.readline().strip() == b"written"
        (tmp,) = tmp_path.glob(".a.h5.tmp-*")
        ((what, line),) = sweep_stale_temporaries(tmp_path / "a.h5")
        assert what == "left" and "in use by another process" in line and tmp.exists()  # alive: not touched
    finally:
        writer.kill()
        writer.wait()
    assert tmp.exists() and not (tmp_path / "a.h5").exists()  # SIGKILL runs no cleanup
    with h5py.File(tmp, "r") as f:
        assert f.attrs["format"] == "mepf-release"  # a whole release
    assert sweep_stale_temporaries(tmp_path / "b.h5") == [] and tmp.exists()  # another output's
    ((what, line),) = sweep_stale_temporaries(tmp_path / "a.h5")
    assert what == "removed"
    assert line.startswith(f"removed {tmp}: a release file left by an embed that was killed") and not tmp.exists()


def test_the_sweep_leaves_what_it_must_not_remove_and_says_so(tmp_path, labelled_npz, eff28, capfd, monkeypatch):
    """Things named like a temporary that are not a stale release file: an empty one (a writer about to lock
    it), a folder, a link, one that cannot be removed; the embed goes on and says what it left."""
    empty, folder, link, stuck = (tmp_path / f".a.h5.tmp-{n}-{n:016x}" for n in (1, 2, 3, 4))
    notes, held = tmp_path / ".a.h5.tmp-notes", tmp_path / f".a.h5.tmp-5-{5:016x}"  # a user's; a reader's
    notes.write_bytes(b"mine")
    held.write_bytes(b"noisy")
    import fcntl
    reader = os.open(held, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)  # as h5py's default file locking does for a reader
    empty.touch()
    folder.mkdir()
    (tmp_path / "target").write_bytes(b"keep")
    link.symlink_to(tmp_path / "target")
    stuck.write_bytes(b"noisy")
    unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, **kw: (_ for _ in ()).throw(PermissionError(errno.EPERM, "sticky"))
                        if str(p) == str(stuck) else unlink(p, **kw))
    try:
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", tmp_path / "log.jsonl")
    finally:
        os.close(reader)
    err = capfd.readouterr().err
    assert empty.exists() and folder.is_dir() and link.is_symlink() and stuck.exists() and held.exists()
    assert (tmp_path / "target").read_bytes() == b"keep" and (tmp_path / "a.h5").exists()
    assert notes.read_bytes() == b"mine" and str(notes) not in err
    for p in (folder, link):
        assert f"left {p}: named like a temporary release file but not a file" in err
    assert f"left {stuck} (PermissionError)" in err and f"left {empty}: empty" in err
    assert f"left {held}: in use by another process" in err


def test_a_logged_release_left_under_its_temporary_name_is_put_in_place(tmp_path, labelled_npz, eff28, capfd,
                                                                          monkeypatch):
    """Killed between logging the release and renaming it: the budget is spent, so the next embed to that
    output puts the file in place (it says so, and stops before the pass as the output is now taken)."""
    log, out = tmp_path / "log.jsonl", tmp_path / "a.h5"
    res = run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out, log)
    tmp = tmp_path / f".a.h5.tmp-123-{7:016x}"
    os.replace(out, tmp)
    with pytest.raises(MepfError, match="now holds the release an earlier embed of yours logged"):
        run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out, log, overwrite=True, allow_repeat=True)
    assert f"put {tmp} in place as {out}: the release an embed logged" in capfd.readouterr().err
    assert not tmp.exists() and file_sha256(out) == res.sha256 == release_log.read_log(log)[0]["output_sha256"]
    os.replace(out, tmp)
    with monkeypatch.context() as m:  # a filesystem without hard links: the logged release is left, and named
        m.setattr(os, "link", lambda *a, **kw: (_ for _ in ()).throw(PermissionError(errno.EPERM, "no hard links")))
        with pytest.raises(MepfError, match="still under its temporary name .* put it in place or remove it"):
            run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out, log, overwrite=True, allow_repeat=True)
    assert f"left {tmp} (PermissionError): it is the release logged for {out}" in capfd.readouterr().err
    assert tmp.exists() and not out.exists() and len(release_log.read_log(log)) == 1
    run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "b.h5", log, allow_repeat=True)
    assert tmp.exists()  # a temporary of another output is not this run's to sweep
    os.link(tmp, tmp_path / "elsewhere")  # a second name: not provably the file the killed run wrote
    run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out, log, allow_repeat=True)
    assert not tmp.exists() and f"removed {tmp}" in capfd.readouterr().err
    assert file_sha256(out) != file_sha256(tmp_path / "elsewhere")  # a fresh release, not the planted file


def test_a_folder_that_copies_the_release_into_place_needs_room_for_two(tmp_path, monkeypatch):
    """Where the kernel will not link an unnamed file into the folder (EXDEV, as on some sandboxes' /proc: this
    development machine's), the release is written unnamed and copied into a reserved temporary: twice its size
    until it is in place, which the check before the pass asked only once (review 49). Where the kernel links
    them, its refusal is taken as given."""
    from mepf.artifacts import staging

    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    if staging._links(tmp_path):
        staging.check_output_path(tmp_path / "r.h5", False, need=free * 6 // 10)  # written in place: room for one
        monkeypatch.setattr(staging, "_links", lambda folder: False)
    if not staging._copied(tmp_path):
        pytest.skip("this filesystem has no unnamed files: a release is written by its temporary name")
    with pytest.raises(MepfError, match="MB free and the output needs about"):
        staging.check_output_path(tmp_path / "r.h5", False, need=free * 6 // 10)
    staging.check_output_path(tmp_path / "r.h5", False, need=free * 4 // 10)


def test_an_output_name_too_long_for_its_temporary_is_refused_before_the_pass(tmp_path):
    from mepf.artifacts.staging import check_output_path

    check_output_path(tmp_path / ("a" * 200 + ".h5"), False)
    with pytest.raises(MepfError, match="too long for this folder .* choose a shorter --out"):
        check_output_path(tmp_path / ("a" * 230 + ".h5"), False)


def test_an_output_folder_without_room_is_refused_before_the_pass(tmp_path):
    """embed read the whole private dataset before it found that --out's folder could not take the release (review
    47 M3): the folder is tried (a file made and removed) and its free space compared with the release's size."""
    from mepf.artifacts.staging import check_output_path

    check_output_path(tmp_path / "r.h5", False, need=1 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the trial file is gone
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(MepfError, match="MB free and the output needs about .* MB; free space or choose another"):
        check_output_path(tmp_path / "r.h5", False, need=free + (1 << 30))
    if os.path.isdir("/proc/self/fd"):  # a folder no file can be made in, whoever runs the test (root included)
        with pytest.raises(MepfError, match="no file can be written in /proc/self/fd"):
            check_output_path("/proc/self/fd/r.h5", False)


def test_a_log_entry_is_whole_or_absent(tmp_path, monkeypatch):
    """A write that fails partway (disk full) is cut back off, so the log stays readable for the next run."""
    log = tmp_path / "log.jsonl"
    release_log.append(log, {"a": 1})
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError):
        release_log.append(log, {"b": "x" * 100})
    monkeypatch.setattr(os, "write", write)
    assert release_log.read_log(log) == [{"a": 1}]


def test_an_entry_after_a_hand_edited_last_line_starts_its_own_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}')  # no final newline
    release_log.append(log, {"b": 2})
    assert release_log.read_log(log) == [{"a": 1}, {"b": 2}]


def test_the_output_cannot_be_the_log_or_its_key(tmp_path, labelled_npz, eff28):
    log = tmp_path / "log.jsonl"
    run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", log)
    files = (log, release_log.key_path(log), release_log.head_path(log))
    before = [p.read_bytes() for p in files]
    for out in files:
        with pytest.raises(MepfError, match="is the release log, its key or its head"):
            run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, out, log, overwrite=True, allow_repeat=True)
    assert [p.read_bytes() for p in files] == before


def test_a_key_is_never_written_over_something_else(tmp_path):
    log = tmp_path / "log.jsonl"
    release_log.key_path(log).symlink_to(tmp_path / "unmounted" / "log.jsonl.key")  # dangling
    with pytest.raises(MepfError, match="key .* is taken by something that is not a key"):
        release_log.prepare(log, [])
    assert release_log.key_path(log).is_symlink() and not list(tmp_path.glob("*.tmp"))
    release_log.key_path(log).unlink()
    key, _, created = release_log.prepare(log, [])
    assert release_log.read_key(log) == key and created and not list(tmp_path.glob("*.tmp"))


def test_a_log_that_is_not_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    os.mkfifo(tmp_path / "fifo.jsonl")
    for log in (tmp_path / "folder.jsonl", tmp_path / "fifo.jsonl"):
        with pytest.raises(MepfError, match="is not a file"):
            release_log.read_log(log)
        with pytest.raises(MepfError, match="(is not a file|cannot be written)"):
            release_log.prepare(log, [])  # neither waits on a FIFO
        with pytest.raises(MepfError, match="release log .* (cannot be opened|is not a file)"):
            with release_log.locked(log):
                pass


def test_delta_must_be_below_one_over_n(tmp_path, labelled_npz, eff28):
    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    with pytest.raises(MepfError, match="not below 1/n"):
        run(src, eff28, tmp_path / "d.h5", tmp_path / "log.jsonl", delta=0.2, force=False)
    assert not (tmp_path / "d.h5").exists() and not list(tmp_path.glob(".*tmp*"))
    run(src, eff28, tmp_path / "d.h5", tmp_path / "log2.jsonl", delta=0.2, force=True)
    rep = audit(tmp_path / "d.h5")  # the override is not in the ledger: the audit shows it from the noisy counts
    detail = {n: d for n, _, d in rep.checks}["delta"]
    assert rep.ok and "delta" in rep.warnings and "not shown below 1/n" in detail, detail
    run(src, eff28, tmp_path / "e.h5", tmp_path / "log3.jsonl", delta=1e-4)
    rep = audit(tmp_path / "e.h5")
    assert "delta" not in rep.warnings and "below 1/n for every n" in {n: d for n, _, d in rep.checks}["delta"]


def test_unlabelled_and_mean_only(tmp_path, eff28):
    x = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", x=x)
    out = run(ArraySource(tmp_path / "u.npz", None), eff28, tmp_path / "u.h5", tmp_path / "log.jsonl",
              moments="mean", budget_split="counts=0.1").path
    r = load(out)
    assert r.moments == ["S1"] and r.arrays["counts"].shape == (1,) and not r.labelled
    assert {x["name"]: x["weight"] for x in r.ledger["releases"]} == pytest.approx({"S1": 0.9, "counts": 0.1})
    assert audit(out).ok


def test_empty_class_still_gets_its_row(tmp_path, eff28):
    x = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "e.npz", images=x, labels=np.zeros(20, dtype=np.int64))
    r = load(run(ArraySource(tmp_path / "e.npz", ["a", "b", "c", "d"]), eff28, tmp_path / "e.h5",
                 tmp_path / "log.jsonl").path)
    assert r.arrays["S1"].shape[0] == 4 and np.all(r.arrays["S1"][1:] != 0)


def test_non_private_baseline_is_exact_and_declared(tmp_path, labelled_npz, eff28):
    from click.testing import CliRunner

    from mepf.cli import main

    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    out = run(src, eff28, tmp_path / "np.h5", tmp_path / "log.jsonl", epsilon=float("inf")).path
    r = load(out)
    exact = accumulate(src, Transform((28, 28), 1), eff28[0], "mean+second", 1.0, 1.0, 8, progress=False)
    assert not r.private and r.epsilon == float("inf") and r.ledger["achieved"]["epsilon"] is None
    assert all(x["sigma"] == 0 and x["mechanism"].startswith("none") for x in r.ledger["releases"])
    np.testing.assert_allclose(r.arrays["S1"], exact.sums["S1"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(r.arrays["counts"], exact.counts)
    rep = audit(out)
    assert not rep.ok and [n for n, ok, _ in rep.checks if not ok] == ["private"]
    res = CliRunner().invoke(main, ["audit", str(out)])
    assert res.exit_code == 1 and "NOT PRIVATE" in res.output
    assert "NONE" in CliRunner().invoke(main, ["info", str(out)]).output


def test_repeat_of_a_baseline_says_it_is_one(tmp_path, labelled_npz, eff28):
    """A private release of data whose only earlier release is an eps = inf baseline is refused as a repeat (the
    log cannot tell the baseline stayed on the premises), and the refusal says it was a baseline and what to do."""
    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    log = tmp_path / "log.jsonl"
    run(src, eff28, tmp_path / "np.h5", log, epsilon=float("inf"))
    with pytest.raises(MepfError, match=r"already released: 1 non-private baseline\(s\) .*their own --release-log"):
        run(src, eff28, tmp_path / "p.h5", log)
    run(src, eff28, tmp_path / "p.h5", log, allow_repeat=True)
    with pytest.raises(MepfError, match=r"\(2 earlier release\(s\) in .*, 1 of them non-private baselines, "):
        run(src, eff28, tmp_path / "q.h5", log)


def test_calibrate_refuses_infinite_epsilon():
    from mepf.artifacts.accounting import calibrate

    with pytest.raises(MepfError, match="no privacy"):
        calibrate(float("inf"), 1e-5, {"S1": 1.0}, {"S1": 1.0})


def test_audit_checks_the_numbers_not_only_the_ledger(tmp_path, labelled_npz, eff28):
    """A file with 1000x less noise than its (genuine) ledger declares, checksum recomputed by the forger,
    fails the audit's noise check where the check has power; a genuine file passes it."""
    from mepf.artifacts.staging import write_release
    from mepf.embed.release import privatise

    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    honest = run(src, eff28, tmp_path / "honest.h5", tmp_path / "log.jsonl", epsilon=1.0).path
    rep = audit(honest)
    checks = {n: (ok, d) for n, ok, d in rep.checks}
    ok, detail = checks["noise:S1"]
    assert rep.ok and ok and "power" in detail and "NO POWER" not in detail
    # every number verified that one file can verify: only the counts' noise rests on the ledger (review 23)
    assert rep.warnings == ["noise:counts"] and rep.to_dict()["verdict"] == "passed with warnings", rep.warnings
    r = load(honest)
    exact = accumulate(src, Transform((28, 28), 1), eff28[0], "mean+second", 1.0, 1.0, 8, progress=False)
    sig = {x["name"]: x["sigma"] / 1000 for x in r.ledger["releases"]}
    forged = privatise({**exact.sums, "counts": exact.counts.astype(np.float64)}, sig)
    write_release(tmp_path / "forged.h5", forged, r.class_names, r.feature_spec, r.data_spec, r.ledger)
    rep = audit(tmp_path / "forged.h5")
    failed = {n for n, ok, _ in rep.checks if not ok}
    assert failed == {"noise:S1", "noise:S2", "noise:shape"}, failed  # checksum, ledger, sigmas and eps look genuine


def test_audit_says_where_the_noise_check_has_no_power(tmp_path):
    from click.testing import CliRunner

    from mepf.cli import main

    x = np.random.default_rng(3).integers(0, 256, (900, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "big.npz", images=x, labels=np.arange(900) % 3)
    r = CliRunner().invoke(main, ["embed", "--data", str(tmp_path / "big.npz"), "--classes", "3", "--out",
                                  str(tmp_path / "b.h5"), "--epsilon", "10", "--delta", "1e-5", "--backbone",
                                      "resnet18",
                                  "--weights", "random", "--layers", "pixels", "--release-log",
                                      str(tmp_path / "l.jsonl"),
                                  "--quiet"])
    assert r.exit_code == 0, r.stderr
    a = CliRunner().invoke(main, ["audit", str(tmp_path / "b.h5")])
    assert a.exit_code == 0 and "[WARN] noise:S1" in a.output and "NO POWER" in a.output  # 300 a class, D=64
    assert "[WARN] noise:shape" in a.output and "NO POWER against noise reduced uniformly" in a.output  # nor here
    assert "AUDIT PASSED WITH WARNINGS (noise:counts, noise:S1, noise:S2, noise:shape)" in a.output, a.output
    assert "\nAUDIT PASSED\n" not in a.output
    assert "ask the data owner whether its SHA-256 is in their release log" in a.output
    j = json.loads(CliRunner().invoke(main, ["audit", str(tmp_path / "b.h5"), "--json"]).output)
    assert j["ok"] and j["verdict"] == "passed with warnings"
    assert j["warnings"] == ["noise:counts", "noise:S1", "noise:S2", "noise:shape"]
    assert [c["name"] for c in j["checks"] if c["warning"]] == ["noise:counts", "noise:S1", "noise:S2", "noise:shape"]
    a = CliRunner().invoke(main, ["audit", str(tmp_path / "b.h5"), "--release-log", str(tmp_path / "l.jsonl")])
    assert a.exit_code == 0 and "its SHA-256 is in the release log given" in a.output


def forge_eps1(tmp_path, images, labels, classes, top_up=()):
    """Embed at eps = 20, then rewrite the ledger consistently to claim eps = 1 (sigmas, mu, eps; the checksum
    recomputed by write_release) and add the missing noise to the rows `top_up` only; the forged file's path."""
    from click.testing import CliRunner

    from mepf.artifacts.accounting import calibrate
    from mepf.artifacts.format import read_raw
    from mepf.artifacts.staging import write_release
    from mepf.cli import main

    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    r = CliRunner().invoke(main, ["embed", "--data", str(tmp_path / "d.npz"), "--classes", str(classes), "--out",
                                  str(tmp_path / "eps20.h5"), "--epsilon", "20", "--delta", "1e-5", "--backbone",
                                  "resnet18", "--weights", "random", "--layers", "pixels", "--release-log",
                                  str(tmp_path / "l.jsonl"), "--quiet"])
    assert r.exit_code == 0, r.stderr
    rel = read_raw(tmp_path / "eps20.h5")
    led = rel.ledger
    before = {e["name"]: e["sigma"] for e in led["releases"]}
    cal = calibrate(1.0, 1e-5, {e["name"]: e["sensitivity"] for e in led["releases"]},
                    {e["name"]: e["weight"] for e in led["releases"]})
    for e in led["releases"]:
        e["sigma"] = cal.sigmas[e["name"]]
    led["mu"], led["target"]["epsilon"] = cal.mu, 1.0
    led["achieved"]["epsilon"], led["achieved"]["epsilon_closed_form"] = cal.achieved_eps, cal.closed_form_eps
    arrays = {k: np.array(v, dtype=np.float64) for k, v in rel.arrays.items()}
    g = np.random.default_rng(5)
    for name, a in arrays.items():
        for row in top_up:
            a[row] += g.normal(0, np.sqrt(cal.sigmas[name] ** 2 - before[name] ** 2), a[row].shape)
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    write_release(tmp_path / "forged.h5", arrays, rel.class_names, rel.feature_spec, rel.data_spec, led)
    return tmp_path / "forged.h5"


def test_a_consistent_forgery_passes_only_with_the_noise_unverified(tmp_path):
    """The checksum is no signature: a file embedded at eps = 20 whose ledger is rewritten to claim eps = 1
    passes every ledger check. Where the numbers cannot show their noise, the audit must not say a plain AUDIT
    PASSED: it passes with the noise checks as warnings."""
    from click.testing import CliRunner

    from mepf.cli import main

    x = np.random.default_rng(1).integers(0, 256, (900, 8, 8), dtype=np.uint8)
    forged = forge_eps1(tmp_path, x, np.arange(900) % 3, 3)
    a = CliRunner().invoke(main, ["audit", str(forged)])
    assert "(1, 1e-05)-DP" in a.output  # the ledger is all consistent: no ledger check can fail it
    assert "[WARN] noise:S1" in a.output and "NO POWER" in a.output  # the rows' norms cannot show the noise...
    # ...but neighbouring pixels' true sums are close, so the differences show what is missing (review 17)
    assert a.exit_code == 1 and "[FAIL] noise:shape" in a.output and "paired coordinates" in a.output, a.output
    rep = audit(forged)
    assert {n for n, ok, _ in rep.checks if not ok} == {"noise:shape"}
    assert {"noise:S1", "noise:S2"} <= set(rep.warnings)


def test_a_forgery_noised_only_where_the_check_has_power_still_warns(tmp_path):
    """Power is judged row by row: with an empty declared class (a row the check can test) beside two large
    ones (rows it cannot), a forger adds the declared noise to the empty class's row alone. Warned, naming the
    rows without power; judged at the best row, this passed plainly."""
    x = np.random.default_rng(2).integers(0, 256, (1000, 64, 64), dtype=np.uint8)
    forged = forge_eps1(tmp_path, x, np.arange(1000) % 2, 3, top_up=(2,))
    rep = audit(forged)
    detail = {n: d for n, _, d in rep.checks}["noise:S1"]
    assert {"noise:S1", "noise:S2"} <= set(rep.warnings), rep.checks
    assert "2 of 3 rows (0, 1) have NO POWER" in detail, detail
    assert {n for n, ok, _ in rep.checks if not ok} == {"noise:shape"}  # the differences show it (review 17)


def test_a_release_never_stands_without_its_log_entry(tmp_path, labelled_npz, eff28, monkeypatch):
    """The log is checked writable before the pass; if the entry still cannot be written (disk full after
    the pass), the release is never put in place, so no budget is spent that the log does not show."""
    import errno

    def full(path, entry, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(release_log, "append", full)
    src = ArraySource(labelled_npz[0], ["a", "b", "c"])
    with pytest.raises(MepfError, match="could not be written .* nothing was released"):
        run(src, eff28, tmp_path / "x.h5", tmp_path / "log.jsonl")
    assert not (tmp_path / "x.h5").exists() and release_log.read_log(tmp_path / "log.jsonl") == []
    assert not list(tmp_path.glob(".x.h5.tmp*"))


def test_a_log_lost_moved_or_rolled_back_is_refused_not_started_over(tmp_path, labelled_npz, eff28, capfd):
    """With its key still beside it, a log deleted, moved away (as a corrupt line's message once advised) or
    replaced by an older copy made the next embed start over: a repeat of the same data passed uncounted. The
    head (MAC'd with the key) records the releases the log held; a log that lost any is refused."""
    from click.testing import CliRunner

    from mepf.cli import main

    log = tmp_path / "log.jsonl"
    src = lambda: ArraySource(labelled_npz[0], ["a", "b", "c"])  # noqa: E731
    first = run(src(), eff28, tmp_path / "a.h5", log)
    empty_backup = b""
    one_entry = log.read_bytes()
    run(src(), eff28, tmp_path / "b.h5", log, allow_repeat=True)
    head = json.loads(release_log.head_path(log).read_text())
    assert len(head["releases"]) == 2 and stat_mode(release_log.head_path(log)) == 0o600
    for restore in (None, empty_backup, one_entry):  # deleted, an empty backup, an older copy
        log.unlink(missing_ok=True)
        if restore is not None:
            log.write_bytes(restore)
        with pytest.raises(MepfError, match=r"no longer holds (2|1) release\(s\).*restore the log"):
            run(src(), eff28, tmp_path / "c.h5", log, allow_repeat=True)
        assert not (tmp_path / "c.h5").exists() and (restore is not None or not log.exists())  # no empty log made
    log.write_bytes(one_entry)
    r = CliRunner().invoke(main, ["releases", "--release-log", str(log)])
    assert r.exit_code == 0 and "no longer holds 1 release(s)" in r.output
    r = CliRunner().invoke(main, ["audit", str(tmp_path / "a.h5"), "--release-log", str(log), "--json"])
    assert "no longer holds 1 release(s)" in json.loads(r.output)["composed"]["note"]
    # a head under another key (another log's) is named, not trusted
    other = tmp_path / "other.jsonl"
    run(src(), eff28, tmp_path / "o.h5", other, allow_repeat=True)
    os.replace(release_log.head_path(other), release_log.head_path(log))
    with pytest.raises(MepfError, match="head .* does not belong to this log's key"):
        run(src(), eff28, tmp_path / "c.h5", log, allow_repeat=True)
    assert file_sha256(tmp_path / "a.h5") == first.sha256
    # a corrupt line: the message no longer says to move the log away
    log.write_text(log.read_text() + "{not json\n")
    with pytest.raises(MepfError, match="line 2 is corrupt; repair that line.*do not move the log away"):
        run(src(), eff28, tmp_path / "c.h5", log, allow_repeat=True)


def test_another_embed_finishing_during_the_pass_is_not_a_lost_log(tmp_path, labelled_npz, eff28, monkeypatch):
    """The head was checked against the entries read before the run took the lock: an embed on the same log that
    finished in between (minutes under torchrun, while the plan reads every file) looked like a lost log."""
    from mepf.embed import release as release_mod

    log = tmp_path / "log.jsonl"
    run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "a.h5", log)
    np.savez(tmp_path / "other.npz", images=np.full((5, 28, 28, 1), 9, np.uint8), labels=np.arange(5) % 3)
    real = release_mod.plan_of
    done = []

    def plan_then_another_embed(*a, **kw):  # after this run read the log, before it takes the lock
        if not done:
            done.append(1)
            run(ArraySource(tmp_path / "other.npz", ["a", "b", "c"]), eff28, tmp_path / "b.h5", log)
        return real(*a, **kw)

    monkeypatch.setattr(release_mod, "plan_of", plan_then_another_embed)
    run(ArraySource(labelled_npz[0], ["a", "b", "c"]), eff28, tmp_path / "c.h5", log, allow_repeat=True)
    assert len(release_log.read_log(log)) == 3 and done


def stat_mode(path) -> int:
    import stat

    return stat.S_IMODE(os.stat(path).st_mode)
