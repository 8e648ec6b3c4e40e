"""Stages under torchrun with 2 CPU processes (gloo): exact sums bitwise equal to one process, one file, one
log entry, a failing rank failing all with one error; distributed training writes one run that samples."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mepf.artifacts import load
from mepf.artifacts.audit import audit
from mepf.embed import release_log
from mepf.embed.fingerprint import open_sketch
from mepf.synthesize import run_folder
from tests.conftest import make_images

MAP = ["--backbone", "resnet18", "--weights", "random", "--layers", "pixels,stem"]


def mepf(*args, ranks: int = 1):
    """Run `mepf ARGS` in fresh processes: directly, or under torchrun with `ranks` CPU processes."""
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "mepf"]
              if ranks > 1 else [sys.executable, "-m", "mepf"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launch, *[str(a) for a in args]], capture_output=True, text=True, env=env, timeout=600)


def embed(data, out, log, *extra, ranks=1):
    return mepf("embed", "--data", data, "--out", out, "--delta", "1e-5", "--release-log", log, "--quiet",
                "--batch-size", "4", *MAP, *extra, ranks=ranks)


def test_two_ranks_give_bitwise_the_one_process_sums(tmp_path):
    np.savez(tmp_path / "d.npz", images=make_images(23, seed=4), labels=np.arange(23) % 3)  # 6 blocks, uneven
    one = embed(tmp_path / "d.npz", tmp_path / "one.h5", tmp_path / "one.jsonl", "--classes", "3", "--epsilon", "inf")
    assert one.returncode == 0, one.stderr
    shutil.copy(tmp_path / "one.jsonl.key", tmp_path / "two.jsonl.key")  # the same sketch key: sketches compare
    two = embed(tmp_path / "d.npz", tmp_path / "two.h5", tmp_path / "two.jsonl", "--classes", "3", "--epsilon", "inf",
                ranks=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote ") == 1  # rank 0 reports
    a, b = load(tmp_path / "one.h5"), load(tmp_path / "two.h5")
    for k in ("S1", "S2", "counts"):
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert a.feature_spec == b.feature_spec and a.data_spec == b.data_spec
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["one.h5", "two.h5"]
    e1, e2 = release_log.read_log(tmp_path / "one.jsonl"), release_log.read_log(tmp_path / "two.jsonl")
    assert len(e2) == 1 and e1[0]["fingerprint"] == e2[0]["fingerprint"]
    key = release_log.read_key(tmp_path / "one.jsonl")  # the sketches, sealed each with its own nonce, are one sample
    s1, s2 = (open_sketch(key, e[0]["sketch"]) for e in (e1, e2))
    assert s1.hashes and (s1.level, s1.hashes) == (s2.level, s2.hashes)

    private = embed(tmp_path / "d.npz", tmp_path / "p.h5", tmp_path / "two.jsonl", "--classes", "3", "--epsilon", "2",
                    "--allow-repeat", "--workers", "1", ranks=2)
    assert private.returncode == 0, private.stderr
    assert audit(tmp_path / "p.h5").ok and len(release_log.read_log(tmp_path / "two.jsonl")) == 2


def test_a_failing_rank_fails_all_with_one_error_and_no_file(tmp_path):
    root = tmp_path / "data" / "a"
    root.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(make_images(1, seed=i)[0, :, :, 0]).save(root / f"{i:02d}.png")
    (root / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # block 1 of 3 (batch 4): rank 1's share
    r = embed(tmp_path / "data", tmp_path / "x.h5", tmp_path / "log.jsonl", "--epsilon", "1", "--image-size", "28",
              "--channels", "1", ranks=2)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "cannot read image" in errors[0] and "05.png" in errors[0], r.stderr
    assert not (tmp_path / "x.h5").exists() and release_log.read_log(tmp_path / "log.jsonl") == []
    assert not list(tmp_path.glob(".x.h5.tmp*"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    np.savez(d / "d.npz", images=make_images(60, seed=9), labels=np.arange(60) % 3)
    r = embed(d / "d.npz", d / "r.h5", d / "log.jsonl", "--classes", "3", "--epsilon", "100")
    assert r.returncode == 0, r.stderr
    return d / "r.h5"


def test_two_rank_training_writes_one_run_that_resumes_and_samples(tmp_path, release):
    from mepf.synthesize import load_generator

    run = tmp_path / "run"
    args = ["--width", "16", "--batch-size", "10", "--grid-every", "0", "--snapshot-every", "3", "--log-every", "2",
            "--device", "cpu", "--quiet"]
    import json

    dry = mepf("synthesize", release, "--out", run, "--dry-run", *args, ranks=2)  # printed twice, no ranks (R44 L4)
    assert dry.returncode == 0 and json.loads(dry.stdout)["global_batch"] == 20 and not run.exists(), dry.stderr
    r = mepf("synthesize", release, "--out", run, "--steps", "6", *args, ranks=2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("trained 6 steps") == 1

    assert json.loads((run / "options.json").read_text())["ranks"] == 2
    steps = [json.loads(l)["step"] for l in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    r = mepf("synthesize", "--resume", run, "--steps", "8", "--quiet", ranks=2)
    assert r.returncode == 0, r.stderr
    assert [json.loads(l)["step"] for l in (run / "stats.jsonl").read_text().splitlines()] == [2, 4, 6, 8]
    images, labels = load_generator(run).sample(6, seed=1)
    assert images.shape == (6, 28, 28, 1) and list(labels) == [0, 1, 2, 0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    shown = json.loads(mepf("synthesize", "--resume", run, "--dry-run", ranks=2).stdout)  # once (review 45)
    assert shown["ranks"] == 2 and shown["global_batch"] == 20 and "ranks" not in shown["resume_changes"]
    shown = json.loads(mepf("synthesize", "--resume", run, "--dry-run").stdout)
    assert shown["resume_changes"]["ranks"] == {"from": 2, "to": 1} and shown["global_batch"] == 10
    r = mepf("synthesize", "--resume", run, "--steps", "9", "--quiet")  # one process: half the global batch
    assert r.returncode == 0, r.stderr
    options = json.loads((run / "options.json").read_text())  # said nothing of it (review 44 H4)
    assert options["ranks"] == 1 and {"step": 8, "option": "ranks", "from": 2, "to": 1} in options["changes"]
    assert "ranks 2 -> 1 at step 8" in mepf("info", run).stdout


def _objective_on_rank(rank, world, store, out):
    import torch
    import torch.distributed as dist

    from mepf.synthesize.objective import class_means

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)  # a stand-in generator: features = z @ w
    z = torch.randn(12, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 0, 0, 1, 2, 2, 2, 0, 1])
    target = torch.randn(3, 7, dtype=torch.float64)
    part = slice(rank * 6, rank * 6 + 6)
    means, present = class_means(z[part] @ w, y[part], 3)
    ((means - target)[present] ** 2).sum().backward()
    dist.all_reduce(w.grad)
    torch.save({"means": means.detach(), "grad": w.grad}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_the_global_batch_objective_is_that_of_one_process(tmp_path):
    import torch
    import torch.multiprocessing as mp

    from mepf.synthesize.objective import class_means

    mp.spawn(_objective_on_rank, args=(2, tmp_path / "store", tmp_path), nprocs=2)
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    z = torch.randn(12, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 0, 0, 1, 2, 2, 2, 0, 1])
    target = torch.randn(3, 7, dtype=torch.float64)
    means, present = class_means(z @ w, y, 3)
    ((means - target)[present] ** 2).sum().backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["means"], means.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["grad"], w.grad, rtol=1e-10, atol=1e-12)


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_with_its_snapshot(tmp_path, release):
    """Under torchrun each rank stopped at once, mid-step, without a snapshot: a preempted job lost everything since
    its last periodic one (500 steps by default), and a resumed run said "interrupted before training began"
    (review 44 M1). The ranks now agree on the stop at a step boundary and write that step's snapshot."""
    import signal
    import time

    run = tmp_path / "run"
    args = ["--width", "8", "--batch-size", "6", "--grid-every", "0", "--snapshot-every", "100000", "--log-every", "5",
            "--device", "cpu", "--quiet", "--precision", "fp32"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mepf"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for leg in (["synthesize", str(release), "--out", str(run), "--steps", "100000", *args],
                ["synthesize", "--resume", str(run), "--quiet"]):
        before = len(run_folder.snapshots(run)) if run.exists() else 0
        lines = len((run / "stats.jsonl").read_text().splitlines()) if run.exists() else 0
        p = subprocess.Popen([*launch, *leg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120  # two records of this leg's own: it trains (the first leg may have left 4)
        while time.time() < deadline and not ((run / "stats.jsonl").exists() and
                                              len((run / "stats.jsonl").read_text().splitlines()) >= lines + 2):
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)  # as Slurm signals the launcher on preemption
        _, err = p.communicate(timeout=120)
        snaps = run_folder.snapshots(run)
        assert len(snaps) == before + 1, err  # the step reached, not the last periodic one (there is none)
        assert f"a snapshot of this step was written; continue with: mepf synthesize --resume {run}" in err, err
        assert "before training began" not in err
    assert snaps[-1][0] > snaps[0][0] >= 10


def test_a_rank_killed_leaves_the_others_one_line_and_a_folder_that_resumes(tmp_path, release):
    """A rank killed (out of memory, a node lost) left every other rank gloo's traceback (review 44 L2): one line now,
    naming --resume, and the folder resumes."""
    import signal
    import time

    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                          "mepf", "synthesize", str(release), "--out", str(run), "--steps", "100000", "--width", "8",
                          "--batch-size", "6", "--grid-every", "0", "--snapshot-every", "5", "--log-every", "5",
                          "--device", "cpu", "--quiet", "--precision", "fp32"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ,
                                                                                          "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "snapshot-0000010.pt").exists():
        time.sleep(0.2)
    workers = [int(c) for c in subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert "collective failed" in err and f"mepf synthesize --resume {run}" in err, err
    assert not any(line.startswith(("[rank0]: Traceback", "[rank1]: Traceback")) for line in err.splitlines()), err
    r = mepf("synthesize", "--resume", run, "--steps", str(run_folder.snapshots(run)[-1][0] + 2), "--quiet")
    assert r.returncode == 0, r.stderr


def _sums_on_rank(rank, world, store, out):
    import torch
    import torch.distributed as dist

    from mepf.synthesize.objective import means_of_sums

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    sums = (torch.randn(4, 5000, generator=g) * 10 ** torch.randint(-3, 4, (4, 5000), generator=g)).requires_grad_()
    means, _ = means_of_sums(sums, torch.tensor([3.0, 2.0, 4.0, 1.0]))
    torch.save(means.detach(), f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_the_global_class_means_are_bitwise_the_same_on_every_rank(tmp_path):
    """Each rank took the global sum as S_r + (T - S_r), not always T in float32: with 3 or more ranks the moving
    averages drifted apart, and a resumed run (the snapshot holds rank 0's) left the uninterrupted one (review 44
    H3). The value is now T on every rank."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_sums_on_rank, args=(3, tmp_path / "store", tmp_path), nprocs=3)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(3)]
    assert all(torch.equal(got[0], g) for g in got[1:])


def _generator_grads(rank, world, store, out, release):
    import torch
    import torch.distributed as dist

    from mepf.synthesize.objective import fake_embeddings, squared_distance
    from mepf.synthesize.train import Trainer, TrainOptions, prepare

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    opts = TrainOptions(release=str(release), out=f"{out}/run", width=16, batch_size=20 // world, device="cpu",
                        precision="fp32", objective="plain")
    t = Trainer(opts, *prepare(opts))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():  # running statistics as after some steps (the update read a buffer it had scaled: review 45)
        for m in t.G.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    z, y = torch.randn(20, 100, generator=g), torch.arange(20) % 3
    part = slice(rank * 20 // world, (rank + 1) * 20 // world)
    x = t.g_train(z[part], y[part])
    fake = fake_embeddings(t.fmap, x, y[part], t.target, sums_by=t.precision.class_sums)
    sum(squared_distance(t.target, fake).values()).backward()
    t.sync_replicas()
    torch.save({"grad": torch.cat([p.grad.reshape(-1) for p in t.G.parameters()]),
                "buffers": torch.cat([b.reshape(-1).float() for b in t.G.buffers()])}, f"{out}/{world}-{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def test_the_generators_batch_norms_see_the_global_batch(tmp_path, release):
    """The objective was the global batch's for the moment sums only: every generator's batch norms normalised each
    rank's own batch, so 2 ranks of 10 trained another model than one process of 20 (21% of the gradient, review 44
    H2; the test above uses a stand-in without batch norm). With the real generator and Trainer, 2 ranks now give
    one process's gradient and running statistics, to rounding."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_generator_grads, args=(2, tmp_path / "store", tmp_path, release), nprocs=2)
    _generator_grads(0, 1, None, tmp_path, release)
    one = torch.load(tmp_path / "1-0.pt")
    for r in range(2):
        two = torch.load(tmp_path / f"2-{r}.pt")
        assert float((two["grad"] - one["grad"]).norm() / one["grad"].norm()) < 1e-5
        torch.testing.assert_close(two["buffers"], one["buffers"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- two nodes that must agree

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(node_args: list, timeout: int = 240, env: dict | None = None, node_env: list | None = None) -> list:
    """`mepf ARGS` as two torchrun nodes of one process each (static rendezvous on 127.0.0.1), each node with
    its own command line (and `node_env`, its own variables), as an operator starts them; returns each node's
    (returncode, stdout, stderr, seconds)."""
    import time

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    procs, started = [], time.monotonic()
    for rank, args in enumerate(node_args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "mepf", *[str(a) for a in args]]
        mine = {**env, **(node_env[rank] if node_env else {})}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mine))
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e, time.monotonic() - started))
    return out


