"""`mepf evaluate`: FID, downstream accuracy and the privacy-free embedding distance, into a report."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mepf.artifacts.errors import MepfError
from mepf.artifacts.versions import versions
from mepf.embed.sources import open_source
from mepf.synthesize import run_folder as files

from .classifiers import CLASSIFIERS, accuracies
from .data import FidStats, ImageSet, load_reference, load_synthetic, read_source, run_stats
from .report import write_report

METRICS = ("fid", "accuracy", "embedding")


def _release_of(synth: ImageSet, release_path: str | None):
    """The released file behind the synthetic images, when known (for the embedding distance)."""
    from mepf.artifacts import load

    if release_path:
        return load(release_path)
    if synth.run_dir is not None and (synth.run_dir / files.OPTIONS).is_file():
        p = json.loads((synth.run_dir / files.OPTIONS).read_text()).get("release")
        if p and Path(p).is_file():
            r = load(p)
            if synth.generator is None or r.file_sha256 == synth.generator.info["release_sha256"]:
                return r
    return None


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


def evaluate(synthetic: str, reference: str, out, n: int = 10000, fid_samples: int | None = None,
             metrics=None, classifiers=CLASSIFIERS, real_train: str | None = None, release: str | None = None,
             inception_weights: str | None = None, data_root=None, release_log=None, seed: int = 0,
             device="cpu", cnn_epochs: int = 8, cache_dir=None, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    if not out.parent.is_dir():
        raise MepfError(f"folder {out.parent} does not exist; create it or choose another --out")
    wanted = set(metrics) if metrics else None
    bad = (wanted or set()) - set(METRICS)
    if bad:
        raise MepfError(f"unknown metric {sorted(bad)[0]!r}; choose from {', '.join(METRICS)}")
    ref = load_reference(reference, data_root)
    synth = load_synthetic(synthetic, n, seed, device)
    warnings = []
    if isinstance(ref, ImageSet) and ref.shape[-1] != synth.shape[-1]:
        raise MepfError(f"geometry differs: synthetic images are {tuple(synth.shape)}, reference {tuple(ref.shape)} "
                        "(channels); evaluate against a reference of the same kind")
    if isinstance(ref, ImageSet) and ref.shape[:2] != synth.shape[:2]:
        raise MepfError(f"geometry differs: synthetic images are {synth.shape[0]}x{synth.shape[1]}, reference "
                        f"{ref.shape[0]}x{ref.shape[1]}; evaluate against a reference of the same size")
    labelled = synth.labels is not None and isinstance(ref, ImageSet) and ref.labels is not None
    if wanted is None:
        wanted = {"fid", "embedding"} | ({"accuracy"} if labelled else set())
        if not labelled:
            warnings.append("accuracy skipped: it needs labelled synthetic images and a labelled reference")
    if "accuracy" in wanted and not labelled:
        side = "reference" if synth.labels is not None else "synthetic set"
        raise MepfError(f"accuracy needs labels, and the {side} has none; use a labelled reference or "
                        "--metrics fid,embedding")
    if "accuracy" in wanted and len(synth.class_names or []) != len(ref.class_names or []):
        raise MepfError(f"the synthetic set has {len(synth.class_names)} classes, the reference "
                        f"{len(ref.class_names)}; accuracy needs the same label set")
    warn = private_reference_warning(ref, release_log)
    if warn:
        print(f"WARNING: {warn}", file=sys.stderr)
        warnings.append(warn)
    metrics_out = {}
    if "fid" in wanted:
        from .fid import frechet_distance, reference_statistics, statistics
        from .inception import activations, load_inception

        model = load_inception(inception_weights, device)
        k = min(fid_samples or len(synth.images), len(synth.images))
        mu_s, s_s = statistics(activations(model, synth.images[:k], device=device, progress=progress))
        if isinstance(ref, FidStats):
            mu_r, s_r = ref.mu, ref.sigma
        else:
            mu_r, s_r, cached = reference_statistics(model, ref.images, inception_weights, cache_dir,
                                                     device=device, progress=progress)
            metrics_out["fid_reference_cached"] = cached
        metrics_out["fid"] = frechet_distance(mu_s, s_s, mu_r, s_r)
        metrics_out["fid_samples"] = k
    if "accuracy" in wanted:
        kk = len(ref.class_names)
        metrics_out["accuracy"] = accuracies(synth.images, synth.labels, ref.images, ref.labels, kk, classifiers,
                                             seed, device, cnn_epochs, progress)
        if real_train:
            real = read_source(open_source(real_train, data_root=data_root))
            if real.labels is None or real.shape != ref.shape:
                raise MepfError("--real-train must be labelled and have the reference's geometry")
            metrics_out["accuracy_real_train"] = accuracies(real.images, real.labels, ref.images, ref.labels, kk,
                                                            classifiers, seed, device, cnn_epochs, progress)
    rel = _release_of(synth, release)
    if "embedding" in wanted and rel is not None and (synth.labels is not None or not rel.labelled):
        from mepf.embed.features import feature_map_from_spec
        from mepf.synthesize.objective import Target, distance_of_batches

        target = Target(rel, "cpu")
        ex = feature_map_from_spec(rel.feature_spec).to(device)
        labels = synth.labels if rel.labelled else np.zeros(len(synth.images), dtype=np.int64)
        batches = ((torch.from_numpy(synth.images[s:s + 200]).permute(0, 3, 1, 2).float() / 255,
                    torch.from_numpy(labels[s:s + 200])) for s in range(0, len(synth.images), 200))
        with torch.no_grad():
            metrics_out["embedding_distance"] = distance_of_batches(batches, ex, target, device)
    elif "embedding" in wanted:
        warnings.append("embedding distance skipped: the released file behind these samples is unknown "
                        "(pass --release FILE)")
    release_info = None
    if synth.generator is not None:
        info = synth.generator.info
        release_info = {"sha256": info["release_sha256"], "epsilon": info["epsilon"], "delta": info["delta"],
                        "relation": info.get("relation", "add-remove")}
    report = {"synthetic": synth.description, "n_synthetic": int(len(synth.images)), "reference": ref.description,
              "n_reference": int(len(ref.images)) if isinstance(ref, ImageSet) else None, "metrics": metrics_out,
              "release": release_info, "not_for_publication": bool(warn), "warnings": warnings, "seed": seed,
              "versions": versions("mepf", "torch", "pytorch-fid", "scikit-learn"),
                  "wall_time_s": time.perf_counter() - t0}
    write_report(out, report, synth.images, synth.labels, run_stats(synth.run_dir))
    return report
