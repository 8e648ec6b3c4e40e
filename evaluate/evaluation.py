"""`mepf evaluate`: FID, downstream accuracy and the privacy-free embedding distance, into a report."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from mepf.artifacts.errors import MepfError
from mepf.artifacts.format import printable
from mepf.artifacts.versions import versions
from mepf.synthesize import run_folder
from mepf.synthesize.checkpoint import resumable_past

from .classes import match_classes, shown_names
from .classifiers import accuracies
from .data import FidStats, ImageSet, load_reference, load_synthetic, run_stats
from .inception import PROBE_TOLERANCE as FID_PROBE_TOLERANCE
from .options import METRICS, EvaluateOptions
from .report import write_report


def _run_options(synth: ImageSet) -> dict | None:
    """The run's options.json, read once for the report: None where the samples come from no run, {} where an
    option is out of range (the report then lacks what it would have told). One that cannot say whether the
    generator.pt is the run's (unreadable, or no release SHA-256) is refused, as `info` and resume refuse it."""
    if synth.run_dir is None or not (synth.run_dir / run_folder.OPTIONS).is_file():
        return None
    from mepf.synthesize.options import TrainOptions, options_problem

    try:
        saved = run_folder.read_options(synth.run_dir)
    except MepfError as e:
        raise MepfError(f"{e}: evaluate its generator.pt from a folder of its own") from None
    why = run_folder.of_another_run(synth.generator.info, saved) if synth.generator is not None else None
    if why is not None:  # a generator.pt copied in: the run's steps, seed and curves are not its
        raise MepfError(f"{synth.generator_path} was not trained by this run ({why}): evaluate that generator.pt from "
                        "a folder of its own, or put the run's back")
    try:
        problem = options_problem(TrainOptions(**{k: v for k, v in saved.items()
                                                  if k in TrainOptions.__dataclass_fields__}))
    except (MepfError, ValueError, RecursionError, TypeError, AttributeError):  # a field missing or of another type
        return {}
    return {} if problem else saved


def _release_of(synth: ImageSet, release_path: str | None, saved: dict | None):
    """The released file behind the synthetic images, when known (for the embedding distance): the one given
    (refused unless its SHA-256 is the generator's), else the run's, found by SHA-256 where the run recorded
    it or beside the run or generator."""
    from mepf.artifacts import load
    from mepf.synthesize.locate import locate_release

    sha = synth.generator.info["release_sha256"] if synth.generator is not None else None
    recorded, size = None, None
    if saved is not None:
        recorded, sha = saved.get("release"), sha or saved.get("release_sha256")
        size = saved.get("release_bytes") if type(saved.get("release_bytes")) is int else None
    if release_path:
        if sha is None:
            return load(release_path)
        return _load_as(locate_release(sha, Path("."), given=release_path, what="these samples"), sha)
    if sha is None:
        return None
    near = synth.run_dir or (synth.generator_path.parent if synth.generator_path else None)
    found = locate_release(sha, near, recorded, required=False, size=size) if near is not None else None
    return _load_as(found, sha) if found else None


def _load_as(path: Path, sha: str):
    """The release at `path`, found by its SHA-256 `sha`, loaded and checked to be still that file (locate_release
    hashed one read of it; the loader reads it again)."""
    from mepf.artifacts import load

    rel = load(path)
    if rel.file_sha256 != sha:
        raise MepfError(f"{path} changed between the search for the release (SHA-256 {sha[:12]}...) and its reading "
                        f"(now {rel.file_sha256[:12]}...); run again once nothing writes to it")
    return rel


