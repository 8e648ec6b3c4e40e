"""The evaluation report: report.json (every number) and report.md with a sample grid and curves."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from mepf.artifacts.format import printable
from mepf.artifacts.staging import atomic_path
from mepf.synthesize.grid import save_grid

from .inception import PROBE_TOLERANCE as FID_PROBE_TOLERANCE

#: the folder beside a dpimagebench report that its evaluation resumes from, and the file in it that makes it one
PROTOCOL_STATE, PROTOCOL_META = "protocol-state", "meta.json"


def _given(report: dict, side: str) -> str:
    """What a side of the evaluation was, as given on the command line and as read (reports before 2026-12-07 hold
    no synthetic_given)."""
    given = report.get(f"{side}_given")
    return f"{_md(given)}, {_md(report[side])}" if given and given != report[side] else _md(report[side])


def privacy_in_words(release: dict | None) -> str:
    if release is None:
        return ("Privacy guarantee unknown: the synthetic images were given as files, not as a generator "
                "that carries its release's guarantee.")
    if release["epsilon"] == float("inf"):
        return ("NOT PRIVATE: the generator was trained on a non-private baseline release (eps = inf), for "
                "comparison only.")
    if not release.get("verified", True):  # reports from before "verified" were written only where it was found
        return (f"UNCHECKED: the generator file claims to be trained only on a released embedding that is "
                f"({release['epsilon']:.4g}, {release['delta']:g})-differentially private, but that release (SHA-256 "
                f"{release['sha256'][:12]}...) was not found, so nothing checked the claim: put it beside the "
                "generator or pass it with --release (--protocol mepf), and evaluate again.")
    rel = "adding or removing" if release["relation"] == "add-remove" else "replacing"
    return (f"The generator was trained only on a released embedding that is ({release['epsilon']:.4g}, "
            f"{release['delta']:g})-differentially private (the release was found and its ledger checked; that "
            f"the generator's weights came from it alone is the word of whoever trained it): {rel} any one person's "
            f"image changes the probability of any outcome by at most a factor e^{release['epsilon']:.4g}, except "
            f"with probability {release['delta']:g}. Training, sampling and this evaluation are post-processing and "
            "cost no further privacy.")


def class_grid(images: np.ndarray, labels: np.ndarray | None, path: Path, per_class: int = 10,
               class_names: list | None = None) -> None:
    """One row per class present, labelled with its name where known, up to `per_class` images each (a class with
    fewer has blank tiles); unlabelled images in rows of `per_class`, at most 10 rows."""
    if labels is None:
        rows, names = [images[s:s + per_class] for s in range(0, min(len(images), per_class * 10), per_class)], None
    else:
        present = [c for c in range(int(labels.max()) + 1) if (labels == c).any()]
        rows = [images[labels == c][:per_class] for c in present]
        names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in present]
    cols = max(len(r) for r in rows)
    blank = np.full((cols, *images.shape[1:]), 255, np.uint8)  # white, as the grid's margins
    x = np.concatenate([np.concatenate([r, blank[len(r):]]) for r in rows])
    save_grid(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, len(rows), path, row_labels=names)


def curves(stats: list, path: Path) -> bool:
    if not stats:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [s["step"] for s in stats]
    for key in sorted(k for k in stats[0] if k.startswith("dist_")):
        ax.plot(steps, [s[key] for s in stats], label=f"||mu_real - mu_fake||^2 ({key[5:]})")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=6))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v):,}"))
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("squared distance (batch)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return True


def _md(value, longest: int = 1000) -> str:
    """A value that may come from a file (a path, a class name, a run's option), as inert Markdown on one line:
    control characters shown as '?', Markdown's and HTML's special characters escaped."""
    text = printable(value, longest)
    return "".join("\\" + c if c in "\\`*_{}[]()|~" else "&lt;" if c == "<" else "&gt;" if c == ">" else
                   "&amp;" if c == "&" else c for c in text)


#: the files of a report (beside a dpimagebench protocol's state)
REPORT_FILES = ("samples.png", "curves.png", "report.json", "report.md")


def write_report(out: Path, report: dict, images, labels, stats: list, class_names: list | None = None) -> None:
    """report.json, report.md and the pictures in `out`, written whole or not at all: each to a temporary name, all
    renamed into place once every one is written, and only then goes what an earlier report there (replaced with
    --overwrite) wrote that this one does not (its run's curves, a dpimagebench state with its meta.json), nothing
    else. A write that fails (a full disk, Ctrl-C) leaves the folder as it was, and none that it made: the same
    command runs again (review 47 H1: a samples.png left refused it; review 48 M3: --overwrite mixed two reports)."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    replacing = (out / "report.json").is_file()
    has_curves = bool(stats)
    try:
        with contextlib.ExitStack() as stack:
            tmp = {n: stack.enter_context(atomic_path(out / n, Path(n).suffix)) for n in REPORT_FILES
                   if has_curves or n != "curves.png"}
            class_grid(images, labels, tmp["samples.png"], class_names=class_names)
            if has_curves:
                curves(stats, tmp["curves.png"])
            tmp["report.json"].write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
            tmp["report.md"].write_text(_markdown(report, labels, has_curves), encoding="utf-8")
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    if replacing and not has_curves:
        (out / "curves.png").unlink(missing_ok=True)
    state = out / PROTOCOL_STATE
    if replacing and report.get("protocol") != "dpimagebench":
        if state.is_symlink():
            state.unlink()
        elif (state / PROTOCOL_META).is_file():
            shutil.rmtree(state)


def _markdown(report: dict, labels, has_curves: bool) -> str:
    """report.md: what was measured against what, the metrics table, the pictures and the warnings."""
    m = report["metrics"]
    lines = ["# mepf evaluation report", ""]
    if report["not_for_publication"]:
        sets = report["private_sets"]
        said = " and the ".join(f"{s} set" for s in sets)
        lines += [f"> **NOT FOR PUBLICATION**: the {said} {'is' if len(sets) == 1 else 'are'} the private training "
                  "data (in the owner's release log). Metrics against it are not private."
                  + (" The classifiers were selected on the generator's own training data, so their accuracy is not "
                     "a held-out figure." if "--validation" in sets else ""), ""]
    private_uses = (["the metrics against the set(s) named above"] if report["not_for_publication"] else []) + (
        ["FID, against the private training images"] if report.get("protocol") == "dpimagebench" and "fid" in m else [])
    lines += [privacy_in_words(report["release"]) + (f" Not so: {' and '.join(private_uses)}, which read the private "
                                                     "data: they are for the data owner, not differentially private."
                                                     if private_uses else ""), "",
              f"- synthetic: {_given(report, 'synthetic')} ({report['n_synthetic']} images)",
              f"- reference: {_given(report, 'reference')} (" + (f"{report['n_reference']} images)"
                                                                 if report["n_reference"] is not None else "not read)")]
    if report.get("real_train_given"):
        lines.append(f"- real training images (the reference point): {_md(report['real_train_given'])} "
                     f"({report['n_real_train']} images)")
    g = report.get("generator")
    if g:
        lines.append(f"- generator: step {_md(g['step'])}" + (f" of the run's {_md(g['run_steps'])}"
                                                              if g.get("run_steps") else "")
                     + f", sha256 {g['sha256'][:16]}"
                     + (f"; trained with seed {_md(g['seed'])}, lr {_md(g['lr'])}" if g.get("seed") is not None else "")
                     + (f"; sampled at z ~ N(0, {g['z_scale']:g}^2 I)" if g.get("z_scale", 1) != 1 else ""))
    given = report.get("release_given")
    if given:  # the user's word that these files came from it: named, never taken as their guarantee
        lines.append(f"- embedding distance against the release given: {_md(given['path'])}, sha256 "
                     f"{_md(given['sha256'][:16])}")
    if report.get("classes"):
        lines.append(f"- classes matched {report['classes']['matched']}: "
                     + ", ".join(f"{_md(a)} -> {_md(b)}" for a, b in report["classes"]["map"].items()))
    lines += ["",
              "| metric | value |", "| --- | --- |"]
    if "fid" in m:
        against = f" vs {_md(m['fid_reference'])}" if m.get("fid_reference") else ""
        net = ("pytorch-fid InceptionV3 pool3" if m.get("fid_probe_error", 0) <= FID_PROBE_TOLERANCE
               else "InceptionV3 pool3 with weights that are not pytorch-fid's")
        lines.append(f"| FID ({m['fid_samples']} samples{against}, {net}) | {m['fid']:.2f} |")
    bench = m.get("dpimagebench")
    if bench:
        lines[lines.index("| metric | value |") - 1:0] = [
            "", "Measured with DPImageBench's protocol (`--protocol dpimagebench`): each classifier's test accuracy at "
            f"its epoch of best accuracy on {bench['validation']}; their tables show the maximum of the three.", ""]
        for k, r in bench["classifiers"].items():
            lines.append(f"| accuracy, {k} ({r['params'] / 1e6:.2f} M parameters), test at best validation epoch "
                         + (f"{r['best_epoch']} | {r['test_at_best_val']:.2f}% |" if r["finished"] else
                            f"| not finished ({r['epochs_done']} epochs) |"))
        reduced = " (REDUCED protocol: not comparable with their tables)" if report.get("protocol_reduced") else ""
        if bench.get("complete"):
            figure = reduced or " (DPImageBench's table figure)"
            lines += [f"| accuracy, maximum of the classifiers{figure} | {bench['max']:.2f}% |",
                      f"| accuracy, mean of the classifiers{reduced} | {bench['mean']:.2f}% |"]
    for k, v in ({} if bench else m.get("accuracy", {})).items():
        lines.append(f"| accuracy, {k} trained on synthetic | {100 * v:.2f}% |")
    for k, v in m.get("accuracy_real_train", {}).items():
        lines.append(f"| accuracy, {k} trained on real (non-private reference point) | {100 * v:.2f}% |")
    for k, v in m.get("embedding_distance", {}).items():
        lines.append(f"| embedding distance to the release ({k}, privacy-free) | {v:.4g} |")
    lines += ["", f"## Samples{' (one row per class)' if labels is not None else ''}", "", "![samples](samples.png)",
              ""]
    if has_curves:
        lines += ["## Training curves", "", "![curves](curves.png)", ""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {_md(w, 1 << 16)}" for w in report["warnings"]] + [""]
    lines += [f"Wall time {report['wall_time_s']:.0f} s; versions {report['versions']}."]
    return "\n".join(lines) + "\n"