def node_embed(node, data, *extra):
    return ["embed", "--data", data, "--out", node / "r.h5", "--delta", "1e-5", "--release-log", node / "log.jsonl",
            "--quiet", "--epsilon", "inf", *MAP, *extra]


def _nodes(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for n in nodes:
        n.mkdir()
    return nodes


def _assert_refused_on_both(results, nodes, words):
    for rc, _, err, seconds in results:
        errors = [line for line in err.splitlines() if line.startswith("Error: ")]
        assert rc != 0 and len(errors) == 1, err
        assert words in errors[0] and "nothing was read or released" in errors[0], errors[0]
        assert seconds < 120
    for n in nodes:
        assert not (n / "r.h5").exists() and release_log.read_log(n / "log.jsonl") == []
        assert not list(n.glob(".r.h5.tmp*"))


@pytest.mark.parametrize("case", ["batch-size", "order", "classes", "data", "bad-records"])
def test_two_nodes_that_disagree_on_the_plan_are_refused_before_reading(tmp_path, case):
    """Each node keeps blocks b % world == rank by its own options and its own copy of the data: with another
    --batch-size, another order or other records one node reads some records twice and others never, while the
    total still equals n. Every such difference is refused on every node before any record is read."""
    nodes = _nodes(tmp_path)
    x, y = make_images(40, seed=3), np.arange(40) % 4
    np.savez(nodes[0] / "d.npz", images=x, labels=y)
    args0 = node_embed(nodes[0], nodes[0] / "d.npz", "--classes", "4", "--batch-size", "10")
    extra1 = {"batch-size": ["--classes", "4", "--batch-size", "5"],
              "classes": ["--classes", "a,b,c,d", "--batch-size", "10"],
              "bad-records": ["--classes", "4", "--batch-size", "10", "--bad-records", "zero"]}
    if case == "order":
        perm = np.random.default_rng(0).permutation(40)
        np.savez(nodes[1] / "d.npz", images=x[perm], labels=y[perm])  # the same records, another order
    elif case == "data":
        x1 = x.copy()
        x1[15] = x[5]  # one record of rank 1's share replaced by a copy of one of rank 0's
        np.savez(nodes[1] / "d.npz", images=x1, labels=y)
    else:
        shutil.copy(nodes[0] / "d.npz", nodes[1] / "d.npz")
    args1 = node_embed(nodes[1], nodes[1] / "d.npz", *extra1.get(case, ["--classes", "4", "--batch-size", "10"]))
    words = {"batch-size": "--batch-size", "order": "the data itself", "classes": "the class names",
             "data": "the data itself", "bad-records": "--bad-records"}[case]
    _assert_refused_on_both(two_nodes([args0, args1]), nodes, words)


def test_two_nodes_whose_kernels_differ_are_refused_before_reading(tmp_path):
    """A node whose oneDNN runs other instructions (another CPU, or ONEDNN_MAX_CPU_ISA as here) rounds the same
    record's features otherwise in the last bits; a record added at the start moves every block boundary and so
    moves records between the nodes, changing their rows too: the sensitivity would not bound the change.
    Such nodes are refused before any record is read (review 17)."""
    nodes = _nodes(tmp_path)
    for n in nodes:
        np.savez(n / "d.npz", images=make_images(20, seed=3), labels=np.arange(20) % 2)
    args = [node_embed(n, n / "d.npz", "--classes", "2", "--batch-size", "5") for n in nodes]
    results = two_nodes(args, node_env=[{}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}])
    _assert_refused_on_both(results, nodes, "the variables that choose kernels (ATEN_CPU_CAPABILITY")
    assert "on machines of one kind" in results[0][2]


