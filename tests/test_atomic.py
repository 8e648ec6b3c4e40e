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
