"""Checks that need CUDA (marked `cuda`; skipped elsewhere; scripts/gpu_check.sh runs them on a GPU machine):
stage 1 and stage 2 give the same feature vectors under CUDA kernels, bf16-autocast training follows fp32
training, and two GPUs under torchrun (NCCL) give bitwise the one-GPU exact sums."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mepf.artifacts import load
from mepf.core.features import feature_map_from_spec
from mepf.embed.files import ArraySource
from mepf.embed.release import accumulate
from mepf.embed.transform import Transform
from tests.conftest import make_images
from tests.test_distributed import embed

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    np.savez(d / "d.npz", images=make_images(200, seed=5), labels=np.arange(200) % 10)
    r = embed(d / "d.npz", d / "r.h5", d / "log.jsonl", "--classes", "10", "--epsilon", "1000", "--device", "cuda",
              "--backbone", "efficientnet-lite0", "--weights", "pretrained", "--layers", "stem,block0,block1,block2")
    assert r.returncode == 0, r.stderr
    return d / "r.h5"


def test_stage1_and_stage2_features_agree_on_cuda(release, tmp_path):
    spec = load(release).feature_spec
    images = make_images(10, seed=6)
    np.savez(tmp_path / "ten.npz", images=images, labels=np.arange(10))
    sums = accumulate(ArraySource(tmp_path / "ten.npz", [str(i) for i in range(10)]), Transform((28, 28), 1),
                      feature_map_from_spec(spec), "mean+second", spec["C1"], spec["C2"], batch_size=16,
                      device="cuda", progress=False)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().cuda() / 255  # what a generator outputs
    fmap = feature_map_from_spec(spec).cuda()
    with torch.no_grad():
        phis = fmap.embed(x, ("S1", "S2"))
        assert torch.equal(fmap.phi("S2", x), phis["S2"])
    for m in ("S1", "S2"):
        np.testing.assert_allclose(sums.sums[m], phis[m].double().cpu().numpy(), atol=1e-5)


def test_bf16_autocast_training_follows_fp32(release, tmp_path):
    from mepf.synthesize.train import TrainOptions, start

    dist = {}
    for precision in ("fp32", "bf16", "bf16-generator"):
        start(TrainOptions(release=str(release), out=str(tmp_path / precision), steps=60, batch_size=50, width=32,
                           grid_every=0, snapshot_every=0, log_every=10, device="cuda", precision=precision),
              progress=False)
        stats = [json.loads(l) for l in (tmp_path / precision / "stats.jsonl").read_text().splitlines()]
        dist[precision] = (stats[0]["dist_S1"], stats[-1]["dist_S1"])
    for first, last in dist.values():
        assert last < 0.7 * first  # both learn
    for p in ("bf16", "bf16-generator"):  # and end within 1.5x of fp32
        assert abs(np.log(dist[p][1] / dist["fp32"][1])) < np.log(1.5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_give_bitwise_the_one_gpu_sums(tmp_path):
    np.savez(tmp_path / "d.npz", images=make_images(37, seed=4), labels=np.arange(37) % 3)
    args = ("--classes", "3", "--epsilon", "inf", "--device", "cuda")
    one = embed(tmp_path / "d.npz", tmp_path / "one.h5", tmp_path / "one.jsonl", *args)
    two = embed(tmp_path / "d.npz", tmp_path / "two.h5", tmp_path / "two.jsonl", *args, ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = load(tmp_path / "one.h5"), load(tmp_path / "two.h5")
    for k in ("S1", "S2", "counts"):
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
