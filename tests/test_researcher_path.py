"""The researcher's side, tried as a new user would on self-made data: three classes named "benign",
"malignant lesion", "normal tissue", files like `patient 0001 scan.jpg` in modes L, RGBA and P at 24-96 px,
and a held-out folder of the same kind. Every test drives the real command line on real files."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mepf.cli import main
from tests.conftest import make_images

TINY = ["--backbone", "resnet18", "--weights", "random", "--layers", "pixels"]
CLASSES = ("benign", "malignant lesion", "normal tissue")
TRAIN = ["--width", "8", "--batch-size", "12", "--grid-every", "0", "--snapshot-every", "2", "--log-every", "1",
         "--device", "cpu", "--quiet"]


def cli(*args, env=None):
    return CliRunner(env=env).invoke(main, [str(a) for a in args])


def ok(r):
    assert r.exit_code == 0, (r.output, r.stderr, r.exception)
    return r


def refused(r, *words):
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, (r.output, r.stderr)
    for w in words:
        assert w in r.stderr, r.stderr
    return r


def messy_folder(root, names=CLASSES, per_class=8, seed=0):
    """Class folders of JPEG and PNG files in modes L, RGBA and P, 24 to 96 px, with spaces in the names."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = int(rng.choice([24, 28, 40, 64, 96]))
            grey = make_images(1, seed=seed * 1000 + c * 100 + i, size=size)[0, :, :, 0]
            mode = ("L", "RGBA", "P")[i % 3]
            im = Image.fromarray(grey).convert(mode)
            if mode == "RGBA" or i % 2:
                im.save(root / name / f"patient {i:04d} scan.png")
            else:
                im.convert("L").save(root / name / f"patient {i:04d} scan.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The owner's release of a messy folder, a researcher's 4-step run, and a held-out folder of the same kind."""
    d = tmp_path_factory.mktemp("study")
    messy_folder(d / "private", seed=1)
    messy_folder(d / "heldout", seed=2, per_class=5)
    ok(cli("embed", "--data", d / "private", "--image-size", "28", "--channels", "1", "--out", d / "rel.h5",
           "--epsilon", "10", "--delta", "1e-3", "--release-log", d / "log.jsonl", "--quiet", *TINY))
    ok(cli("synthesize", d / "rel.h5", "--out", d / "run", "--steps", "4", *TRAIN))
    return d


def accuracy(run, reference, out, *extra):
    return cli("evaluate", run, "--reference", reference, "--out", out, "-n", "30", "--metrics", "accuracy",
               "--classifiers", "logreg", "--quiet", *extra)


# --------------------------------------------------------------------------- 1. classes matched by name

def test_classes_are_matched_by_name_never_silently_by_position(study, tmp_path):
    other = tmp_path / "renamed"
    shutil.copytree(study / "heldout", other)
    for old, new in zip(CLASSES, ("Class A", "Class B", "Class C")):
        (other / old).rename(other / new)
    refused(accuracy(study / "run", other, tmp_path / "rep"), "class names do not match", "malignant lesion",
            "Class B", "--class-map")
    assert not (tmp_path / "rep").exists()
    ok(accuracy(study / "run", other, tmp_path / "rep", "--class-map",
                "benign=Class A,malignant lesion=Class B,normal tissue=Class C"))
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["classes"] == {"matched": "by --class-map", "map": {"benign": "Class A", "malignant lesion": "Class B",
                                                                   "normal tissue": "Class C"}}
    assert "malignant lesion -> Class B" in (tmp_path / "rep" / "report.md").read_text()
    # the same names in another order on disk are matched by name
    ok(accuracy(study / "run", study / "heldout", tmp_path / "rep2"))
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["classes"]["matched"] == "by name"


def test_real_train_classes_are_matched_by_name_in_any_order(study, tmp_path):
    """--real-train with the reference's classes in another order is the same training set (it was refused);
    other classes are refused with both sets named."""
    names = sorted(CLASSES)
    images, y = make_images(30, seed=5), np.arange(30) % 3
    np.savez(tmp_path / "a.npz", images=images, labels=y, class_names=np.array(names))
    np.savez(tmp_path / "b.npz", images=images, labels=2 - y, class_names=np.array(names[::-1]))
    got = []
    for name in ("a", "b"):
        ok(accuracy(study / "run", study / "heldout", tmp_path / f"rep-{name}", "--real-train",
                    tmp_path / f"{name}.npz"))
        got.append(json.loads((tmp_path / f"rep-{name}" / "report.json").read_text())["metrics"]["accuracy_real_train"])
    assert got[0] == got[1]
    np.savez(tmp_path / "c.npz", images=images, labels=y, class_names=np.array(["x", "y", "z"]))
    refused(accuracy(study / "run", study / "heldout", tmp_path / "rep-c", "--real-train", tmp_path / "c.npz"),
            "--real-train must be labelled with the reference's classes", "{x, y, z}", "malignant lesion")


def test_float_images_outside_the_unit_range_are_told_how_to_rescale(study, tmp_path):
    np.savez(tmp_path / "pm1.npz", images=make_images(12).astype(np.float32) / 127.5 - 1, labels=np.arange(12) % 3,
             class_names=np.array(sorted(CLASSES)))
    refused(accuracy(tmp_path / "pm1.npz", study / "heldout", tmp_path / "rep"), "outside [0,1]", "(x + 1) / 2")


@pytest.mark.parametrize("unnamed", ["synthetic", "reference"])
def test_the_class_map_the_refusal_suggests_is_accepted(unnamed):
    """The example in the refusal was '0=NAME' whichever side had no names; --class-map is SYNTH=REF, so where the
    reference was the unnamed side the suggestion itself was refused (review 15)."""
    import re

    from mepf.artifacts.errors import MepfError
    from mepf.evaluate.classes import match_classes

    names, index = ["circle", "square", "stripe"], ["0", "1", "2"]
    sides = (index, True, None, names, False) if unnamed == "synthetic" else (names, False, None, index, True)
    with pytest.raises(MepfError) as e:
        match_classes(*sides)
    example = re.search(r"\(e\.g\. '([^']*)'\)", str(e.value)).group(1)
    pairs = {a: b for a, b in (p.split("=") for p in example.split(","))}
    first_synth, first_ref = (sides[0][0], sides[3][0])
    full = ",".join(f"{a}={b}" for a, b in zip(sides[0], sides[3]))
    assert pairs == {first_synth: first_ref} and match_classes(*sides, class_map=full)[2] == "by --class-map"
    with pytest.raises(MepfError, match="all 3 of them \\(1 pair given"):  # that example alone is not enough: said so
        match_classes(*sides, class_map=example)


@pytest.mark.parametrize("unnamed", ["synthetic", "reference"])
def test_folders_named_by_number_pair_with_those_labels_whatever_their_order(unnamed):
    """Class folders "0".."11" are listed as text sorts them ("10" third): against an .npz of labels 0..11 they were
    refused (the order differed from 0..11), though each folder's name is its label."""
    from mepf.evaluate.classes import match_classes

    index = [str(i) for i in range(12)]
    folders = sorted(index)
    assert folders[2] == "10"
    if unnamed == "synthetic":  # synthetic label i is the reference folder named str(i)
        perm = match_classes(index, True, None, folders, False)[0]
        assert [folders[p] for p in perm] == index
    else:  # synthetic folder named n is reference label int(n)
        perm = match_classes(folders, False, None, index, True)[0]
        assert perm.tolist() == [int(n) for n in folders]


def test_a_sampled_folder_maps_back_to_the_release_names(study, tmp_path):
    ok(cli("sample", study / "run", "-n", "30", "--out", tmp_path / "samples"))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        ".mepf-samples", "0_benign", "1_malignant_lesion", "2_normal_tissue"]  # the marker --overwrite needs
    r = ok(cli("evaluate", tmp_path / "samples", "--reference", study / "heldout", "--out", tmp_path / "rep",
               "--metrics", "accuracy", "--classifiers", "logreg", "--quiet"))
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["classes"]["matched"] == "by name" and rep["classes"]["map"]["1_malignant_lesion"] == "malignant lesion"
    assert r.output.splitlines()[-1].startswith("report:")  # after the notes (24 px images among the reference's)
    assert rep["reference_read"]["crop_from"] == "samples" and rep["reference_read"]["converted"]["upsampled"] > 0


