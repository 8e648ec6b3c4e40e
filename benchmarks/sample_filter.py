"""Does keeping only the samples that a held-out classifier finds consistent with their label change what the
downstream classifiers learn? A post-processing choice (no privacy cost: the generator and its samples only).

A class-balanced pool of --pool samples (seed, --z-scale) is split into --folds class-balanced folds; the protocol's
CNN recipe is trained on all folds but one and scores the held-out fold's samples by the probability of their own
label (cross-fitted, so no sample is scored by a model that saw it). Arm `filtered` keeps, per class, the
--keep / K samples with the highest score; arm `random` keeps as many per class at random from the same pool
(the control). Each arm's set is evaluated like stage 3's accuracy against a held-out reference.

    .venv/bin/python benchmarks/sample_filter.py GENERATOR --pool 90000 --keep 60000 --z-scale 1.2 \\
        --reference fashion-mnist:val-5k --out DIR

Tune on a validation hold-out (fashion-mnist:val-5k), never on the reported test split. Prints one row per arm and
writes DIR/sample_filter.json (with the pool's held-out label agreement per class)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mepf.evaluate.classifiers import accuracies, cnn_probabilities, train_cnn
from mepf.evaluate.data import load_reference
from mepf.synthesize import load_generator

ARMS = ("filtered", "random")


def held_out_scores(images, y, k: int, folds: int, seed: int):
    """(probability of each sample's own label, predicted class) from a CNN that did not see the sample."""
    fold = (np.arange(len(y)) // k) % folds  # y = arange % k: every fold holds every class equally
    score, pred = np.empty(len(y)), np.empty(len(y), np.int64)
    for f in range(folds):
        model = train_cnn(images[fold != f], y[fold != f], k, seed=seed + 1 + f)
        p = cnn_probabilities(model, images[fold == f])
        score[fold == f] = p[np.arange(len(p)), y[fold == f]]
        pred[fold == f] = p.argmax(1)
    return score, pred


def keep_indices(arm: str, score, y, k: int, per_class: int, seed: int) -> np.ndarray:
    """Per class, the per_class samples with the highest score (filtered) or a random per_class (random)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(k):
        idx = np.flatnonzero(y == c)
        out.append(idx[np.argsort(-score[idx], kind="stable")[:per_class]] if arm == "filtered"
                   else rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generator")
    ap.add_argument("--pool", type=int, default=90000)
    ap.add_argument("--keep", type=int, default=60000)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--z-scale", type=float, default=1.0)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--reference", default="fashion-mnist:val-5k")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    arms = a.arms.split(",")
    if not set(arms) <= set(ARMS):
        ap.error(f"--arms: some of {', '.join(ARMS)}")
    g = load_generator(a.generator)
    k = g.arch["num_classes"]
    if a.pool % (k * a.folds) or a.keep % k or not 0 < a.keep <= a.pool or a.folds < 2:
        ap.error("--pool: a multiple of classes x folds; --keep: a multiple of the classes, at most --pool; "
                 "--folds: at least 2")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images, y = g.sample(a.pool, seed=a.seed, z_scale=a.z_scale)
    ref = load_reference(a.reference, geometry=images.shape[1:])
    if list(ref.class_names or []) != list(g.info["class_names"]):
        ap.error(f"{a.reference}'s classes are not the generator's")
    score, pred = held_out_scores(images, y, k, a.folds, a.seed)
    agree = [float((pred[y == c] == c).mean()) for c in range(k)]
    record = {"settings": {**vars(a), "command": "benchmarks/sample_filter.py"},
              "pool": {"held_out_agreement": float((pred == y).mean()), "agreement_per_class": agree,
                       "seconds": round(time.perf_counter() - t0, 1)},
              "results": []}
    print(f"pool of {a.pool}: held-out CNN agrees with the label on {(pred == y).mean():.1%} "
          f"(per class {', '.join(f'{v:.0%}' for v in agree)})", flush=True)
    for arm in arms:
        t0 = time.perf_counter()
        idx = keep_indices(arm, score, y, k, a.keep // k, a.seed)
        acc = accuracies(images[idx], y[idx], ref.images, ref.labels, k, seed=a.seed)
        record["results"].append({"arm": arm, **acc, "kept_agreement": float((pred[idx] == y[idx]).mean()),
                                  "kept_min_score": float(score[idx].min()),
                                  "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{arm}: " + ", ".join(f"{c} {v:.1%}" for c, v in acc.items()), flush=True)
        (out / "sample_filter.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
