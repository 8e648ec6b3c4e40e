"""DPImageBench's protocol (evaluate/benchnets.py, bench_protocol.py): the networks' sizes, the schedule, the
EMA, the selection rule, resume across calls, and the figure their tables show."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mepf.artifacts.errors import MepfError
from mepf.embed.datasets import DEBIAN_FASHION_DIRS
from mepf.evaluate import bench_protocol as bp
from mepf.evaluate.benchnets import BENCH_CLASSIFIERS, PARAMS_M, bench_classifier


@pytest.mark.parametrize("kind,millions", [("wrn", 8.95), ("resnet", 1.73), ("resnext", 34.43)])
def test_parameter_counts_are_theirs_for_grey_28px(kind, millions):
    """The sizes DPImageBench's definitions give for 1 x 28 x 28 input and 10 classes; 28 px pools 7 x 7 to 1."""
    assert PARAMS_M[kind] == millions
    model = bench_classifier(kind, 1, 28, 10)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_dropout_only_where_theirs_has_it():
    """WRN-40-4 has dropout 0.3; their ResNeXt takes a rate and never applies it: in train mode (batch norm on
    running statistics) two passes differ for the one and are equal for the other."""
    x = torch.randn(4, 1, 28, 28)
    for kind, dropped in (("wrn", True), ("resnext", False)):
        m = bench_classifier(kind, 1, 28, 10).train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eval()
        with torch.no_grad():
            assert (not torch.equal(m(x), m(x))) == dropped, kind


def test_schedule_is_adam_001_decayed_by_5_every_20_epochs():
    s = bp.BenchSchedule()
    assert (s.epochs, s.batch_size, s.lr, s.ema, s.n_train) == (50, 256, 0.01, 0.9999, 55000)
    model = torch.nn.Linear(2, 2)
    opt, sched = bp.optimiser(model, s)
    assert isinstance(opt, torch.optim.Adam)
    lrs = []
    for _ in range(s.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:20] == [0.01] * 20
    assert lrs[20:40] == pytest.approx([0.002] * 20) and lrs[40:] == pytest.approx([0.0004] * 10)


def test_ema_warms_up_then_decays_at_0_9999():
    """shadow <- d * shadow + (1 - d) * param with d = min(0.9999, (1 + n) / (10 + n)) at the n-th update,
    against the recurrence computed here in float64."""
    p = torch.nn.Parameter(torch.zeros(3))
    ema = bp.WeightEMA([p], 0.9999)
    ref = np.zeros(3)
    rng = np.random.default_rng(1)
    for n in range(1, 20001):
        v = rng.standard_normal(3)
        p.data = torch.tensor(v, dtype=torch.float32)
        ema.update([p])
        d = min(0.9999, (1 + n) / (10 + n))
        ref = d * ref + (1 - d) * np.float32(v)
        if n in (1, 2, 100, 20000):
            assert ema.shadow[0].double().numpy() == pytest.approx(ref, abs=1e-5), n
    model = torch.nn.Linear(3, 1)
    ema = bp.WeightEMA(model.parameters(), 0.5)
    own = [q.detach().clone() for q in model.parameters()]
    ema.shadow = [torch.full_like(q, 7.0) for q in model.parameters()]
    with ema.applied(model):
        assert all(torch.all(q == 7) for q in model.parameters())
    assert all(torch.equal(q, o) for q, o in zip(model.parameters(), own))


