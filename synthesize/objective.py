"""Stage 2's target and objective: per-class mean embeddings of generated images against the release."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mepf.embed.features import phi


class Target:
    """What a released file offers stage 2 (post-processing only): per-class noisy means per moment
    and the noisy label prior."""

    def __init__(self, release, device):
        self.moments = release.moments
        self.means = {m: torch.as_tensor(v, dtype=torch.float32, device=device) for m, v in release.class_means().items()}
        self.prior = torch.as_tensor(release.label_prior(), dtype=torch.float32)
        self.num_classes = len(release.class_names)
        self.spec = release.feature_spec


def class_means(feats: torch.Tensor, y: torch.Tensor, k: int):
    """Per-class means of rows of `feats` (B, D) by labels y; returns (means (K, D), present mask (K,))."""
    onehot = F.one_hot(y, k).to(feats.dtype)
    cnt = onehot.sum(0)
    return (onehot.T @ feats) / cnt.clamp_min(1)[:, None], cnt > 0


def fake_embeddings(extractor, images, y, target: Target) -> dict:
    """Per-class mean of phi over a generated batch, for each released moment (float32, differentiable)."""
    f = extractor(images).float()
    out = {}
    for m in target.moments:
        means, present = class_means(phi(m, f, target.spec, torch.float32), y, target.num_classes)
        out[m] = (means, present)
    return out


def squared_distance(target: Target, fake: dict) -> dict:
    """Mean over the classes present of ||mu_real[c] - mu_fake[c]||^2, per moment."""
    return {m: ((target.means[m][p] - mu[p]) ** 2).sum(1).mean() for m, (mu, p) in fake.items()}


@torch.no_grad()
def embedding_distance(generator, extractor, target: Target, n: int = 500, batch_size: int = 100, seed: int = 0,
                       device="cpu") -> dict:
    """Privacy-free quality signal: squared distance between the generator's class-balanced embedding
    of n samples and the released one, per moment (needs only the released file)."""
    g = torch.Generator().manual_seed(seed)
    k = target.num_classes
    sums = {m: torch.zeros_like(target.means[m]) for m in target.moments}
    counts = torch.zeros(k, device=device)
    was_training = generator.training
    generator.eval()
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        y = (torch.arange(start, start + b) % k)
        z = torch.randn(b, generator.z_dim, generator=g)
        f = extractor(generator(z.to(device), y.to(device))).float()
        for m in target.moments:
            onehot = F.one_hot(y.to(device), k).float()
            sums[m] += onehot.T @ phi(m, f, target.spec, torch.float32)
        counts += torch.bincount(y.to(device), minlength=k).float()
    generator.train(was_training)
    present = counts > 0
    return {m: float(((target.means[m] - sums[m] / counts.clamp_min(1)[:, None])[present] ** 2).sum(1).mean())
            for m in target.moments}
