"""Stage 2's target and objective: per-class mean embeddings of generated images against the release."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F

from mepf.artifacts.errors import MepfError
from mepf.core import distributed


class Target:
    """What a released file offers stage 2 (post-processing only): per-class noisy means per moment
    and the noisy label prior."""

    def __init__(self, release, device):
        self.moments = release.moments
        self.means = {m: torch.as_tensor(v, dtype=torch.float32, device=device)
                      for m, v in release.class_means().items()}
        self.prior = torch.as_tensor(release.label_prior(), dtype=torch.float32)
        self.num_classes = len(release.class_names)


def class_means(feats: torch.Tensor, y: torch.Tensor, k: int, sums_by: str = "index_add"):
    """Per-class means of rows of `feats` (B, D) by labels y over the global batch; returns (means (K, D),
    present mask (K,)). sums_by: "index_add", or "matmul" (a one-hot product: the same sums but for rounding,
    kept for runs recorded with it)."""
    if sums_by not in ("matmul", "index_add"):
        raise ValueError(f"sums_by must be matmul or index_add, not {sums_by!r}")
    if sums_by == "matmul":
        onehot = F.one_hot(y, k).to(feats.dtype)
        return means_of_sums(onehot.T @ feats, onehot.sum(0))
    return means_of_sums(feats.new_zeros(k, feats.shape[1]).index_add(0, y, feats),
                         torch.bincount(y, minlength=k).to(feats.dtype))


def means_of_sums(sums: torch.Tensor, cnt: torch.Tensor):
    """(means (K, D), present mask (K,)) of this rank's per-class sums and counts. Under torchrun both are summed
    over ranks: the value is the mean of every rank's samples, the gradient flows to this rank's own
    (S_all + S - S.detach()); with one process it is exactly the local mean."""
    if distributed.current().active:
        total = distributed.all_sum_(torch.cat([sums.detach(), cnt[:, None].to(sums.dtype)], dim=1))
        sums = total[:, :-1] + (sums - sums.detach())  # the value bitwise the same on every rank (review 44 H3)
        cnt = total[:, -1]
    return sums / cnt.clamp_min(1)[:, None], cnt > 0


def fake_embeddings(fmap, images, y, target: Target, fast: bool = True, sums_by: str = "index_add") -> dict:
    """{moment: (per-class mean of phi over a generated batch (K, D), float32 and differentiable; the classes
    present, a mask (K,), or None when all are)}.
    fast: the fused phi, and the class sums in float32 even under a bf16 autocast; False: as runs started
    before both computed it (autograd through phi1/phi2, the sums in the autocast's dtype). sums_by: "fused"
    (phi and the class sums in one step that writes no phi row; fast only), or as class_means."""
    if sums_by == "fused":
        if not fast:
            raise ValueError("sums_by fused needs the fast paths")
        k = target.num_classes
        cnt = torch.bincount(y, minlength=k).float()
        fake = {m: means_of_sums(s, cnt) for m, s in fmap.class_sums(images, y, k, target.moments).items()}
    else:
        phis = fmap.embed(images, target.moments, fused=fast)
        with torch.autocast(images.device.type, enabled=False) if fast else contextlib.nullcontext():
            fake = {m: class_means(p, y, target.num_classes, sums_by) for m, p in phis.items()}
    # every class present (a balanced batch of at least K): no mask, so that no use copies the rows it selects or
    # waits for the device; the same numbers as selecting all of them
    return {m: (mu, None if bool(p.all()) else p) for m, (mu, p) in fake.items()}


def present(t: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """The rows of a (K, ...) tensor of the classes present (p: fake_embeddings' mask, None for all)."""
    return t if p is None else t[p]


def check_weight(flag: str, key: str, w) -> None:
    """A weight of the distance (--moment-weights, --layer-weights) is a finite real number >= 0."""
    if not (isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0):
        raise MepfError(f"{flag} {key}={w}: a weight must be a finite number >= 0")


def layer_weight_vector(weights: dict, dims: dict, device="cpu") -> torch.Tensor | None:
    """The weight of each coordinate of f(x) (D,) from {layer: w} or {FIRST..LAST: w} (layers in forward order,
    both ends included; unnamed layers 1), given {layer: its coordinates} in order; None when every weight is 1.
    A stage-2 choice: it weighs the distance to the release, whose noise and guarantee it does not touch."""
    names = list(dims)
    per_layer = dict.fromkeys(names, 1.0)
    for key, w in weights.items():
        first, sep, last = key.partition("..")
        bad = [n for n in ((first, last) if sep else (key,)) if n not in dims]
        if bad:
            raise MepfError(f"--layer-weights names {bad[0]!r}; this file's feature map has the layers "
                            f"{', '.join(names)} (or FIRST..LAST for a range)")
        i, j = names.index(first), names.index(last if sep else first)
        if j < i:
            raise MepfError(f"--layer-weights range {key}: {last} comes before {first}; give FIRST..LAST in order")
        check_weight("--layer-weights", key, w)
        per_layer.update(dict.fromkeys(names[i:j + 1], float(w)))
    if not any(per_layer.values()):
        raise MepfError("--layer-weights gives every layer weight 0: nothing would be matched; keep one above 0")
    if all(w == 1.0 for w in per_layer.values()):
        return None
    return torch.cat([torch.full((dims[n],), per_layer[n]) for n in names]).to(device)


def squared_distance(target: Target, fake: dict, coord_weights: torch.Tensor | None = None) -> dict:
    """Mean over the classes present of ||mu_real[c] - mu_fake[c]||^2 (each coordinate's square times its
    weight, if given), per moment."""
    sq = {m: (present(target.means[m], p) - present(mu, p)) ** 2 for m, (mu, p) in fake.items()}
    return {m: (s if coord_weights is None else coord_weights * s).sum(1).mean() for m, s in sq.items()}


@torch.no_grad()
def distance_of_batches(batches, fmap, target: Target, device="cpu") -> dict:
    """Squared distance, per moment and averaged over the classes present, between the class-conditional
    mean embedding of images given as (x in [0,1] (B,C,H,W), y) batches and the released one."""
    k = target.num_classes
    sums = {m: torch.zeros_like(target.means[m]) for m in target.moments}
    counts = torch.zeros(k, device=target.means[target.moments[0]].device)
    for x, y in batches:
        y = y.to(counts.device)
        onehot = F.one_hot(y, k).float()
        for m, p in fmap.embed(x.to(device), target.moments).items():
            sums[m] += onehot.T @ p.to(counts.device)
        counts += onehot.sum(0)
    present = counts > 0
    return {m: float(((target.means[m] - sums[m] / counts.clamp_min(1)[:, None])[present] ** 2).sum(1).mean())
            for m in target.moments}


def embedding_distance(generator, fmap, target: Target, n: int = 500, batch_size: int = 100, seed: int = 0,
                       device="cpu") -> dict:
    """Privacy-free quality signal of a generator: distance_of_batches for n class-balanced samples."""
    g = torch.Generator().manual_seed(seed)
    k = target.num_classes
    was_training = generator.training
    generator.eval()

    def batches():
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            y = torch.arange(start, start + b) % k
            z = torch.randn(b, generator.z_dim, generator=g)
            yield generator(z.to(device), y.to(device)), y

    with torch.no_grad():
        out = distance_of_batches(batches(), fmap, target, device)
    generator.train(was_training)
    return out