def test_two_nodes_whose_image_decoders_differ_are_refused_before_reading(tmp_path):
    """Pillow's wheels bundle their own libjpeg-turbo and zlib: a node with another build may turn the same file
    into other pixels, and a record added at the start moves other records between the nodes (review 38). The
    versions of the decoders are in the plan; node 1 here reports another libjpeg-turbo, as another wheel would."""
    nodes = _nodes(tmp_path)
    for n in nodes:
        np.savez(n / "d.npz", images=make_images(20, seed=3), labels=np.arange(20) % 2)
    other = tmp_path / "other_pillow"
    other.mkdir()
    (other / "sitecustomize.py").write_text(
        "from PIL import features\n"
        "real = features.version\n"
        "features.version = lambda name: '2.1.5' if name == 'libjpeg_turbo' else real(name)\n")
    args = [node_embed(n, n / "d.npz", "--classes", "2", "--batch-size", "5") for n in nodes]
    path = os.pathsep.join(p for p in (str(other), os.environ.get("PYTHONPATH")) if p)
    results = two_nodes(args, node_env=[{}, {"PYTHONPATH": path}])
    _assert_refused_on_both(results, nodes, "Pillow (with its libjpeg-turbo and zlib)")


def test_kernels_name_what_rounds_a_records_features():
    """The plan's kernel field differs where the kernel path does (an override of the instruction set, another
    device kind) and not with what leaves rounding alone (the number of threads)."""
    import torch

    from mepf.embed.plan import kernels

    base = kernels("cpu")
    assert base["device"] == ["cpu"] and base["cpu"][1] == torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernels("cpu") == base
    finally:
        torch.set_num_threads(threads)
    old = os.environ.get("ONEDNN_MAX_CPU_ISA")
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    try:
        assert kernels("cpu")["kernel_env"] != base["kernel_env"]
    finally:
        if old is None:
            del os.environ["ONEDNN_MAX_CPU_ISA"]
        else:
            os.environ["ONEDNN_MAX_CPU_ISA"] = old
    assert kernels("meta")["device"] == ["meta"] != base["device"]


