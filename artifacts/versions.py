"""Installed versions of the packages a result depends on, for the records that stages write."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def versions(*packages: str) -> dict:
    """{package: version or None when not installed}."""
    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out