def _check_release_fits(synth: ImageSet, rel, warnings: list) -> np.ndarray | None:
    """Images given as files (no generator names their release): the --release given must be of their geometry
    and classes, by name where both sides name them (a wrong file gave a traceback, or a distance of classes
    paired by position). Returns, where both name the same classes in another order (folders "0".."11" sort as
    text, a release's classes need not), each sample class's row in the release; else None (the same order)."""
    f = rel.features
    if tuple(synth.shape) != (f.height, f.width, f.channels):
        h, w, c = synth.shape
        raise MepfError(f"--release {rel.path} is of {f.height} x {f.width} x {f.channels} images and these samples "
                        f"are {h} x {w} x {c}: pass the release they were generated from")
    if not rel.labelled or synth.labels is None:
        return None
    from mepf.synthesize.sampling import class_folders

    k = len(rel.class_names)
    names = None if synth.by_index else list(synth.class_names)
    if names is not None:
        # a folder from mepf sample names its classes INDEX_NAME, made safe ("T-shirt/top" -> "0_T-shirt_top")
        folders = class_folders(rel.class_names)
        theirs = next((c for c in (list(rel.class_names), folders) if sorted(c) == sorted(names)), None)
        if theirs is None:
            fix = ("; a class with no sample has no folder: sample more images" if len(names) < k and set(names) <= set(
                folders) else ": pass the release they were generated from")
            raise MepfError(f"these samples' classes {{{', '.join(map(str, names))}}} are not the release's "
                            f"{{{', '.join(map(str, rel.class_names))}}}{fix}")
        if names != theirs:  # the same classes (a release's names are distinct) in another order
            row = {name: i for i, name in enumerate(theirs)}
            return np.array([row[name] for name in names], dtype=np.int64)
    if int(synth.labels.max(initial=0)) >= k:
        raise MepfError(f"these samples have labels up to {int(synth.labels.max())} and --release {rel.path} has "
                        f"{k} classes: pass the release they were generated from")
    if names is None and list(rel.class_names) != [str(i) for i in range(k)]:
        warnings.append(f"the samples' labels (indices, no names) are taken as indices into the release's classes "
                        f"{', '.join(map(str, rel.class_names))} (label i is its class i), for the embedding distance "
                        "and for accuracy, which matches those names to the reference's")
    return None


#: FID from fewer samples than this is noticeably biased upwards (pytorch-fid's advice: at least 2,048)
FID_UNBIASED = 2048


def _generator_record(synth: ImageSet, saved: dict | None, z_scale: float = 1.0) -> dict | None:
    """What the report records of the generator: its step and SHA-256, the latent's scale the samples were drawn
    at, and the run's steps, seed and lr."""
    if synth.generator is None or synth.generator_path is None:
        return None
    rec = {"path": str(synth.generator_path), "step": synth.generator.info.get("step"),
           "sha256": synth.generator.sha256, "z_scale": z_scale}  # of the bytes sampled from, not the file now
    if saved is not None:
        rec.update(run_steps=saved.get("steps"), seed=saved.get("seed"), lr=saved.get("lr"),
                   lr_schedule=saved.get("lr_schedule"))
        behind = resumable_past(synth.run_dir, rec["step"], saved)
        if behind:
            rec["behind"] = behind
    return rec


def private_reference_warning(ref, release_log) -> str | None:
    """A warning when the reference is, or shares records with, data in the owner's release log."""
    from mepf.embed.release_log import check_key, default_log_path, read_key, read_log, related

    if not isinstance(ref, ImageSet) or ref.fingerprint is None:
        return None
    log = Path(release_log) if release_log else default_log_path()
    entries = read_log(log)
    key = read_key(log)
    problem = check_key(log, entries, key)
    usable = key if key and not problem else None
    found = related(entries, ref.fingerprint.with_key(usable) if usable else ref.fingerprint, usable)
    hits = found["same"] + found["most"] + found["some"]
    if hits:
        what = "is data that was released privately" if found["same"] else "shares records with data released privately"
        return (f"the reference {ref.description} {what} ({len(hits)} release(s) in {log}): evaluating against "
                "private training data is not private; this report is NOT for publication")
    if problem:  # not a finding about the reference: said, but the report is not marked
        print(f"note: {problem}: the reference was compared with the releases in {log} as a whole dataset only, "
              "not record by record; restore the key to check it fully", file=sys.stderr)
    return None


_D = EvaluateOptions  # the defaults, written once there


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MepfError(f"--out {out} is a file; give a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MepfError(f"report folder {out} is not empty; pass --overwrite to replace its report, or choose "
                        "another --out")


def _metrics_wanted(metrics, labelled: bool, synth_unlabelled: bool, warnings: list) -> set:
    """The metrics asked for (all that apply when none are named); accuracy needs labels on both sides."""
    if not metrics:
        if not labelled:
            warnings.append("accuracy skipped: it needs labelled synthetic images and a labelled reference")
        return {"fid", "embedding"} | ({"accuracy"} if labelled else set())
    wanted = set(metrics)
    if "accuracy" in wanted and not labelled:
        side = "synthetic set" if synth_unlabelled else "reference"
        raise MepfError(f"accuracy needs labels, and the {side} has none; use a labelled "
                        f"{'reference' if side == 'reference' else 'run or samples'} or --metrics fid,embedding")
    return wanted