# --------------------------------------------------------------------------- 2. a reference like the owner's data

def test_a_held_out_folder_like_the_owners_is_accepted_as_embed_accepts_it(study, tmp_path):
    """Mixed sizes (24-96 px) and modes (L, RGBA, P), and a 64 px folder: converted and resized to the release's
    28x28x1 by stage 1's own transform, as embed did."""
    ok(accuracy(study / "run", study / "heldout", tmp_path / "rep"))
    big = tmp_path / "big"
    for name in CLASSES:
        (big / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(make_images(1, seed=i, size=64, channels=3)[0]).save(big / name / f"{i}.png")
    ok(accuracy(study / "run", big, tmp_path / "rep64"))
    assert json.loads((tmp_path / "rep64" / "report.json").read_text())["n_reference"] == 12


# --------------------------------------------------------------------------- 3, 4. resume

def _copy_run(study, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(study / "run", run)
    return run


def test_resume_applies_changed_options_from_the_resumed_step_and_records_them(study, tmp_path):
    run = _copy_run(study, tmp_path)
    before = (run / "options.json").read_text()
    dry = json.loads(ok(cli("synthesize", "--resume", run, "--steps", "6", "--lr", "0.01", "--dry-run")).output)
    assert dry["steps"] == 6 and dry["lr"] == 0.01 and dry["resume_changes"] == {
        "lr": {"from": 0.001, "to": 0.01}, "steps": {"from": 4, "to": 6}}
    refused(cli("synthesize", "--resume", run, "--steps", "6", "--width", "16", "--dry-run"), "--width",
            "cannot change")
    refused(cli("synthesize", "--resume", run, "--steps", "3", "--dry-run"), "at step 4", "would go back")
    assert (run / "options.json").read_text() == before  # a dry run changes nothing
    r = ok(cli("synthesize", "--resume", run, "--steps", "6", "--lr", "0.01", "--quiet"))
    assert "resumed" in r.output and "step 6" in r.output
    o = json.loads((run / "options.json").read_text())
    assert o["steps"] == 6 and o["lr"] == 0.01
    assert {"step": 4, "option": "lr", "from": 0.001, "to": 0.01} in o["changes"]
    assert {"step": 4, "option": "steps", "from": 4, "to": 6} in o["changes"]
    steps = [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    r = ok(cli("synthesize", "--resume", run, "--quiet"))
    assert "already complete at step 6" in r.output
    refused(cli("synthesize", "--resume", run, "--steps", "3"), "at step 6", "would go back")
    for opt, value in (("--seed", "3"), ("--width", "16"), ("--objective", "plain"), ("--batch-size", "7")):
        refused(cli("synthesize", "--resume", run, "--steps", "8", opt, value), opt, "cannot change")
    assert json.loads((run / "options.json").read_text())["steps"] == 6  # nothing changed by the refusals
    refused(cli("synthesize", "--resume", run, "--out", tmp_path / "x"), "--out and --resume")


def test_a_run_follows_its_release_by_sha256_not_by_path(study, tmp_path):
    run = _copy_run(study, tmp_path)
    moved = tmp_path / "elsewhere" / "moved.h5"
    moved.parent.mkdir()
    shutil.copy(study / "rel.h5", moved)
    o = json.loads((run / "options.json").read_text())
    o["release"] = str(tmp_path / "gone.h5")  # the release has moved since the run started
    (run / "options.json").write_text(json.dumps(o))
    refused(cli("synthesize", "--resume", run, "--steps", "5", "--quiet"), "is not there", "SHA-256")
    ok(cli("synthesize", moved, "--resume", run, "--steps", "5", "--quiet"))
    assert json.loads((run / "options.json").read_text())["release"] == str(moved.resolve())
    np.savez(tmp_path / "x.npz", images=make_images(6))
    ok(cli("embed", "--data", tmp_path / "x.npz", "--out", tmp_path / "other.h5", "--epsilon", "10", "--delta", "1e-3",
           "--release-log", tmp_path / "log.jsonl", "--quiet", *TINY))
    refused(cli("synthesize", tmp_path / "other.h5", "--resume", run, "--steps", "6"), "is not the release")
    # found beside the run, whatever its name
    moved.rename(tmp_path / "renamed.h5")
    ok(cli("synthesize", "--resume", run, "--steps", "6", "--quiet"))
    # evaluate: the embedding distance of a run whose release cannot be found is an error, not an empty row
    (tmp_path / "renamed.h5").rename(tmp_path / "elsewhere" / "hidden.h5")
    refused(cli("evaluate", run, "--reference", study / "heldout", "--out", tmp_path / "rep", "-n", "20",
                "--metrics", "embedding", "--quiet"), "embedding distance cannot be computed", "--release")
    ok(cli("evaluate", run, "--reference", study / "heldout", "--out", tmp_path / "rep", "-n", "20", "--metrics",
           "embedding", "--release", tmp_path / "elsewhere" / "hidden.h5", "--quiet"))
    assert set(json.loads((tmp_path / "rep" / "report.json").read_text())["metrics"]["embedding_distance"]) == {
        "S1", "S2"}
    refused(cli("evaluate", run, "--reference", study / "heldout", "--out", tmp_path / "rep3", "-n", "20",
                "--metrics", "embedding", "--release", tmp_path / "other.h5", "--quiet"), "is not the release")


# --------------------------------------------------------------------------- 5. output folders

def test_output_folders_are_created_and_a_report_is_not_overwritten_silently(study, tmp_path):
    ok(cli("synthesize", study / "rel.h5", "--out", tmp_path / "runs" / "2026" / "a", "--steps", "1", *TRAIN))
    assert (tmp_path / "runs" / "2026" / "a" / "generator.pt").is_file()
    ok(cli("evaluate", study / "run", "--reference", study / "heldout", "--out", tmp_path / "reports" / "2026" / "a",
           "-n", "20", "--metrics", "embedding", "--quiet"))
    refused(cli("evaluate", study / "run", "--reference", study / "heldout", "--out",
                tmp_path / "reports" / "2026" / "a", "-n", "20", "--metrics", "embedding", "--quiet"), "not empty",
            "--overwrite")
    ok(cli("evaluate", study / "run", "--reference", study / "heldout", "--out", tmp_path / "reports" / "2026" / "a",
           "-n", "20", "--metrics", "embedding", "--overwrite", "--quiet"))
    refused(cli("sample", study / "run", "-n", "4", "--out", tmp_path / "x.png"), "an .npz file, or a folder")
    ok(cli("sample", study / "run", "-n", "4", "--out", tmp_path / "samples" / "2026" / "s.npz"))
    assert (tmp_path / "samples" / "2026" / "s.npz").is_file() and not (tmp_path / "x.png").exists()
    # a report replaced with --overwrite keeps nothing of the old one: the run's curves, a dpimagebench state
    rep = tmp_path / "reports" / "2026" / "a"
    assert (rep / "curves.png").is_file()
    (rep / "protocol-state").mkdir()
    (rep / "protocol-state" / "meta.json").write_text("{}")
    ok(cli("evaluate", tmp_path / "samples" / "2026" / "s.npz", "--reference", study / "heldout", "--out", rep,
           "--metrics", "embedding", "--release", study / "rel.h5", "--overwrite", "--quiet"))
    assert sorted(p.name for p in rep.iterdir()) == ["report.json", "report.md", "samples.png"]
    # a folder that held no report keeps what is in it: --overwrite replaces a report, not someone's files
    mine = tmp_path / "mine"
    (mine / "protocol-state").mkdir(parents=True)
    (mine / "protocol-state" / "meta.json").write_text("{}")
    (mine / "curves.png").write_bytes(b"not ours")
    ok(cli("evaluate", tmp_path / "samples" / "2026" / "s.npz", "--reference", study / "heldout", "--out", mine,
           "--metrics", "embedding", "--release", study / "rel.h5", "--overwrite", "--quiet"))
    assert (mine / "curves.png").read_bytes() == b"not ours" and (mine / "protocol-state" / "meta.json").is_file()


# --------------------------------------------------------------------------- 6. progress in logs

def test_without_a_terminal_progress_is_a_few_plain_lines(study, tmp_path):
    p = subprocess.run([sys.executable, "-m", "mepf", "synthesize", str(study / "rel.h5"), "--out", str(tmp_path / "r"),
                        "--steps", "40", *[a for a in TRAIN if a != "--quiet"]], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("synthesize:")]
    assert len(lines) == 1 and "done, 100%, 40/40 step" in lines[0] and "\r" not in p.stderr, p.stderr
    env = {**os.environ, "MEPF_PROGRESS_EVERY": "0"}
    p = subprocess.run([sys.executable, "-m", "mepf", "synthesize", str(study / "rel.h5"), "--out", str(tmp_path / "s"),
                        "--steps", "5", *[a for a in TRAIN if a != "--quiet"]], capture_output=True, text=True,
                       timeout=600, env=env)
    assert len([line for line in p.stderr.splitlines() if line.startswith("synthesize:")]) == 6


# --------------------------------------------------------------------------- 9. signals

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_snapshot_the_step_and_say_how_to_resume(study, tmp_path, sig, code):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "mepf", "synthesize", str(study / "rel.h5"), "--out", str(run),
                          "--steps", "100000", *TRAIN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run / "stats.jsonl").exists() and
                                               len((run / "stats.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert f"continue with: mepf synthesize --resume {run}" in err and "Traceback" not in err, err
    step = int(err.split("interrupted at step ")[1].split()[0])
    assert (run / f"snapshot-{step:07d}.pt").is_file()
    r = ok(cli("synthesize", "--resume", run, "--steps", str(step + 2), "--quiet"))
    assert f"step {step + 2}" in r.output


def test_an_interrupt_before_the_first_step_says_to_resume_the_folder_it_made(study, tmp_path, monkeypatch):
    """Ctrl-C during set-up, after the run folder was made (here injected where fit starts): the same command is
    refused ('not empty'), so the message names --resume, which then trains the run from its start."""
    import mepf.synthesize.train as train

    def ctrl_c():
        raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(train, "keep_freed_memory", ctrl_c)
    r = cli("synthesize", study / "rel.h5", "--out", run, "--steps", "3", *TRAIN)
    assert r.exit_code == 130 and f"continue from its last snapshot (or its start) with: mepf synthesize --resume " \
        f"{run}" in r.stderr, r.stderr
    monkeypatch.undo()
    assert "step 3" in ok(cli("synthesize", "--resume", run, "--quiet")).output
    monkeypatch.setattr(train, "keep_freed_memory", ctrl_c)  # in a resumed run's fit: it said "before training
    r = cli("synthesize", "--resume", run, "--steps", "4", "--quiet")  # began" (under torchrun, mid-step: review 44)
    assert r.exit_code == 130 and "before training began" not in r.stderr, r.stderr
    assert f"continue from its last snapshot (or its start) with: mepf synthesize --resume {run}" in r.stderr


# --------------------------------------------------------------------------- 10, 11, 12. messages, reports, help

def test_info_describes_runs_and_generators_and_messages_say_what_is_wrong(study, tmp_path):
    r = ok(cli("info", study / "run"))
    assert "step 4 of 4 (complete)" in r.output and "3 classes: benign, malignant lesion, normal tissue" in r.output
    g = json.loads(ok(cli("info", study / "run" / "generator.pt", "--json")).output)
    assert g["kind"] == "generator" and "step 4" in g["generator"]
    rel = json.loads(ok(cli("info", study / "rel.h5", "--json")).output)
    assert rel["kind"] == "release" and rel["classes"].startswith("3 classes")
    refused(cli("info", tmp_path), "not a run folder")
    refused(cli("sample", study / "rel.h5", "-n", "4", "--out", tmp_path / "s.npz"), "is a release", "mepf synthesize")
    # mepf's other files where a release is expected are named, not called corrupt HDF5
    refused(cli("synthesize", study / "run", "--out", tmp_path / "new"), "is a run folder", "--resume")
    refused(cli("synthesize", study / "run" / "generator.pt", "--out", tmp_path / "new"), "a zip archive")
    refused(cli("info", study / "run" / "stats.jsonl"), "a JSON text (a release log")
    assert not (tmp_path / "new").exists()
    np.savez(tmp_path / "one.npz", images=make_images(6), labels=np.zeros(6, int))
    refused(cli("evaluate", study / "run", "--reference", tmp_path / "one.npz", "--out", tmp_path / "rep", "-n", "9",
                "--metrics", "accuracy", "--quiet"), "the reference 1 class;")


def test_a_generator_is_hashed_from_the_bytes_it_was_loaded_from(study, tmp_path):
    """The report and DPImageBench's saved state named a generator by hashing its file again after loading it: a
    file replaced in between was named for what was not sampled. The hash is now of the bytes read, once."""
    import shutil

    from mepf.synthesize import load_generator

    shutil.copy(study / "run" / "generator.pt", tmp_path / "g.pt")
    before = (tmp_path / "g.pt").read_bytes()
    g = load_generator(tmp_path / "g.pt")
    (tmp_path / "g.pt").write_bytes(before[:-1] + bytes([before[-1] ^ 1]))
    assert g.sha256 == hashlib.sha256(before).hexdigest() != hashlib.sha256((tmp_path / "g.pt").read_bytes()
                                                                           ).hexdigest()


def test_a_release_replaced_after_it_was_found_by_hash_is_refused(study, tmp_path, monkeypatch):
    """Review 26 F3: evaluate found the run's release by SHA-256 in one read and loaded it in another, never
    comparing: another release swapped in between (the same eps, delta and relation) was measured against, under
    the first one's SHA-256 in the report."""
    import mepf.synthesize.locate as locate

    shutil.copy(study / "rel.h5", tmp_path / "rel.h5")
    ok(cli("embed", "--data", study / "private", "--image-size", "28", "--channels", "1", "--out", tmp_path / "b.h5",
           "--epsilon", "10", "--delta", "1e-3", "--release-log", tmp_path / "log.jsonl", "--quiet", *TINY))
    real = locate.locate_release

    def swapped_after(*args, **kwargs):
        found = real(*args, **kwargs)
        os.replace(tmp_path / "b.h5", found)
        return found

    monkeypatch.setattr(locate, "locate_release", swapped_after)
    refused(cli("evaluate", study / "run", "--reference", study / "heldout", "--out", tmp_path / "rep", "-n", "20",
                "--metrics", "embedding", "--release", tmp_path / "rel.h5", "--quiet"),
            "changed between the search for the release", "run again once nothing writes to it")
    assert not (tmp_path / "rep").exists()


def test_the_report_records_the_generator_and_run_and_labels_the_grid(study, tmp_path):
    ok(cli("evaluate", study / "run", "--reference", study / "heldout", "--out", tmp_path / "rep", "-n", "30",
           "--metrics", "accuracy,embedding", "--classifiers", "logreg", "--seed", "3", "--quiet"))
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    g = rep["generator"]
    assert g["step"] == 4 and g["run_steps"] == 4 and g["seed"] == 0 and g["lr"] == 1e-3
    assert g["sha256"] == hashlib.sha256((study / "run" / "generator.pt").read_bytes()).hexdigest()
    assert rep["reference_given"] == str(study / "heldout") and rep["seed"] == 3
    grid = Image.open(tmp_path / "rep" / "samples.png")
    assert grid.width > grid.height * 10 // 3 * 1.05  # 10 samples a row, 3 rows, and a margin of class names
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "generator: step 4 of the run's 4" in md


def test_help_states_each_default_once():
    s = ok(cli("synthesize", "--help")).output
    width = s.split("--width")[1].split("--objective")[0]
    weights = s.split("--moment-weights")[1].split("--layer-weights")[0]
    layers = s.split("--layer-weights")[1].split("--grid-every")[0]
    assert width.count("default") == 1 and weights.count("default") == 1 and layers.count("default") == 1
    assert '[default: ""]' not in s
    e = ok(cli("embed", "--help")).output
    assert "Records per forward pass" in e and "stretched" in e


# --------------------------------------------------------------------------- 7, 8, 10, 12. the owner's side of the same

def test_the_backup_note_comes_with_the_logs_first_release_even_after_a_run_that_released_nothing(tmp_path):
    """A first embed to a new log that stopped after making the log's key (Ctrl-C, a bad record) released nothing;
    the run that then released said nothing of the key to back up (review 47 L1)."""
    from mepf.embed import release_log

    log = tmp_path / "logs" / "log.jsonl"
    release_log.prepare(log, release_log.read_log(log))  # what the stopped run left: the log and its key, no entry
    assert release_log.key_path(log).is_file() and not release_log.read_log(log)
    np.savez(tmp_path / "d.npz", images=make_images(6))
    r = ok(cli("embed", "--data", tmp_path / "d.npz", "--out", tmp_path / "r.h5", "--epsilon", "10", "--delta", "1e-3",
               "--quiet", "--release-log", log, *TINY))
    assert f"its secret key {log}.key and its head {log}.head; back up all three" in r.stderr

def test_the_first_release_says_where_the_log_and_key_are_and_releases_lists_them(tmp_path):
    home = tmp_path / "xdg"
    np.savez(tmp_path / "d.npz", images=make_images(6))
    env = {"XDG_DATA_HOME": str(home)}
    r = CliRunner(env=env).invoke(main, ["embed", "--data", str(tmp_path / "d.npz"), "--out",
                                         str(tmp_path / "a" / "r.h5"), "--epsilon", "10", "--delta", "1e-3",
                                         "--quiet", *TINY])
    ok(r)
    log = home / "mepf" / "releases.jsonl"
    assert (f"started the release log {log}, its secret key {log}.key and its head {log}.head; back up all three"
            in r.stderr)
    assert (tmp_path / "a" / "r.h5").is_file()  # --out's folder was created
    entry = json.loads(log.read_text())
    assert entry["data"] == str(tmp_path / "d.npz")
    r = CliRunner(env=env).invoke(main, ["embed", "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "b.h5"),
                                         "--epsilon", "10", "--delta", "1e-3", "--quiet", "--allow-repeat", *TINY])
    ok(r)
    assert "started the release log" not in r.stderr
    listed = CliRunner(env=env).invoke(main, ["releases"])
    ok(listed)
    assert str(log) in listed.output and listed.output.count(str(tmp_path / "d.npz")) == 2
    rows = json.loads(ok(CliRunner(env=env).invoke(main, ["releases", "--json"])).output)["releases"]
    assert [r["composed_releases"] for r in rows] == [2, 2] and rows[1]["composed_epsilon"] > rows[1]["epsilon"]


def test_every_unusable_file_is_named_at_once_and_check_lists_them(tmp_path):
    root = messy_folder(tmp_path / "data", per_class=3)
    for name in ("notes.txt", "scan.bmp", "scan.webp"):
        (root / "benign" / name).write_bytes(b"x")
    (root / "benign" / "more").mkdir()  # a folder in a class folder is not read: said as a folder (review 15)
    good = root / "normal tissue" / "patient 0000 scan.jpg"
    good.write_bytes(good.read_bytes()[:200])  # a truncated JPEG
    r = refused(cli("embed", "--data", root, "--image-size", "28", "--channels", "1", "--out", tmp_path / "x.h5",
                    "--epsilon", "1", "--delta", "1e-3", "--release-log", tmp_path / "log.jsonl", "--quiet", *TINY),
                "notes.txt", "scan.bmp", "scan.webp")
    c = cli("embed", "--check", "--data", root, "--quiet")
    assert c.exit_code == 2 and "fix or remove them" in c.stderr
    lines = c.output.splitlines()
    assert {any(n in line for line in lines) for n in ("notes.txt", "scan.bmp", "scan.webp", "0000 scan.jpg")} == {True}
    assert not any(ch.isdigit() for ch in c.stderr.replace("0000", ""))  # names, never a count
    assert any(line.endswith("more: a folder inside a class folder (not read)") for line in lines), lines
    for name in ("notes.txt", "scan.bmp", "scan.webp"):
        (root / "benign" / name).unlink()
    (root / "benign" / "more").rmdir()
    good.unlink()
    c = ok(cli("embed", "--check", "--data", root))
    assert "ready for mepf embed" in c.output and not (tmp_path / "x.h5").exists()
    assert "an image folder also needs --image-size and --channels" in c.output  # or the run stops there
    c = ok(cli("embed", "--check", "--data", root, "--image-size", "28", "--channels", "1"))
    assert "also needs" not in c.output
    assert r.exit_code == 2


def test_a_single_class_folder_is_released_with_a_note(tmp_path):
    root = messy_folder(tmp_path / "data", names=("only",), per_class=4)
    r = ok(cli("embed", "--data", root, "--image-size", "28", "--channels", "1", "--out", tmp_path / "x.h5",
               "--epsilon", "10", "--delta", "1e-3", "--release-log", tmp_path / "log.jsonl", "--quiet", *TINY))
    assert "declares one class (only)" in r.stderr and "directly in the folder" in r.stderr


def test_crop_center_keeps_the_middle_of_non_square_records_and_evaluate_applies_it(tmp_path):
    """A 28x56 record whose left and right quarters are white: stretched, the white shows; cropped, not."""
    root = tmp_path / "wide" / "a"
    root.mkdir(parents=True)
    img = np.zeros((28, 56), np.uint8)
    img[:, :14] = img[:, 42:] = 255
    for i in range(4):
        Image.fromarray(img).save(root / f"{i}.png")
    for crop in ("none", "center"):
        ok(cli("embed", "--data", tmp_path / "wide", "--image-size", "28", "--channels", "1", "--crop", crop,
               "--out", tmp_path / f"{crop}.h5", "--epsilon", "inf", "--delta", "1e-3", "--allow-repeat",
               "--release-log", tmp_path / "log.jsonl", "--quiet", *TINY))
    from mepf.artifacts import load

    stretched, cropped = (load(tmp_path / f"{c}.h5") for c in ("none", "center"))
    assert stretched.arrays["S1"].max() > 0.05 and np.abs(cropped.arrays["S1"]).max() == 0  # pixels only: black
    assert cropped.data_spec["transform"]["crop"].startswith("center") and "crop" not in stretched.data_spec[
        "transform"]
    from mepf.evaluate.data import load_reference

    ref = load_reference(str(tmp_path / "wide"), geometry=(28, 28, 1), crop="center")
    assert ref.images.max() == 0 and load_reference(str(tmp_path / "wide"), geometry=(28, 28, 1)).images.max() > 0


def test_samples_as_files_are_scored_against_the_reference_cropped_as_the_run_is(tmp_path):
    """A --crop center release: evaluating the run cropped the reference, evaluating the very same samples as an .npz
    or PNG folder (even with --release) stretched it, and said nothing (review 50 H1). The samples record the crop,
    the release gives it, and where neither does a stretched reference is a warning."""
    for name, sides in (("a", True), ("b", False)):
        (tmp_path / "wide" / name).mkdir(parents=True)
        for i in range(6):
            img = np.zeros((28, 56), np.uint8)
            img[:, :14] = img[:, 42:] = 255 * sides
            img[:, 14:42] = 0 if sides else 160 + 10 * i
            Image.fromarray(img).save(tmp_path / "wide" / name / f"{i}.png")
    ok(cli("embed", "--data", tmp_path / "wide", "--image-size", "28", "--channels", "1", "--crop", "center",
           "--out", tmp_path / "r.h5", "--epsilon", "inf", "--delta", "1e-3", "--release-log", tmp_path / "log.jsonl",
           "--quiet", *TINY))
    ok(cli("synthesize", tmp_path / "r.h5", "--out", tmp_path / "run", "--steps", "2", *TRAIN))
    ok(cli("sample", tmp_path / "run", "-n", "30", "--out", tmp_path / "s.npz"))
    ok(cli("sample", tmp_path / "run", "-n", "30", "--out", tmp_path / "pngs"))
    with np.load(tmp_path / "s.npz") as d:
        np.savez(tmp_path / "bare.npz", **{k: d[k] for k in d.files if k != "crop"})  # another tool's, say

    def read(synthetic, *extra):
        out = tmp_path / f"rep{len(list(tmp_path.glob('rep*')))}"
        ok(accuracy(synthetic, tmp_path / "wide", out, *extra))
        return json.loads((out / "report.json").read_text())

    run, npz, pngs = read(tmp_path / "run"), read(tmp_path / "s.npz"), read(tmp_path / "pngs")
    given, bare = read(tmp_path / "bare.npz", "--release", tmp_path / "r.h5"), read(tmp_path / "bare.npz")
    for rep, said in ((run, "generator"), (npz, "samples"), (pngs, "samples"), (given, "release")):
        assert rep["reference_read"]["crop"] == "center" and rep["reference_read"]["crop_from"] == said, rep
        assert not any("stretched" in w for w in rep["warnings"]), rep["warnings"]
    assert npz["metrics"] == run["metrics"] == given["metrics"]  # the same images against the same reference
    assert bare["reference_read"]["crop"] is None and bare["reference_read"]["converted"]["other_aspect"] == 12
    assert any("12 of 12 reference images have another aspect ratio" in w and "--release" in w
               for w in bare["warnings"]), bare["warnings"]
    from mepf.evaluate.data import load_synthetic
    from tests.conftest import fails_if_blocked

    (tmp_path / "pngs" / ".mepf-samples").unlink()
    os.mkfifo(tmp_path / "pngs" / ".mepf-samples")  # someone else's folder: read as one that records no crop
    with fails_if_blocked():
        assert load_synthetic(str(tmp_path / "pngs"), 30).crop is None


def test_a_reference_smaller_or_greyer_than_the_samples_is_said(study, tmp_path):
    """A 24 px grey reference for 28 px colour samples was upsampled and repeated to RGB without a word (review 50
    M1): the report says what was done, and warns."""
    rgb = make_images(12, seed=5, size=28, channels=3)
    np.savez(tmp_path / "samples.npz", images=rgb, labels=np.arange(12) % 3)
    np.savez(tmp_path / "ref.npz", images=make_images(9, seed=6, size=24), labels=np.arange(9) % 3)
    r = ok(cli("evaluate", tmp_path / "samples.npz", "--reference", tmp_path / "ref.npz", "--out", tmp_path / "rep",
               "--metrics", "accuracy", "--classifiers", "logreg", "--quiet"))
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["reference_read"]["converted"] == {"records": 9, "other_aspect": 0, "upsampled": 9,
                                                  "other_channels": 9}, rep
    assert any("9 of 9 reference images are smaller than 28 x 28" in w for w in rep["warnings"]), rep["warnings"]
    assert any("9 of 9 reference images are grey" in w for w in rep["warnings"]), rep["warnings"]
    assert r.exit_code == 0


def test_an_npz_without_names_is_paired_by_index_only_with_a_map_or_index_names(study, tmp_path):
    """An .npz reference has labels but no names: pairing them with "benign"... by position could be silently
    wrong, so it needs --class-map; samples written by `mepf sample --out x.npz` carry their names."""
    x = make_images(9)
    np.savez(tmp_path / "ref.npz", images=x, labels=np.arange(9) % 3)
    refused(accuracy(study / "run", tmp_path / "ref.npz", tmp_path / "rep"), "no class names", "--class-map")
    ok(accuracy(study / "run", tmp_path / "ref.npz", tmp_path / "rep", "--class-map",
                "benign=0,malignant lesion=1,normal tissue=2"))
    ok(cli("sample", study / "run", "-n", "30", "--out", tmp_path / "s.npz"))
    with np.load(tmp_path / "s.npz") as d:
        assert list(d["class_names"]) == list(CLASSES)
    ok(cli("evaluate", tmp_path / "s.npz", "--reference", study / "heldout", "--out", tmp_path / "rep2", "--metrics",
           "accuracy", "--classifiers", "logreg", "--quiet"))
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["classes"]["matched"] == "by name"


def test_sampling_a_run_without_a_generator_says_resume_and_unlabelled_samples_carry_no_labels(study, tmp_path):
    """A walkthrough: `mepf sample` of a run stopped after its last generator.pt said nothing (evaluate says so);
    of a run stopped before its first generator.pt it said to start a new run (which the folder then refused); and
    an unlabelled generator's .npz held labels, all 0, which evaluate read as one labelled class and refused
    beside a 10-class reference."""
    run = _copy_run(study, tmp_path)
    quiet = ok(cli("sample", run, "-n", "4", "--out", tmp_path / "now.npz"))
    assert "older generator" not in quiet.stderr
    shutil.copy(run / "snapshot-0000004.pt", run / "snapshot-0000006.pt")  # named past it, of step 4: refused
    assert "older generator" not in ok(cli("sample", run, "-n", "4", "--out", tmp_path / "named.npz")).stderr
    info = ok(cli("info", run)).output  # it advised "--resume", which then refused the snapshot (review 43 F6)
    assert "resume refuses its latest snapshot" in info and "not of the step its name gives" in info, info
    import torch

    state = torch.load(run / "snapshot-0000004.pt", weights_only=True)
    state["step"] = 6
    torch.save(state, run / "snapshot-0000006.pt")
    options = json.loads((run / "options.json").read_text())
    (run / "options.json").write_text(json.dumps({**options, "steps": 8}))  # stopped after a snapshot past it
    behind = ok(cli("sample", run, "-n", "4", "--out", tmp_path / "old.npz"))  # said, as evaluate says it
    assert "snapshots past its generator.pt (step 6 > 4)" in behind.stderr and "--resume" in behind.stderr
    assert "step 6 of 8; continue with: mepf synthesize --resume" in ok(cli("info", run)).output
    (run / "generator.pt").unlink()
    refused(cli("sample", run, "-n", "4", "--out", tmp_path / "s.npz"), "has no generator.pt yet",
            f"mepf synthesize --resume {run}")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, img in enumerate(make_images(12, seed=4)):
        Image.fromarray(img[:, :, 0]).save(flat / f"{i:03d}.png")
    ok(cli("embed", "--data", flat, "--image-size", "28", "--channels", "1", "--out", tmp_path / "flat.h5",
           "--epsilon", "10", "--delta", "1e-3", "--release-log", tmp_path / "log.jsonl", "--quiet", *TINY))
    ok(cli("synthesize", tmp_path / "flat.h5", "--out", tmp_path / "frun", "--steps", "2", *TRAIN))
    ok(cli("sample", tmp_path / "frun", "-n", "6", "--out", tmp_path / "f.npz"))
    mixed = tmp_path / "mixed"  # another release's generator.pt copied into a run: credited to the run before
    shutil.copytree(study / "run", mixed)
    shutil.copy(tmp_path / "frun" / "generator.pt", mixed / "generator.pt")
    refused(cli("evaluate", mixed, "--reference", study / "heldout", "--out", tmp_path / "mixrep", "-n", "6",
                "--metrics", "embedding", "--quiet"), "was not trained by this run")
    assert "NOT this run's: trained from another release" in ok(cli("info", mixed)).output
    with np.load(tmp_path / "f.npz") as f:
        assert sorted(f.files) == ["crop", "images"]  # no labels; the release's crop (review 50 H1)
    np.savez(tmp_path / "ref.npz", images=make_images(10, seed=5), labels=np.arange(10))
    refused(cli("evaluate", tmp_path / "f.npz", "--reference", tmp_path / "ref.npz", "--out", tmp_path / "rep",
                "--metrics", "accuracy,embedding", "--release", tmp_path / "flat.h5", "--quiet"),
            "accuracy needs labels, and the synthetic set has none")  # was: "1 class, the reference 10 classes"
    ok(cli("sample", tmp_path / "frun", "-n", "6", "--out", tmp_path / "F.NPZ"))  # written as .npz: read as one
    for name in ("f.npz", "F.NPZ"):
        ok(cli("evaluate", tmp_path / name, "--reference", tmp_path / "ref.npz", "--out", tmp_path / f"rep-{name}",
               "--metrics", "embedding", "--release", tmp_path / "flat.h5", "--quiet"))
        assert "embedding_distance" in json.loads((tmp_path / f"rep-{name}" / "report.json").read_text())["metrics"]


# ------------------------------------------------------------------ 13. the machine's storage, one trainer a run

def _file_size_capped(limit: int):
    """For a child process: files written past `limit` bytes fail with EFBIG, as a full disk fails with ENOSPC (a
    real failed write; SIGXFSZ ignored so that the write returns the error rather than killing the process)."""
    import resource

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return cap


def test_a_full_disk_while_training_is_one_line_naming_the_resume_command_quoted(study, tmp_path):
    """A snapshot that could not be written ended in three tracebacks (torch's writer hides the OSError), and the
    resume command printed for a run path with spaces failed when pasted (review 47 H1, M1). Now one line, the
    command quoted for the shell, and that very command continues the run."""
    import shlex

    run = tmp_path / "my runs" / "r 1"
    p = subprocess.run([sys.executable, "-m", "mepf", "synthesize", str(study / "rel.h5"), "--out", str(run), "--steps",
                        "4", *TRAIN], capture_output=True, text=True, timeout=600,
                       preexec_fn=_file_size_capped(200_000))  # the release's private copy fits, a snapshot does not
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    line = [x for x in p.stderr.splitlines() if x.startswith("Error: ")]
    assert len(line) == 1 and "File too large" in line[0] and "snapshot-0000002.pt" in line[0], p.stderr
    said = line[0].split("with: ")[-1]
    assert said == f"mepf synthesize --resume {shlex.quote(str(run))}"
    assert not list(run.glob("snapshot-*.pt")) and not list(run.glob(".*tmp*"))  # nothing half-written
    ok(cli(*shlex.split(said)[1:], "--quiet"))  # pasted as printed
    assert (run / "generator.pt").is_file() and "step 4 of 4 (complete)" in ok(cli("info", run)).output


def test_evaluate_on_a_full_disk_leaves_no_report_behind(study, tmp_path):
    """samples.png was written before the write that failed, and the folder it left refused the same command run
    again ("not empty", review 47 H1): a failed report removes what it wrote, so the command runs again."""
    run = tmp_path / "run"  # 150 steps logged: curves.png larger than the release read and samples.png
    ok(cli("synthesize", study / "rel.h5", "--out", run, "--steps", "150", *TRAIN, "--snapshot-every", "0"))
    args = ["-m", "mepf", "evaluate", str(run), "--reference", str(study / "heldout"), "-n", "6",
            "--metrics", "accuracy", "--classifiers", "logreg", "--quiet", "--out"]
    ok(cli(*args[2:], tmp_path / "whole"))
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "whole").iterdir()}
    cap = (sizes["curves.png"] + (study / "rel.h5").stat().st_size) // 2  # the release's private copy fits under it
    assert max(sizes["samples.png"], (study / "rel.h5").stat().st_size) < cap < sizes["curves.png"], sizes
    p = subprocess.run([sys.executable, *args, str(tmp_path / "rep")], capture_output=True, text=True, timeout=600,
                       preexec_fn=_file_size_capped(cap))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "File too large" in p.stderr, p.stderr
    assert not (tmp_path / "rep").exists()
    ok(cli(*args[2:], tmp_path / "rep"))
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(sizes)
    # --overwrite of a report with another one that fails: the old report stays whole (it mixed the new samples.png
    # with the old report.json and had removed the old curves.png, review 48 M3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    again = [a if a != "6" else "9" for a in args]  # other samples: another samples.png
    p = subprocess.run([sys.executable, *again, str(tmp_path / "rep"), "--overwrite"], capture_output=True, text=True,
                       timeout=600, preexec_fn=_file_size_capped(cap))
    assert p.returncode == 2 and "File too large" in p.stderr, p.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()} == before


def test_a_run_folder_is_trained_by_one_process_at_a_time(study, tmp_path):
    """Two resumes of one folder (a requeued job while the first still runs) both trained it, interleaving its log and
    stats and recording changes it never had (review 47 M2): the folder is held (flock on the folder itself) while
    a process trains it; another start or resume is refused in one line that names the command for afterwards."""
    from mepf.synthesize import run_folder

    run = tmp_path / "run"
    ok(cli("synthesize", study / "rel.h5", "--out", run, "--steps", "2", *TRAIN))
    options = (run / "options.json").read_text()
    held = run_folder.hold(run)  # another process's hold, as far as flock is concerned: its own open of the folder
    try:
        refused(cli("synthesize", "--resume", run, "--steps", "4", "--quiet"), "is being trained by another process",
                f"mepf synthesize --resume {run}")
        assert (run / "options.json").read_text() == options and not (run / "snapshot-0000004.pt").exists()
    finally:
        run_folder.release(held)
    ok(cli("synthesize", "--resume", run, "--steps", "4", "--quiet"))
    refused(cli("synthesize", study / "rel.h5", "--out", run, "--steps", "2", *TRAIN), f"run folder {run} is not empty",
            f"continue it with: mepf synthesize --resume {run}")
    assert (run / "options.json").read_text() != options  # the resume's changes, not a new run's options
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    held = run_folder.hold(fresh)
    try:  # two starts on one empty --out
        refused(cli("synthesize", study / "rel.h5", "--out", fresh, "--steps", "2", *TRAIN), "another process")
        assert not any(fresh.iterdir())
    finally:
        run_folder.release(held)


def test_a_second_sigterm_while_the_first_unwinds_is_not_a_second_interrupt(monkeypatch):
    """timeout and batch schedulers signal the process and its group: the second SIGTERM raised KeyboardInterrupt
    again while embed unwound from the first (a traceback, and at times exit 130 for SIGTERM; review 47 L2)."""
    from mepf import cli as cli_module

    monkeypatch.setattr(cli_module, "_TERMINATED", False)
    with pytest.raises(KeyboardInterrupt):
        cli_module._on_sigterm(signal.SIGTERM, None)
    assert cli_module._TERMINATED and cli_module._on_sigterm(signal.SIGTERM, None) is None


def test_the_owners_and_auditors_small_frictions(study, tmp_path):
    """Review 47 L3, L6, L7: embed --out x.npz wrote a release that info called images; the help left 0 of
    --snapshot-every and evaluate's --quiet unsaid; evaluate given a release said only what it expected; a folder
    given --image-size alone was told to pass both; a file not in the log given to audit stopped as a usage error,
    where for an auditor it is a finding."""
    np.savez(tmp_path / "d.npz", images=make_images(6))
    refused(cli("embed", "--data", tmp_path / "d.npz", "--out", tmp_path / "x.npz", "--epsilon", "10", "--delta",
                "1e-3", "--quiet", *TINY), "a release is an HDF5 file", f"{tmp_path / 'x.h5'}")
    assert not (tmp_path / "x.npz").exists()
    assert "0: end only" in ok(cli("synthesize", "--help")).output
    assert "--quiet No progress bars." in " ".join(ok(cli("evaluate", "--help")).output.split())
    refused(cli("evaluate", study / "rel.h5", "--reference", study / "heldout", "--out", tmp_path / "r"),
            "is a release", "mepf synthesize")
    refused(cli("embed", "--data", study / "private", "--image-size", "28", "--out", tmp_path / "y.h5", "--epsilon",
                "10", "--delta", "1e-3", "--quiet", *TINY), "pass --channels (1 or 3) too")
    other = tmp_path / "other.jsonl"
    ok(cli("embed", "--data", tmp_path / "d.npz", "--out", tmp_path / "z.h5", "--epsilon", "10", "--delta", "1e-3",
           "--release-log", other, "--quiet", *TINY))
    a = cli("audit", study / "rel.h5", "--release-log", other)
    assert a.exit_code == 1 and "[FAIL] release-log: its SHA-256 is NOT in the release log" in a.output, a.output
    a = cli("audit", study / "rel.h5", "--release-log", study / "log.jsonl")
    assert a.exit_code == 0 and "[ok] release-log: its SHA-256 is in the release log" in a.output, a.output


def test_a_printed_command_names_the_very_folder_when_pasted_and_is_inert_on_screen():
    """Commands mepf prints for pasting (--resume RUN, ...): a run folder with spaces failed pasted (review 47 M1);
    one with control characters or bytes that are not UTF-8 was shown with '?' for them, naming another folder
    (review 48 L1). Each name pasted into bash gives back its very bytes, and the word holds nothing a terminal
    acts on."""
    from mepf.artifacts.format import printable
    from mepf.synthesize.run_folder import resume_command, shell_word

    for name in ("plain", "my runs/r 1", "it's", "a\x1b[31mred\x1b[0m", "tab\there", "new\nline", "ü ß",
                 os.fsdecode(b"not utf-8 \xff\xfe"), "-dash", "back\\slash'q"):
        word = shell_word(name)
        pasted = subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, check=True).stdout
        assert pasted == os.fsencode(name) and printable(word, 1000) == word, (name, word)
    assert resume_command("my runs/r 1") == "mepf synthesize --resume 'my runs/r 1'"
