"""The house's layering, read from the source: imports point one way (stages -> mepf.core -> artifacts), stage 2
imports nothing from stage 1, and stage 3 takes from stage 1 only what reads reference data and the owner's log."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"mepf.artifacts": ROOT / "artifacts", "mepf.core": ROOT / "mepf" / "core", "mepf.embed": ROOT / "embed",
           "mepf.synthesize": ROOT / "synthesize", "mepf.evaluate": ROOT / "evaluate"}
#: what stage 3 may take from stage 1: reading reference data as `mepf embed` would, and the owner's release log
EVALUATE_FROM_EMBED = {"mepf.embed.sources", "mepf.embed.files", "mepf.embed.fingerprint", "mepf.embed.transform",
                       "mepf.embed.release_log"}
STAGES = ("mepf.embed", "mepf.synthesize", "mepf.evaluate")


def imports_of(package: str) -> dict:
    """{module imported: [files importing it]} for every .py in the package's folder, relative imports resolved
    and `from pkg import module` counted as the module, at any depth (lazy imports inside functions too)."""
    found: dict = {}
    for path in sorted(FOLDERS[package].glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package if node.level == 1 else (node.module or "")
                if node.level == 1 and node.module:
                    base = f"{package}.{node.module}"
                assert node.level <= 1, f"{path}: relative import above its package"
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                found.setdefault(name, []).append(path.name)
    return found


def _under(names, prefix):
    return sorted(n for n in names if n == prefix or n.startswith(prefix + "."))


def test_the_scan_sees_relative_and_lazy_imports():
    embed = imports_of("mepf.embed")
    assert "mepf.embed.release_log" in embed  # `from . import release_log` in release.py
    assert "mepf.synthesize" not in embed
    evaluate = imports_of("mepf.evaluate")
    assert "mepf.embed.release_log" in evaluate  # imported inside a function in evaluation.py


def test_artifacts_is_torch_free_and_below_everything():
    found = imports_of("mepf.artifacts")
    assert not _under(found, "torch") and not _under(found, "torchvision")
    for above in ("mepf.core", *STAGES):
        assert not _under(found, above), (above, found)


def test_the_shared_torch_layer_imports_no_stage():
    found = imports_of("mepf.core")
    for stage in STAGES:
        assert not _under(found, stage), {n: found[n] for n in _under(found, stage)}


def test_stage_2_imports_nothing_from_stage_1_or_3():
    found = imports_of("mepf.synthesize")
    for stage in ("mepf.embed", "mepf.evaluate"):
        assert not _under(found, stage), {n: found[n] for n in _under(found, stage)}


def test_stage_3_takes_from_stage_1_only_reference_reading_and_the_log():
    found = imports_of("mepf.evaluate")
    extra = {n: found[n] for n in _under(found, "mepf.embed")
             if n != "mepf.embed" and not any(_under([n], allowed) for allowed in EVALUATE_FROM_EMBED)}
    assert not extra  # `from mepf.embed import x` counts as mepf.embed.x, checked here too


def test_stage_1_imports_no_later_stage():
    found = imports_of("mepf.embed")
    assert not _under(found, "mepf.synthesize") and not _under(found, "mepf.evaluate")


def test_stage_2_loads_no_stage_1_module_at_run_time():
    """The static scan above misses imports made by what stage 2 imports; this loads stage 2 and looks."""
    modules = ", ".join(f"mepf.synthesize.{p.stem}" for p in sorted(FOLDERS["mepf.synthesize"].glob("*.py")))
    code = (f"import sys, {modules};"
            "bad = sorted(m for m in sys.modules if m.startswith('mepf.embed'));"
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
