"""One atomic-write helper (artifacts/staging.py atomic_path): a file or folder is replaced whole or not at all, no
temporary is left, and no module writes with its own tmp-then-rename."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mepf.artifacts.staging import atomic_path, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_a_file_is_replaced_whole_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "s.npz"
    np.savez(target, x=np.zeros(2))
    with pytest.raises(RuntimeError), atomic_path(target, ".npz") as tmp:
        np.savez(tmp, x=np.ones(2))
        assert tmp.is_file() and tmp.name.endswith(".npz")  # the suffix keeps np.savez from renaming it
        raise RuntimeError("killed mid-write")
    assert np.load(target)["x"].tolist() == [0, 0] and [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_a_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "samples"
    (out / "old").mkdir(parents=True)
    with atomic_path(out) as tmp:
        (tmp / "0").mkdir(parents=True)
        (tmp / "0" / "a.png").write_bytes(b"png")
    assert [p.name for p in out.iterdir()] == ["0"] and [p.name for p in tmp_path.iterdir()] == ["samples"]
    with pytest.raises(ValueError), atomic_path(out) as tmp:
        (tmp / "1").mkdir(parents=True)
        raise ValueError
    assert [p.name for p in out.iterdir()] == ["0"] and [p.name for p in tmp_path.iterdir()] == ["samples"]


def test_no_module_renames_its_own_temporaries():
    """Only the staging module and the release log (which writes under its own lock) rename files."""
    allowed = {ROOT / "artifacts" / "staging.py", ROOT / "embed" / "release_log.py"}
    renames = re.compile(r"os\.replace\(|os\.rename\(|\.replace\((tmp|path)\b|\.rename\(")
    found = []
    for folder in ("artifacts", "embed", "synthesize", "evaluate", "mepf"):
        for path in (ROOT / folder).rglob("*.py"):
            if path not in allowed and renames.search(path.read_text()):
                found.append(path.relative_to(ROOT))
    assert not found


def test_a_name_as_long_as_the_folder_allows_can_be_written(tmp_path):
    """The temporary's name is cut to fit: any name the folder takes can be written (255 bytes here)."""
    target = tmp_path / ("n" * 251 + ".npz")
    with atomic_path(target, ".npz") as tmp:
        np.savez(tmp, x=np.arange(3))
    assert np.load(target)["x"].tolist() == [0, 1, 2] and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_temporaries_of_a_killed_writer_are_removed_and_a_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = tmp_path / f".s.npz.tmp-{pid}-0123abcd.npz"
    left.write_bytes(b"half")
    folder_left = tmp_path / f".s.npz.tmp-{pid}-4567abcd.npz.old"  # a folder moved aside, then killed
    folder_left.mkdir()
    (folder_left / "0.png").write_bytes(b"png")
    live = tmp_path / f".s.npz.tmp-{os.getpid()}-89abcdef.npz"  # this process: still writing
    live.write_bytes(b"live")
    other = tmp_path / f".t.npz.tmp-{pid}-0123abcd.npz"  # another output's
    other.write_bytes(b"other")
    write_text_atomic(tmp_path / "unrelated.json", "{}")
    assert left.exists()  # only temporaries of the output being written are looked at
    with atomic_path(tmp_path / "s.npz", ".npz") as tmp:
        np.savez(tmp, x=np.zeros(1))
    assert not left.exists() and not folder_left.exists() and live.exists() and other.exists()


def test_a_folder_that_cannot_be_replaced_stays_as_it_was(tmp_path):
    out = tmp_path / "samples"
    (out / "kept").mkdir(parents=True)
    with pytest.raises(FileNotFoundError), atomic_path(out):
        pass  # the writer made nothing: the old folder must survive
    assert [p.name for p in out.iterdir()] == ["kept"] and [p.name for p in tmp_path.iterdir()] == ["samples"]