def fid_pick(n: int, fid_samples: int | None, seed: int):
    """The indices of the `fid_samples` of n synthetic images that FID uses, drawn with `seed` (not the first ones:
    a folder or an .npz may hold its images class by class); None: all of them."""
    k = min(fid_samples or n, n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False)) if k < n else None


def _fid(synth, ref, inception_weights, cache_dir, device, progress, pick=None) -> dict:
    """FID of the synthetic images at the indices `pick` (None: all) against `ref`."""
    from .fid import frechet_distance, reference_statistics, statistics
    from .inception import activations, checked_probe_error, load_inception

    out = {}
    images = synth.images[pick] if pick is not None else synth.images
    k = len(images)
    for what, count in (("synthetic", k), ("reference", len(ref.images) if isinstance(ref, ImageSet) else 2)):
        if count < 2:  # one image has no covariance: NaN, on which scipy's sqrtm ran for hours past SIGTERM
            raise MepfError(f"FID needs at least 2 {what} images (it compares covariances), and there "
                            f"{'is' if count == 1 else 'are'} {count}: give more (FID is biased upwards below 2,048)"
                            + (", e.g. -n 2048" if what == "synthetic" and synth.generator is not None else ""))
    model = load_inception(inception_weights, device)
    out["fid_probe_error"] = checked_probe_error(model, inception_weights, device)
    mu_s, s_s = statistics(activations(model, images, device=device, progress=progress,
                                       desc="FID: synthetic images"))
    if isinstance(ref, FidStats):
        mu_r, s_r = ref.mu, ref.sigma
    else:
        mu_r, s_r, cached = reference_statistics(model, ref.images, cache_dir, device=device, progress=progress)
        out["fid_reference_cached"] = cached
    out["fid"] = frechet_distance(mu_s, s_s, mu_r, s_r)
    out["fid_samples"] = k
    return out


#: a training or selection set sharing more than this share of its images with the test set is refused
OVERLAP_REFUSED = 0.1


def shared_with(a: ImageSet, b: ImageSet) -> float:
    """The larger of the share of a's images that are b's and of b's that are a's (by their pixels, whatever their
    labels): a training set ten times the test set's size holds all of it at a 10% share of its own."""
    from mepf.embed.fingerprint import record_hash

    ours, theirs = [record_hash(x) for x in a.images], [record_hash(x) for x in b.images]
    both = set(ours) & set(theirs)
    return max(sum(h in both for h in ours) / max(1, len(ours)), sum(h in both for h in theirs) / max(1, len(theirs)))


def _real_train(real_train, reference, ref, data_root, crop, shape):
    """--real-train read and checked before any classifier trains: labelled with the reference's classes, and not
    the test set (a reference point trained on its own test images would read 100%)."""
    real = load_reference(real_train, data_root, geometry=shape, crop=crop, flag="--real-train")
    if not isinstance(real, ImageSet):
        raise MepfError(f"--real-train {printable(real_train, 60)} holds FID statistics; give labelled images")
    names, ref_names = list(real.class_names or []), list(ref.class_names or [])
    if real.labels is None or sorted(names) != sorted(ref_names):
        raise MepfError(f"--real-train must be labelled with the reference's classes (by name, in any order): it "
                        f"has {shown_names(names) if real.labels is not None else 'no labels'}, the reference "
                        f"{shown_names(ref_names)}")
    shared = shared_with(real, ref)
    if real_train == reference or shared > OVERLAP_REFUSED:
        raise MepfError(f"--real-train {printable(real_train, 60)} is (or shares {shared:.0%} of its images with) "
                        f"--reference {printable(reference, 60)}: the real reference point would be tested on its "
                        "own training images; pass real images the reference does not hold, such as "
                        "fashion-mnist:train")
    real.labels = np.array([ref_names.index(n) for n in names], dtype=np.int64)[real.labels]
    return real


def _accuracy(synth, synth_labels, ref, real, classifiers, seed, device, cnn_epochs, progress) -> dict:
    kk = len(ref.class_names)
    out = {"accuracy": accuracies(synth.images, synth_labels, ref.images, ref.labels, kk, classifiers, seed, device,
                                  cnn_epochs, progress)}
    if real is not None:
        out["accuracy_real_train"] = accuracies(real.images, real.labels, ref.images, ref.labels, kk, classifiers,
                                                seed, device, cnn_epochs, progress)
    return out


