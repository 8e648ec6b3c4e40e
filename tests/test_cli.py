"""The command line: the done-when commands, and every bad input as one clear line, no file left."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mepf.artifacts import load
from mepf.cli import main
from mepf.embed import release_log
from tests.conftest import make_images


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def embed_args(data, out, log, *extra):
    return ["embed", "--data", data, "--out", out, "--epsilon", "10", "--delta", "1e-3", "--release-log", log,
            "--quiet", *extra]


def test_embed_audit_info_on_mnist5k_with_vgg19_random(tmp_path):
    out = tmp_path / "X.h5"
    r = cli(*embed_args("mnist-5k", out, tmp_path / "log.jsonl", "--backbone", "vgg19", "--weights", "random",
                        "--delta", "1e-5", "--image-size", "32"))
    assert r.exit_code == 0, r.output + r.stderr
    assert "random" in r.output
    a = cli("audit", out)
    assert a.exit_code == 0 and "AUDIT PASSED" in a.output and "(10, 1e-05)-DP" in a.output
    j = cli("audit", out, "--json", "--release-log", tmp_path / "log.jsonl")
    report = json.loads(j.output)
    assert report["ok"] and report["composed"]["releases"] == 1
    i = cli("info", out)
    assert i.exit_code == 0 and "vgg19" in i.output and "32x32x1" in i.output and "D=303104" in i.output
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"({os.path.getsize(out) / 1e6:.1f} MB, sha256 {sha[:16]})" in i.output


def test_a_baseline_into_the_default_log_is_warned_about(tmp_path, monkeypatch):
    """eps = inf enters the release log like any release, so one made into the default log warns, before any
    record is read, that a later private release of that data will be a repeat; with its own log it does not."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home"))
    args = ["embed", "--data", tmp_path / "missing.npz", "--out", tmp_path / "x.h5", "--epsilon", "inf", "--delta",
            "1e-3"]
    r = cli(*args)
    assert r.exit_code == 2 and "enters the default release log" in r.stderr and "own --release-log" in r.stderr
    r = cli(*args, "--release-log", tmp_path / "baselines.jsonl")
    assert r.exit_code == 2 and "NON-PRIVATE" in r.stderr and "default release log" not in r.stderr


