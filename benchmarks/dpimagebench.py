"""DPImageBench's protocol on the generators behind the results rows, in calls of bounded time (issue 28).

Each call spends at most --budget seconds: for every generator, each classifier in turn continues its training
from the epoch it saved (`mepf evaluate --protocol dpimagebench --time-budget`), then FID against the private
training images; what is left waits for the next call. Every call rewrites OUT/results.json (rows in
docs/results' form, protocol "dpimagebench") and prints each classifier's time.

    .venv/bin/python benchmarks/dpimagebench.py --device cuda            # one GPU call; repeat until complete
    .venv/bin/python benchmarks/dpimagebench.py --epochs 1 -n 300 --real-limit 300 --no-fid   # CPU check
    .venv/bin/python benchmarks/dpimagebench.py --device cuda --jobs 3    # the three classifiers at once on one GPU

Generators: those named by docs/results/*.json rows (committed under docs/results/generators/), or given.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


#: the private set a release must have been made from for the protocol's validation hold-out to be unseen
PRIVATE_SET = "fashion-mnist:train-55k"


def _committed_rows() -> list[dict]:
    """The results rows of docs/results/*.json that name a generator evaluated under mepf's protocol, sampled at
    z ~ N(0, I) as the protocol samples (a generator's rows at other z-scales are of other samples): one each."""
    return [r for path in sorted((ROOT / "docs" / "results").glob("*.json"))
            for r in json.loads(path.read_text())["results"]
            if r.get("generator") and r.get("protocol", "mepf") == "mepf" and r.get("z_scale") in (None, 1, 1.0)]


def _private_set_ok(r: dict) -> bool:
    if r.get("data") != PRIVATE_SET:
        print(f"skipped {r['generator']}: its release is of {r.get('data', 'fashion-mnist:train')}, which holds the "
              f"validation hold-out (the protocol needs {PRIVATE_SET})", file=sys.stderr)
    return r.get("data") == PRIVATE_SET


def committed_generators() -> list[tuple[Path, dict]]:
    """(generator.pt, its results row) for every row of docs/results/*.json that names one and whose release
    was made from the 55,000 images (a release of all 60,000 has seen the validation hold-out)."""
    return [(ROOT / r["generator"], r) for r in _committed_rows() if _private_set_ok(r)]


def named_generators(paths: list[str]) -> list[tuple[Path, dict]]:
    """(generator.pt, its results row) for generators named on the command line (scripts/gpu_offline.sh names them
    by path): a committed one takes its row (data, eps, seed, setting) and the same 55k rule; another has no row."""
    rows = {(ROOT / r["generator"]).resolve(): r for r in _committed_rows()}
    out = []
    for g in map(Path, paths):
        row = rows.get(g.resolve())
        if row is None:
            print(f"note: {g} is in no results row of docs/results: its row here lacks data, eps, seed and setting, "
                  f"and whether its release was made from {PRIVATE_SET} is not checked", file=sys.stderr)
        if row is None or _private_set_ok(row):
            out.append((g, row or {}))
    return out


def _report(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None


def _same_run(rep: dict | None, sha: str, a) -> bool:
    """Whether a report is of this generator under this call's protocol (a reduced check does not count)."""
    return bool(rep and (rep.get("generator") or {}).get("sha256") == sha and rep.get("epochs") == a.epochs
                and rep.get("n_synthetic") == a.n and rep.get("real_limit") == a.real_limit)


def _fid_of(rep: dict | None, sha: str, a) -> dict | None:
    """The report's FID where it is of this run and of today's method (50,000 samples drawn with the seed; a report
    without `fid_drawn_with_seed` took all 60,000 and is computed again)."""
    ok = _same_run(rep, sha, a) and "fid" in rep["metrics"] and "fid_drawn_with_seed" in rep["metrics"]
    return rep if ok else None


def _finished(folder: Path, kind: str, sha: str, a) -> bool:
    rep = _report(folder)
    return _same_run(rep, sha, a) and bool(
        rep["metrics"].get("dpimagebench", {}).get("classifiers", {}).get(kind, {}).get("finished"))


def main() -> int:
    from mepf.artifacts.errors import MepfError
    from mepf.artifacts.format import file_sha256
    from mepf.core.device import resolve_device
    from mepf.evaluate.options import BENCH_CLASSIFIERS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("generators", nargs="*", help="generator.pt files  [default: every committed one]")
    ap.add_argument("--budget", type=float, default=480, help="seconds of work in this call")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--classifiers", default=",".join(BENCH_CLASSIFIERS))
    ap.add_argument("-n", type=int, default=60000, help="synthetic images (theirs: 60,000)")
    ap.add_argument("--real-limit", type=int, default=None, help="first N images of each real set (a reduced check)")
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--inception-weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fid-seconds", type=float, default=150,
                    help="FID starts only with this much of the budget left (its time on one H200, with loading)")
    ap.add_argument("--min-seconds", type=float, default=30,
                    help="a classifier starts only with this much of the budget left")
    ap.add_argument("--out", default="bench/dpimagebench")
    ap.add_argument("--jobs", type=int, default=1,
                    help="classifiers trained at once, each in a process of its own (on a GPU, ResNet-110's launches "
                    "leave the device mostly idle)")
    ap.add_argument("--no-rows", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: the parent writes them
    a = ap.parse_args()
    t_start = time.time()
    deadline = t_start + a.budget
    device = resolve_device(a.device)
    out = Path(a.out)
    gens = named_generators(a.generators) if a.generators else committed_generators()
    if not gens:
        print("no generators: name some, or commit results rows that name theirs", file=sys.stderr)
        return 2
    kinds = [k.strip() for k in a.classifiers.split(",") if k.strip()]
    shas = {gen: file_sha256(gen) for gen, _ in gens}
    if a.jobs > 1:
        _in_parallel([(gen, kind) for gen, _ in gens for kind in kinds
                      if not _finished(_folder(gen, shas[gen], a, out) / kind, kind, shas[gen], a)], a, deadline)
    rows, left = [], False
    for gen, row in gens:
        sha = shas[gen]
        folder = _folder(gen, sha, a, out)
        try:
            left |= _evaluate(gen, sha, folder, kinds, a, deadline, device, out)
        except MepfError as e:  # one generator's problem: said, and the others go on
            print(f"{gen}: {e}", file=sys.stderr)
            left = True
        rows.append(_row(gen, row, folder, kinds, sha, a))
    if a.no_rows:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": vars(a), "results": rows}, indent=2))
    for r in rows:
        acc = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in r["per_classifier"].items())
        print(f"{r['name']}: max {r['accuracy_max']}, mean {r['accuracy_mean']} ({acc}); FID {r['fid']}")
    print(f"call took {time.time() - t_start:.0f} s; " + ("work is left: run the same command again" if left
                                                          else "complete"))
    return 0


def _folder(gen: Path, sha: str, a, out: Path) -> Path:
    """A generator's folder, named by its folder and SHA-256 (a generator replaced in place starts afresh); a
    reduced run works in one of its own."""
    full = (a.epochs, a.n, a.real_limit) == (50, 60000, None)
    return out / (f"{gen.parent.name}-{sha[:12]}" + ("" if full else f"-reduced-e{a.epochs}-n{a.n}-r{a.real_limit}"))


def _in_parallel(todo: list, a, deadline: float) -> None:
    """Each (generator, classifier) of `todo` in a process of its own (this script, one classifier, no FID, no
    rows), at most --jobs at once, within this call's deadline; each saves its state as a sequential run does."""
    import subprocess

    common = ["--epochs", str(a.epochs), "-n", str(a.n), "--device", a.device, "--out", a.out, "--no-fid",
              "--no-rows", "--min-seconds", str(a.min_seconds)]
    common += ["--real-limit", str(a.real_limit)] if a.real_limit else []
    common += ["--data-root", a.data_root] if a.data_root else []
    queue, running = list(todo), []
    while queue or running:
        while queue and len(running) < a.jobs and deadline - time.time() >= a.min_seconds:
            gen, kind = queue.pop(0)
            running.append(subprocess.Popen([sys.executable, __file__, str(gen), "--classifiers", kind, "--budget",
                                             f"{deadline - time.time():.0f}", *common]))
        if not running:
            break
        running = [p for p in running if p.poll() is None]
        time.sleep(0.5)


def _epoch_estimate(folder: Path, kind: str, kinds: list) -> float:
    """Seconds of a first epoch of `kind`, from an epoch another classifier of this generator has run (0: none)."""
    from mepf.evaluate.benchnets import EPOCH_COST

    for other in kinds:
        rep = _report(folder / other)
        hist = rep["metrics"]["dpimagebench"]["classifiers"][other]["history"] if rep and "dpimagebench" in rep[
            "metrics"] and other in rep["metrics"]["dpimagebench"]["classifiers"] else []
        if hist:
            return hist[-1]["seconds"] / EPOCH_COST[other] * EPOCH_COST[kind]
    return 0.0


def _evaluate(gen: Path, sha: str, folder: Path, kinds: list, a, deadline: float, device, out: Path) -> bool:
    """This call's share of one generator's protocol; True where work is left for the next call."""
    from mepf.evaluate.dpimagebench import evaluate_dpimagebench

    left = False
    for kind in kinds:
        if _finished(folder / kind, kind, sha, a):
            continue
        rep = _report(folder / kind)
        done = rep["metrics"]["dpimagebench"]["classifiers"][kind]["epochs_done"] if _same_run(rep, sha, a) else 0
        if deadline - time.time() < max(a.min_seconds, 0 if done else _epoch_estimate(folder, kind, kinds)):
            left = True
            continue
        t0 = time.time()
        rep = evaluate_dpimagebench(str(gen), "fashion-mnist:test", folder / kind, n=a.n, metrics=["accuracy"],
                                    classifiers=[kind], epochs=a.epochs, real_limit=a.real_limit,
                                    time_budget=max(1.0, deadline - time.time()), data_root=a.data_root,
                                    device=device, progress=False)
        r = rep["metrics"]["dpimagebench"]["classifiers"][kind]
        print(f"{folder.name} {kind}: {time.time() - t0:.0f} s in this call, {r['seconds']:.0f} s of training in "
              f"all, {r['epochs_done']}/{a.epochs} epochs", flush=True)
        left |= not r["finished"]
    fid_dir = folder / "fid"
    if not a.no_fid and not _fid_of(_report(fid_dir), sha, a):
        if deadline - time.time() >= a.fid_seconds:
            t0 = time.time()
            evaluate_dpimagebench(str(gen), "fashion-mnist:test", fid_dir, n=a.n, metrics=["fid"],
                                  epochs=a.epochs, real_limit=a.real_limit, data_root=a.data_root, device=device,
                                  inception_weights=a.inception_weights, cache_dir=out / "fid-stats",
                                  progress=False, overwrite=True)
            print(f"{folder.name} FID: {time.time() - t0:.0f} s", flush=True)
        else:
            left = True
    return left


def _row(gen: Path, row: dict, folder: Path, kinds: list, sha: str, a) -> dict:
    from mepf.evaluate.options import BENCH_CLASSIFIERS

    per, reduced, done = {}, set(), True
    for kind in kinds:
        rep = _report(folder / kind)
        rep = rep if _same_run(rep, sha, a) else None
        r = rep["metrics"]["dpimagebench"]["classifiers"].get(kind) if rep else None
        per[kind] = r["test_at_best_val"] if r and r["finished"] else None
        done &= per[kind] is not None
        reduced |= set(rep["protocol_reduced"]) if rep else set()
    fid = _fid_of(_report(folder / "fid"), sha, a)
    if fid:
        reduced |= set(fid["protocol_reduced"])
    # each classifier is an evaluation of its own here: the row's classifiers are this call's, said once
    reduced = {w for w in reduced if not w.startswith("classifiers ")}
    if sorted(kinds) != sorted(BENCH_CLASSIFIERS):
        reduced.add(f"classifiers {', '.join(kinds)} only (theirs: {', '.join(BENCH_CLASSIFIERS)})")
    vals = [v for v in per.values() if v is not None]
    where = gen.resolve().relative_to(ROOT) if gen.resolve().is_relative_to(ROOT) else gen
    return {"name": folder.name, "protocol": "dpimagebench", "generator": str(where), "generator_sha256": sha,
            "data": row.get("data"), "epsilon": row.get("epsilon"), "seed": row.get("seed"),
            "setting": row.get("setting"), "per_classifier": per, "complete": done,
            "accuracy_max": max(vals) if done else None,
            "accuracy_mean": sum(vals) / len(vals) if done else None,
            "fid": fid["metrics"]["fid"] if fid else None,
            "fid_samples": fid["metrics"]["fid_samples"] if fid else None, "reduced": sorted(reduced)}


if __name__ == "__main__":
    sys.exit(main())