def _missing_classes(synth, rel, rows: np.ndarray | None) -> str | None:
    """Why the samples cannot be measured against a labelled release: a class of it with no sample (the distance is
    a mean over the release's classes; over the classes present only, leaving hard ones out would lower it)."""
    if not rel.labelled:
        return None
    labels = rows[synth.labels] if rows is not None else synth.labels
    missing = sorted(set(range(len(rel.class_names))) - set(np.unique(labels).tolist()))
    if not missing:
        return None
    return (f"the samples hold no image of {len(missing)} of the release's {len(rel.class_names)} classes "
            f"({shown_names([rel.class_names[i] for i in missing])}), and the distance is a mean over every class: "
            + ("draw at least one per class (raise -n)" if synth.generator is not None else
               "give samples of each class (mepf sample draws them balanced)")
            + ", or leave embedding out of --metrics")


def _embedding_distance(synth, rel, device, rows: np.ndarray | None = None) -> dict:
    """Per-moment distance of the samples' class-conditional mean embedding to the release's; `rows`: each
    sample class's row in the release, where the order differs."""
    from mepf.core.features import feature_map_from_spec
    from mepf.synthesize.objective import Target, distance_of_batches

    target = Target(rel, "cpu")
    fmap = feature_map_from_spec(rel.features).to(device)
    labels = synth.labels if rel.labelled else np.zeros(len(synth.images), dtype=np.int64)
    labels = rows[labels] if rows is not None and rel.labelled else labels
    batches = ((torch.from_numpy(synth.images[s:s + 200]).permute(0, 3, 1, 2).float() / 255,
                torch.from_numpy(labels[s:s + 200])) for s in range(0, len(synth.images), 200))
    with torch.no_grad():
        return distance_of_batches(batches, fmap, target, device)