def test_embed_with_pixels_layer_records_and_shows_it(tmp_path, labelled_npz):
    out = tmp_path / "P.h5"
    r = cli(*embed_args(labelled_npz[0], out, tmp_path / "l.jsonl", "--classes", "3", "--backbone", "resnet18",
                        "--weights", "random", "--layers", "stem,pixels", "--pixel-weight", "3"))
    assert r.exit_code == 0, r.output + r.stderr
    spec = load(out).feature_spec
    h, w = spec["input"]["height"], spec["input"]["width"]
    assert spec["layers"] == ["pixels", "stem"] and spec["pixel_weight"] == 3.0
    assert spec["dim"] == h * w + 64 * (h // 2) * (w // 2)  # resnet18 stem: 64 channels at stride 2
    assert "AUDIT PASSED" in cli("audit", out).output
    assert "pixels x3" in cli("info", out).output


def test_a_stale_release_file_is_swept_even_where_the_output_is_taken(tmp_path, labelled_npz):
    """The sweep comes before the refusal of an existing output: a killed run's temporary, a whole noisy
    release never logged, does not outlive an embed that stops at once."""
    out = tmp_path / "X.h5"
    out.write_bytes(b"an earlier release")
    stale = tmp_path / f".X.h5.tmp-1-{'ab' * 8}"
    stale.write_bytes(b"noisy")
    r = cli(*embed_args(labelled_npz[0], out, tmp_path / "l.jsonl", "--classes", "3"))
    assert r.exit_code != 0 and "already exists" in r.output and "Traceback" not in r.output
    assert f"removed {stale}: a release file left by an embed that was killed" in r.stderr and not stale.exists()
    assert out.read_bytes() == b"an earlier release"


def test_python_m_mepf_audit_fails_on_tampered_file_without_traceback(tmp_path, labelled_npz):
    out = tmp_path / "X.h5"
    assert cli(*embed_args(labelled_npz[0], out, tmp_path / "l.jsonl", "--classes", "3")).exit_code == 0
    import h5py

    with h5py.File(out, "r+") as f:
        f["counts"][0] += 1
    p = subprocess.run([sys.executable, "-m", "mepf", "audit", str(out)], capture_output=True, text=True)
    assert p.returncode == 1 and "AUDIT FAILED" in p.stdout and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "mepf", "info", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "checksum mismatch" in p.stderr


def _folder(tmp_path, name, sizes=(28,), extra=None, corrupt=False):
    root = tmp_path / name
    (root / "a").mkdir(parents=True)
    for i, s in enumerate(sizes * 2):
        Image.fromarray(make_images(1, size=s)[0, :, :, 0]).save(root / "a" / f"{i}.png")
    if extra:
        (root / "a" / extra).write_text("not an image")
    if corrupt:
        (root / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def _npz(tmp_path, name, images, labels=None):
    path = tmp_path / name
    np.savez(path, **({"images": images} if labels is None else {"images": images, "labels": labels}))
    return path


BAD = {
    "missing path": (lambda t: ["--data", t / "nope"], "no such file or folder"),
    "one image": (lambda t: ["--data", _folder(t, "one") / "a" / "0.png"], "a single file that is not an .npz or .h5"),
    "array of tiny images": (lambda t: ["--data", _npz(t, "tiny.npz", np.zeros((5, 4, 4), np.uint8))],
                             "the images are 4 x 4 and mepf embeds 8 to 1024 px a side"),
    "empty folder": (lambda t: ["--data", (t / "empty").mkdir() or t / "empty"], "holds no images"),
    "corrupt image": (lambda t: ["--data", _folder(t, "c", corrupt=True), "--image-size", "28", "--channels", "1"],
                      "cannot read image"),
    "folder without geometry": (lambda t: ["--data", _folder(t, "m", sizes=(28, 32))], "--image-size (N or HxW) and"),
    "folder without channels": (lambda t: ["--data", _folder(t, "m"), "--image-size", "28"], "--channels (1 or 3)"),
    "non-image file": (lambda t: ["--data", _folder(t, "n", extra="notes.txt")], "not PNG or JPEG images"),
    "labels out of range": (lambda t: ["--data", _npz(t, "l.npz", make_images(5), np.array([0, 1, 2, 3, 9])),
                                       "--classes", "4"], "outside 0..3"),
    "labels undeclared": (lambda t: ["--data", _npz(t, "u.npz", make_images(5), np.arange(5))], "--classes"),
    "nan in npz": (lambda t: ["--data", _npz(t, "nan.npz", np.full((5, 28, 28), np.nan, np.float32))], "NaN"),
    "wrong dtype": (lambda t: ["--data", _npz(t, "i.npz", np.zeros((5, 28, 28), np.int32))], "dtype int32"),
    "eps zero": (lambda t: ["--data", "mnist-5k", "--epsilon", "0"], "--epsilon must be > 0"),
    "eps negative": (lambda t: ["--data", "mnist-5k", "--epsilon", "-1"], "--epsilon must be > 0"),
    "delta one": (lambda t: ["--data", "mnist-5k", "--delta", "1"], "--delta must be in (0, 1)"),
    "delta zero": (lambda t: ["--data", "mnist-5k", "--delta", "0"], "--delta must be in (0, 1)"),
    "out under a file": (lambda t: ["--data", "mnist-5k", "--out", (t / "f").touch() or t / "f" / "x.h5"],
                         "cannot be created"),
    "unknown dataset": (lambda t: ["--data", "imagenet"], "not a folder"),
    "bad budget split": (lambda t: ["--data", "mnist-5k", "--budget-split", "S9=0.1"], "unknown release"),
    # a sigma above what every reader accepts (1e18): the budget would be spent on a file no one can read
    "budget split no reader accepts": (lambda t: ["--data", "mnist-5k", "--budget-split", "counts=1e-40"],
                                       "counts whose sigma is out of bounds, which every reader refuses"),
    "eps beyond calibration": (lambda t: ["--data", "mnist-5k", "--epsilon", "2e6"], "beyond what mepf calibrates"),
    "delta below calibration": (lambda t: ["--data", "mnist-5k", "--delta", "1e-320"], "below what mepf calibrates"),
    "eps the accountants cannot meet": (lambda t: ["--data", "mnist-5k", "--epsilon", "1e-6", "--delta", "0.5"],
                                        "cannot be calibrated"),
    "feature size below image": (lambda t: ["--data", "mnist-5k", "--feature-size", "16"], "only upsamples"),
    "pixel weight without pixels": (lambda t: ["--data", "mnist-5k", "--pixel-weight", "2"], "add pixels to --layers"),
    # geometries no mepf generator draws: the once-only budget would go to a file no one can train from (review 42)
    "not square": (lambda t: ["--data", "mnist-5k", "--image-size", "16x12", "--backbone", "resnet18", "--weights",
                              "random"], "draw square images, not 16x12"),
    "array of 30 px": (lambda t: ["--data", _npz(t, "odd.npz", make_images(5, size=30))],
                       "a side divisible by 4, not 30"),
    "array of 516 px": (lambda t: ["--data", _npz(t, "big.npz", make_images(2, size=516)), "--backbone", "resnet18",
                                   "--weights", "random"], "sides above 512 px only as s x 2^k"),  # 4 x 129: conv's
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(tmp_path, case):
    make, message = BAD[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    args = {"--out": outdir / "x.h5", "--epsilon": "10", "--delta": "1e-5", "--release-log": tmp_path / "log.jsonl"}
    given = make(tmp_path)
    for i in range(0, len(given), 2):
        args[given[i]] = given[i + 1]
    r = cli("embed", "--quiet", *[v for kv in args.items() for v in kv])
    assert r.exit_code == 2, (r.output, r.stderr, r.exception)
    assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr
    assert list(outdir.iterdir()) == []
    assert release_log.read_log(tmp_path / "log.jsonl") == []  # no entry (the log may be prepared, empty)


def test_existing_output_needs_overwrite(tmp_path, labelled_npz):
    out = tmp_path / "x.h5"
    out.write_bytes(b"precious")
    r = cli(*embed_args(labelled_npz[0], out, tmp_path / "log.jsonl", "--classes", "3"))
    assert r.exit_code == 2 and "--overwrite" in r.stderr and out.read_bytes() == b"precious"
    r = cli(*embed_args(labelled_npz[0], out, tmp_path / "log.jsonl", "--classes", "3", "--overwrite"))
    assert r.exit_code == 0 and out.read_bytes() != b"precious"


def test_a_failed_embed_leaves_no_folders_it_made(tmp_path, labelled_npz):
    """--out's missing folders are made before the pass (so that an unwritable place fails first); a run that
    then fails left them behind, empty (review 15). A folder that holds something (the log) stays."""
    r = cli(*embed_args(labelled_npz[0], tmp_path / "new" / "a" / "x.h5", tmp_path / "log.jsonl", "--classes", "2"))
    assert r.exit_code == 2 and "outside 0..1" in r.stderr and not (tmp_path / "new").exists(), r.stderr
    r = cli(*embed_args(labelled_npz[0], tmp_path / "kept" / "x.h5", tmp_path / "kept" / "log.jsonl", "--classes",
                        "2"))
    assert r.exit_code == 2 and (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "x.h5").exists()
    (tmp_path / "pre").mkdir()  # existed before: kept, however the path reaches it (review 16)
    r = cli(*embed_args(labelled_npz[0], f"{tmp_path}/nothere/../pre/x.h5", tmp_path / "log.jsonl", "--classes", "2"))
    assert r.exit_code == 2 and (tmp_path / "pre").is_dir()
    r = cli(*embed_args(labelled_npz[0], tmp_path / "ok" / "x.h5", tmp_path / "log.jsonl", "--classes", "3"))
    assert r.exit_code == 0 and (tmp_path / "ok" / "x.h5").is_file()
    np.savez(tmp_path / "tiny.npz", images=np.zeros((3, 7, 7), np.uint8))  # --check said it was ready (review 16)
    c = cli("embed", "--check", "--data", tmp_path / "tiny.npz")
    assert c.exit_code == 2 and "the images are 7 x 7 and mepf embeds 8 to 1024 px" in c.output, c.output
    assert cli("embed", "--check", "--data", tmp_path / "tiny.npz", "--image-size", "8").exit_code == 0
    c = cli("embed", "--check", "--data", _folder(tmp_path, "f30"), "--image-size", "30", "--channels", "1")
    assert c.exit_code == 2 and "a side divisible by 4, not 30" in c.output, c.output  # embed would refuse it (r. 43)
    missing = cli("info", tmp_path / "missing.npz")
    assert missing.exit_code == 2 and "images" not in missing.stderr, missing.stderr


def test_a_path_too_long_is_one_line_in_every_command(tmp_path, labelled_npz):
    """A folder or file name over the filesystem's 255 bytes was a traceback wherever it was first touched."""
    long = "a" * 300
    log = tmp_path / "log.jsonl"
    for out in (tmp_path / long / "x.h5", tmp_path / "new" / long / "x.h5", tmp_path / f"{long}.h5"):
        r = cli(*embed_args(labelled_npz[0], out, log, "--classes", "3"))
        assert r.exit_code == 2 and r.stderr.startswith("Error: ") and "too long" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "new").exists()
    assert cli(*embed_args(labelled_npz[0], tmp_path / "r.h5", log, "--classes", "3")).exit_code == 0
    for args in (["info", tmp_path / long], ["audit", tmp_path / "r.h5", "--release-log", tmp_path / long],
                 ["releases", "--release-log", tmp_path / long / "log"], ["synthesize", "--resume", tmp_path / long],
                 ["synthesize", tmp_path / "r.h5", "--out", tmp_path / "x" / long, "--steps", "1"],
                 ["evaluate", tmp_path / long, "--reference", labelled_npz[0], "--out", tmp_path / "e"]):
        r = cli(*args)
        assert r.exit_code == 2 and r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_output_inside_the_data_folder_is_refused_before_it_is_made(tmp_path, image_folder):
    """--out inside the image folder was made before the folder was listed: it became a class ('releases'), and
    the next embed of the folder read the release as an image (review 17 F4)."""
    geometry = ("--image-size", "28", "--channels", "1")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "up").symlink_to(image_folder / "cats")  # the OS follows it before '..': into the data
    (tmp_path / "link").symlink_to(image_folder)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    r = cli(*embed_args(image_folder, tmp_path / "loop" / "r.h5", tmp_path / "log.jsonl", *geometry))
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr  # traceback
    for out, log, flag in ((image_folder / "releases" / "r1.h5", tmp_path / "log.jsonl", "--out"),
                           (tmp_path / "r.h5", image_folder / "cats" / "log.jsonl", "--release-log"),
                           (f"{image_folder}/../{image_folder.name}/r.h5", tmp_path / "log.jsonl", "--out"),
                           (tmp_path / "other" / "up" / ".." / "new" / "r.h5", tmp_path / "log.jsonl", "--out"),
                           (tmp_path / "link" / "r.h5", tmp_path / "log.jsonl", "--out")):
        r = cli(*embed_args(image_folder, out, log, *geometry))
        assert r.exit_code == 2 and f"{flag} " in r.stderr and "inside the data folder" in r.stderr, r.stderr
    assert sorted(p.name for p in image_folder.iterdir()) == ["cats", "dogs"]
    assert not list((image_folder / "cats").glob("log*"))
    r = cli(*embed_args(image_folder, tmp_path / "out" / "r.h5", tmp_path / "log.jsonl", *geometry))
    assert r.exit_code == 0, r.stderr


def test_an_output_that_is_the_data_file_is_refused_and_the_data_kept(tmp_path, labelled_npz):
    """--out naming the .h5 being read, with --overwrite (which "already exists; pass --overwrite" suggested),
    replaced the owner's data with the release (review 49 M2); through a link or as the log, likewise."""
    import h5py

    _, x, y = labelled_npz
    data = tmp_path / "private.h5"
    with h5py.File(data, "w") as f:
        f.create_dataset("images", data=x)
        f.create_dataset("labels", data=y)
    before = data.read_bytes()
    (tmp_path / "link.h5").symlink_to(data)
    for out, log, flag in ((data, tmp_path / "log.jsonl", "--out"), (tmp_path / "link.h5", tmp_path / "log.jsonl",
                                                                       "--out"),
                           (tmp_path / "r.h5", data, "--release-log")):
        r = cli(*embed_args(data, out, log, "--classes", "3", "--overwrite"))
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{flag} " in r.stderr and "is the data file being read" in r.stderr, r.stderr
    assert data.read_bytes() == before and not (tmp_path / "log.jsonl").exists()
    assert cli(*embed_args(data, tmp_path / "r.h5", tmp_path / "log.jsonl", "--classes", "3")).exit_code == 0


def test_audit_with_a_log_that_does_not_exist_says_so(tmp_path, labelled_npz):
    """A mistyped --release-log read as the alarming "not in the release log" (review 15)."""
    r = cli(*embed_args(labelled_npz[0], tmp_path / "x.h5", tmp_path / "log.jsonl", "--classes", "3"))
    assert r.exit_code == 0, r.stderr
    bad = cli("audit", tmp_path / "x.h5", "--release-log", tmp_path / "typo.jsonl")
    assert bad.exit_code == 2 and "no release log at" in bad.stderr and "not in the release log" not in bad.stderr
    assert cli("audit", tmp_path / "x.h5", "--release-log", tmp_path / "log.jsonl").exit_code == 0


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_interrupted_embed_on_another_node_does_not_say_nothing_was_released(monkeypatch, capsys, rank):
    """Under multi-node torchrun every node's lead rank reports a Ctrl-C; only rank 0 writes the release, and it may
    have logged it already, so another node saying "nothing was released" invited a second, paid draw."""
    from mepf.cli import user_errors
    from mepf.embed.release import Interrupted, _complete

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it

    @user_errors
    def embed(complete=False):
        raise Interrupted(_complete("a.h5")) if complete else KeyboardInterrupt

    for complete in (False, True):
        with pytest.raises(SystemExit) as e:
            embed(complete)
        said = capsys.readouterr().err
        assert e.value.code == 130 and said.count("\n") == 1
        if rank == "1":
            assert "first node (rank 0) says whether" in said and "nothing was released" not in said
        else:
            assert ("it is complete; do not run again" if complete else "nothing was released") in said


def test_a_lone_process_with_rank_variables_in_its_shell_still_reports(monkeypatch, capsys):
    """RANK and LOCAL_RANK alone (a shell that exports them, a launcher of something else) silenced a lone process's
    errors and results: they count only where WORLD_SIZE says several processes run."""
    from mepf.artifacts.errors import MepfError
    from mepf.cli import user_errors

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    @user_errors
    def embed():
        raise MepfError("something the user must see")

    with pytest.raises(SystemExit) as e:
        embed()
    assert e.value.code == 2 and "something the user must see" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")  # one of four: rank 0's node lead says it
    with pytest.raises(SystemExit):
        embed()
    assert capsys.readouterr().err == ""


def test_rank_0_numbered_local_rank_1_still_says_interrupts_and_long_paths(monkeypatch, capsys):
    """Review 26 F5: a launcher numbering a node's ranks from 1 gives rank 0 LOCAL_RANK=1; a MepfError was printed
    there (rank 0 prints), but a path too long and a Ctrl-C were printed by the node lead alone: by no rank."""
    import errno

    from mepf.cli import user_errors

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")

    @user_errors
    def sample(kind):
        if kind == "path":
            raise OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300)
        raise KeyboardInterrupt

    for kind, code, words in (("path", 2, "path too long"), ("interrupt", 130, "interrupted")):
        with pytest.raises(SystemExit) as e:
            sample(kind)
        said = capsys.readouterr().err
        assert e.value.code == code and said.count("\n") == 1 and words in said


def test_a_world_size_that_is_not_a_number_is_said_whatever_rank_the_shell_claims(monkeypatch, capsys):
    """The CLI decided who prints by its own reading of WORLD_SIZE, beside the collectives' (now one torch-free
    module, core/launch_env): WORLD_SIZE=x counted as several processes there, so a process with RANK=1 and
    LOCAL_RANK=1 in its shell exited 2 without printing that its WORLD_SIZE is not a number."""
    from mepf.cli import user_errors
    from mepf.core.launch_env import launched

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "x")

    @user_errors
    def embed():
        launched()

    with pytest.raises(SystemExit) as e:
        embed()
    said = capsys.readouterr().err
    assert e.value.code == 2 and said.count("\n") == 1 and "WORLD_SIZE='x' is not a whole number" in said


def test_an_interrupt_while_rank_0_tells_the_others_says_the_release_is_complete(tmp_path, labelled_npz, monkeypatch):
    """A Ctrl-C or SIGTERM (torchrun's agent, Slurm: typically when a node was lost) that lands while rank 0 tells
    the other ranks the outcome, after the release was written and logged, said "nothing was released ... run the
    same command again" (review 51 M1). Simulated: the signal taken as the broadcast after the release returns."""
    from mepf.core import distributed

    real = distributed.on_main

    def on_main(fn, on_lost=None):
        result = real(fn, on_lost)
        if on_lost is not None:  # the release's: the signal lands in its broadcast
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(distributed, "on_main", on_main)
    r = cli(*embed_args(labelled_npz[0], tmp_path / "r.h5", tmp_path / "log.jsonl", "--classes", "3"))
    assert r.exit_code == 130 and "nothing was released" not in r.stderr, r.stderr
    assert "the release was written to" in r.stderr and "it is complete; do not run again" in r.stderr, r.stderr
    assert load(tmp_path / "r.h5").epsilon == pytest.approx(10)
    assert len(release_log.read_log(tmp_path / "log.jsonl")) == 1
