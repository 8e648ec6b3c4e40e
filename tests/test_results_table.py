"""The README's results tables are what docs/results/*.json give (benchmarks/results_table.py), and the
per-seed summary computes what it says."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("results_table",
                                              Path(__file__).parents[1] / "benchmarks" / "results_table.py")
results_table = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(results_table)


def test_readme_table_is_generated_from_the_committed_json():
    assert results_table.main(["--check"]) == 0, "run python benchmarks/results_table.py"


def row(eps, seed, cnn, fid=None):
    return {"epsilon": eps, "seed": seed, "setting": "s", "cnn": cnn, "logreg": 0.5, "mlp": 0.6, "fid": fid,
            "fid_samples": 10000 if fid else None, "fid_reference": 10000 if fid else None, "steps": 100,
            "train_s": 600.0, "eval_s": 60.0, "device": "cpu", "commit": "abc"}


def test_summary_means_seeds_lists_each_and_spread(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"results": [row("10", 0, 0.80, 12.5), row("10", 1, 0.86),
                                                             row("1", 0, 0.70)]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results_table.BEGIN}\nstale\n{results_table.END}\noutro\n")
    assert results_table.main(["--check", "--readme", str(readme), "--results", str(tmp_path)]) == 1
    assert results_table.main(["--readme", str(readme), "--results", str(tmp_path)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    eps10 = next(line for line in text.splitlines() if line.startswith("| s | 10 | 2 |"))
    assert "**83.0%**" in eps10 and "80.0 / 86.0" in eps10 and "| 6.0 |" in eps10
    assert "12.5 (10000 vs 10000)" in eps10
    assert "one seed" in next(line for line in text.splitlines() if line.startswith("| s | 1 | 1 |"))
    assert results_table.main(["--check", "--readme", str(readme), "--results", str(tmp_path)]) == 0


def test_missing_markers_is_a_clear_error(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"results": [row("10", 0, 0.8)]}))
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="must contain"):
        results_table.main(["--readme", str(readme), "--results", str(tmp_path)])


def test_dpimagebench_rows_have_their_own_table_beside_the_published(tmp_path):
    """Rows measured with DPImageBench's protocol never enter mepf's CNN tables; they sit beside FETA-Pro's."""
    bench = {"protocol": "dpimagebench", "epsilon": "10", "seed": 0, "setting": "s", "complete": True,
             "per_classifier": {"resnet": 85.0, "wrn": 86.5, "resnext": 84.0}, "accuracy_max": 86.5,
             "accuracy_mean": 85.1667, "fid": 9.87, "reduced": []}
    (tmp_path / "r.json").write_text(json.dumps({"results": [row("10", 0, 0.80), bench]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{results_table.BEGIN}\n{results_table.END}\n")
    assert results_table.main(["--readme", str(readme), "--results", str(tmp_path)]) == 0
    lines = readme.read_text().splitlines()
    ours = next(line for line in lines if line.startswith("| mepf s seed 0 | 10 |"))
    assert "| 86.5 | 85.2 | 85.00 / 86.50 / 84.00 | 9.9 |" in ours
    assert any(line.startswith("| FETA-Pro | 1 / 10 | 83.4 / 88.2 |") for line in lines)
    assert next(line for line in lines if line.startswith("| s | 10 | 1 |"))  # the mepf row: one seed, not two


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_generator_named_by_path_takes_its_committed_row(tmp_path, capsys):
    """scripts/gpu_offline.sh names generators by path, and benchmarks/dpimagebench.py gave those rows no data, eps,
    seed or setting ("mepf None seed None" in the README's table) and skipped the train-55k rule (review 42 F4)."""
    bench = _benchmark("dpimagebench")
    root = Path(__file__).parents[1]
    committed = dict(bench.committed_generators())
    paths = [p for p, _ in bench.committed_generators()]
    assert len(paths) == len(set(paths)) >= 8  # one row each: the protocol samples at z = 1, not a z0.9 row's z
    gen = root / "docs/results/generators/r3-55k-lite0-conv64-32k-cooldown-eps10-seed0/generator.pt"
    [(path, row)] = bench.named_generators([str(gen)])
    assert path == gen and row == committed[gen]
    assert (row["data"], row["epsilon"], row["seed"]) == ("fashion-mnist:train-55k", "10", 0) and row["setting"]
    elsewhere = tmp_path / "generator.pt"
    elsewhere.write_bytes(gen.read_bytes())
    assert bench.named_generators([str(elsewhere)]) == [(elsewhere, {})]
    assert "is in no results row" in capsys.readouterr().err


def test_quality_refuses_to_overwrite_a_kept_generator(tmp_path):
    """benchmarks/quality.py copies each run's generator under --keep-generators (default docs/results/generators):
    the README's reproduction command, with the committed setting's name, replaced the generators behind the
    published rows (review 42 F12). A kept generator that is not the run's is now refused before training."""
    quality = _benchmark("quality")
    kept, run = tmp_path / "kept", tmp_path / "run"
    kept.mkdir()
    run.mkdir()
    assert not quality.kept_elsewhere(kept, run)  # nothing kept there yet
    (kept / "generator.pt").write_bytes(b"committed")
    assert quality.kept_elsewhere(kept, run)  # the run has none yet
    (run / "generator.pt").write_bytes(b"another")
    assert quality.kept_elsewhere(kept, run)
    (run / "generator.pt").write_bytes(b"committed")  # an interrupted call that kept it, then stopped
    assert not quality.kept_elsewhere(kept, run)
