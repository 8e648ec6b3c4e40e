"""Regenerate the README's Fashion-MNIST tables from docs/results/*.json (issue 15: the table comes from the JSON).

    python benchmarks/results_table.py           # rewrite the block between the README's markers
    python benchmarks/results_table.py --check   # exit 1 if the README is not what the JSON gives

Two tables: per setting and eps, the mean CNN accuracy over seeds with every seed's figure and the spread;
then every run, newest setting first. Rows from before round 2 carry no seed or setting name: they are shown
as seed 0 and named by their learning rate and steps. Standard library only, so the check runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"


def load_rows(folder: Path) -> list[dict]:
    """Every results row of every JSON file in folder, with its file name and a setting name."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        settings = doc.get("settings", {})
        for r in doc["results"]:
            r = dict(r, source=path.name)
            if r.get("protocol") == "dpimagebench":
                rows.append(r)
                continue
            r.setdefault("lr", settings.get("lr"))
            r.setdefault("seed", 0)
            if not r.get("setting"):
                r["setting"] = f"round 1: lr {r['lr']:g}, {r['steps']} steps"
            rows.append(r)
    return rows


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def fid_text(r) -> str:
    if r.get("fid") is None:
        return "not run"
    return f"{r['fid']:.1f} ({r['fid_samples']} vs {r['fid_reference']})"


def eps_key(e) -> float:
    try:
        return float(e)  # "inf" too
    except (TypeError, ValueError):
        return -1.0  # a row that names no eps (a generator given by hand) goes last


def ordered(rows: list[dict]) -> list[dict]:
    """Named (round 2 and later) settings first, then more steps first; within a setting eps descending, seed."""
    return sorted(rows, key=lambda r: (r["setting"].startswith("round 1"), -r["steps"], r["setting"],
                                       -eps_key(r["epsilon"]), r["seed"]))


def spread(values: list[float]) -> str:
    return f"{100 * (max(values) - min(values)):.1f}" if len(values) > 1 else "one seed"


def summary(rows: list[dict]) -> list[str]:
    """Mean over seeds per (setting, eps): every seed's CNN figure and the spread (max - min)."""
    groups: dict[tuple, list[dict]] = {}
    for r in ordered(rows):
        groups.setdefault((r["setting"], r["epsilon"]), []).append(r)
    lines = ["| setting | eps | seeds | CNN mean | CNN per seed | spread | LogReg mean | MLP mean | FID "
             "| train per run |",
             "| --- " * 10 + "|"]
    for (setting, eps), g in groups.items():
        cnn = [r["cnn"] for r in g]
        fids = [fid_text(r) for r in g if r.get("fid") is not None]
        lines.append(
            f"| {setting} | {eps} | {len(g)} | **{pct(statistics.mean(cnn))}%** | "
            f"{' / '.join(pct(c) for c in cnn)} | {spread(cnn)} | "
            f"{pct(statistics.mean(r['logreg'] for r in g))}% | {pct(statistics.mean(r['mlp'] for r in g))}% | "
            f"{'; '.join(fids) or 'not run'} | {', '.join(format(r['train_s'] / 60, '.0f') for r in g)} min |")
    return lines


def every_run(rows: list[dict]) -> list[str]:
    lines = ["| setting | eps | seed | CNN | LogReg | MLP | FID (samples vs test images) | steps | train | evaluate | "
             "device | commit | file | generator |", "| --- " * 14 + "|"]
    for r in ordered(rows):
        lines.append(f"| {r['setting']} | {r['epsilon']} | {r['seed']} | {pct(r['cnn'])}% | {pct(r['logreg'])}% | "
                     f"{pct(r['mlp'])}% | {fid_text(r)} | {r['steps']} | {r['train_s'] / 60:.1f} min | "
                     f"{r['eval_s'] / 60:.1f} min | {r['device']} | {r['commit']} | {r['source']} | "
                     f"{'committed' if r.get('generator') else 'not kept'} |")
    return lines


#: Published Fashion-MNIST rows measured by DPImageBench's evaluator (the maximum of three classifiers' test accuracy
#: selected on a real validation hold-out; FID against the training images): (method, eps 1, eps 10, FID 1, FID 10,
#: source). FETA-Pro is not in DPImageBench's tables: its own paper, later, with its method in their repository.
PUBLISHED = [("FETA-Pro", 83.4, 88.2, 27.8, 11.3, "FETA-Pro (arXiv 2601.06368)"),
             ("DP-FETA", 81.7, 87.3, 31.4, 13.2, "DPImageBench"), ("PrivImage", 79.9, 87.1, 12.1, 5.3, "DPImageBench"),
             ("DPDM", 76.4, 85.6, None, 17.1, "DPImageBench")]


def _num(x, digits=1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def bench_table(rows: list[dict]) -> list[str]:
    """DPImageBench's protocol: our rows (from benchmarks/dpimagebench.py) beside their published ones."""
    lines = ["| method | eps | accuracy (max of 3) | mean of 3 | per classifier (resnet / wrn / resnext) "
             "| FID vs train | source |", "| --- " * 7 + "|"]
    for r in sorted(rows, key=lambda r: (r.get("setting") or "", -eps_key(str(r["epsilon"])), r.get("seed") or 0)):
        per = " / ".join(_num(r["per_classifier"].get(k), 2) or "-" for k in ("resnet", "wrn", "resnext"))
        note = "; REDUCED: " + ", ".join(r["reduced"]) if r.get("reduced") else ""
        lines.append(f"| mepf {r.get('setting')} seed {r.get('seed')} | {r['epsilon']} | {_num(r['accuracy_max'])} | "
                     f"{_num(r['accuracy_mean'])} | {per} | {_num(r.get('fid'))} | {r['source']}{note} |")
    if not rows:
        lines.append("| mepf | 1, 10 | not run yet: a GPU job (scripts/gpu_dpimagebench.sh) | | | | |")
    for name, a1, a10, f1, f10, source in PUBLISHED:
        lines.append(f"| {name} | 1 / 10 | {a1} / {a10} | | | {_num(f1) or '-'} / {_num(f10)} | {source} |")
    return lines


def block(rows: list[dict]) -> str:
    ours = [r for r in rows if r.get("protocol", "mepf") == "mepf"]
    bench = [r for r in rows if r.get("protocol") == "dpimagebench"]
    return "\n".join([BEGIN, "<!-- generated by benchmarks/results_table.py from docs/results/*.json: "
                      "do not edit by hand -->", "", "mepf's protocol (CPU: small CNN, LogReg, MLP; FID against the "
                      "test images):", "", *summary(ours), "", "Every run:", "", *every_run(ours), "",
                      "DPImageBench's protocol (WRN-40-4, ResNet-110, ResNeXt-29 selected on the real validation "
                      "hold-out; FID against the 55,000 private training images):", "", *bench_table(bench), "",
                      END])


def regenerate(readme: str, rows: list[dict]) -> str:
    """The README text with the block between the markers replaced (the markers must be there, once each)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise SystemExit(f"results_table: the README must contain {BEGIN} ... {END} once; add them where the "
                         "table belongs")
    head, rest = readme.split(BEGIN)
    return head + block(rows) + rest.split(END, 1)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="Exit 1 if the README differs from what the JSON gives.")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    a = ap.parse_args(argv)
    text = a.readme.read_text()
    new = regenerate(text, load_rows(a.results))
    if a.check:
        if new != text:
            print(f"{a.readme} is out of date with {a.results}: run python benchmarks/results_table.py")
            return 1
        return 0
    a.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