def test_two_nodes_with_image_folders_that_differ_in_one_image_are_refused(tmp_path):
    nodes = _nodes(tmp_path)
    for i, n in enumerate(nodes):
        for j in range(12):
            d = n / "data" / f"c{j % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(make_images(1, seed=j + (100 if i and j == 7 else 0))[0, :, :, 0]).save(d / f"{j:02d}.png")
    args = [node_embed(n, n / "data", "--image-size", "28", "--channels", "1", "--batch-size", "3") for n in nodes]
    _assert_refused_on_both(two_nodes(args), nodes, "the data itself")


def test_two_nodes_with_the_same_plan_release_once_the_one_process_sums(tmp_path):
    """Two copies of the same data in other places (an image folder copied anew, an array file) and each
    node's own --out and --release-log: one release, on node 0, bitwise the one-process sums."""
    nodes = _nodes(tmp_path)
    x, y = make_images(23, seed=4), np.arange(23) % 3
    for n in nodes:
        np.savez(n / "d.npz", images=x, labels=y)
    one = embed(nodes[0] / "d.npz", tmp_path / "one.h5", tmp_path / "one.jsonl", "--classes", "3", "--epsilon", "inf")
    assert one.returncode == 0, one.stderr
    results = two_nodes([node_embed(n, n / "d.npz", "--classes", "3", "--batch-size", "4") for n in nodes])
    assert [r[0] for r in results] == [0, 0], results
    assert results[0][1].count("wrote ") == 1 and "wrote " not in results[1][1]
    a, b = load(tmp_path / "one.h5"), load(nodes[0] / "r.h5")
    for k in ("S1", "S2", "counts"):
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert not (nodes[1] / "r.h5").exists() and len(release_log.read_log(nodes[0] / "log.jsonl")) == 1


def test_two_nodes_whose_folders_hold_same_size_images_in_another_order_are_refused(tmp_path):
    """Uncompressed PNGs of one geometry all have one size: a listing of names and sizes cannot tell two
    swapped images apart, the images' bytes can."""
    nodes = _nodes(tmp_path)
    for i, n in enumerate(nodes):
        for j in range(12):
            d = n / "data" / f"c{j % 2}"
            d.mkdir(parents=True, exist_ok=True)
            k = {5: 7, 7: 5}.get(j, j) if i else j  # node 1: images 5 and 7 (same class) swapped
            Image.fromarray(make_images(1, seed=k)[0, :, :, 0]).save(d / f"{j:02d}.png", compress_level=0)
    sizes = {p.stat().st_size for p in (tmp_path / "node0").rglob("*.png")}
    assert len(sizes) == 1
    args = [node_embed(n, n / "data", "--image-size", "28", "--channels", "1", "--batch-size", "3") for n in nodes]
    _assert_refused_on_both(two_nodes(args), nodes, "the data itself")


