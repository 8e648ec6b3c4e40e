"""Downstream accuracy: train on one labelled set (synthetic or real), test on the real labelled reference.

sklearn LogisticRegression and MLPClassifier on flattened [0,1] pixels (the paper's MNIST protocol), and a
torch CNN (a small ResNet for 28/32 px greyscale; ResNet9 as in the FFCV recipe for 32 px RGB) with one
fixed recipe. Nothing is selected on the test set: each model is trained once and tested once.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mepf.progress import progress as progress_bar

from .options import CLASSIFIERS

MIN_STEPS = 500


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def sklearn_accuracy(kind: str, x_train, y_train, x_test, y_test, seed: int = 0) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    model = (LogisticRegression(max_iter=200, random_state=seed) if kind == "logreg"
             else MLPClassifier(hidden_layer_sizes=(100,), max_iter=60, random_state=seed))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)  # checked first: the later filter goes in front
        model.fit(_flat(x_train), y_train)
    # MLPClassifier.fit catches Ctrl-C, warns and returns a half-trained model, whose accuracy would be reported
    if any("interrupted by user" in str(w.message) for w in said):
        raise KeyboardInterrupt
    for w in said:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return float((model.predict(_flat(x_test)) == y_test).mean())


def _conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c, c), _conv_bn(c, c))

    def forward(self, x):
        return x + self.body(x)


def small_resnet(channels: int, num_classes: int, width: int = 32) -> nn.Module:
    """For 28/32 px: two residual stages with pooling, global average pool, linear."""
    return nn.Sequential(_conv_bn(channels, width), _Residual(width), nn.MaxPool2d(2),
                         _conv_bn(width, 2 * width), _Residual(2 * width), nn.MaxPool2d(2),
                         _conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


def resnet9(channels: int, num_classes: int) -> nn.Module:
    """ResNet9 (the FFCV CIFAR-10 recipe's network) for 32 px RGB."""
    return nn.Sequential(_conv_bn(channels, 64), _conv_bn(64, 128), nn.MaxPool2d(2), _Residual(128),
                         _conv_bn(128, 256), nn.MaxPool2d(2), _conv_bn(256, 512), nn.MaxPool2d(2), _Residual(512),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


def train_cnn(x_train, y_train, num_classes: int, seed: int = 0, epochs: int = 8, batch_size: int = 128,
              device="cpu", progress: bool = False) -> nn.Module:
    """Fixed recipe: Adam lr 2e-3 with a one-cycle schedule, `epochs` epochs but at least MIN_STEPS steps
    (small training sets would otherwise leave batch norm's running statistics unsettled), random crop for
    augmentation; returns the last iterate, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c = x_train.shape[-1]
        model = (resnet9(c, num_classes) if (c == 3 and x_train.shape[1] >= 32) else small_resnet(c, num_classes))
    model = model.to(device)
    xt = torch.from_numpy(x_train).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(y_train.astype(np.int64))
    per_epoch = max(1, (len(xt) + batch_size - 1) // batch_size)
    epochs = max(epochs, -(-MIN_STEPS // per_epoch))
    steps = epochs * per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    bar = progress_bar(total=steps, desc="cnn classifier", unit="step", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for s in range(0, len(xt), batch_size):
            idx = perm[s:s + batch_size]
            x = F.pad(xt[idx], (2, 2, 2, 2), mode="replicate")
            i, j = torch.randint(0, 5, (2,), generator=g).tolist()
            x = x[:, :, i:i + xt.shape[2], j:j + xt.shape[3]]
            loss = F.cross_entropy(model(x.to(device)), yt[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


@torch.no_grad()
def cnn_probabilities(model: nn.Module, images: np.ndarray, device="cpu") -> np.ndarray:
    """Softmax class probabilities (N, K) of uint8 images (N, H, W, C) under a trained CNN."""
    xe = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return torch.cat([model(xe[s:s + 500].to(device)).softmax(1).cpu() for s in range(0, len(xe), 500)]).numpy()


def cnn_accuracy(x_train, y_train, x_test, y_test, num_classes: int, seed: int = 0, epochs: int = 8,
                 batch_size: int = 128, device="cpu", progress: bool = False) -> float:
    """train_cnn's model, tested once on the test set."""
    model = train_cnn(x_train, y_train, num_classes, seed, epochs, batch_size, device, progress)
    xe = torch.from_numpy(x_test).permute(0, 3, 1, 2).float() / 255
    correct = 0
    with torch.no_grad():
        for s in range(0, len(xe), 500):
            correct += int((model(xe[s:s + 500].to(device)).argmax(1).cpu().numpy() == y_test[s:s + 500]).sum())
    return correct / len(xe)


def accuracies(train_images, train_labels, test_images, test_labels, num_classes: int, which=CLASSIFIERS,
               seed: int = 0, device="cpu", cnn_epochs: int = 8, progress: bool = False) -> dict:
    out = {}
    for kind in which:
        if progress:
            print(f"training {kind} on {len(train_images)} images", file=sys.stderr)
        if kind == "cnn":
            out[kind] = cnn_accuracy(train_images, train_labels, test_images, test_labels, num_classes, seed,
                                     epochs=cnn_epochs, device=device, progress=progress)
        else:
            out[kind] = sklearn_accuracy(kind, train_images, train_labels, test_images, test_labels, seed)
    return out