def evaluate(synthetic: str, reference: str, out, n: int = _D.n, fid_samples: int | None = _D.fid_samples,
             metrics=_D.metrics, classifiers=_D.classifiers, real_train: str | None = None, release: str | None = None,
             inception_weights: str | None = None, data_root=None, release_log=None, seed: int = _D.seed,
             device="cpu", cnn_epochs: int = _D.cnn_epochs, cache_dir=None, progress: bool = True,
             class_map: str | None = None, overwrite: bool = False, z_scale: float = _D.z_scale) -> dict:
    """Stage 3 on SYNTHETIC against REFERENCE: the input checks, then FID, accuracy and the embedding distance
    as asked, and the report written to `out`. z_scale: a generator's samples drawn at N(0, z_scale^2 I)."""
    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out, overwrite)
    bad = set(metrics or ()) - set(METRICS)
    if bad:
        raise MepfError(f"unknown metric {sorted(bad)[0]!r}; choose from {', '.join(METRICS)}")
    synth = load_synthetic(synthetic, n, seed, device, z_scale)
    saved = _run_options(synth)
    rel = _release_of(synth, release, saved)
    # the reference as stage 1 read the data: converted, cropped as the release's and resized to its geometry
    crop, crop_from = reference_crop(synth, rel)
    ref = load_reference(reference, data_root, geometry=synth.shape, crop=crop)
    warnings = conversion_warnings(ref, synth.shape, crop_from)
    labelled = synth.labels is not None and isinstance(ref, ImageSet) and ref.labels is not None
    wanted = _metrics_wanted(metrics, labelled, synth.labels is None, warnings)
    release_rec = _release_record(synth, rel)  # before any metric: an altered generator stops here
    warnings += unchecked_warning(release_rec, "pass it with --release")
    given, rows = None, None  # images as files: the release is the user's word (the distance; unnamed labels' names)
    if rel is not None and synth.generator is None:
        rows = _check_release_fits(synth, rel, warnings)
        given = {"sha256": rel.file_sha256, "path": str(rel.path), "epsilon": rel.epsilon, "delta": rel.delta}
        if synth.by_index and synth.labels is not None and rel.labelled:
            # unnamed labels of the release's samples index its classes: the distance pairs them so, and so must
            # accuracy (matched to the reference by those names), not as the numbers "0".."K-1"
            synth.class_names, synth.by_index = list(rel.class_names), False
    classes = None
    if "accuracy" in wanted:
        perm, mapping, how = match_classes(synth.class_names, synth.by_index, synth.sampled_names, ref.class_names,
                                           ref.by_index, class_map)
        synth_labels = perm[synth.labels]
        classes = {"matched": how, "map": mapping}
        numbers = [str(i) for i in range(len(ref.class_names or []))]
        if synth.by_index and not class_map and list(ref.class_names or []) != numbers:
            warnings.append("the synthetic labels (no class names) were paired with the reference classes named by "
                            "those numbers; if they index a release's classes, which list as text (0, 1, 10, 2, ...), "
                            "pass --release so that label i is its class i")
    elif class_map:
        raise MepfError("--class-map pairs classes for the accuracy metric, which this evaluation does not compute")
    real = (_real_train(real_train, reference, ref, data_root, crop, synth.shape) if real_train and "accuracy" in wanted
            else None)
    emb_why = None
    if "embedding" in wanted:  # decided before the minutes of FID and accuracy
        emb_why = ("the released file behind these samples is unknown (pass --release FILE)" if rel is None else
                   "it needs labelled samples for a labelled release" if synth.labels is None and rel.labelled else
                   _missing_classes(synth, rel, rows))
        if emb_why is not None and metrics:  # named by the user: say why it cannot be had
            raise MepfError(f"the embedding distance cannot be computed: {emb_why}")
        if emb_why is not None:
            warnings.append(f"embedding distance skipped: {emb_why}")
    warn = private_reference_warning(ref, release_log)
    if warn:
        print(f"WARNING: {warn}", file=sys.stderr)
        warnings.append(warn)
    metrics_out = {}
    if "fid" in wanted:
        pick = fid_pick(len(synth.images), fid_samples, seed)
        metrics_out.update(_fid(synth, ref, inception_weights, cache_dir, device, progress, pick=pick))
        metrics_out["fid_drawn_with_seed"] = None if pick is None else seed
        if fid_samples and fid_samples > len(synth.images):
            warnings.append(f"--fid-samples {fid_samples}: the synthetic set has {len(synth.images)} images, so FID "
                            "used them all" + (" (raise -n)" if synth.generator is not None else ""))
    if "accuracy" in wanted:
        metrics_out.update(_accuracy(synth, synth_labels, ref, real, classifiers, seed, device, cnn_epochs,
                                     progress))
    if "embedding" in wanted and emb_why is None:
        metrics_out["embedding_distance"] = _embedding_distance(synth, rel, device, rows)
    generator = _generator_record(synth, saved, z_scale)
    warnings += _late_warnings(metrics_out, generator)
    report = {"synthetic": synth.description, "synthetic_given": synthetic, "n_synthetic": int(len(synth.images)),
              "reference": ref.description, "reference_given": reference, "generator": generator,
              "reference_read": {"geometry": list(synth.shape), "crop": crop, "crop_from": crop_from,
                                 "converted": getattr(ref, "native", None)},
              **({"real_train_given": real_train, "n_real_train": int(len(real.images))} if real is not None else {}),
              "n_reference": int(len(ref.images)) if isinstance(ref, ImageSet) else None, "metrics": metrics_out,
              "release": release_rec, "release_given": given, "not_for_publication": bool(warn),
              "private_sets": ["--reference"] if warn else [],
              "warnings": warnings, "seed": seed, "classes": classes,
              "versions": versions("mepf", "torch", "pytorch-fid", "scikit-learn"),
              "wall_time_s": time.perf_counter() - t0}
    write_report(out, report, synth.images, synth.labels, run_stats(synth.run_dir), synth.class_names)
    return report


def reference_crop(synth, rel) -> tuple:
    """(crop, where it was learnt) for reading the reference as the release's data were read: the generator's,
    what the samples record (mepf sample), else the release given; (None, None) where none says (review 50 H1:
    files were compared with a stretched reference where the run's evaluation cropped it)."""
    release = None
    if rel is not None:
        release = "center" if (rel.data_spec.get("transform") or {}).get("crop") else "none"  # as a run records it
    if synth.crop is not None:
        if release is not None and release != synth.crop:
            raise MepfError(f"the samples were drawn for a release read with crop {synth.crop}, the release given "
                            f"was read with crop {release}: they are not this release's samples")
        return (None if synth.crop == "none" else synth.crop), ("generator" if synth.generator else "samples")
    if release is not None:
        return (None if release == "none" else release), "release"
    return None, None