@pytest.mark.parametrize("killed", [1, 0])
def test_a_node_lost_while_rank_0_releases_leaves_one_true_line(tmp_path, killed):
    """Rank 0 releases while the others wait to hear the outcome (review 49). Held at the release log's lock by this
    test, the other node is killed (1): the release was written and logged, yet rank 0 ended in gloo's traceback and
    exit 1 without saying so; now it says "wrote" with a warning. Rank 0 killed there (0): the other node's line
    says rank 0 was releasing and where to look, not gloo's traceback."""
    import fcntl
    import signal
    import threading
    import time

    nodes = _nodes(tmp_path)
    np.savez(nodes[0] / "d.npz", images=make_images(96, seed=2), labels=np.arange(96) % 3)
    shutil.copy(nodes[0] / "d.npz", nodes[1] / "d.npz")
    log = nodes[0] / "log.jsonl"
    log.touch(mode=0o600)
    held = os.open(log, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    port, procs = _free_port(), []
    for rank, node in enumerate(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "mepf",
               *[str(a) for a in node_embed(node, node / "d.npz", "--classes", "3", "--epsilon", "1")]]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    said, out = [], []
    readers = [threading.Thread(target=lambda f=f, to=to: to.extend(iter(f.readline, "")), daemon=True)
               for f, to in ((procs[0].stderr, said), (procs[0].stdout, out))]
    for r in readers:
        r.start()

    def until(done, what):
        deadline = time.monotonic() + 240
        while not done():
            assert time.monotonic() < deadline and procs[0].poll() is None, f"{what}: {''.join(said)}"
            time.sleep(0.05)

    def held_back(times):  # rank 0 waits for the lock for the `times`th time
        until(lambda: sum("waiting for another mepf embed" in line for line in said) >= times, "never held back")

    try:
        held_back(1)  # taken before the pass, to create the log's key
        fcntl.flock(held, fcntl.LOCK_UN)
        until(release_log.key_path(log).exists, "no key")  # rank 0 holds the lock now
        fcntl.flock(held, fcntl.LOCK_EX)  # back as soon as rank 0 lets go: its pass takes far longer
        held_back(2)  # to append the entry: the sums are exchanged
        workers = [int(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout or 0)
                   for p in procs]
        assert all(workers), workers
        os.kill(workers[killed], signal.SIGKILL)
        if killed == 1:
            procs[1].communicate(timeout=120)
    finally:
        os.close(held)
    if killed == 1:  # rank 0's end, not its agent's: torchrun waits up to 5 minutes for the lost node to leave
        until(lambda: not os.path.exists(f"/proc/{workers[0]}/cmdline") or
              not open(f"/proc/{workers[0]}/cmdline").read(), "rank 0 never ended")
        procs[0].kill()
    procs[0].wait(timeout=180)
    for r in readers:
        r.join(timeout=60)
    out = "".join(out)
    err = "".join(said) if killed == 1 else procs[1].communicate(timeout=180)[1]
    root = str(Path(__file__).resolve().parents[1])
    frames = [line for line in err.splitlines() if f'File "{root}' in line and "site-packages" not in line]
    assert not frames, err  # no traceback through mepf's code (torchrun's own, of a failed node, may follow)
    if killed == 1:
        assert out.count("wrote ") == 1 and "exitcode" not in err, (out, err)  # torchrun names a worker that failed
        assert "another rank stopped after the sums were exchanged" in err and "complete and logged" in err, err
        assert len(release_log.read_log(log)) == 1 and audit(nodes[0] / "r.h5").ok
    else:
        errors = [line for line in err.splitlines() if line.startswith("Error: ")]
        assert procs[1].returncode != 0 and len(errors) == 1, err
        assert "collective failed" in errors[0] and "rank 0 was releasing" in errors[0], errors[0]
        assert release_log.read_log(log) == [] and not (nodes[0] / "r.h5").exists()


def test_a_node_that_stops_before_joining_stops_the_others_within_the_join_timeout(tmp_path):
    """A refused option on one node before it joins (a click error, a device it lacks) used to leave the other
    nodes waiting six hours in init_process_group."""
    nodes = _nodes(tmp_path)
    np.savez(nodes[0] / "d.npz", images=make_images(8))
    shutil.copy(nodes[0] / "d.npz", nodes[1] / "d.npz")
    results = two_nodes([node_embed(nodes[0], nodes[0] / "d.npz"), node_embed(nodes[1], nodes[1] / "d.npz",
                                                                              "--workers", "-1")],
                        env={"MEPF_DIST_JOIN_MINUTES": "0.3"})
    rc, _, err, seconds = results[0]
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert rc != 0 and len(errors) == 1 and "not every rank joined" in errors[0] and seconds < 120, err
    assert results[1][0] != 0 and "--workers" in results[1][2]
    assert not (nodes[0] / "r.h5").exists() and release_log.read_log(nodes[0] / "log.jsonl") == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_node_without_the_device_asked_for_fails_every_node_in_one_line(tmp_path):
    nodes = _nodes(tmp_path)
    np.savez(nodes[0] / "d.npz", images=make_images(8))
    shutil.copy(nodes[0] / "d.npz", nodes[1] / "d.npz")
    results = two_nodes([node_embed(nodes[0], nodes[0] / "d.npz", "--device", "cpu"),
                         node_embed(nodes[1], nodes[1] / "d.npz", "--device", "cuda")])
    for rc, _, err, seconds in results:
        errors = [line for line in err.splitlines() if line.startswith("Error: ")]
        assert rc != 0 and len(errors) == 1 and "cuda" in errors[0].lower() and seconds < 120, err
    assert not (nodes[0] / "r.h5").exists()


def test_a_log_with_open_samples_from_an_earlier_mepf_is_refused_under_torchrun(tmp_path):
    """Entries of logs from before sealing hold tags under the log's own key, which only a one-process run
    may compute; under torchrun a superset of such a release went through as a first release."""
    import json

    from mepf.embed.fingerprint import Fingerprint, key_id, keyed_digest

    x, y = make_images(21, seed=8), np.arange(21) % 3
    np.savez(tmp_path / "a.npz", images=x[:20], labels=y[:20])
    np.savez(tmp_path / "b.npz", images=x, labels=y)
    log = tmp_path / "log.jsonl"
    key = bytes(range(32))
    release_log.key_path(log).write_text(key.hex() + "\n")
    release_log.key_path(log).chmod(0o600)
    old = Fingerprint(legacy_key=key)
    old.update(x[:20], y[:20])
    entry = {"fingerprint": keyed_digest(key, old.hexdigest()), "sketch": old.legacy_sketch.to_json(),
             "key_id": key_id(key), "output": "a.h5", "output_sha256": "0" * 64, "mu": 0.5, "epsilon": 1.0,
             "delta": 1e-5, "relation": "add-remove", "repeat": False}
    log.write_text(json.dumps(entry) + "\n")
    log.chmod(0o600)
    r = embed(tmp_path / "b.npz", tmp_path / "b.h5", log, "--classes", "3", "--epsilon", "1", ranks=2)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert r.returncode != 0 and len(errors) == 1 and "earlier mepf" in errors[0], r.stderr
    assert not (tmp_path / "b.h5").exists() and len(release_log.read_log(log)) == 1
    one = embed(tmp_path / "b.npz", tmp_path / "b.h5", log, "--classes", "3", "--epsilon", "1")
    assert one.returncode != 0 and "shares most of its records" in one.stderr  # one process: compared, refused


def test_an_array_file_reading_another_file_is_refused(tmp_path):
    """Records that an .h5 takes from another file (external storage, an external link, a virtual dataset)
    are not in the bytes the nodes' plan compares: refused before the pass, in one process too."""
    import h5py

    x = make_images(8)
    (tmp_path / "raw.bin").write_bytes(x.tobytes())
    with h5py.File(tmp_path / "ext.h5", "w") as f:
        f.create_dataset("images", shape=x.shape, dtype="u1", external=[(str(tmp_path / "raw.bin"), 0, x.nbytes)])
    np.savez(tmp_path / "plain.npz", images=x)
    with h5py.File(tmp_path / "inner.h5", "w") as f:
        f["images"] = x
    with h5py.File(tmp_path / "link.h5", "w") as f:
        f["images"] = h5py.ExternalLink(str(tmp_path / "inner.h5"), "/images")
    for name in ("ext.h5", "link.h5"):
        r = embed(tmp_path / name, tmp_path / "x.h5", tmp_path / "log.jsonl", "--epsilon", "1")
        errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
        assert r.returncode == 2 and len(errors) == 1 and "stored outside the file" in errors[0], r.stderr
    assert not (tmp_path / "x.h5").exists()


def test_a_read_error_in_the_pass_is_one_line(tmp_path):
    """A damaged chunk of a compressed .h5 makes h5py raise mid-pass: one line, not a traceback, no file."""
    import h5py

    x = make_images(16)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("images", data=x, chunks=(4, 28, 28, 1), compression="gzip")
        offset = f["images"].id.get_chunk_info(2).byte_offset
    raw = bytearray((tmp_path / "d.h5").read_bytes())
    raw[offset:offset + 16] = bytes(16)
    (tmp_path / "d.h5").write_bytes(bytes(raw))
    r = embed(tmp_path / "d.h5", tmp_path / "x.h5", tmp_path / "log.jsonl", "--epsilon", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "reading the data failed" in errors[0]
    assert not (tmp_path / "x.h5").exists() and release_log.read_log(tmp_path / "log.jsonl") == []


def test_two_nodes_training_with_other_options_are_refused(tmp_path, release):
    """Each node trains with its own command line: another --lr or --steps would make the replicas diverge or
    leave one rank waiting in a collective."""
    nodes = _nodes(tmp_path)
    args = ["--width", "8", "--batch-size", "6", "--grid-every", "0", "--snapshot-every", "0", "--device", "cpu",
            "--quiet", "--steps"]
    results = two_nodes([["synthesize", release, "--out", nodes[0] / "run", *args, "4"],
                         ["synthesize", release, "--out", nodes[1] / "run", *args, "400", "--lr", "0.02"]])
    for rc, _, err, seconds in results:
        errors = [line for line in err.splitlines() if line.startswith("Error: ")]
        assert rc != 0 and len(errors) == 1 and "the training options" in errors[0] and seconds < 120, err
    assert not (nodes[0] / "run" / "generator.pt").exists()


def test_ranks_of_one_node_must_find_the_same_data_files():
    """The ranks of a node compare the identities of the files they opened (only the node's first rank digests
    their bytes): another file on one rank of a node is refused on every rank; other nodes' files may differ."""
    import struct

    from mepf.embed.plan import files_disagreement

    def rows(*given):  # (node, ident) per rank; local ranks numbered within each node, in rank order
        seen: dict = {}
        out = []
        for node, ident in given:
            out.append(struct.pack("<qq", node, seen.setdefault(node, 0)) + ident * 32)
            seen[node] += 1
        return out

    assert files_disagreement(rows((0, b"a"), (0, b"a"), (2, b"b"), (2, b"b"))) is None
    error = files_disagreement(rows((0, b"a"), (0, b"a"), (2, b"b"), (2, b"c")))
    assert error.startswith("rank 3 found other data files") and "nothing was read or released" in error
    assert files_disagreement(rows((0, b"a"), (0, b"x"), (0, b"y"))).startswith("ranks 1, 2 found")


def test_a_node_whose_ranks_are_not_numbered_from_zero_is_refused():
    """Review 23 F5: only a node's local rank 0 digests its data (plan_of), so under a launcher that numbers a
    node's ranks otherwise (none 0, or two 0s) that node's data was never compared with rank 0's."""
    import struct

    from mepf.embed.plan import files_disagreement

    def row(node, local):
        return struct.pack("<qq", node, local) + b"a" * 32

    assert files_disagreement([row(0, 0), row(0, 1), row(2, 0), row(2, 1)]) is None
    for bad in ([row(0, 0), row(0, 1), row(2, 1), row(2, 2)],  # the second node has no local rank 0
                [row(0, 0), row(0, 0)],  # two 0s, one node
                [row(0, 1)]):
        error = files_disagreement(bad)
        assert error and "not numbered 0.." in error and "nothing was read" in error, error


_AGREE = """
import sys
from pathlib import Path
import torch.distributed as dist
from mepf.artifacts.errors import MepfError
from mepf.embed.files import ArraySource
from mepf.embed.plan import agree_on_files
dist.init_process_group("gloo")
rank = dist.get_rank()
if sys.argv[-1] == "shift":  # a launcher numbering the node's ranks 1, 2
    import os
    os.environ["LOCAL_RANK"] = str(rank + 1)
try:
    agree_on_files(ArraySource(sys.argv[2 + rank], None))
    said = "agreed"
except MepfError as e:
    said = f"refused: {e}"
Path(sys.argv[1], f"rank{rank}.txt").write_text(said)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("same", [True, False, "shift"])
def test_two_ranks_of_a_node_compare_the_files_they_opened(tmp_path, same):
    """Under torchrun, two ranks of one node given the same path, where the file was replaced between their starts
    (here: each rank opens a file of its own with the same bytes), are refused on both ranks; the same file
    agrees, unless LOCAL_RANK numbers the node's ranks 1, 2 (no rank would digest the node's data)."""
    np.savez(tmp_path / "a.npz", images=make_images(8, seed=1))
    shutil.copy(tmp_path / "a.npz", tmp_path / "b.npz")
    script = tmp_path / "agree.py"
    script.write_text(_AGREE)
    files = [tmp_path / "a.npz", tmp_path / ("b.npz" if same is False else "a.npz")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(tmp_path), *map(str, files), str(same)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [(tmp_path / f"rank{i}.txt").read_text() for i in range(2)]
    if same == "shift":
        assert all(line.startswith("refused: the ranks of one node are not numbered 0..1") for line in lines), lines
    elif same:
        assert lines == ["agreed", "agreed"]
    else:
        assert all(line.startswith("refused: rank 1 found other data files") for line in lines), lines


_RANK1_ELSEWHERE = """import os
if os.environ.get("LOCAL_RANK") == "1":
    os.chdir(os.environ["MEPF_TEST_RANK1_DIR"])
"""


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_mepf_embed_refuses_ranks_of_a_node_that_found_other_files(tmp_path, kind):
    """End to end: `mepf embed` under torchrun, the node's two ranks given the same relative --data, which for
    rank 1 names another copy of the same bytes (as when the data was replaced between the ranks' starts; only
    the node's first rank digests bytes). Every rank stops before any record is read, nothing is written."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    if kind == "npz":
        np.savez(a / "d.npz", images=make_images(16, seed=2), labels=np.arange(16) % 2)
        data, extra = "d.npz", ["--classes", "2"]
    else:
        x = make_images(12, seed=2)
        for i in range(12):
            (a / "d" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i, :, :, 0]).save(a / "d" / f"c{i % 2}" / f"{i:02d}.png")
        data, extra = "d", ["--image-size", "28", "--channels", "1"]
    shutil.copytree(a, b)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_RANK1_ELSEWHERE)  # rank 1 starts in b/: its --data is b's copy

    def run(rank1_dir, name):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MEPF_TEST_RANK1_DIR": str(rank1_dir),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "mepf",
               "embed", "--data", data, "--out", str(tmp_path / f"{name}.h5"), "--delta", "1e-5", "--release-log",
               str(tmp_path / f"{name}.jsonl"), "--quiet", "--epsilon", "inf", "--batch-size", "4", *MAP, *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=a, timeout=600)

    same = run(a, "same")  # the hook itself changes nothing when both ranks find the same files
    assert same.returncode == 0 and (tmp_path / "same.h5").exists(), same.stderr
    r = run(b, "other")
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert r.returncode != 0 and errors, r.stderr
    assert all("rank 1 found other data files" in e and "nothing was read or released" in e for e in errors), errors
    assert not (tmp_path / "other.h5").exists() and release_log.read_log(tmp_path / "other.jsonl") == []
    assert not list(tmp_path.glob(".other.h5.tmp*"))


