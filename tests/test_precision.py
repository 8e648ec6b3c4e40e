"""Stage 2's precision plan: what --precision resolves to, that a run records it and resumes under it (also
when auto would now resolve otherwise), that runs from before the plan keep theirs, and that a bf16 generator
beside an fp32 extractor keeps the loss, moving averages and optimiser state in float32."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mepf.artifacts.errors import MepfError
from mepf.cli import main
from mepf.synthesize import precision as prec
from mepf.synthesize import train as train_mod
from mepf.synthesize.precision import Precision, legacy, native_bf16, resolve
from mepf.synthesize.train import Trainer, TrainOptions, prepare, resume, start

COMPAT = Path(__file__).resolve().parent / "data" / "compat"
FAST = {"width": 8, "batch_size": 20, "grid_every": 0, "snapshot_every": 5, "log_every": 5, "device": "cpu"}
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def release(tmp_path):
    shutil.copy(COMPAT / "release.h5", tmp_path / "r.h5")
    return str(tmp_path / "r.h5")


def test_auto_resolves_by_hardware(monkeypatch):
    # the generator's batch norms over the global batch under torchrun, in every new plan (review 44 H2)
    # a bf16 extractor did not train as well on the proxy (docs/results.md): auto keeps it fp32, on CUDA too
    assert resolve("auto", CUDA) == Precision("bf16", "fp32", True, True, "matmul", True, True, True, True)
    monkeypatch.setattr(prec, "native_bf16", lambda device: True)
    assert resolve("auto", CPU) == Precision("bf16", "fp32", True, True, "index_add", True, True, True, True)
    monkeypatch.setattr(prec, "native_bf16", lambda device: False)
    assert resolve("auto", CPU) == Precision("fp32", "fp32", True, bn_folded=True, upsample_folded=True,
                                                bn_global=True, labels_rotated=True)
    assert resolve("auto", torch.device("mps")) == Precision("fp32", "fp32", True, True, "matmul", True, True, True,
                                                             True)
    for device in (CPU, CUDA):  # an explicit choice is taken as given; class sums by device (CUDA: no atomics)
        sums = "matmul" if device.type == "cuda" else "index_add"
        assert resolve("fp32", device) == Precision("fp32", "fp32", True, True, sums, True, True, True, True)
        assert resolve("bf16", device) == Precision("bf16", "bf16", True, True, sums, True, True, True, True)
        assert resolve("bf16-generator", device) == Precision("bf16", "fp32", True, True, sums, True, True, True, True)
    with pytest.raises(MepfError, match="--precision must be one of"):
        resolve("fp16", CPU)


def test_native_bf16_is_read_from_torch():
    caps = torch.cpu.get_capabilities()
    assert native_bf16(CPU) == bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    assert native_bf16(CUDA) and not native_bf16(torch.device("mps"))


def test_plan_round_trips_and_a_damaged_one_is_refused():
    for p in (Precision("fp32", "fp32", False, False, "matmul"), Precision("bf16", "fp32", True),
              Precision("bf16", "bf16", True, True, "matmul"), Precision("bf16", "fp32", True, True, "fused"),
              Precision("fp32", "fp32", True, True, "index_add", True),
              Precision("bf16", "fp32", True, True, "index_add", True, True),
              Precision("bf16", "fp32", True, True, "index_add", True, True, True),
              Precision("bf16", "fp32", True, True, "index_add", True, True, True, True)):
        assert Precision.from_json(json.loads(json.dumps(p.to_json()))) == p
    # a plan recorded before class_sums existed summed by the one-hot product, and resumes so
    old = {"generator": "bf16", "extractor": "fp32", "channels_last": True, "fast_paths": True}
    assert Precision.from_json(old).class_sums == "matmul"
    assert not Precision.from_json(old).bn_folded  # and, before bn_folded, did not fold
    assert not Precision.from_json(old).upsample_folded
    assert not Precision.from_json(old).bn_global  # and, before bn_global, normalised each rank's batch
    assert not Precision.from_json(old).labels_rotated
    for bad in (None, [], {"generator": "fp16", "extractor": "fp32", "channels_last": True},
                {"generator": "bf16", "extractor": "fp32", "channels_last": 1}, {"generator": "bf16"},
                {"generator": "bf16", "extractor": "fp32", "channels_last": True},  # no fast_paths
                {**old, "class_sums": "scatter"}, {**old, "class_sums": None},
                {**old, "fast_paths": False, "class_sums": "index_add"},  # pairs no code ever wrote
                {**old, "fast_paths": False, "class_sums": "fused"},
                {**old, "bn_folded": 1}, {**old, "bn_folded": None},
                {**old, "fast_paths": False, "class_sums": "matmul", "bn_folded": True},
                {**old, "upsample_folded": 1}, {**old, "upsample_folded": "true"}, {**old, "bn_global": 1},
                {**old, "labels_rotated": 0},
                {**old, "fast_paths": False, "class_sums": "matmul", "upsample_folded": True}):
        with pytest.raises(MepfError, match="precision_resolved"):
            Precision.from_json(bad)


def test_a_run_records_its_plan_and_resumes_under_it(release, tmp_path, monkeypatch):
    monkeypatch.setattr(prec, "native_bf16", lambda device: True)
    run = tmp_path / "run"
    start(TrainOptions(release=release, out=str(run), steps=5, **FAST), progress=False)
    saved = json.loads((run / "options.json").read_text())
    assert saved["precision"] == "auto"
    assert saved["precision_resolved"] == {"generator": "bf16", "extractor": "fp32", "channels_last": True,
                                          "fast_paths": True, "class_sums": "index_add", "bn_folded": True,
                                          "upsample_folded": True, "bn_global": True,
                                          "labels_rotated": True}
    monkeypatch.setattr(prec, "native_bf16", lambda device: False)  # e.g. resumed on another machine
    assert resume(run, steps=10, progress=False).precision == Precision("bf16", "fp32", True, bn_folded=True,
                                                                        upsample_folded=True, bn_global=True,
                                                                        labels_rotated=True)
    for bad in ({"generator": "x"}, None):
        (run / "options.json").write_text(json.dumps({**saved, "precision_resolved": bad}))
        with pytest.raises(MepfError, match="no valid precision_resolved"):
            resume(run, steps=15, progress=False)
    del saved["precision_resolved"]  # a plan-less run may only say what old code could have written
    (run / "options.json").write_text(json.dumps({**saved, "precision": "bf16-generator"}))
    with pytest.raises(MepfError, match="records no plan"):
        resume(run, steps=15, progress=False)


def test_a_run_from_before_the_plan_resumes_under_its_old_one(tmp_path):
    """tests/data/compat/run (ec2b872) has no precision_resolved: auto on a CPU was fp32 in the default memory
    format then, without the fast paths, and must stay so, whatever auto means now (test_compat checks the
    resumed weights bit for bit against ec2b872's own resume)."""
    run = tmp_path / "run"
    shutil.copytree(COMPAT / "run", run)
    shutil.copy(COMPAT / "release.h5", tmp_path / "release.h5")
    assert "precision_resolved" not in json.loads((run / "options.json").read_text())
    t = resume(run, release=str(tmp_path / "release.h5"), steps=6, progress=False)
    assert t.precision == legacy("auto", CPU) == Precision("fp32", "fp32", False, False, "matmul")
    assert legacy("auto", CUDA) == legacy("bf16", CPU) == Precision("bf16", "bf16", True, False, "matmul")


@pytest.mark.parametrize("choice", ["bf16-generator", "bf16", "fp32"])
def test_a_step_keeps_float32_where_it_must(release, tmp_path, choice):
    opts = TrainOptions(release=release, out=str(tmp_path / "x"), steps=2, precision=choice, **FAST)
    rel, fmap, arch, dev = prepare(opts)
    t = Trainer(opts, rel, fmap, arch, dev)
    before = [p.detach().clone() for p in t.G.parameters()]
    stats = t.train_step()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32 for v in stats.values())
    assert all(bool(torch.isfinite(v)) for v in stats.values())
    assert all(p.dtype == torch.float32 for p in t.G.parameters())  # the weights are never cast
    assert all(v.dtype == torch.float32 for v in t.mavg.values())
    assert all(s.dtype == torch.float32 for st in t.opt_g.state.values() for s in st.values() if s.dim())
    assert any(not torch.equal(a, p) for a, p in zip(before, t.G.parameters()))
    if t.precision.channels_last:
        conv = next(m for m in t.G.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_dry_run_shows_the_plan(release, tmp_path):
    r = CliRunner().invoke(main, ["synthesize", release, "--out", str(tmp_path / "run"), "--dry-run",
                                  "--precision", "bf16-generator", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["precision_resolved"] == {"generator": "bf16", "extractor": "fp32",
                                                           "channels_last": True, "fast_paths": True,
                                                           "class_sums": "index_add", "bn_folded": True,
                                                           "upsample_folded": True, "bn_global": True,
                                          "labels_rotated": True}


def test_resume_dry_run_shows_the_legacy_plan_of_a_run_from_before_it(tmp_path):
    """tests/data/compat/run was made before the plan was recorded: --resume --dry-run shows the computation
    resume will use (the old code's: fp32, default memory format, no fast paths on CPU), and writes nothing."""
    import shutil
    from pathlib import Path

    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data" / "compat" / "run", run)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    r = CliRunner().invoke(main, ["synthesize", "--resume", str(run), "--dry-run", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["precision_resolved"] == {"generator": "fp32", "extractor": "fp32", "channels_last": False,
                                           "fast_paths": False, "class_sums": "matmul", "bn_folded": False,
                                           "upsample_folded": False, "bn_global": False,
                                           "labels_rotated": False}
    assert "before the plan" in shown["precision_resolved_note"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


def test_class_sums_by_index_add_equal_the_one_hot_product():
    """The two ways of summing per class give the same means, present mask and gradients (float64; a class
    absent from the batch and a repeated label included)."""
    from mepf.synthesize.objective import class_means

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([3, 0, 0, 1, 3, 3, 1, 0])  # class 2 absent
    out = {}
    for how in ("matmul", "index_add"):
        f = torch.randn(8, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        means, present = class_means(f, y, 4, how)
        (means * torch.randn(4, 11, dtype=torch.float64, generator=g.manual_seed(2))).sum().backward()
        out[how] = (means.detach(), present, f.grad)
    torch.testing.assert_close(out["matmul"][0], out["index_add"][0], rtol=1e-12, atol=1e-14)
    assert out["matmul"][1].tolist() == out["index_add"][1].tolist() == [True, True, False, True]
    torch.testing.assert_close(out["matmul"][2], out["index_add"][2], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="sums_by"):
        class_means(f, y, 4, "scatter")


def _runs_of_an_old_plan(release, tmp_path, monkeypatch, old_plan: Precision, missing: str):
    """Under `old_plan`: run "a" uninterrupted to step 6 (returned), and run "b" to step 3, whose recorded plan
    then lacks `missing`, as the code before that plan value wrote it."""
    opts = dict(FAST, snapshot_every=3)
    monkeypatch.setattr(train_mod, "resolve", lambda precision, device: old_plan)
    a = start(TrainOptions(release=release, out=str(tmp_path / "a"), steps=6, **opts), progress=False)
    start(TrainOptions(release=release, out=str(tmp_path / "b"), steps=3, **opts), progress=False)
    monkeypatch.setattr(train_mod, "resolve", prec.resolve)
    saved = json.loads((tmp_path / "b" / "options.json").read_text())
    del saved["precision_resolved"][missing]
    (tmp_path / "b" / "options.json").write_text(json.dumps(saved))
    return a


def _an_unfolded_old_plan_resumes(release, tmp_path, monkeypatch, folded, field: str, note: str):
    """`folded`'s plan with `field` False, recorded without it (as before it existed): `--resume --dry-run` shows it
    False with `note`, and the run resumes under it bit-exactly (its weights equal run "a"'s, uninterrupted, and
    differ from `folded`'s, so that the comparison tells the two apart). Returns the resumed trainer."""
    old_plan = dataclasses.replace(folded.precision, **{field: False})
    a = _runs_of_an_old_plan(release, tmp_path, monkeypatch, old_plan, field)
    r = CliRunner().invoke(main, ["synthesize", "--resume", str(tmp_path / "b"), "--dry-run"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["precision_resolved"][field] is False and note in shown["precision_resolved_note"]
    b = resume(tmp_path / "b", steps=6, progress=False)
    assert b.precision == a.precision == old_plan
    for (ka, va), (kb, vb) in zip(a.G.state_dict().items(), b.G.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert any(not torch.equal(va, vf) for va, vf in zip(a.G.state_dict().values(), folded.G.state_dict().values()))
    return b


def test_a_run_recorded_before_class_sums_resumes_with_the_one_hot_product(release, tmp_path, monkeypatch):
    """A run whose plan has fast_paths but no class_sums (recorded before 2026-12-03) resumes bit-exactly with
    the product it was trained with: every training step's class sums go through the product (spied: on this
    CPU the two kernels can agree to the bit, so the weights alone could not tell), the weights equal those of
    an uninterrupted run with the product, and a fresh run on CPU sums by index_add."""
    from mepf.synthesize import objective

    used = []
    real = objective.class_means
    monkeypatch.setattr(objective, "class_means", lambda f, y, k, sums_by="index_add": (used.append(sums_by),
                                                                                         real(f, y, k, sums_by))[1])
    opts = dict(FAST, snapshot_every=3)
    fresh = start(TrainOptions(release=release, out=str(tmp_path / "fresh"), steps=6, **opts), progress=False)
    assert fresh.precision.class_sums == "index_add" and set(used) == {"index_add"}
    old_plan = dataclasses.replace(fresh.precision, class_sums="matmul")  # the same plan but for the sums
    a = _runs_of_an_old_plan(release, tmp_path, monkeypatch, old_plan, "class_sums")
    r = CliRunner().invoke(main, ["synthesize", "--resume", str(tmp_path / "b"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["precision_resolved"]["class_sums"] == "matmul"
    used.clear()
    b = resume(tmp_path / "b", steps=6, progress=False)
    assert b.precision == old_plan and used and set(used) == {"matmul"}
    for (ka, va), (kb, vb) in zip(a.G.state_dict().items(), b.G.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_fused_class_means_equal_index_add_and_resume_bit_exactly(release, tmp_path, monkeypatch):
    """class_sums "fused" (phi and the sums in one step): the same class means and image gradients as phi rows
    summed by index_add, on the release's own feature map under the bf16-generator plan; legacy computation
    refuses it; and a fused run resumed from its snapshot equals the uninterrupted run to the bit."""
    from mepf.synthesize.objective import Target, fake_embeddings, present

    opts = TrainOptions(release=release, out=str(tmp_path / "x"), **FAST)
    rel, fmap, arch, dev = prepare(opts)
    target = Target(rel, dev)
    x = torch.rand(12, rel.features.channels, rel.features.height, rel.features.width,
                   generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 3, 3, 1, 2]) % target.num_classes
    out = {}
    for how in ("index_add", "fused"):
        xi = x.clone().requires_grad_(True)
        fake = fake_embeddings(fmap, xi, y, target, fast=True, sums_by=how)
        sum(((present(mu, p) - present(target.means[m], p)) ** 2).sum() for m, (mu, p) in fake.items()).backward()
        out[how] = ({m: mu.detach() for m, (mu, _) in fake.items()}, {m: p for m, (_, p) in fake.items()}, xi.grad)
    for m in target.moments:
        torch.testing.assert_close(out["fused"][0][m], out["index_add"][0][m], rtol=1e-5, atol=1e-7)
        masks = out["fused"][1][m], out["index_add"][1][m]  # None where every class is in the batch
        assert masks == (None, None) if masks[0] is None else torch.equal(*masks)
    g = out["index_add"][2]
    torch.testing.assert_close(out["fused"][2], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
    with pytest.raises(ValueError, match="fast paths"):
        fake_embeddings(fmap, x, y, target, fast=False, sums_by="fused")

    plan = Precision("bf16", "fp32", True, True, "fused")
    monkeypatch.setattr(train_mod, "resolve", lambda precision, device: plan)
    from mepf.core.features import FeatureMap
    from mepf.synthesize import objective

    used = []  # every training step must take the fused sums, none the rows' class_means
    real_sums, real_means = FeatureMap.class_sums, objective.class_means
    monkeypatch.setattr(FeatureMap, "class_sums", lambda *a, **k: (used.append("fused"), real_sums(*a, **k))[1])
    monkeypatch.setattr(objective, "class_means", lambda *a, **k: (used.append("rows"), real_means(*a, **k))[1])
    o = dict(FAST, snapshot_every=3)
    a = start(TrainOptions(release=release, out=str(tmp_path / "a"), steps=6, **o), progress=False)
    start(TrainOptions(release=release, out=str(tmp_path / "b"), steps=3, **o), progress=False)
    monkeypatch.setattr(train_mod, "resolve", prec.resolve)
    assert json.loads((tmp_path / "b" / "options.json").read_text())["precision_resolved"]["class_sums"] == "fused"
    b = resume(tmp_path / "b", steps=6, progress=False)
    assert a.precision == b.precision == plan
    assert len(used) >= 12 and set(used) == {"fused"}
    for (ka, va), (kb, vb) in zip(a.G.state_dict().items(), b.G.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_a_run_recorded_before_bn_folded_resumes_on_the_map_as_built(tmp_path, monkeypatch):
    """A new run folds the extractor's batch norms into its convolutions; a run whose plan does not say
    bn_folded (recorded before it) resumes on the map as built, bit-exactly: its weights equal an uninterrupted
    unfolded run's, and differ from a folded run's (so the comparison can tell the two apart). On a release of
    the default map (EfficientNet-Lite0 with its real weights)."""
    import numpy as np
    from conftest import make_images

    np.savez(tmp_path / "d.npz", images=make_images(40, seed=3), labels=np.arange(40) % 4)
    r = CliRunner().invoke(main, ["embed", "--data", str(tmp_path / "d.npz"), "--classes", "4",
                                  "--out", str(tmp_path / "r.h5"), "--epsilon", "10", "--delta", "1e-3", "--force",
                                  "--quiet", "--release-log", str(tmp_path / "log.jsonl")])
    assert r.exit_code == 0, r.output
    release = str(tmp_path / "r.h5")
    opts = dict(FAST, snapshot_every=3)
    folded = start(TrainOptions(release=release, out=str(tmp_path / "f"), steps=6, **opts), progress=False)
    assert folded.precision.bn_folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.fmap.modules())
    b = _an_unfolded_old_plan_resumes(release, tmp_path, monkeypatch, folded, "bn_folded", "batch norms unfolded")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in b.fmap.modules())


def test_a_run_recorded_before_upsample_folded_resumes_as_written(release, tmp_path, monkeypatch):
    """A new run computes the generator's upsample -> 3x3 conv pairs as transposed convolutions; a run whose plan
    does not say upsample_folded (recorded before it) resumes upsampling, bit-exactly: its weights equal an
    uninterrupted run's as written, and differ from a folded run's; the dry run shows the plan resume will use."""
    import torch.nn.functional as F

    calls = []  # the folded pairs' transposed convolutions (the conv generator has no other)
    real = F.conv_transpose2d
    monkeypatch.setattr(F, "conv_transpose2d", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    folded = start(TrainOptions(release=release, out=str(tmp_path / "f"), steps=6, **dict(FAST, snapshot_every=3)),
                   progress=False)
    assert folded.precision.upsample_folded and folded.arch["name"] == "conv" and len(calls) >= 12
    calls.clear()
    _an_unfolded_old_plan_resumes(release, tmp_path, monkeypatch, folded, "upsample_folded",
                                  "upsamples, then convolves")
    assert not calls  # every step of the old plan's runs and of the resumed one upsampled, then convolved
