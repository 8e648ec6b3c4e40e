"""A run folder from someone else (a tar, a git checkout) that a researcher resumes: its links, options and
snapshots must not make mepf write outside it, run away, or stop with a traceback (review 9)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from mepf.synthesize import run_folder
from tests.conftest import make_images
from tests.test_hostile_files import TINY, cli, one_line_refusal


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-step run (a snapshot at each step) of a tiny release; tests copy it."""
    d = tmp_path_factory.mktemp("run")
    np.savez(d / "d.npz", images=make_images(40, seed=3), labels=np.arange(40) % 10)
    r = cli("embed", "--data", d / "d.npz", "--classes", "10", "--out", d / "r.h5", "--epsilon", "1", "--delta",
            "1e-5", "--force", "--release-log", d / "log.jsonl", "--quiet", *TINY)
    assert r.exit_code == 0, r.output + r.stderr
    r = cli("synthesize", d / "r.h5", "--out", d / "run", "--steps", "2", "--width", "8", "--grid-every", "0",
            "--snapshot-every", "1", "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output + r.stderr
    return d


@pytest.fixture
def copied(base_run, tmp_path):
    shutil.copy(base_run / "r.h5", tmp_path / "r.h5")
    shutil.copytree(base_run / "run", tmp_path / "run")
    return tmp_path / "run"


def resume(run, steps=3):
    return cli("synthesize", "--resume", run, "--steps", steps, "--quiet")


def test_links_in_a_run_folder_are_not_written_through(copied, tmp_path):
    """log.txt linked to a file outside (a shell's start-up file) was appended to, and a dangling stats.jsonl
    link created its target; both are refused, nothing outside changes."""
    victim, dangling = tmp_path / "bashrc", tmp_path / "created.pth"
    victim.write_text("precious\n")
    (copied / "log.txt").unlink()
    (copied / "log.txt").symlink_to(victim)
    one_line_refusal(resume(copied), "log.txt", "a link")
    assert victim.read_text() == "precious\n"
    (copied / "log.txt").unlink()
    (copied / "stats.jsonl").unlink()
    (copied / "stats.jsonl").symlink_to(dangling)
    one_line_refusal(resume(copied), "stats.jsonl", "a link")
    assert not dangling.exists()
    (copied / "stats.jsonl").unlink()
    (copied / "log.txt").unlink()  # created, in the folder, before stats.jsonl was refused
    os.link(victim, copied / "log.txt")  # a second name of a file outside
    one_line_refusal(resume(copied), "log.txt", "one name")
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("field,value,named", [
    ("log_every", 0, "log_every 0"), ("lr", "x", "lr 'x'"), ("lr", -1, "lr -1"), ("ema", "x", "ema 'x'"),
    ("seed", 1.5, "seed 1.5"), ("batch_size", 10 ** 8, "batch_size 100000000"), ("width", 2_000_000, "width"),
    ("steps", "~", "steps '~'"), ("release", 5, "release 5"), ("release_sha256", 5, "release_sha256"),
    ("moment_weights", 5, "moment_weights 5"), ("snapshot_every", "a", "snapshot_every 'a'"),
    ("generator", ["conv"], "generator"),
])
def test_options_read_back_are_checked_for_type_and_range(copied, field, value, named):
    """options.json's values went untyped into training: tracebacks, a 40 GB allocation from batch_size."""
    opts = json.loads((copied / "options.json").read_text())
    opts[field] = value
    (copied / "options.json").write_text(json.dumps(opts))
    one_line_refusal(cli("synthesize", "--resume", copied, "--quiet"), "options.json holds", named)


@pytest.mark.parametrize("step", ["\necho PWNED # ", -10 ** 9, 1, 2.0])
def test_a_snapshot_must_be_of_the_step_its_name_gives(copied, step):
    """A string step was written raw into log.txt; a step of -10^9 trained for 10^9 steps."""
    snap = copied / "snapshot-0000002.pt"
    state = torch.load(snap, weights_only=True)
    state["step"] = step
    torch.save(state, snap)
    before = (copied / "log.txt").read_text()
    one_line_refusal(resume(copied), "snapshot-0000002.pt", "not of the step its name gives")
    assert (copied / "log.txt").read_text() == before


@pytest.mark.parametrize("group,key,value", [("opt_g", "betas", (0.5, "x")), ("opt_g", "lr", float("nan")),
                                             ("opt_m", "foreach", "yes"), ("opt_g", "params", None)])
def test_a_snapshots_optimiser_settings_must_be_this_runs_kind(copied, group, key, value):
    """betas (0.5, 'x') loaded, then the first step stopped with a traceback."""
    snap = copied / "snapshot-0000002.pt"
    state = torch.load(snap, weights_only=True)
    if value is None:
        del state[group]["param_groups"][0][key]
    else:
        state[group]["param_groups"][0][key] = value
    torch.save(state, snap)
    one_line_refusal(resume(copied), "snapshot-0000002.pt", "optimiser settings", group)


@pytest.mark.parametrize("change", ["exp_avg shape", "exp_avg_sq negative", "exp_avg nan", "mavg shape", "beta1 1",
                                    "beta2 2", "eps 0", "no exp_avg_sq", "no exp_avg"])
def test_a_snapshots_optimiser_state_and_moving_averages_must_fit(copied, change):
    """An exp_avg of another shape stopped the first step with a traceback; a negative exp_avg_sq resumed and
    wrote a generator of NaN weights; a moving average of another shape was broadcast silently (review 10)."""
    snap = copied / "snapshot-0000002.pt"
    state = torch.load(snap, weights_only=True)
    entry = state["opt_g"]["state"][0]
    if change == "exp_avg shape":
        entry["exp_avg"] = entry["exp_avg"].flatten()[:3].clone()
    elif change == "exp_avg_sq negative":
        entry["exp_avg_sq"] = -entry["exp_avg_sq"] - 1
    elif change == "exp_avg nan":
        entry["exp_avg"] = entry["exp_avg"] * float("nan")
    elif change.startswith("beta"):
        b = list(state["opt_g"]["param_groups"][0]["betas"])
        b[int(change[4]) - 1] = float(change[-1])
        state["opt_g"]["param_groups"][0]["betas"] = tuple(b)
    elif change == "eps 0":
        state["opt_g"]["param_groups"][0]["eps"] = 0.0
    elif change.startswith("no "):
        del entry[change[3:]]
    else:
        m = next(iter(state["mavg"]))
        state["mavg"][m] = state["mavg"][m][:1].clone()
    torch.save(state, snap)
    one_line_refusal(resume(copied), "snapshot-0000002.pt", "optimiser settings or state")


def test_a_snapshot_from_another_torch_version_resumes(copied):
    """Adam's settings gain keys across torch versions (decoupled_weight_decay); a snapshot without one, or with
    a flag this torch lacks, is torch's to fill in, not a damaged snapshot (review 10)."""
    snap = copied / "snapshot-0000002.pt"
    state = torch.load(snap, weights_only=True)
    for group in state["opt_g"]["param_groups"]:
        group.pop("decoupled_weight_decay", None)
        group["a_flag_of_a_later_torch"] = False
    torch.save(state, snap)
    r = resume(copied)
    assert r.exit_code == 0, r.output + r.stderr


def test_an_untouched_copy_resumes(copied):
    r = resume(copied)
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads((copied / "stats.jsonl").read_text().splitlines()[-1])["step"] == 3


def evaluate(run, reference, out):
    return cli("evaluate", run, "--reference", reference, "--metrics", "embedding", "--out", out, "-n", "20",
               "--quiet", "--release-log", out.parent / "none.jsonl")


def test_a_generator_claiming_another_guarantee_than_its_release_is_refused(copied, base_run, tmp_path):
    """evaluate found the release by SHA-256 (for the embedding distance) yet reported the generator's own,
    edited claim of (0.01, 1e-12)-DP."""
    g = torch.load(copied / "generator.pt", weights_only=True)
    g["epsilon"], g["delta"] = 0.01, 1e-12
    torch.save(g, copied / "generator.pt")
    one_line_refusal(evaluate(copied, base_run / "d.npz", tmp_path / "rep"), "claims (0.01, 1e-12)-DP",
                     "(1, 1e-05)-DP", "altered")
    assert not (tmp_path / "rep").exists()


def test_strings_from_a_run_folder_reach_the_report_inert(copied, base_run, tmp_path):
    """Options and stats records from elsewhere: escapes and Markdown/HTML went into report.md raw (a forged
    FID row, a remote image), and a record without a distance stopped the curves with a traceback."""
    opts = json.loads((copied / "options.json").read_text())
    opts["lr"] = "0.001\x1b]0;owned\x07\n| FID (10000 samples) | 3.14 |\n<img src=https://attacker.example/t.png>"
    (copied / "options.json").write_text(json.dumps(opts))
    with open(copied / "stats.jsonl", "a") as f:
        f.write(json.dumps({"step": 2}) + "\n")  # no dist_ values
    r = evaluate(copied, base_run / "d.npz", tmp_path / "rep")
    assert r.exit_code == 0, r.output + r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "\x1b" not in md and "<img" not in md and "| FID" not in md and "3.14" not in md
    assert (tmp_path / "rep" / "curves.png").exists()


def test_markdown_escaping_leaves_nothing_active():
    from mepf.evaluate.report import _md

    text = _md("a|b <img src=x> [l](http://x) `c` *d* \x1b[2J\nnext & ~~s~~")
    assert "\x1b" not in text and "\n" not in text and "<" not in text and ">" not in text
    assert all(text[i - 1] == "\\" for i, c in enumerate(text) if c in "|[]()`*~")


def test_a_generator_with_a_transform_mepf_never_writes_is_refused(copied, base_run, tmp_path):
    g = torch.load(copied / "generator.pt", weights_only=True)
    g["transform"] = [1]
    torch.save(g, copied / "generator.pt")
    one_line_refusal(evaluate(copied, base_run / "d.npz", tmp_path / "rep"), "transform")


def test_dpimagebench_refuses_a_generator_of_other_images_before_sampling(copied, tmp_path, monkeypatch):
    """A 32 x 32 x 3 generator under --protocol dpimagebench was refused only after its 60,000 samples were drawn
    (minutes on a CPU; review 14): its declared size is checked first."""
    from mepf.artifacts.errors import MepfError
    from mepf.evaluate import dpimagebench
    from mepf.synthesize.generators import build_generator

    base = torch.load(copied / "generator.pt", weights_only=True)
    arch = {**base["arch"], "image_size": 32, "channels": 3}
    state = {k: v.detach().clone() for k, v in build_generator(arch).state_dict().items()}
    torch.save({**base, "arch": arch, "state_dict": state}, tmp_path / "rgb.pt")

    def never(*a, **kw):
        raise AssertionError("sampled before the geometry was checked")

    monkeypatch.setattr(dpimagebench, "load_synthetic", never)
    with pytest.raises(MepfError, match="recipe for grey 28 x 28 images .* these are 32 x 32 x 3"):
        dpimagebench.evaluate_dpimagebench(str(tmp_path / "rgb.pt"), "fashion-mnist:test", tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


def test_a_small_generator_declaring_large_images_samples_in_bounded_batches(copied, tmp_path):
    """A 56 KB generator.pt declaring 1024 x 1024 x 3 images asked, at the default batch of 500, for one 8 GB
    tensor (a traceback under a memory limit); batches are now capped at 256 MB of images, and what does not fit
    is one line."""
    import resource
    import subprocess
    import sys

    from mepf.synthesize.generators import build_generator

    base = torch.load(copied / "generator.pt", weights_only=True)
    arch = {"name": "resnet", "image_size": 1024, "channels": 3, "num_classes": 1, "z_dim": 100, "width": 2}
    state = {k: v.detach().clone() for k, v in build_generator(arch).state_dict().items()}
    torch.save({**base, "arch": arch, "state_dict": state, "class_names": ["all"], "labelled": False,
                "label_prior": [1.0]}, tmp_path / "big.pt")
    assert (tmp_path / "big.pt").stat().st_size < 1 << 20

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (10 << 30, 10 << 30))

    def sample(n):
        return subprocess.run([sys.executable, "-m", "mepf", "sample", tmp_path / "big.pt", "-n", str(n), "--out",
                               tmp_path / f"s{n}.npz", "--device", "cpu"], capture_output=True, text=True,
                              timeout=600, preexec_fn=limit)

    r = sample(30)  # 2 batches of 21 (not one of 500 images at 12 MB each as float32)
    assert r.returncode == 0, r.stderr
    r = sample(10 ** 4)  # 31 GB of uint8 images: more than the limit
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "do not fit in this machine's memory" in r.stderr


def test_a_large_stats_file_is_read_a_line_at_a_time(copied, monkeypatch):
    """stats.jsonl (up to 512 MB from someone else) was parsed whole: every record a dict, about 30 x the file in
    memory. evaluate keeps a record's step and distances only, resume's trim its kept lines only; a file over the
    limit is refused, and the curves are those the records give."""
    import tracemalloc

    from mepf.artifacts.errors import MepfError
    from mepf.evaluate.data import run_stats
    from mepf.synthesize import run_folder

    with open(copied / "stats.jsonl", "w") as f:
        for step in range(1, 3001):
            f.write(json.dumps({"step": step, "dist_S1": step / 7, "loss": 1.0, "pad": list(range(300))}) + "\n")
    size = (copied / "stats.jsonl").stat().st_size
    tracemalloc.start()
    curves = run_stats(copied)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert curves == [{"step": s, "dist_S1": s / 7} for s in range(1, 3001)]
    assert peak < size, (peak, size)  # whole, the records alone took over 10 x the file
    monkeypatch.setattr(run_folder, "MAX_STATS_BYTES", size - 1)
    with pytest.raises(MepfError, match=r"more than the .* bytes mepf reads here\); the run folder is damaged"):
        list(run_folder.iter_stats(copied))
    assert run_stats(copied) == []  # the report then shows no curve
    monkeypatch.undo()
    stats = copied / "stats.jsonl"
    stats.write_text(json.dumps({"step": 1, "pad": "x" * (2 << 20)}) + "\n")  # one line: parsed whole, 26 x its size
    with pytest.raises(MepfError, match="line 1 is longer than any stats record"):
        list(run_folder.iter_stats(copied))
    stats.unlink()
    stats.symlink_to("/proc/self/mem")  # a plain file to stat, whose read fails: a traceback (review 14)
    with pytest.raises(MepfError, match=r"cannot be read \((OSError|it)"):
        list(run_folder.iter_stats(copied))
    stats.unlink()
    with open(stats, "w") as f:
        for step in range(1, 3001):
            f.write(json.dumps({"step": step, "dist_S1": step / 7, "loss": 1.0, "pad": list(range(300))}) + "\n")
    r = resume(copied, steps=4)  # trims records past the last snapshot (step 2), then logs the last step
    assert r.exit_code == 0, r.output + r.stderr
    assert [json.loads(line)["step"] for line in (copied / "stats.jsonl").read_text().splitlines()] == [1, 2, 4]


def test_a_sparse_generator_larger_than_memory_allows_is_refused_unread(copied, tmp_path):
    """A generator.pt of a few KB on disk can claim any size (a sparse file): it was read whole before any check,
    so a file of more than this machine's memory ended in an out-of-memory kill. Files over a quarter of the
    memory (loading takes about three times the file) are refused before a byte is read."""
    from mepf.artifacts.plain_file import memory_bytes

    memory = memory_bytes()
    assert memory and memory > 1 << 28
    with open(copied / "generator.pt", "r+b") as f:
        f.truncate(memory // 4 + 1)  # the real file, then a hole
    assert os.stat(copied / "generator.pt").st_blocks * 512 < 1 << 24  # sparse: nothing of it is on disk
    one_line_refusal(cli("sample", copied, "-n", "4", "--out", tmp_path / "s"), "more than a quarter of this "
                     "machine's memory")
    one_line_refusal(evaluate(copied, tmp_path / "x.npz", tmp_path / "rep"), "more than a quarter")
    assert not (tmp_path / "s").exists()


def _other_run(base_run, tmp_path, release, *extra):
    r = cli("synthesize", release, "--out", tmp_path / "other", "--steps", "3", "--width", "8", "--grid-every", "0",
            "--snapshot-every", "1", "--device", "cpu", "--quiet", *extra)
    assert r.exit_code == 0, r.output + r.stderr
    return tmp_path / "other"


def test_a_snapshot_of_another_run_is_not_resumed(copied, base_run, tmp_path):
    """Snapshots said nothing of their run: one from a non-private baseline of other data, copied into a run of an
    eps = 1 release, was resumed and its generator.pt credited with (1, 1e-5)-DP (review 39 F1); one of another
    seed of the same release mixed two runs. Each is refused, by its release or run id, and any past the run's
    --steps."""
    np.savez(tmp_path / "o.npz", images=make_images(40, seed=9), labels=np.arange(40) % 10)
    r = cli("embed", "--data", tmp_path / "o.npz", "--classes", "10", "--out", tmp_path / "base.h5", "--epsilon",
            "inf", "--delta", "1e-5", "--release-log", tmp_path / "log.jsonl", "--quiet", *TINY)
    assert r.exit_code == 0, r.output + r.stderr
    baseline = _other_run(base_run, tmp_path, tmp_path / "base.h5")
    before = (copied / "generator.pt").read_bytes()
    shutil.copy(baseline / "snapshot-0000003.pt", copied / "snapshot-0000003.pt")
    one_line_refusal(resume(copied, steps=4), "snapshot-0000003.pt", "not of this run", "another release")
    info = cli("info", copied).output  # info and sample counted it: "step 3 of 2; continue with --resume" (R43 F6)
    assert "resume refuses its latest snapshot" in info and "another release" in info and "step 3" not in info, info
    r = cli("sample", copied, "-n", "4", "--out", tmp_path / "s.npz")
    assert r.exit_code == 0 and "snapshots past" not in r.stderr, r.stderr
    assert (copied / "generator.pt").read_bytes() == before
    shutil.rmtree(baseline)
    sibling = _other_run(base_run, tmp_path, copied.parent / "r.h5", "--seed", "5")
    shutil.copy(sibling / "snapshot-0000003.pt", copied / "snapshot-0000003.pt")
    one_line_refusal(resume(copied, steps=4), "not of this run", "run id")
    ours = torch.load(copied / "snapshot-0000002.pt", weights_only=True)
    ours["step"] = 3
    torch.save(ours, copied / "snapshot-0000003.pt")  # this run's, but past the steps options.json records
    one_line_refusal(resume(copied, steps=4), "not of this run", "past the run's --steps 2")
    (copied / "snapshot-0000003.pt").unlink()
    for name in ("grid-0000001.png", "grid-0000009.png"):  # a grid past the snapshot stayed (review 44 L1)
        (copied / name).write_bytes(b"drawn")
    assert resume(copied, steps=4).exit_code == 0
    assert (copied / "grid-0000001.png").read_bytes() == b"drawn" and not (copied / "grid-0000009.png").exists()
    g = torch.load(copied / "generator.pt", weights_only=True)
    assert g["step"] == 4 and g["run_id"] == json.loads((copied / "options.json").read_text())["run_id"]
    ours = torch.load(copied / "generator.pt", weights_only=True)
    shutil.copy(sibling / "generator.pt", copied / "generator.pt")  # the same release, another run
    r = cli("sample", copied, "-n", "4", "--out", tmp_path / "other.npz")  # sampled without a word (review 44 M2)
    assert r.exit_code == 0 and "generator.pt is NOT this run's (it is another run's, by its run id)" in r.stderr
    one_line_refusal(evaluate(copied, base_run / "d.npz", tmp_path / "rep"), "not trained by this run", "run id")
    assert "NOT this run's" in cli("info", copied).output
    g = torch.load(sibling / "generator.pt", weights_only=True)
    del g["run_id"]  # as every mepf before run ids wrote it (review 40 R3)
    torch.save(g, copied / "generator.pt")
    one_line_refusal(evaluate(copied, base_run / "d.npz", tmp_path / "rep"), "not trained by this run", "run id")
    assert "NOT this run's" in cli("info", copied).output
    r = resume(copied, steps=4)  # at the last step with another run's generator.pt: written again (review 40 R4)
    assert r.exit_code == 0 and "already complete" not in r.output, r.output
    mine = torch.load(copied / "generator.pt", weights_only=True)
    assert mine["run_id"] == json.loads((copied / "options.json").read_text())["run_id"] and mine["step"] == 4
    assert all(torch.equal(mine["state_dict"][k], ours["state_dict"][k]) for k in ours["state_dict"])
    assert "(complete)" in cli("info", copied).output


def test_a_run_from_before_run_ids_owns_no_generator_with_one(copied, base_run, tmp_path):
    """resume, info and evaluate each decided whether a generator.pt was the run's, and differed in one case: a run
    from before run ids (none in options.json or its snapshots) holding a generator.pt with one (a newer run's of
    the same release, copied in). Resume wrote it again; info called it complete and evaluate took it as the run's.
    One rule (run_folder.of_another_run) now serves all three: it is another run's."""
    options = json.loads((copied / "options.json").read_text())
    del options["run_id"]
    (copied / "options.json").write_text(json.dumps(options))
    for _, snap in run_folder.snapshots(copied):  # as every mepf before run ids wrote them
        state = torch.load(snap, weights_only=True)
        del state["run_id"]
        torch.save(state, snap)
    newer = torch.load(copied / "generator.pt", weights_only=True)
    assert newer["run_id"] is not None and newer["step"] == 2
    one_line_refusal(evaluate(copied, base_run / "d.npz", tmp_path / "rep"), "not trained by this run", "run id")
    out = cli("info", copied).output
    assert "NOT this run's: it is another run's, by its run id" in out and "(complete)" not in out, out
    r = resume(copied, steps=2)  # at its last step: the run's generator.pt is written again from its snapshot
    assert r.exit_code == 0 and "already complete" not in r.output, r.output
    mine = torch.load(copied / "generator.pt", weights_only=True)
    assert mine["run_id"] is None and mine["step"] == 2
    assert "(complete)" in cli("info", copied).output
    assert evaluate(copied, base_run / "d.npz", tmp_path / "rep").exit_code == 0


def test_evaluate_decides_a_generators_run_as_info_and_resume_do(copied, base_run, tmp_path):
    """Review 43: evaluate took options.json without a release SHA-256 (or with an option out of range) as "cannot be
    read" and then evaluated another run's generator.pt with this run's curves, where info and resume refused the
    folder; and it named generator.pt when refusing another file of the folder."""
    sibling = _other_run(base_run, tmp_path, copied.parent / "r.h5", "--seed", "5")
    good = json.loads((copied / "options.json").read_text())
    shutil.copy(sibling / "generator.pt", copied / "b.pt")
    one_line_refusal(evaluate(copied / "b.pt", base_run / "d.npz", tmp_path / "rep"), "b.pt was not trained by this "
                     "run", "run id")
    shutil.copy(sibling / "generator.pt", copied / "generator.pt")
    (copied / "options.json").write_text(json.dumps({**good, "lr": -1}))  # out of range: the rest still read
    one_line_refusal(evaluate(copied, base_run / "d.npz", tmp_path / "rep"), "not trained by this run", "run id")
    for damaged in ({k: v for k, v in good.items() if k != "release_sha256"}, {**good, "release_sha256": 7}, [1]):
        (copied / "options.json").write_text(json.dumps(damaged))
        one_line_refusal(evaluate(copied, base_run / "d.npz", tmp_path / "rep"), "options.json", "damaged",
                         "a folder of its own")
        one_line_refusal(cli("info", copied), "options.json", "damaged")
        one_line_refusal(resume(copied), "options.json", "damaged")
    assert not (tmp_path / "rep").exists()


def test_a_run_stopped_before_its_generator_is_finished_by_resume(copied):
    """A kill between the last snapshot and generator.pt (or a folder named like an old snapshot, which ended the
    run with a traceback there) left a run that resume called complete and sample told to finish with resume
    (review 39 F5). A folder of a snapshot's name is no snapshot; resume writes generator.pt from the snapshot."""
    (copied / "snapshot-0000000.pt").mkdir()
    assert resume(copied, steps=3).exit_code == 0
    assert (copied / "snapshot-0000000.pt").is_dir() and (copied / "snapshot-0000003.pt").is_file()
    g = torch.load(copied / "generator.pt", weights_only=True)
    assert g["step"] == 3
    (copied / "generator.pt").unlink()
    assert "continue with" in cli("info", copied).output
    r = resume(copied, steps=3)
    assert r.exit_code == 0 and torch.load(copied / "generator.pt", weights_only=True)["step"] == 3, r.output
    old = torch.load(copied / "snapshot-0000002.pt", weights_only=True)
    torch.save({**g, "step": 2}, copied / "generator.pt")  # an older generator.pt: written before the last steps
    assert "continue with" in cli("info", copied).output
    assert resume(copied, steps=3).exit_code == 0
    again = torch.load(copied / "generator.pt", weights_only=True)
    assert again["step"] == 3 and all(torch.equal(again["state_dict"][k], g["state_dict"][k]) for k in g["state_dict"])
    assert "(complete)" in cli("info", copied).output
    assert old["step"] == 2


def test_the_release_a_run_folder_names_is_hashed_only_where_it_could_be_one(copied, base_run, tmp_path):
    """options.json may name any file: a 1 TiB sparse one kept evaluate hashing it for as long as it liked (review
    39 F3). A file of another size than the run recorded, or larger than a release this machine could read, is not
    read; the release beside the run is still found."""
    from mepf.artifacts.plain_file import memory_bytes
    from mepf.synthesize.locate import _sha

    huge = tmp_path / "huge.h5"
    with open(huge, "wb") as f:
        f.truncate(memory_bytes() // 2 + 1)  # sparse: no disk
    real = copied.parent / "r.h5"
    assert _sha(huge) is None and _sha(real, size=real.stat().st_size + 1) is None
    assert _sha(real) == _sha(real, size=real.stat().st_size) is not None
    opts = json.loads((copied / "options.json").read_text())
    opts["release"] = str(huge)
    del opts["release_bytes"]  # no size to filter by: the memory bound alone keeps the decoy unread
    (copied / "options.json").write_text(json.dumps(opts))
    r = evaluate(copied, base_run / "d.npz", tmp_path / "rep")
    assert r.exit_code == 0, r.output + r.stderr
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["release"]["verified"] is True


def test_the_report_says_when_a_generators_claim_was_not_checked(copied, base_run, tmp_path):
    """A generator whose release was not found had its claim written into report.md as a fact (review 39 F2);
    info on a run folder showed options.json's guarantee beside a generator claiming another."""
    (tmp_path / "away").mkdir()
    shutil.move(copied.parent / "r.h5", tmp_path / "away" / "r.h5")  # not beside the run, nor where it was
    opts = json.loads((copied / "options.json").read_text())
    opts["release"] = str(tmp_path / "gone.h5")
    (copied / "options.json").write_text(json.dumps(opts))
    r = cli("evaluate", copied, "--reference", base_run / "d.npz", "--metrics", "accuracy", "--classifiers", "logreg",
            "--out", tmp_path / "rep", "-n", "20", "--quiet", "--release-log", tmp_path / "none.jsonl")
    assert r.exit_code == 0, r.output + r.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["release"]["verified"] is False and rep["release"]["epsilon"] == pytest.approx(1)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "UNCHECKED" in md and "was not found" in md and "--release" in md
    assert "is UNCHECKED: pass it with --release" in r.stderr, r.stderr  # on the console too (review 40 R2)
    r = cli("evaluate", copied, "--reference", base_run / "d.npz", "--metrics", "embedding", "--out",
            tmp_path / "rep2", "-n", "20", "--quiet", "--release-log", tmp_path / "none.jsonl",
            "--release", tmp_path / "away" / "r.h5")
    assert r.exit_code == 0, r.output + r.stderr
    md = (tmp_path / "rep2" / "report.md").read_text()
    assert "UNCHECKED" not in md and "ledger checked" in md
    opts["epsilon"] = 0.01
    (copied / "options.json").write_text(json.dumps(opts))
    said = cli("info", copied).output
    assert "NOT the generator's, which claims (1, 1e-05)-DP" in said, said


def test_a_generator_must_fit_the_release_it_names(copied, base_run, tmp_path):
    """A generator naming a found release but made for other images or classes ended in a traceback, and one
    with the release's classes in another order paired them by position for the distance and by name for the
    accuracy (review 39 F4): refused in one line."""
    g = torch.load(copied / "generator.pt", weights_only=True)
    names = list(g["class_names"])
    g["class_names"] = names[1:] + names[:1]
    torch.save(g, copied / "generator.pt")
    one_line_refusal(evaluate(copied, base_run / "d.npz", tmp_path / "rep"), "does not fit the release",
                     "another order")
    assert not (tmp_path / "rep").exists()


def test_a_run_kept_for_its_result_alone_is_not_trained_over(copied):
    """A run folder kept with options.json and generator.pt only (docs/results/generators) was shown as "step 0 of
    N; continue with resume", and resume trained it again from step 0 over the published generator (review 40)."""
    before = (copied / "generator.pt").read_bytes()
    for p in copied.glob("snapshot-*.pt"):
        p.unlink()
    said = cli("info", copied).output
    assert "step 2 of 2 (its generator.pt alone: no snapshot to resume from)" in said, said
    one_line_refusal(resume(copied, steps=4), "no snapshot to continue from", "--out NEW_DIR")
    assert (copied / "generator.pt").read_bytes() == before


def test_a_search_for_the_release_hashes_hdf5_files_only_and_a_bounded_total(copied, tmp_path):
    """Each candidate within the size the run recorded was hashed, 65 of them each up to half the memory (review 40
    R1): a file that is no HDF5 file is not hashed, and one search hashes at most half the memory in all."""
    from mepf.synthesize.locate import _sha

    real = copied.parent / "r.h5"
    n = real.stat().st_size
    decoy = tmp_path / "decoy.h5"
    with open(decoy, "wb") as f:
        f.truncate(n)  # the recorded size, all zeros
    assert _sha(decoy, n) is None and _sha(real, n) is not None
    budget = [n - 1]
    assert _sha(real, n, budget) is None and budget == [n - 1]  # past what is left: not read
    budget = [2 * n]
    assert _sha(real, n, budget) == _sha(real, n) and budget == [n]