@pytest.mark.parametrize("value", ["x", "node1", str(2 ** 64), "-1", ""])
def test_a_launchers_number_that_is_not_one_is_said_in_one_line(monkeypatch, value):
    """LOCAL_RANK, LOCAL_WORLD_SIZE or GROUP_RANK that is not a whole number in range gave a ValueError or struct.error
    traceback (review 24 F3); the parse used everywhere takes "00" as 0, as the check of the numbering does."""
    from mepf.core.distributed import env_int, launch_problem

    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.setenv(name, value)
        problem = launch_problem()
        assert problem.startswith(f"{name}=") and "is not a whole number" in problem and "\n" not in problem
        assert env_int(name, 7) == 7
        monkeypatch.setenv(name, "00" if name != "LOCAL_WORLD_SIZE" else "02")
    assert launch_problem() is None and env_int("LOCAL_RANK", 7) == 0 and env_int("LOCAL_WORLD_SIZE", 7) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")  # divided the cores by it (review 25)
    monkeypatch.setenv("RANK", "1")
    assert launch_problem().startswith("LOCAL_WORLD_SIZE='0' (rank 1) is not a whole number from 1")
    assert env_int("LOCAL_WORLD_SIZE", 1, least=1) == 1
    from mepf.artifacts.errors import MepfError
    from mepf.core.distributed import launched

    for size, several in (("", False), ("1", False), ("0", False), ("3", True)):
        monkeypatch.setenv("WORLD_SIZE", size)
        assert launched() is several
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(MepfError, match="WORLD_SIZE='x' is not a whole number"):
        launched()


