"""A dataset's fingerprint: SHA-256 of its records as read. It lives only in the owner's local release
log (never in a released file); evaluation uses it to recognise private data named as a reference."""
from __future__ import annotations

import hashlib

import numpy as np


class Fingerprint:
    """Images and labels are hashed in separate streams, so the digest does not depend on batching."""

    def __init__(self, description: str):
        self.description = description
        self._images, self._labels = hashlib.sha256(), hashlib.sha256()

    def update(self, images, labels) -> None:
        for a in images if isinstance(images, list) else [images]:
            self._images.update(np.ascontiguousarray(a).tobytes())
        if labels is not None:
            self._labels.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())

    def hexdigest(self) -> str:
        return hashlib.sha256(f"mepf-dataset-fingerprint-v1|{self.description}|{self._images.hexdigest()}|"
                              f"{self._labels.hexdigest()}".encode()).hexdigest()

