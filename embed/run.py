"""Stage 1's one entry point: EmbedOptions (every option and its default, once) and run_embed, which the
command line, the benchmarks and the privacy audit call."""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from mepf.artifacts.accounting import validate_target
from mepf.artifacts.errors import MepfError
from mepf.artifacts.staging import check_output_path
from mepf.core import distributed
from mepf.core.device import resolve_device
from mepf.core.features import build_feature_map

from .loader import default_workers
from .options import EmbedOptions
from .release import EmbedResult, embed_to_file, sweep_output
from .sources import declared_geometry, open_source, parse_classes
from .transform import Transform


def prepare_embed(opts: EmbedOptions):
    """Everything that can fail on the options alone, before any record is read: (source, transform,
    extractor, feature spec, device). Under torchrun, this rank's device."""
    validate_target(opts.epsilon, opts.delta, allow_inf=True)
    out = Path(opts.out)
    if out.suffix.lower() not in (".h5", ".hdf5"):  # other commands tell files apart by it
        raise MepfError(f"--out {out}: a release is an HDF5 file, named .h5 (or .hdf5), e.g. "
                        f"{out.with_suffix('.h5') if out.name and out.name != '..' else 'release.h5'}")
    outside_data(opts.data, {"--out": opts.out, "--release-log": opts.release_log})
    if distributed.current().main:
        sweep_output(opts.out, opts.release_log)  # a stale one is dealt with even where the output is taken
        check_output_path(opts.out, opts.overwrite)
    source = open_source(opts.data, parse_classes(opts.classes), opts.data_root)
    size, channels = declared_geometry(source, opts.image_size, opts.channels)
    extractor, spec = build_feature_map(opts.backbone, opts.weights, list(opts.layers) if opts.layers else None,
                                        opts.pooling, size, channels, opts.weights_seed,
                                        feature_size=opts.feature_size, pixel_weight=opts.pixel_weight)
    return source, Transform(size, channels, opts.crop), extractor, spec, resolve_device(opts.device)


def outside_data(data, outputs: dict) -> None:
    """Refuse an output inside the image folder being read: made before the folder is listed, it would be read as
    a record or a class of it, and the next embed of that folder would read the release. An output that is the
    .npz/.h5 file being read (--overwrite would have replaced the data with the release: review 49 M2) likewise."""
    if not data:
        return
    try:
        root = os.stat(data)
    except OSError:  # open_source says what is wrong with it
        return
    if not stat.S_ISDIR(root.st_mode):
        for flag, path in outputs.items():
            try:
                st = os.stat(path) if path else None
            except OSError:  # not there yet: it cannot be the data
                continue
            if st is not None and (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino):
                raise MepfError(f"{flag} {path} is the data file being read (--data {data}); write it to another file")
        return
    for flag, path in outputs.items():
        if not path:
            continue
        # the folders the output would be in, as the OS will find them (links followed before '..'), and the data
        # folder found by identity, so that a link to it or a bind mount of it counts as inside
        for folder in [p := Path(os.path.realpath(path)), *p.parents]:
            try:
                st = os.stat(folder)
            except OSError:  # not made yet, or a link loop (which the output check refuses in one line)
                continue
            if (st.st_dev, st.st_ino) == (root.st_dev, root.st_ino):
                raise MepfError(f"{flag} {path} is inside the data folder {data}; write it outside the folder that is "
                                "read")


def no_core_dumps() -> None:
    """A crash of this process (and of its loader workers, which inherit it) writes no core file: one would hold
    the exact sums and the noise drawn for them."""
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (OSError, ValueError):  # a platform without the limit
        pass


def _missing_folders(out) -> list:
    """The folders above `out` that do not exist yet, deepest first (absolute: never one reached through '..');
    one that cannot be looked at (a name too long) is taken as existing, and prepare_embed says why."""
    missing = []
    for p in Path(os.path.abspath(out)).parents:
        try:
            if p.exists():
                break
        except OSError:
            continue
        missing.append(p)
    return missing


def run_embed(opts: EmbedOptions, progress: bool = True) -> EmbedResult | None:
    """The whole of `mepf embed`: open the data, build the feature map, release, log. Launched by torchrun,
    it joins the process group first; every rank reads its share; rank 0 returns the result (None on the
    others) and a failure on any rank is one error on all."""
    no_core_dumps()
    ranks, device = distributed.join(opts.device, resolve_device)
    # folders --out needs that do not exist yet: made early (to fail before the pass), removed if left empty
    made = _missing_folders(opts.out) if ranks.main else []
    try:
        with distributed.peers_lost("nothing was released; run again once every node can take part" if ranks.main
                                    else "rank 0 alone releases, normally not after this: its output (or `mepf "
                                    "releases` on its release log) says whether it did; run again only if not"):
            source, transform, extractor, spec, _ = distributed.guarded(lambda: prepare_embed(opts))
            workers = default_workers(device, ranks.local_world) if opts.workers is None else opts.workers
            return embed_to_file(source, transform, extractor, spec, out=opts.out, epsilon=opts.epsilon,
                                 delta=opts.delta, relation=opts.relation, moments=opts.moments,
                                 budget_split=opts.budget_split, batch_size=opts.batch_size, device=device,
                                 overwrite=opts.overwrite, force=opts.force, release_log_path=opts.release_log,
                                 allow_repeat=opts.allow_repeat, progress=progress, workers=workers,
                                 data_given=opts.data, bad_records=opts.bad_records)
    except BaseException:
        for p in made:  # deepest first; a folder holding anything (a log, a release) stays
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