def test_ema_update_is_the_per_tensor_formula_bit_for_bit():
    """The multi-tensor update computes exactly s - (1 - d) * (s - p) for every tensor (frozen ones skipped)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((5, 3, 3, 3), (7,), (4, 9))]
    params[1].requires_grad_(False)
    ema = bp.WeightEMA(params, 0.9999)
    ref = [s.clone() for s in ema.shadow]
    for n in range(1, 30):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update(params)
        d = min(0.9999, (1 + n) / (10 + n))
        live = [p.detach() for p in params if p.requires_grad]
        ref = [s - (1 - d) * (s - p) for s, p in zip(ref, live)]
        assert len(ema.shadow) == 2 and all(torch.equal(a, b) for a, b in zip(ema.shadow, ref)), n


def test_selection_takes_the_later_of_equal_validation_accuracies():
    assert bp.better(50.0, None) and bp.better(50.0, 50.0) and not bp.better(49.9, 50.0)


def test_training_subset_is_their_permutation():
    x = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    y = np.arange(100) % 10
    xs, ys = bp.training_subset(x, y, 55)
    order = np.random.default_rng(0).permutation(100)[:55]
    assert (xs[:, 0, 0, 0] == order).all() and (ys == order % 10).all()
    assert len(bp.training_subset(x, y, 55000)[0]) == 100  # fewer than 55,000: all of them train


def _tiny(seed=0, n=64):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = (rng.integers(0, 60, (n, 28, 28, 1)) + 40 * y[:, None, None, None]).astype(np.uint8)  # learnable
    return x, y


def test_selected_epoch_follows_the_rule_and_resume_is_exact(tmp_path, monkeypatch):
    """Three epochs straight, against one epoch, a stop at the deadline and a resumed call: the same history,
    the same weights; the reported test accuracy is the one at the last epoch of best validation accuracy."""
    sched = bp.BenchSchedule(epochs=3, batch_size=16)
    train, val, test = _tiny(0), _tiny(1, 32), _tiny(2, 32)
    straight = bp.train_classifier("resnet", train, val, test, 4, sched, seed=3, state_path=tmp_path / "a.pt")
    assert straight["finished"] and straight["epochs_done"] == 3
    vals = [h["val"] for h in straight["history"]]
    best = max(i for i, v in enumerate(vals) if v == max(vals))
    assert straight["best_epoch"] == best + 1 and straight["best_val"] == max(vals)
    assert straight["test_at_best_val"] == straight["history"][best]["test"]

    clock = iter([0.0, 1e9])  # the first epoch starts before the deadline, the second would end after it
    monkeypatch.setattr(bp.time, "time", lambda: next(clock))
    part = bp.train_classifier("resnet", train, val, test, 4, sched, seed=3, state_path=tmp_path / "b.pt",
                               deadline=100.0)
    monkeypatch.undo()
    assert not part["finished"] and part["epochs_done"] == 1
    assert bp.summarise({"resnet": part}) == {"complete": False}
    rest = bp.train_classifier("resnet", train, val, test, 4, sched, seed=3, state_path=tmp_path / "b.pt")
    assert rest["finished"]
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in straight["history"]]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in rest["history"]] == strip
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with pytest.raises(MepfError, match="another evaluation"):
        bp.train_classifier("resnet", train, val, _tiny(5, 32), 4, sched, seed=3, state_path=tmp_path / "b.pt")


def test_summary_is_their_table_figure():
    r = {k: {"finished": True, "test_at_best_val": v} for k, v in zip(BENCH_CLASSIFIERS, (85.48, 87.11, 86.11))}
    s = bp.summarise(r)
    assert s["complete"] and s["max"] == 87.11 and s["mean"] == pytest.approx(86.2333, abs=1e-3)


def test_a_state_file_that_is_not_ours_is_a_one_line_error(tmp_path):
    """Garbage, a pickle that would run code, a bare tensor, a folder, and our state with a field missing: each
    refused with a MepfError naming the file and the fix, nothing executed."""
    import pickle

    from tests.conftest import Payload

    sched = bp.BenchSchedule(epochs=1, batch_size=16)
    train, val, test = _tiny(0, 16), _tiny(1, 8), _tiny(2, 8)
    good = tmp_path / "good.pt"
    bp.train_classifier("resnet", train, val, test, 4, sched, seed=0, state_path=good)
    partial = torch.load(good, weights_only=True)
    del partial["state"]["history"]
    cases = {"garbage.pt": lambda p: p.write_bytes(b"not a state"),
             "pickle.pt": lambda p: p.write_bytes(pickle.dumps(Payload(tmp_path / "ran"))),
             "tensor.pt": lambda p: torch.save(torch.zeros(3), p),
             "folder.pt": lambda p: p.mkdir(),
             "partial.pt": lambda p: torch.save(partial, p)}
    for name, make in cases.items():
        make(tmp_path / name)
        with pytest.raises(MepfError, match=f"{name} (is not a training state|does not fit).*--overwrite"):
            bp.train_classifier("resnet", train, val, test, 4, sched, seed=0, state_path=tmp_path / name)
    assert not (tmp_path / "ran").exists()


@pytest.mark.skipif(not any(Path(d).is_dir() for d in DEBIAN_FASHION_DIRS),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_the_protocol_script_gives_the_same_rows_with_classifiers_in_parallel(tmp_path):
    """benchmarks/dpimagebench.py --jobs 2 trains each classifier in a process of its own (a reduced run on the
    CPU): the same per-classifier figures as one after the other, every classifier finished, one results.json."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    gen = root / "docs/results/generators/r3-55k-lite0-conv64-32k-cooldown-eps10-seed0/generator.pt"
    rows = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}"
        r = subprocess.run([sys.executable, str(root / "benchmarks/dpimagebench.py"), str(gen), "--device", "cpu",
                            "--epochs", "1", "-n", "120", "--real-limit", "120", "--no-fid", "--classifiers",
                            "resnet,wrn", "--jobs", str(jobs), "--out", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "complete" in r.stdout, r.stdout + r.stderr
        (row,) = json.loads((out / "results.json").read_text())["results"]
        rows[jobs] = row
    assert rows[2]["complete"] and set(rows[2]["per_classifier"]) == {"resnet", "wrn"}
    assert rows[1]["per_classifier"] == rows[2]["per_classifier"]


@pytest.mark.skipif(not any(Path(d).is_dir() for d in DEBIAN_FASHION_DIRS),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("failure", ["full disk", "ctrl-c"])
def test_a_protocol_run_started_afresh_says_to_continue_without_overwrite(tmp_path, monkeypatch, failure):
    """A full disk or Ctrl-C after --overwrite had made the protocol's state said "run the same command again", which
    (--overwrite included) discarded the epochs it had saved (review 48 M2): it says to run again without it. The
    failure is injected where a classifier's state is saved (what a full disk does there)."""
    import errno

    from mepf.artifacts.errors import Interrupted
    from mepf.evaluate import dpimagebench

    root = Path(__file__).resolve().parent.parent
    gen = root / "docs/results/generators/r3-55k-lite0-conv64-32k-cooldown-eps10-seed0/generator.pt"

    def fails(*args, **kwargs):
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "rep" / "protocol-state" / "resnet.pt"))

    monkeypatch.setattr(dpimagebench, "train_classifier", fails)
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "old.txt").write_text("an earlier report's folder")
    kind = Interrupted if failure == "ctrl-c" else MepfError
    with pytest.raises(kind, match="run the same command again WITHOUT --overwrite to continue from the saved epoch"):
        dpimagebench.evaluate_dpimagebench(str(gen), "fashion-mnist:test", tmp_path / "rep", n=120, real_limit=120,
                                           epochs=1, metrics=["accuracy"], classifiers=("resnet",), progress=False,
                                           overwrite=True)
    assert (tmp_path / "rep" / "protocol-state" / "meta.json").is_file()
