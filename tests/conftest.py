"""Shared fixtures: small real datasets written as real files, and real extractors."""
from __future__ import annotations

import contextlib
import signal

import numpy as np
import pytest
from PIL import Image

from mepf.core.features import build_feature_map


def make_images(n: int, seed: int = 0, size: int = 28, channels: int = 1) -> np.ndarray:
    """Blobby digit-like uint8 images (smooth shapes, not white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        img = np.zeros((size, size))
        for _ in range(3):
            cy, cx = rng.uniform(5, size - 5, 2)
            r = rng.uniform(2, 6)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img = (255 * img / img.max()).astype(np.uint8)
        out[i] = img[:, :, None] if channels == 1 else np.stack([img, img[::-1], img[:, ::-1]], -1)
    return out


@contextlib.contextmanager
def fails_if_blocked(seconds: int = 20):
    """Fail the test, rather than hang it, if the code inside waits on a FIFO (or anything else) for `seconds`."""
    def hang(*_):
        raise AssertionError("blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class Payload:
    """A pickle that runs code when unpickled (writes `marker`): what a hostile file in a pickle format can carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture
def labelled_npz(tmp_path):
    x = make_images(37, seed=1)
    y = np.arange(37) % 3
    path = tmp_path / "private.npz"
    np.savez(path, images=x, labels=y)
    return path, x, y


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "secret_clinic_data"
    x = make_images(12, seed=2)
    for i in range(12):
        d = root / ("cats" if i % 2 else "dogs")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, :, :, 0]).save(d / f"patient_{1000 + i}.png")
    return root


@pytest.fixture(scope="session")
def eff28():
    """EfficientNet-Lite0 with its real ImageNet weights, 28x28 greyscale input."""
    return build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=1)
