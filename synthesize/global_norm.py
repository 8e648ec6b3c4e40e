"""Batch norm over the global batch under torchrun: each rank's batch norms normalise with the statistics of every
rank's samples, so N ranks of B compute what one process computes on the N x B samples (up to rounding)."""
from __future__ import annotations

import torch
from torch import nn

from mepf.core import distributed


class _AllSum(torch.autograd.Function):
    """Sum over ranks; its gradient is summed over ranks too: each rank's loss reaches the statistics only through
    its own samples, and every rank's share of the statistics' gradient flows back to every rank's inputs."""

    @staticmethod
    def forward(ctx, x):
        return distributed.all_sum_(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return distributed.all_sum_(grad.contiguous().clone())


def _global_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not (bn.training and distributed.current().active):
        return super(type(bn), bn).forward(x)
    c = x.shape[1]
    dims = [0] + list(range(2, x.dim()))
    view = (1, c) + (1,) * (x.dim() - 2)
    xf = x.float()
    shift = bn.running_mean.detach().float().clone().view(view)  # equal on every rank; a copy: updated below
    d = xf - shift
    count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
    total = _AllSum.apply(torch.cat([d.sum(dims), (d * d).sum(dims), count]))
    n = total[-1]
    mean_d = total[:c] / n
    var = (total[c:2 * c] / n - mean_d * mean_d).clamp_min(0)
    y = (d - mean_d.view(view)) * torch.rsqrt(var.view(view) + bn.eps)
    if bn.affine:
        y = y * bn.weight.view(view) + bn.bias.view(view)
    with torch.no_grad():  # as nn.BatchNorm updates them, from the global batch's statistics
        bn.num_batches_tracked.add_(1)
        f = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - f).add_((shift.view(-1) + mean_d).detach(), alpha=f)
        bn.running_var.mul_(1 - f).add_((var * n / (n - 1).clamp_min(1)).detach(), alpha=f)
    return y.to(x.dtype)


_CLASSES: dict = {}


def global_batch_norms(module: nn.Module) -> nn.Module:
    """In place: every batch norm of `module` with running statistics normalises over the global batch in training
    under torchrun (as written elsewhere: one process, eval mode). State dicts, copies and names are unchanged."""
    for m in module.modules():
        cls = type(m)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and cls not in _CLASSES.values():
            if cls not in _CLASSES:
                _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _global_forward, "__module__": __name__})
            m.__class__ = _CLASSES[cls]
    return module
