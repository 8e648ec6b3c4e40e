"""Data sources stream the declared records with the declared label set."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from mepf.artifacts.errors import MepfError
from mepf.embed.datasets import DEBIAN_FASHION_DIRS, named_source
from mepf.embed.files import ArraySource, FolderSource
from mepf.embed.sources import open_source
from tests import npz_shards


def collect(src, bs=7):
    xs, ys = [], []
    for x, y in src.batches(bs):
        assert len(x) <= bs
        xs.append(np.asarray(x))
        ys.append(y)
    return np.concatenate(xs), (np.concatenate(ys) if ys[0] is not None else None)


def test_npz_and_h5_stream_the_same_records(tmp_path, labelled_npz):
    path, x, y = labelled_npz
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["images"], f["labels"] = x, y
    for p in (path, tmp_path / "d.h5"):
        xs, ys = collect(ArraySource(p, ["a", "b", "c"]))
        np.testing.assert_array_equal(xs, x)
        np.testing.assert_array_equal(ys, y)
    np.savez_compressed(tmp_path / "c.npz", images=x[..., 0], labels=y)
    xs, _ = collect(ArraySource(tmp_path / "c.npz", ["a", "b", "c"]), bs=5)
    np.testing.assert_array_equal(xs, x)


def test_each_shard_of_an_npz_reads_its_own_records_once(tmp_path):
    """Workers and ranks read an .npz in shards, skipping the others' blocks by seeking. Every block a shard keeps
    holds exactly its records and their labels, and the shards together hold every record once (stored and
    compressed, either member first): a seek in one member must not move where the other reads."""
    assert npz_shards.problems(tmp_path) == []


def test_npz_shards_under_a_newer_python(tmp_path):
    """The same under Python >= 3.12 (CI's scripts/test.sh makes one where it can: MEPF_NEWER_PYTHON), where
    zipfile's seek in a stored member moves the file position shared by the members of one ZipFile: with one
    ZipFile for both members, shards read other records' bytes (silently, labels stored first) or failed."""
    py = os.environ.get("MEPF_NEWER_PYTHON")
    if not py:
        pytest.skip("no MEPF_NEWER_PYTHON (a Python >= 3.12 with numpy, h5py, scipy and autodp; scripts/test.sh)")
    root = Path(__file__).resolve().parent.parent
    pkg = tmp_path / "tree" / "mepf"
    pkg.mkdir(parents=True)  # mepf as pyproject's package-dir assembles it, without installing it there
    for entry in (root / "mepf").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub in ("artifacts", "embed", "synthesize", "evaluate"):
        (pkg / sub).symlink_to(root / sub)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "tree"), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([py, str(root / "tests" / "npz_shards.py"), str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok (Python 3.1"), r.stdout + r.stderr


def test_folder_labelled_and_flat(tmp_path, image_folder):
    src = FolderSource(image_folder)
    assert src.classes == ["cats", "dogs"] and len(src) == 12 and src.geometry is None
    xs, ys = collect(src, bs=5)
    assert xs.shape == (12, 28, 28, 1) and sorted(np.bincount(ys)) == [6, 6]
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (image_folder / "cats").iterdir():
        (flat / p.name).write_bytes(p.read_bytes())
    src = open_source(str(flat))
    assert src.classes is None and collect(src)[1] is None


def test_mnist5k_splits_are_fixed_and_disjoint():
    tr, te = named_source("mnist-5k:train"), named_source("mnist-5k")
    assert te.split == "train"
    xtr, ytr = collect(tr, 500)
    xte, yte = collect(named_source("mnist-5k:test"), 500)
    assert xtr.shape == (4000, 28, 28, 1) and xte.shape == (1000, 28, 28, 1)
    assert list(np.bincount(ytr)) == [400] * 10 and list(np.bincount(yte)) == [100] * 10
    train_rows = {r.tobytes() for r in xtr}
    assert sum(r.tobytes() in train_rows for r in xte) <= 5  # the subset has a few duplicate digits at most


@pytest.mark.skipif(not any(Path(d).is_dir() for d in DEBIAN_FASHION_DIRS),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_debian_package(tmp_path):
    src = named_source("fashion-mnist:test", data_root=tmp_path, download=False)
    assert len(src) == 10000 and src.geometry == (28, 28, 1) and len(src.classes) == 10
    x, y = next(src.batches(256))
    assert x.shape == (256, 28, 28, 1) and x.dtype == np.uint8 and y.max() <= 9


@pytest.mark.skipif(not any(Path(d).is_dir() for d in DEBIAN_FASHION_DIRS),
                    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)")
def test_dpimagebench_holdout_split(tmp_path):
    """:train-55k and :val-5k partition the training images as DPImageBench's loader does (torch.manual_seed(0),
    random_split into 55,000 and 5,000, on the files' order); every rank's blocks together are the 55,000 once."""
    import torch

    from mepf.embed.datasets import holdout_indices

    whole = np.concatenate([x for x, _ in named_source("fashion-mnist:train", tmp_path, download=False).batches(5000)])
    priv = named_source("fashion-mnist:train-55k", tmp_path, download=False)
    val = named_source("fashion-mnist:val-5k", tmp_path, download=False)
    assert (len(priv), len(val)) == (55000, 5000) and priv.listing_digest() != val.listing_digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _, theirs = torch.utils.data.random_split(range(60000), [55000, 5000])
    assert sorted(theirs.indices) == holdout_indices().tolist()
    held = np.zeros(60000, dtype=bool)
    held[theirs.indices] = True
    for bs in (1000, 777):
        blocks = list(priv.blocks(bs))
        assert [b for b, _, _ in blocks] == list(range(len(blocks)))
        assert all(len(x) == bs for _, x, _ in blocks[:-1]) and len(blocks[-1][1]) == 55000 - bs * (len(blocks) - 1)
        assert (np.concatenate([x for _, x, _ in blocks]) == whole[~held]).all()
        assert (np.concatenate([x for _, x, _ in val.blocks(bs)]) == whole[held]).all()
    world = 3
    shards = [np.concatenate([x for _, x, _ in priv.blocks(1000, lambda b, r=r: b % world == r)]) for r in range(world)]
    assert sum(map(len, shards)) == 55000
    assert {r.tobytes() for s in shards for r in s} == {r.tobytes() for r in whole[~held]}
    with pytest.raises(MepfError, match="unknown split"):
        named_source("cifar10:val-5k", tmp_path, download=False)
