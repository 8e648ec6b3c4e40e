"""`mepf evaluate --protocol dpimagebench`: the synthetic set measured as DPImageBench (CCS 2025) measures it.

Accuracy: three classifiers (bench_protocol.py) trained on 55,000 of 60,000 synthetic images, selected on the
real 5,000-image validation hold-out (`fashion-mnist:val-5k`, which `mepf embed` never embeds when the release
was made from `fashion-mnist:train-55k`), reported on the test set. FID: pytorch-fid's Inception pool3 of 50,000
of the synthetic images against the 55,000 private training images, as their evaluator computes it (not a private
figure: it reads the private data; the data owner reports it). Their recipe for (Fashion-)MNIST only, the one
implemented here: grey 28 x 28 images (CIFAR and larger images get other networks and training there).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from mepf.artifacts.errors import STORAGE_ERRORS, Interrupted, MepfError, storage_error
from mepf.artifacts.format import printable
from mepf.artifacts.staging import write_text_atomic
from mepf.artifacts.versions import versions

from .bench_protocol import BenchSchedule, summarise, train_classifier, training_subset
from .benchnets import BENCH_CLASSIFIERS, EPOCH_COST
from .classes import match_classes
from .data import ImageSet, load_reference, load_synthetic, run_stats
from .evaluation import (
    OVERLAP_REFUSED,
    _check_out,
    _fid,
    _generator_record,
    _late_warnings,
    _release_of,
    _release_record,
    _run_options,
    fid_pick,
    private_reference_warning,
    shared_with,
    unchecked_warning,
)
from .report import PROTOCOL_META as META
from .report import PROTOCOL_STATE as STATE
from .report import write_report

PROTOCOL_METRICS = ("accuracy", "fid")
#: the named splits their protocol uses, derived from a (Fashion-)MNIST test reference
DERIVED = {"validation": "val-5k", "fid_reference": "train-55k"}
#: their evaluator's synthetic set, and the random part of it their FID uses (fld's FID draws 50,000, unseeded)
THEIR_N, THEIR_FID_N = 60000, 50000
#: the image geometry (H, W, C) of the recipe implemented here, theirs for (Fashion-)MNIST
THEIR_GEOMETRY = (28, 28, 1)


def derived_split(reference: str, which: str) -> str:
    base, _, split = reference.partition(":")
    if base in ("mnist", "fashion-mnist") and split == "test":
        return f"{base}:{DERIVED[which]}"
    flag, what = (("--validation", "the real hold-out the classifiers are selected on") if which == "validation"
                  else ("--fid-reference", "the private training images"))
    raise MepfError(f"--protocol dpimagebench derives {flag} only for a (fashion-)mnist:test reference; pass {flag} "
                    f"({what})")


def _labelled(spec: str, flag: str, data_root, geometry, crop, limit) -> ImageSet:
    ref = load_reference(spec, data_root, geometry=geometry, crop=crop, flag=flag)
    if not isinstance(ref, ImageSet) or ref.labels is None:
        raise MepfError(f"{flag} {spec} must be labelled images")
    if limit:
        ref.images, ref.labels = ref.images[:limit], ref.labels[:limit]
    return ref


def _check_not_test(val: ImageSet, test: ImageSet, val_spec: str, reference: str) -> None:
    """Selecting on the test set is what DPImageBench was built to stop: refuse a validation set that is it."""
    shared = shared_with(val, test)
    if val_spec == reference or shared > OVERLAP_REFUSED:
        raise MepfError(f"--validation {val_spec} is (or shares {shared:.0%} of its records with) --reference "
                        f"{reference}: the classifiers would be selected on the test set; pass a held-out set such "
                        "as fashion-mnist:val-5k")


def _check_geometry(shape: tuple) -> None:
    if tuple(shape) != THEIR_GEOMETRY:
        h, w, c = shape
        raise MepfError(f"--protocol dpimagebench implements DPImageBench's recipe for grey 28 x 28 images "
                        f"((Fashion-)MNIST), and these are {h} x {w} x {c}: their evaluator trains other networks, "
                        "another way, for other data (CIFAR: WRN-28-10, SGD, 200 epochs); use --protocol mepf")


def _unverified_holdout(synth, val_spec: str, release_log) -> str | None:
    """Why the premise that the generator never saw the validation hold-out cannot be checked here: the release it
    was trained from is not in the owner's release log on this machine (a GPU host, someone else's generator)."""
    from mepf.embed.release_log import default_log_path, read_log

    log = Path(release_log) if release_log else default_log_path()
    sha = synth.generator.info["release_sha256"] if synth.generator is not None else None
    if sha and any(isinstance(e, dict) and e.get("output_sha256") == sha for e in read_log(log)):
        return None
    what = "the generator's release is not" if sha else "images given as files are not a release"
    return (f"the hold-out --validation {val_spec} could not be checked to be outside the generator's training "
            f"data: {what} in the release log {log}; the protocol assumes the generator never saw it (a release of "
            "fashion-mnist:train-55k never holds fashion-mnist:val-5k)")


def _identity(synth) -> str | None:
    """What names the synthetic set across machines: the generator's SHA-256 with n and the seed (its samples
    may differ by a rounding between machines); None for images given as files (their bytes name them)."""
    if synth.generator_path is None:
        return None
    return f"{synth.generator.sha256}|{len(synth.images)}"


def _read_meta(state: Path) -> dict:
    try:
        meta = json.loads((state / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("evaluation"), str):
        raise MepfError(f"{state} holds no readable {META}: it is not a protocol state this mepf wrote; pass "
                        "--overwrite to start afresh, or choose another --out")
    return meta


def _prepare_state(out: Path, overwrite: bool, meta: dict) -> Path:
    """The state folder, made before anything else is written: its presence makes the folder resumable."""
    state = out / STATE
    if state.is_symlink() or (state.exists() and not state.is_dir()):
        raise MepfError(f"{state} is not a folder; move it away, or choose another --out")
    if overwrite and state.is_dir():
        shutil.rmtree(state)
    if state.is_dir():
        old = _read_meta(state)
        if old["evaluation"] != meta["evaluation"]:
            raise MepfError(f"{out} holds the saved state of another protocol run ({printable(old['evaluation'])}); "
                            "pass --overwrite to start afresh, or choose another --out")
        return state
    state.mkdir(parents=True)  # the folder was checked before sampling (evaluate_dpimagebench)
    write_text_atomic(state / META, json.dumps(meta, indent=2))
    return state


def _first_epoch_estimate(state: Path, kind: str) -> float:
    """Seconds of a first epoch of `kind`, from an epoch of another classifier already run here (0 if none)."""
    rate = _read_meta(state).get("seconds_per_cost_epoch")
    return float(rate) * EPOCH_COST[kind] if isinstance(rate, (int, float)) else 0.0


def _record_rate(state: Path, kind: str, result: dict) -> None:
    if not result["history"]:
        return
    meta = _read_meta(state)
    meta["seconds_per_cost_epoch"] = result["history"][-1]["seconds"] / EPOCH_COST[kind]
    write_text_atomic(state / META, json.dumps(meta, indent=2))


def evaluate_dpimagebench(synthetic: str, reference: str, out, *args, overwrite: bool = False, **kwargs) -> dict:
    """DPImageBench's protocol on SYNTHETIC, testing on REFERENCE; resumes the classifiers' training from `out`
    (the same command again continues a run cut short by `time_budget`). Once this call has made the state
    afresh (--overwrite), a full disk or Ctrl-C says to run again WITHOUT --overwrite, which continues from the
    saved epoch: "the same command" would discard it (review 48 M2)."""
    prepared = []
    try:
        return _evaluate_dpimagebench(synthetic, reference, out, *args, overwrite=overwrite, prepared=prepared,
                                      **kwargs)
    except KeyboardInterrupt as e:
        if not (overwrite and prepared) or isinstance(e, Interrupted):
            raise
        raise Interrupted(f"interrupted; the classifiers' progress is saved in {prepared[0]}: run the same command "
                          "again WITHOUT --overwrite to continue from the saved epoch", getattr(e, "signum", None)
                          ) from None
    except OSError as e:
        if not (overwrite and prepared) or e.errno not in STORAGE_ERRORS:
            raise
        raise MepfError(f"{storage_error(e)}; the classifiers' progress is saved in {prepared[0]}: free space (or fix "
                        "the permissions) and run the same command again WITHOUT --overwrite to continue from the "
                        "saved epoch") from None


def _evaluate_dpimagebench(synthetic: str, reference: str, out, n: int = THEIR_N, fid_samples: int | None = None,
                           metrics=None, classifiers=BENCH_CLASSIFIERS, validation: str | None = None,
                           fid_reference: str | None = None, real_limit: int | None = None, epochs: int = 50,
                           time_budget: float | None = None, inception_weights: str | None = None, data_root=None,
                           release_log=None, seed: int = 0, device="cpu", cache_dir=None, progress: bool = True,
                           class_map: str | None = None, overwrite: bool = False, z_scale: float = 1.0,
                           prepared: list | None = None) -> dict:
    """evaluate_dpimagebench's work; `prepared` gets the state folder once this call has made or taken it."""
    prepared = [] if prepared is None else prepared
    t0 = time.perf_counter()
    deadline = time.time() + time_budget if time_budget else None
    out = Path(out)
    bad = set(metrics or ()) - set(PROTOCOL_METRICS)
    if bad:
        raise MepfError(f"--protocol dpimagebench measures {' and '.join(PROTOCOL_METRICS)}, not {sorted(bad)[0]!r}")
    unknown = [c for c in classifiers if c not in BENCH_CLASSIFIERS]
    if unknown:
        raise MepfError(f"unknown classifier {unknown[0]!r} for --protocol dpimagebench; choose from "
                        f"{', '.join(BENCH_CLASSIFIERS)}")
    if out.exists() and not out.is_dir():
        raise MepfError(f"--out {out} is a file; give a folder for the report")
    if not (out / STATE).is_dir():
        _check_out(out, overwrite)  # before any sampling: a refused folder costs nothing
    wanted = set(metrics or PROTOCOL_METRICS)
    unused = ([("--validation", validation), ("--class-map", class_map)] if "accuracy" not in wanted else []) + (
        [("--fid-reference", fid_reference), ("--fid-samples", fid_samples), ("--inception-weights",
                                                                              inception_weights)]
        if "fid" not in wanted else [("--time-budget", time_budget)] if wanted == {"fid"} else [])
    given = [flag for flag, value in unused if value is not None]
    if given:
        raise MepfError(f"{given[0]} does nothing with --metrics {','.join(sorted(wanted))}; drop it")
    p, generator = Path(synthetic), None
    if p.suffix == ".pt" or (p / "generator.pt").is_file():  # a generator's size is known before its samples
        from mepf.synthesize import load_generator

        generator = load_generator(p)
        arch = generator.arch
        _check_geometry((arch["image_size"], arch["image_size"], arch["channels"]))
    synth = load_synthetic(synthetic, n, seed, device, z_scale, generator)
    _check_geometry(tuple(synth.shape))
    saved = _run_options(synth)
    release = _release_record(synth, _release_of(synth, None, saved))  # before any metric: an altered generator stops
    ident = _identity(synth)
    # what the saved state belongs to: a generator by its SHA-256 (wherever it lies now), images by their path
    drawn = "" if z_scale == 1 else f" at z scale {z_scale!r}"  # a saved state belongs to these samples only
    meta = {"evaluation": f"{'generator ' + ident + drawn if ident else synthetic}, seed {seed}, {epochs} epochs, real "
                          f"limit {real_limit}, {'+'.join(sorted(wanted))}, {'+'.join(sorted(classifiers))}"}
    crop = None if synth.crop in (None, "none") else synth.crop  # the generator's, or as mepf sample recorded it
    schedule = BenchSchedule(epochs=epochs)
    metrics_out, flagged = {}, []
    warnings = unchecked_warning(release, "put it beside the generator (this protocol takes no --release)")
    k = len(synth.images)
    k_fid = min(fid_samples or THEIR_FID_N, k)
    reduced = [w for w, on in ((f"{k:,} synthetic images (theirs: {THEIR_N:,})", k != THEIR_N),
                               (f"{epochs} epochs (theirs: 50)", epochs != 50),
                               (f"the first {real_limit:,} images of each real set" if real_limit else "",
                                bool(real_limit)),
                               (f"classifiers {', '.join(classifiers)} only (theirs: {', '.join(BENCH_CLASSIFIERS)})",
                                "accuracy" in wanted and sorted(classifiers) != sorted(BENCH_CLASSIFIERS)),
                               (f"FID from {k_fid:,} samples (theirs: {THEIR_FID_N:,} drawn at random)",
                                "fid" in wanted and k_fid != THEIR_FID_N))
               if on]
    classes, test = None, None
    complete = True
    if "accuracy" in wanted:
        if synth.labels is None:
            raise MepfError("the protocol's accuracy needs labelled synthetic images; use a labelled run or "
                            "--metrics fid")
        test = _labelled(reference, "--reference", data_root, synth.shape, crop, real_limit)
        val_spec = validation or derived_split(reference, "validation")
        val = _labelled(val_spec, "--validation", data_root, synth.shape, crop, real_limit)
        if list(val.class_names or []) != list(test.class_names or []):
            raise MepfError(f"--validation {val_spec} and --reference {reference} have different classes")
        _check_not_test(val, test, val_spec, reference)
        for s, flag in ((val, "--validation"), (test, "--reference")):
            warn = private_reference_warning(s, release_log)
            if warn:
                print(f"WARNING: {flag}: {warn}", file=sys.stderr)
                flagged.append((flag, warn))
        unverified = _unverified_holdout(synth, val_spec, release_log)
        if unverified:
            warnings.append(unverified)
        perm, mapping, how = match_classes(synth.class_names, synth.by_index, synth.sampled_names, test.class_names,
                                           test.by_index, class_map)
        classes = {"matched": how, "map": mapping}
        train = training_subset(synth.images, perm[synth.labels], schedule.n_train)
        state = _prepare_state(out, overwrite, meta)  # the inputs are good: from here the folder can resume
        prepared.append(state)
        overwrite = False  # replaced once, not again by the FID below
        results = {}
        for kind in classifiers:
            if progress:
                print(f"training {kind} on {len(train[0]):,} synthetic images", file=sys.stderr)
            results[kind] = r = train_classifier(
                kind, train, (val.images, val.labels), (test.images, test.labels), len(test.class_names), schedule,
                seed, device, state / f"{kind}.pt", deadline, progress,
                train_key=f"{ident}|{seed}|{class_map}" if ident else None,
                first_epoch_s=_first_epoch_estimate(state, kind))
            _record_rate(state, kind, r)
            status = "finished" if r["finished"] else f"stopped at epoch {r['epochs_done']}/{epochs}"
            print(f"{kind}: {r['seconds']:.0f} s of training in all, {status}"
                  + (f"; test {r['test_at_best_val']:.2f}% at epoch {r['best_epoch']} (best validation "
                     f"{r['best_val']:.2f}%)" if r["best_epoch"] else ""), file=sys.stderr)
        summary = summarise(results)
        metrics_out["dpimagebench"] = {"classifiers": results, **summary, "validation": val.description,
                                       "n_train": len(train[0]), "schedule": schedule.__dict__}
        metrics_out["accuracy"] = {k: r["test_at_best_val"] / 100 for k, r in results.items() if r["finished"]}
        unfinished = [k for k, r in results.items() if not r["finished"]]
        complete = not unfinished
        if unfinished:
            none_yet = all(results[k]["epochs_done"] == 0 for k in unfinished)
            how = (" (no epoch fitted in this call: give a larger --time-budget)" if none_yet
                   else " from the saved epoch")
            warnings.append(f"incomplete: {', '.join(unfinished)} not finished within --time-budget; run the same "
                            f"command again (without --overwrite) to continue{how}")
    if "fid" in wanted and not complete:
        warnings.append("FID not computed: the classifiers come first; it runs on the call that finishes them")
    elif "fid" in wanted:
        fid_spec = fid_reference or derived_split(reference, "fid_reference")
        ref = load_reference(fid_spec, data_root, geometry=synth.shape, crop=crop, flag="--fid-reference")
        if real_limit and isinstance(ref, ImageSet):
            ref.images = ref.images[:real_limit]
        state = _prepare_state(out, overwrite, meta)
        prepared.append(state)
        stats_dir = Path(cache_dir) if cache_dir else state / "fid-stats"
        # theirs draws THEIR_FID_N of the samples unseeded; here a draw fixed by the seed, so a rerun agrees
        pick = fid_pick(k, k_fid, seed)
        metrics_out.update(_fid(synth, ref, inception_weights, stats_dir, device, progress, pick=pick))
        metrics_out["fid_drawn_with_seed"] = None if pick is None else seed
        metrics_out["fid_reference"] = fid_spec
        warnings.append(f"FID is against {fid_spec}, the private training images, as DPImageBench measures it: it is "
                        "not a differentially private figure (the data owner computes and reports it); their Inception "
                        f"statistics are kept in {stats_dir}")
    if reduced:
        warnings.append("REDUCED protocol, not comparable with DPImageBench's tables: " + "; ".join(reduced))
    generator = _generator_record(synth, saved, z_scale)
    warnings += _late_warnings(metrics_out, generator)
    warnings += [f"{flag}: {warn}" for flag, warn in flagged]
    report = {"protocol": "dpimagebench", "protocol_reduced": reduced, "epochs": epochs, "real_limit": real_limit,
              "synthetic": synth.description, "synthetic_given": synthetic, "n_synthetic": k, "reference": reference,
              "reference_given": reference,
              "n_reference": None if test is None else int(len(test.images)), "generator": generator,
              "metrics": metrics_out, "release": release, "not_for_publication": bool(flagged),
              "private_sets": [flag for flag, _ in flagged],
              "warnings": warnings, "seed": seed, "classes": classes,
              "versions": versions("mepf", "torch", "pytorch-fid"), "wall_time_s": time.perf_counter() - t0}
    write_report(out, report, synth.images, synth.labels, run_stats(synth.run_dir), synth.class_names)
    return report