@pytest.mark.parametrize("rank", ["x", "+1", "1_0", "\u0663", str(2 ** 31), ""])
def test_a_rank_that_is_not_a_number_is_one_line_before_joining(monkeypatch, rank):
    """Review 26 F6: RANK reached torch's int() inside init_process_group, and the user read "not every rank joined
    ... (ValueError)"; "+1", "1_0" and an Arabic-Indic three are ranks 1, 10 and 3 to Python's int() but rank 0 to
    the CLI's printing rule, so rank-0 output was printed twice."""
    from mepf.artifacts.errors import MepfError
    from mepf.core.launch_env import is_main_rank, launched

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(MepfError, match=r"^RANK='.*' is not a whole number from 0 to 2\^31-1 \(WORLD_SIZE says") as e:
        launched()
    assert "\n" not in str(e.value) and is_main_rank()  # the process that cannot say its rank prints its error
    monkeypatch.setenv("RANK", "01")
    assert launched() and not is_main_rank()
    monkeypatch.setenv("WORLD_SIZE", str(2 ** 31))
    with pytest.raises(MepfError, match=r"WORLD_SIZE='2147483648' is not a whole number from 0 to 2\^31-1"):
        launched()


def test_a_cuda_rank_past_the_nodes_gpus_is_a_launch_error(monkeypatch):
    """Review 26 F7 (read, not run: no GPU here): more processes per node than GPUs gave torch's "invalid device
    ordinal" traceback on the ranks past them and a wait on the others; join now agrees this line on every rank."""
    import torch

    from mepf.core.distributed import gpu_problem

    monkeypatch.setenv("LOCAL_RANK", "2")
    said = gpu_problem(torch.device("cuda"), count=2)
    assert said.startswith("LOCAL_RANK 2 names a GPU this process does not see (it sees 2")
    assert "--nproc-per-node 2" in said
    assert gpu_problem(torch.device("cpu"), count=0) is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert gpu_problem(torch.device("cuda"), count=2) is None


