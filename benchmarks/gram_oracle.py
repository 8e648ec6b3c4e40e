"""Would a release that also held the class means of the shallow layers' channel Gram matrices train better
generators? A public-data simulation of issue 29's richer-statistics lever before any stage-1 change.

It simulates, from an existing release R of public data D, the release a stage 1 with a third statistic S3 would
have written under the same mu: S3 is the per-class sum over D of each image's Gram vector (the upper triangle of
A A^T / HW of each named layer's C x HW map, each layer scaled to norm 1/sqrt(L), so norm 1 per image: the
sensitivity of the sum under add-remove), with Gaussian noise sigma3 = 1 / (mu sqrt(W)); S1 and S2 are topped up
with independent noise from R's sigma to the sigma of their weight (1 - W - w_counts) / 2, so that the simulated
release is exactly the re-split one. Stage 2 then trains as `mepf synthesize` does, with one extra term: the squared
distance of the batch's per-class mean Gram vectors to S3 / counts, times --gram-weight. It reads D again and spends
no budget it records: an experiment on public data, never a release.

    python benchmarks/gram_oracle.py bench/stem3/release-eps10-seed0.h5 fashion-mnist:train-55k \
        --out bench/gram/run-s0 --seed 0 --steps 4000 --lr-schedule cooldown
    mepf evaluate bench/gram/run-s0 --reference fashion-mnist:val-5k -n 5000 --metrics accuracy,embedding
"""
import argparse
import json
import math
import secrets
from pathlib import Path

import numpy as np
import torch
from gram_fit import gram_vector  # benchmarks/ is the script's folder

from mepf.artifacts import load
from mepf.evaluate.data import load_reference
from mepf.synthesize import train
from mepf.synthesize.objective import class_means
from mepf.synthesize.options import TrainOptions


def gram_vectors(maps: list) -> torch.Tensor:
    """(B, sum C(C+1)/2): each map's (B, C, H, W) unit-norm Gram vector scaled by 1/sqrt(L), float32."""
    return torch.cat([gram_vector(m.float()) / math.sqrt(len(maps)) for m in maps], dim=1)


def real_sums(fmap, images: np.ndarray, labels: np.ndarray, k: int, n_layers: int, batch: int = 500) -> np.ndarray:
    sums = None
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s:s + batch]).permute(0, 3, 1, 2).float() / 255
            v = gram_vectors(fmap.layer_maps(x, n_layers)).double()
            if sums is None:
                sums = torch.zeros(k, v.shape[1], dtype=torch.float64)
            sums.index_add_(0, torch.from_numpy(labels[s:s + batch].astype(np.int64)), v)
    return sums.numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release", help="a release of PUBLIC data (its ledger's mu and sigmas are used)")
    ap.add_argument("data", help="the public data the release was made of, e.g. fashion-mnist:train-55k")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--lr-schedule", default="cooldown")
    ap.add_argument("--layers", type=int, default=4, help="the first N layers of the map (Lite0: stem, block0-2)")
    ap.add_argument("--budget-weight", type=float, default=0.1, help="W: S3's share of mu^2")
    ap.add_argument("--gram-weight", type=float, default=1.0)
    ap.add_argument("--noise-seed", type=int, default=None, help="default: a fresh secret seed")
    a = ap.parse_args()
    from mepf.embed.datasets import DATASETS

    if a.data.split(":")[0] not in DATASETS:  # S3 is computed from D without a release log or accounting
        raise SystemExit(f"{a.data}: gram_oracle simulates on public named datasets only ({', '.join(DATASETS)}); "
                         "private data is released by mepf embed, never by this script")

    release = load(a.release)
    ledger = release.ledger
    mu = ledger["mu"]
    sig = {r["name"]: r for r in ledger["releases"]}
    assert set(sig) == {"S1", "S2", "counts"} and ledger["relation"] == "add-remove", "a default add-remove release"
    w_moments = (1 - a.budget_weight - sig["counts"]["weight"]) / 2
    sigma12 = {m: sig[m]["sensitivity"] / (mu * math.sqrt(w_moments)) for m in ("S1", "S2")}
    sigma3 = 1.0 / (mu * math.sqrt(a.budget_weight))
    rng = np.random.default_rng(a.noise_seed if a.noise_seed is not None else secrets.randbits(128))
    k = len(release.class_names)
    counts = np.maximum(release.arrays["counts"].astype(np.float64), 1.0)[:, None]

    geometry = (*release.data_spec["transform"]["image_size"], release.data_spec["transform"]["channels"])
    opts = TrainOptions(release=a.release, out=a.out, seed=a.seed, steps=a.steps, lr_schedule=a.lr_schedule,
                        grid_every=0, snapshot_every=0)
    topped = {}
    for m in ("S1", "S2"):
        extra = sigma12[m] ** 2 - sig[m]["sigma"] ** 2
        assert extra >= 0
        topped[m] = (release.arrays[m].astype(np.float64) + rng.normal(0, math.sqrt(extra), release.arrays[m].shape))
    target = {}

    prepare = train.prepare

    def prepare_simulated(opts, device=None):
        rel, fmap, arch, dev = prepare(opts, device)
        for m in ("S1", "S2"):
            rel.arrays[m] = topped[m].astype(np.float32)
        ref = load_reference(a.data, geometry=geometry, flag="data")
        sums = real_sums(fmap, ref.images, ref.labels, k, a.layers)
        noisy = sums + rng.normal(0, sigma3, sums.shape)
        target["S3"] = torch.as_tensor(noisy / counts, dtype=torch.float32, device=dev)
        print(f"S3: {sums.shape[1]} numbers per class from {len(ref.images)} images; sigma3 {sigma3:.4f}, S1/S2 "
              f"sigma {sig['S1']['sigma']:.4f} -> {sigma12['S1']:.4f}")
        return rel, fmap, arch, dev

    def gram_term(trainer, x, y):
        with torch.autocast(x.device.type, enabled=False):
            v = gram_vectors(trainer.fmap.layer_maps(x.float(), a.layers))
            mu_f, present = class_means(v, y, k)
            d = ((target["S3"][present] - mu_f[present]) ** 2).sum(1).mean()
        return a.gram_weight * d, {"dist_S3": d.detach()}

    train.prepare = prepare_simulated
    train.Trainer.extra_term = gram_term
    train.start(opts)
    Path(a.out, "gram_oracle.json").write_text(json.dumps(
        {**vars(a), "mu": mu, "sigma3": sigma3, "sigma_S1_S2": sigma12["S1"], "release_sigma": sig["S1"]["sigma"]},
        indent=2))


if __name__ == "__main__":
    main()