def conversion_warnings(ref, geometry: tuple, crop_from: str | None) -> list:
    """What reading the reference at the synthetic images' geometry did to its records that a reader of the
    numbers should know (review 50 M1): stretched without a known crop, upsampled, grey and colour converted."""
    native = getattr(ref, "native", None)
    if not native or not native["records"]:
        return []
    h, w, c = geometry
    total, out = native["records"], []
    if native["other_aspect"] and crop_from is None:
        out.append(f"{native['other_aspect']:,} of {total:,} reference images have another aspect ratio than "
                   f"{h} x {w} and were stretched to it: whether the release cropped its data is unknown (these "
                   "images do not say); pass --release FILE so that the reference is read as its data were")
    if native["upsampled"]:
        out.append(f"{native['upsampled']:,} of {total:,} reference images are smaller than {h} x {w} and were "
                   "upsampled to it: a reference at the release's size (or larger) is the one to compare with")
    if native["other_channels"] and c >= 3:  # colour to grey is what the release did to its own data
        out.append(f"{native['other_channels']:,} of {total:,} reference images are grey and were repeated to the "
                   "synthetic images' three channels: a colour reference is the one to compare with")
    return out


def _late_warnings(metrics_out: dict, generator: dict | None) -> list:
    out = []
    if metrics_out.get("fid_probe_error", 0) > FID_PROBE_TOLERANCE:
        out.append(f"the --inception-weights are not pytorch-fid's (they miss its features on a fixed probe by "
                   f"{metrics_out['fid_probe_error']:.2g}): this FID is not comparable with published figures")
    if "fid" in metrics_out and metrics_out["fid_samples"] < FID_UNBIASED:
        out.append(f"FID from {metrics_out['fid_samples']} samples is biased upwards (the usual is 10,000; below "
                   f"{FID_UNBIASED:,} it is not comparable with published figures)")
    if generator and generator.get("behind"):
        out.append(f"{run_folder.behind_note(generator['behind'], generator['step'], 'this report is')} evaluate again")
    return out


def unchecked_warning(release: dict | None, fix: str) -> list:
    """The warning, for the console and the report, that a generator's claimed guarantee went unchecked."""
    if release is None or release["verified"] or release["epsilon"] == float("inf"):
        return []
    return [f"the release the generator names (SHA-256 {release['sha256'][:12]}...) was not found, so its claim of "
            f"({release['epsilon']:.4g}, {release['delta']:g})-DP is UNCHECKED: {fix}"]


def _release_record(synth, rel=None) -> dict | None:
    """The release a generator was trained from, as its checkpoint records it; where the release itself was
    found (by its SHA-256), the checkpoint's guarantee must be the release's ledger's."""
    if synth.generator is None:
        return None
    info = synth.generator.info
    claimed = (info["epsilon"], info["delta"], info.get("relation", "add-remove"))
    if rel is not None and claimed != (rel.epsilon, rel.delta, rel.ledger.get("relation")):
        raise MepfError(f"the generator claims ({claimed[0]:g}, {claimed[1]:g})-DP under {printable(claimed[2])}, but "
                        f"the release it was trained from says ({rel.epsilon:g}, {rel.delta:g})-DP under "
                        f"{printable(rel.ledger.get('relation'))}: the generator file was altered; use the one its "
                        "run wrote")
    if rel is not None:  # made for other images or classes than those of the release it names (review 39)
        a, f, names = synth.generator.arch, rel.features, list(info.get("class_names", []))
        mine = (a["image_size"], a["image_size"], a["channels"])
        if mine != (f.height, f.width, f.channels):
            why = f"it makes {mine[0]} x {mine[1]} x {mine[2]} images, the release's are {f.height} x {f.width} x " \
                  f"{f.channels}"
        elif names != list(rel.class_names):
            why = (f"its classes are {{{', '.join(map(printable, names))}}}, the release's "
                   f"{{{', '.join(map(printable, rel.class_names))}}}" + (" (the same, in another order)"
                                                                            if sorted(names) == sorted(rel.class_names)
                                                                            else ""))
        else:
            why = None
        if why:
            raise MepfError(f"the generator does not fit the release it names ({why}): the generator file was "
                            "altered; use the one its run wrote")
    return {"sha256": info["release_sha256"], "epsilon": claimed[0], "delta": claimed[1], "relation": claimed[2],
            "verified": rel is not None}