_LAUNCHER = """import os
mode, local = os.environ.get("MEPF_TEST_LAUNCHER"), os.environ.get("LOCAL_RANK")
if mode == "shift" and local is not None:  # a launcher numbering the node's ranks 1, 2
    os.environ["LOCAL_RANK"] = str(int(local) + 1)
elif mode == "bad" and local == "1":
    os.environ["LOCAL_RANK"] = "x"
"""


@pytest.mark.parametrize("mode, said", [
    ("shift", "the ranks of one node are not numbered 0..1 by LOCAL_RANK"),
    ("bad", "LOCAL_RANK='x' (rank 1) is not a whole number")])
def test_a_misnumbered_launch_is_refused_in_one_line_on_every_rank(tmp_path, mode, said):
    """A node whose ranks LOCAL_RANK numbers 1, 2 has no local rank 0, which alone printed errors: every rank exited
    2 without a word (review 24 F3). Such errors now print on every rank; nothing is read or written."""
    np.savez(tmp_path / "d.npz", images=make_images(8, seed=1), labels=np.arange(8) % 2)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEPF_TEST_LAUNCHER": mode,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "mepf", "embed", "--data", str(tmp_path / "d.npz"), "--classes", "2", "--out",
                        str(tmp_path / "x.h5"), "--delta", "1e-5", "--release-log", str(tmp_path / "log.jsonl"),
                        "--quiet", "--epsilon", "inf", *MAP], capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert r.returncode != 0 and len(errors) == 2 and all(said in e for e in errors), r.stderr
    # torchrun's own report of a failed child is a traceback; mepf's ranks print none
    assert not any(w in r.stderr for w in ("ValueError", "struct.error", "Connection closed")), r.stderr
    assert not (tmp_path / "x.h5").exists()


def test_a_misnumbered_node_is_refused_by_synthesize_too(tmp_path, release):
    """Review 26 F5: only embed compared the ranks' numbering (before it reads data); synthesize under a launcher
    numbering a node's ranks 1, 2 ran with no rank that prints for that node, and two ranks could share a GPU.
    The check is now made where every stage joins the ranks (distributed.join)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_LAUNCHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEPF_TEST_LAUNCHER": "shift",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "mepf", "synthesize", str(release), "--out", str(tmp_path / "run"), "--steps", "2", "--width",
                        "8", "--batch-size", "6", "--device", "cpu", "--quiet"], capture_output=True, text=True,
                       env=env, timeout=600)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert r.returncode != 0 and len(errors) == 2, r.stderr
    assert all("the ranks of one node are not numbered 0..1 by LOCAL_RANK" in e for e in errors), r.stderr
    assert not (tmp_path / "run" / "generator.pt").exists()
