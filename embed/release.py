"""The private release: one streaming pass of exact integer sums, then Gaussian noise from OS entropy, once.

This is the only code that touches private records. What leaves it is the noisy sums and counts, the
declared specs and the ledger; the exact sums, n, the fingerprint and the noise stay here. Every
decision that can refuse a run (delta < 1/n, a repeat release) is made before any noise is drawn, and
no message, progress display or result carries a number computed from the records.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mepf.artifacts.accounting import parse_budget_split, validate_target
from mepf.artifacts.errors import Interrupted, MepfError, storage_error
from mepf.artifacts.format import fd_sha256, printable
from mepf.artifacts.ledger import RELATIONS, build_ledger, calibration_for
from mepf.artifacts.schema import MAX_CLASSES, MAX_NAME, class_names_problem, ledger_problem
from mepf.artifacts.staging import check_output_path, staged_release, sweep_stale_temporaries
from mepf.core import distributed
from mepf.core.features import QUANT_BITS, dequantise, grid_rows
from mepf.core.memory import keep_freed_memory
from mepf.core.signals import deferred_interrupts
from mepf.progress import progress as progress_bar

from . import release_log
from .fingerprint import Fingerprint, tag_key
from .loader import Failed, loader, shard_size
from .options import BAD_RECORDS
from .plan import agree_on_files, agree_on_plan, plan_of
from .sources import refuse_untrainable

MOMENTS = {"mean": ("S1",), "mean+second": ("S1", "S2")}
#: the progress display shows how far the pass is and for how long, never a count or a rate of records
PROGRESS_FORMAT = "{desc}: {bar} [{elapsed}<{remaining}]"


@dataclass
class Sums:
    """Exact (pre-noise) statistics: private, never written anywhere."""

    qsums: dict  # name -> int64 (K, D) on the grid of step C * 2**-QUANT_BITS
    counts: np.ndarray  # int64 (K,)
    fingerprint: Fingerprint | None  # merged on rank 0; None on the other ranks
    cs: dict = field(default_factory=dict)  # name -> C
    read: int = 0  # records read over every rank, those dropped under --bad-records zero included

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def sums(self) -> dict:
        """name -> float64 (K, D): the exact sums in feature units."""
        return {n: dequantise(q, self.cs[n]).numpy() for n, q in self.qsums.items()}


#: an interrupt while the release was written, before its entry; and a second one, taken at once
NOT_RELEASED = "interrupted before the release was logged: nothing was released; run the same command again"
AGAIN = "interrupted again: stopped at once, before the release was logged: nothing was released"

OUT_OF_MEMORY = ("the pass ran out of memory; nothing was released; decoding one image may take up to 1.7 GB in each "
                 "loader worker (README, 'What can stop a run'): give the process more memory, or fewer --workers")


GPU_OUT_OF_MEMORY = "the GPU ran out of memory; nothing was released; embed with a smaller --batch-size"


def out_of_memory(e: BaseException) -> str | None:
    """What to say where a failure of the pass is the machine's memory, not a record's: a worker's MemoryError comes
    back as one; torch's CPU allocator and a worker killed by the kernel raise RuntimeErrors, as CUDA does."""
    said = str(e)
    if isinstance(e, RuntimeError) and "CUDA out of memory" in said:
        return GPU_OUT_OF_MEMORY
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(
            m in said for m in ("can't allocate memory", "out of memory", "killed by signal: Killed"))):
        return OUT_OF_MEMORY
    return None


def _complete(out, said=()) -> str:
    """What an interrupt says once the release is in place and logged, with what the run would have said besides."""
    return (f"interrupted, but the release was written to {out} and logged: it is complete; do not run again"
            + "".join(f"; {line}" for line in said))


def _holds(path, sha: str | None) -> bool:
    """Whether `path` is now the file whose SHA-256 is `sha` (read without following a link at its name)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return sha is not None and fd_sha256(fd) == sha
    finally:
        os.close(fd)


def release_names(moments: str) -> list:
    if moments not in MOMENTS:
        raise MepfError(f"--moments must be one of {', '.join(MOMENTS)}")
    return [*MOMENTS[moments], "counts"]


@contextlib.contextmanager
def deterministic_kernels(device: torch.device):
    """On CUDA: no TF32 and no benchmark-selected algorithms, so that a record's features are the same
    computation whatever batch position it has. Restores the caller's settings afterwards."""
    if device.type != "cuda":
        yield
        return
    b = torch.backends
    saved = (b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, False, False, False
    try:
        yield
    finally:
        b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


class ExactSums:
    """Per-class sums of grid rows, exact: float64 holds integers exactly below 2**53 and a grid row's
    entries are at most 2**QUANT_BITS, so each class's float64 running sum moves into int64 before it has
    taken FLUSH rows. Any order of additions gives the same integers."""

    FLUSH = 2 ** (52 - QUANT_BITS)

    def __init__(self, k: int, d: int, device):
        self.running = torch.zeros(k, d, dtype=torch.float64, device=device)
        self.total = torch.zeros(k, d, dtype=torch.int64, device=device)
        self.pending = 0

    def add_rows(self, q: torch.Tensor, labels: torch.Tensor) -> None:
        if len(q) == 1:
            self.running[int(labels[0])] += q[0]
        else:
            self.running.index_add_(0, labels, q)
        self._count(len(q))

    def _count(self, rows: int) -> None:
        self.pending += rows
        if self.pending >= self.FLUSH:
            self.flush()

    def flush(self) -> torch.Tensor:
        self.total += self.running.to(torch.int64)
        self.running.zero_()
        self.pending = 0
        return self.total


#: on the CPU, grid rows are computed this many float64 entries at a time (a cache-sized chunk of rows)
CHUNK_ENTRIES = 2 ** 18


def accumulate(source, transform, extractor, moments: str, c1: float, c2: float, batch_size: int = 128,
               device="cpu", progress: bool = True, workers: int = 0, dim: int | None = None,
               tag_key: bytes | None = None, legacy_key: bytes | None = None) -> Sums:
    """One pass over `source`: exact per-class sums of each record's grid row of phi1 (and phi2), exact
    counts and the dataset's fingerprint (its sketch under `tag_key`; `legacy_key`, the log's own key, only
    in one process). Under torchrun each rank takes its blocks of records, checks that it read exactly its
    planned share, and the integer sums and counts are summed over ranks once at the end (exact: the result
    is the one-process result); the fingerprints are merged on rank 0 from their bytes (nothing unpickled,
    and the log's key never leaves rank 0). Every forward pass has the same batch shape (the last
    batch is padded). Grid rows are computed over the padded batch in fixed chunks (on the CPU, cache-sized
    chunks of rows; on CUDA the whole batch), so every computation has the same shape whatever the data.
    On MPS (no float64) the rows run on the CPU."""
    names = MOMENTS[moments]
    cs = {"S1": c1, "S2": c2}
    k = len(source.classes) if source.classes else 1
    labelled = source.classes is not None
    ranks = distributed.current()
    keep_freed_memory()
    device = torch.device(device)
    extractor = extractor.to(device)
    if device.type == "cuda":
        extractor = extractor.to(memory_format=torch.channels_last)
    acc = device if device.type == "cuda" else torch.device("cpu")
    shape = (batch_size, transform.channels, *transform.image_size)
    counts = torch.zeros(k, dtype=torch.int64, device=acc)
    fp = Fingerprint(tag_key, None if ranks.active else legacy_key, expected=len(source))
    planned = shard_size(len(source), batch_size, ranks.rank, ranks.world)
    read, error = 0, None
    with torch.no_grad(), deterministic_kernels(device):
        if dim is None:  # the feature spec says; else one forward pass of zeros tells
            dim = extractor(torch.zeros(shape, device=device)).shape[1]
        sums = {n: ExactSums(k, dim, acc) for n in names}
        chunk = batch_size if acc.type == "cuda" else max(1, min(batch_size, CHUNK_ENTRIES // dim))
        buffers = {}  # one float64 buffer per chunk shape, reused: no allocation per record
        data = loader(source, transform, batch_size, workers, ranks.rank, ranks.world, pin=device.type == "cuda")
        with progress_bar(total=shard_size(len(source), batch_size, ranks.rank, ranks.world), desc="embed",
                          bar_format=PROGRESS_FORMAT, disable=not (progress and ranks.main), counts=False) as bar:
            try:
                for item in data:
                    if isinstance(item, Failed):
                        raise MepfError(item)
                    x, y, hashes = item
                    b = len(x)
                    read += b
                    # under --bad-records zero a record whose label is outside the declared set adds nothing: no
                    # row, no count, no place in the fingerprint (any source's; otherwise it is refused below)
                    dropped = ((y < 0) | (y >= k)) if labelled and source.bad_records == "zero" else None
                    if dropped is not None and not bool(dropped.any()):
                        dropped = None
                    if dropped is not None:
                        hashes = [h for h, d in zip(hashes, dropped.tolist()) if not d]
                    labels = y if dropped is None else y[~dropped]
                    if len(labels) and (int(labels.max()) >= k or (labelled and int(labels.min()) < 0)):
                        raise MepfError(f"{source.description}: a label is outside the {k} declared classes; the "
                                        "data is corrupt, fetch it again")  # unlabelled: all -1
                    fp.add(hashes, labels.tolist())
                    if b < batch_size:  # every forward pass has the same shape, so the same kernels and rounding
                        x = torch.cat([x, x.new_zeros((batch_size - b, *x.shape[1:]))])
                    f = extractor(x.to(device, non_blocking=True)).to(acc)
                    cls = (y.clamp_min(0) if dropped is None else y.masked_fill(dropped, 0)).to(acc)
                    if dropped is not None:  # class 0 for the index only: its row is zero and it is not counted
                        dropped = dropped.to(acc)
                    for name in names:
                        for s in range(0, batch_size, chunk):
                            if s >= b:
                                break
                            rows = f[s:s + chunk]
                            if rows.shape not in buffers:
                                buffers[rows.shape] = torch.empty(rows.shape, dtype=torch.float64, device=acc)
                            buf = buffers[rows.shape]
                            q = grid_rows(rows, name == "S2", out=buf)[:b - s]
                            if dropped is not None:  # a dropped record's row is zero: it adds nothing
                                q[dropped[s:min(s + chunk, b)]] = 0
                            sums[name].add_rows(q, cls[s:min(s + chunk, b)])
                    counts += torch.bincount(cls if dropped is None else cls[~dropped], minlength=k)
                    bar.update(b)
            except MepfError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - a reader's or loader's failure: one line on every rank
                error = (out_of_memory(e) or
                         f"reading the data failed ({type(e).__name__}); nothing was released; check that the data "
                         "is readable (mepf embed --check lists unreadable images) and run again")
    if error is None and read != planned:  # each rank's own share, not only the total
        error = ("the data changed while it was read (a rank read other records than its planned share); nothing "
                 "was released, run again on data that is not being modified")
    distributed.agree(error)  # a rank that failed makes every rank fail, with its message
    qsums = {n: distributed.all_sum_(s.flush()).cpu() for n, s in sums.items()}
    counts = distributed.all_sum_(counts).cpu().numpy()
    read = int(distributed.all_sum_(torch.tensor([read], dtype=torch.int64, device=acc)).item())
    if len(source) == 0:  # not the counts: records dropped under --bad-records zero must not decide the outcome
        raise MepfError("the data source yielded no records")
    if ranks.active:
        parts = distributed.all_gather_bytes(fp.to_bytes(), fp.max_bytes())

        def merge():
            for r, raw in enumerate(parts[1:], 1):
                try:
                    fp.merge(Fingerprint.from_bytes(raw))
                except ValueError:
                    raise MepfError(f"rank {r} sent a malformed fingerprint (another mepf version?); nothing was "
                                    "released: run the same mepf on every node") from None

        distributed.on_main(merge)
    return Sums(qsums=qsums, counts=counts, fingerprint=fp if ranks.main else None, cs={n: cs[n] for n in names},
                read=read)


def privatise(values: dict, sigmas: dict) -> dict:
    """value + N(0, sigma^2 I) for each release, float64. The generator is seeded from OS entropy and
    dropped here: neither seed nor noise is kept, logged or returned separately."""
    rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence(secrets.randbits(128))))
    out = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        out[name] = v + rng.standard_normal(v.shape) * sigmas[name]
    del rng
    return out


def check_class_names(source) -> None:
    """The declared classes become the release's class names, which readers refuse unless each is safe to
    print and to name a folder after (and K is bounded): refused here, before any record is read."""
    if source.classes is None:
        return
    problem = class_names_problem(list(source.classes))
    if problem:
        raise MepfError(f"{source.description} declares {problem}; rename the class folder or fix --classes "
                        "(class names are printable, not '.' or '..', at most "
                        f"{MAX_NAME} characters, at most {MAX_CLASSES:,} classes)")


#: more records than this could overflow a class's int64 exact sum (entries of at most 2**QUANT_BITS each), which
#: would wrap and break the sensitivity bound
MAX_RECORDS = 2 ** (63 - QUANT_BITS) - 1


def check_size(n: int) -> None:
    """Refuse, before any record is read, a source listing more records than ExactSums holds (2^31); --force does
    not override it. At that size it reveals one bit about n, as the delta < 1/n rule does."""
    if n > MAX_RECORDS:
        raise MepfError("the data lists 2^31 records or more, more than the exact sums hold; split it into "
                        "releases of fewer records (each a release of its own, composed in the release log)")


def check_delta(delta: float, n: int, force: bool) -> None:
    """delta must be below 1/n. Decided from the number of records the source lists, before any record is
    read or any noise drawn; the refusal names no number computed from the data."""
    if not force and delta >= 1.0 / max(n, 1):
        raise MepfError(f"--delta {delta:g} is not below 1/n for this dataset (n: its number of records); choose a "
                        "smaller --delta, e.g. 1/(10 n), or pass --force if you know why")


def files_identity(source) -> str | None:
    """What fixes the records a source yields, from its files' identities alone (device, inode, size, mtime, ctime:
    no one can set ctime back), with how it reads them (its kind, description, count, classes and --bad-records):
    the same string is the same records. None for a source that states no identities."""
    ids = source.file_identity()
    if ids is None:
        return None
    what = (type(source).__name__, source.description, len(source), source.classes, source.bad_records, tuple(ids))
    return hashlib.sha256(repr(what).encode()).hexdigest()


AGAIN_COSTS = ("a second release spends more privacy budget. Reuse the earlier file, or pass --allow-repeat knowingly "
               "(`mepf audit FILE --release-log` then shows the composed total)")


def check_same_files(earlier: list, log_path: Path) -> None:
    """Refuse, before the pass, data read from the very files of earlier private releases, unchanged. Where any of
    them is a baseline, the pass's check refuses it, saying what to do about baselines."""
    if earlier and all(e.get("epsilon") is not None for e in earlier):  # eps = inf is logged as null
        raise MepfError(f"this dataset was already released: these files, unchanged ({len(earlier)} release(s) from "
                        f"them in {log_path}, the last to {earlier[-1].get('output')}; releases of copies are counted "
                        f"after reading); {AGAIN_COSTS}")


def check_repeat(found: dict, log_path: Path, allow_repeat: bool) -> list:
    """Refuse a release of data that was released before (the same records, or mostly the same) unless
    allowed; return warnings for a smaller overlap. Decided before any noise is drawn."""
    earlier = found["same"] + found["most"]
    if earlier and not allow_repeat:
        what = "this dataset was already released" if found["same"] else "this dataset shares most of its records " \
            "with data already released"
        baselines = sum(1 for e in earlier if e.get("epsilon") is None)  # eps = inf is logged as null
        if baselines == len(earlier):
            raise MepfError(f"{what}: {len(earlier)} non-private baseline(s) (--epsilon inf) in {log_path}, the last "
                            f"to {earlier[-1].get('output')}; the log counts a baseline as a release (it cannot tell "
                            "that the file stayed on the premises), so a private release of this data now composes to "
                            "eps = inf. If no baseline left the premises, embed this release with a --release-log that "
                            "holds the data's other releases but not its baselines, and give baselines their own "
                            "--release-log from now on")
        of = f", {baselines} of them non-private baselines" if baselines else ""
        raise MepfError(f"{what} ({len(earlier)} earlier release(s) in {log_path}{of}, the last to "
                        f"{earlier[-1].get('output')}); {AGAIN_COSTS}")
    if found["some"]:
        return [f"some records of this dataset were in {len(found['some'])} earlier release(s) in {log_path}; for "
                "them the guarantee is the composition: see `mepf audit FILE --release-log`"]
    return []


@dataclass
class EmbedResult:
    path: Path
    sha256: str
    ledger: dict
    repeat_of: int
    warnings: list
    notes: list = field(default_factory=list)


def sweep_output(out, log_path=None, entries=None) -> None:
    """Deal with release files that killed embeds left under temporary names beside `out`, saying what was
    done; stop if one was a logged release (the output is then taken, or needs the user's hand)."""
    out = Path(out)
    log_path = Path(log_path) if log_path else release_log.default_log_path()
    entries = release_log.read_log(log_path) if entries is None else entries

    def logged_here(fd):  # a run killed between logging its release and putting it in place
        entry = release_log.entry_of(entries, fd_sha256(fd))
        return entry is not None and entry.get("output") == os.path.abspath(out)

    swept = sweep_stale_temporaries(out, recover=logged_here)
    for _, line in swept:
        print(f"mepf embed: {line}", file=sys.stderr)
    if any(what == "placed" for what, _ in swept):
        raise MepfError(f"{out} now holds the release an earlier embed of yours logged before it was killed; use "
                        "it, or choose another --out (--overwrite would replace it; the same data again is a repeat)")
    if any(what == "logged-left" for what, _ in swept):
        raise MepfError(f"a release logged for {out} by an earlier, killed embed is still under its temporary name "
                        "(see above); put it in place or remove it, then run again")


def embed_to_file(source, transform, extractor, feature_spec: dict, *, out, epsilon: float, delta: float,
                  relation: str = "add-remove", moments: str = "mean+second", budget_split: str | None = None,
                  batch_size: int = 128, device="cpu", overwrite: bool = False, force: bool = False,
                  release_log_path=None, allow_repeat: bool = False, progress: bool = True,
                  workers: int = 0, data_given: str | None = None, bad_records: str = "stop") -> EmbedResult | None:
    """The whole private release, from a source to a written file and a log entry. epsilon = inf is a
    non-private baseline: the same path with the noise off, declared in the ledger. Under torchrun every
    rank takes part in the pass; rank 0 alone checks, draws the noise, writes the file and the log entry
    and returns the result (None on the other ranks); an error on any rank is raised on all. `bad_records`: what
    a record that cannot be embedded as it is does ("stop" the run, or "zero": see Source)."""
    c1, c2 = feature_spec["C1"], feature_spec["C2"]

    def from_options():  # on every rank, through the agreed path: one node's bad option stops every node
        validate_target(epsilon, delta, allow_inf=True)
        if relation not in RELATIONS:
            raise MepfError(f"--relation must be one of {', '.join(RELATIONS)}")
        if bad_records not in BAD_RECORDS:
            raise MepfError(f"--bad-records must be one of {', '.join(BAD_RECORDS)}")
        source.bad_records = bad_records
        check_class_names(source)
        refuse_untrainable(transform.image_size)
        names = release_names(moments)
        weights = parse_budget_split(budget_split, names)
        calib = calibration_for(relation, names, c1, c2, weights, epsilon, delta)
        k = len(source.classes) if source.classes else 1  # the ledger every reader checks, before it is paid for
        shapes = {n: (k,) if n == "counts" else (k, feature_spec["dim"]) for n in names}
        problem = ledger_problem(build_ledger(relation, shapes, calib, epsilon, delta))
        if problem:
            raise MepfError(f"these options would write {problem}, which every reader refuses; nothing was "
                            "released: give each release a larger --budget-split weight, or change --epsilon / --delta")
        return names, calib

    names, calib = distributed.guarded(from_options)  # before any private record is read
    log_path = Path(release_log_path) if release_log_path else release_log.default_log_path()
    out = Path(out)

    def before():  # a corrupt log or a taken output fails now, not after the pass
        entries = release_log.read_log(log_path)
        if distributed.current().active and release_log.open_keyed(entries):
            raise MepfError(f"release log {log_path} holds entries written by an earlier mepf, whose record samples "
                            "only a one-process run can compare with this data; run this embed once without torchrun, "
                            "or start a new log with --release-log NEW (budgets in the old log then no longer "
                            "compose with new releases)")
        sweep_output(out, log_path, entries)
        k = len(source.classes) if source.classes else 1
        # the arrays' float32 bytes and a margin for the strings and HDF5's own: known before a record is read
        check_output_path(out, overwrite, need=sum(4 * k * (1 if n == "counts" else feature_spec["dim"])
                                                   for n in names) + (1 << 20))
        for p in (log_path, release_log.key_path(log_path), release_log.head_path(log_path)):
            if os.path.abspath(out) == os.path.abspath(p) or (out.exists() and p.exists() and os.path.samefile(out, p)):
                raise MepfError(f"--out {out} is the release log, its key or its head; choose another --out")
        return entries

    entries = distributed.on_main(before)
    # several ranks are one mechanism only if they agree: every rank checks rank 0's plan before any record is read
    plan = distributed.guarded(lambda: plan_of(source, transform, feature_spec, batch_size=batch_size, moments=moments,
                                               relation=relation, epsilon=epsilon, delta=delta,
                                               budget_split=budget_split, force=force, device=device,
                                               bad_records=bad_records))
    agree_on_plan(plan)
    agree_on_files(source)
    listed = len(source)
    distributed.on_main(lambda: (check_size(listed), check_delta(delta, listed, force)))
    key, narrowed, created = distributed.on_main(lambda: release_log.prepare(log_path, entries)) or (None, None, False)
    files = files_identity(source)
    if files is not None and not allow_repeat:  # the plain re-run: refused now, not after the whole pass
        distributed.on_main(lambda: check_same_files(release_log.same_files(entries, key, files), log_path))
    tkey = distributed.broadcast_bytes(tag_key(key) if key is not None else None, 32)  # never the log's own key
    legacy = bool(release_log.open_keyed(entries or []))

    sums = accumulate(source, transform, extractor, moments, c1, c2, batch_size, device, progress, workers,
                      dim=feature_spec["dim"], tag_key=tkey, legacy_key=key if legacy else None)

    def release(lock) -> EmbedResult:
        if sums.read != listed:
            raise MepfError("the data changed while it was read (not the records it listed); nothing was released, "
                            "run again on data that is not being modified")
        now = release_log.read_log(log_path)  # under the lock: entries appended during the pass count too
        if release_log.check_key(log_path, now, key):
            raise MepfError(f"release log {log_path} was changed during this run to entries under another key; nothing "
                            "was released; restore the log that belongs to its key and run again")
        release_log.check_not_lost(log_path, now, key)
        found = release_log.related(now, sums.fingerprint, key)
        warnings = check_repeat(found, log_path, allow_repeat)
        empty = sums.fingerprint.hexdigest() == Fingerprint().hexdigest()  # no record: no one's data to repeat
        notes = []
        if created or not now:  # the log's first release (its key may stand from a run that released nothing)
            notes.append(f"started the release log {log_path}, its secret key {release_log.key_path(log_path)} and "
                         f"its head {release_log.head_path(log_path)}; back up all three, together: without the "
                         "key later embeds refuse to use the log, and the log is how a repeat release of the same "
                         "data is refused")
        if source.classes is not None and len(source.classes) == 1:
            notes.append(f"the data declares one class ({printable(source.classes[0], 40)}): the release is labelled "
                         "with that one class; for unlabelled data put the images directly in the folder")
        if narrowed:
            warnings.append(f"{' and '.join(narrowed)} could be read by others until now (narrowed to 0600); whoever "
                            "copied both the log and its key can test images for membership in earlier releases")
        k = len(sums.counts)
        noisy = privatise({**sums.sums, "counts": sums.counts.astype(np.float64)}, calib.sigmas)
        shapes = {n: noisy[n].shape for n in names}
        ledger = build_ledger(relation, shapes, calib, epsilon, delta)
        data_spec = {"dataset": source.description, "labelled": source.classes is not None, "num_classes": k,
                     "transform": transform.spec(), "moments": moments}
        class_names = list(source.classes) if source.classes else ["all"]
        repeats = found["same"] + found["most"] + found["some"]
        # the entry is appended while the file, written whole, has no name yet (staged_release): an error, Ctrl-C
        # or kill at any point leaves no release without its entry (at worst an entry without its release, which
        # overstates the spend), and a full disk fails before the entry
        logged, sha = False, None
        # Ctrl-C or SIGTERM (Slurm's preemption) held from here: once the entry stands, the rename is finished
        # rather than a paid-for release dropped; one that came before the entry releases nothing
        with deferred_interrupts(again=AGAIN) as hits:
            try:
                with staged_release(out, {n: noisy[n] for n in names}, class_names, feature_spec, data_spec, ledger,
                                    overwrite=overwrite) as sha:
                    if hits:
                        raise Interrupted(NOT_RELEASED, hits[0])
                    try:
                        release_log.append(log_path, release_log.new_entry(
                            sums.fingerprint, key, composes_with=[e.get("output_sha256") for e in repeats],
                            time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), dataset=source.description, data=data_given,
                            output=os.path.abspath(out), output_sha256=sha, epsilon=ledger["achieved"]["epsilon"],
                            delta=delta, mu=ledger["mu"], relation=relation, repeat=bool(repeats),
                            **({"files": release_log.files_key(key, files)} if files is not None and not empty
                               else {})), lock=lock)
                    except OSError as e:  # checked writable before the pass
                        raise MepfError(f"release log {log_path} could not be written ({type(e).__name__}); nothing "
                                        "was released; free space or fix the log's permissions and run again") from None
                    logged = True
                    try:
                        release_log.record_head(log_path, key)
                    except OSError as e:  # the release stands; its head lags one entry, which no check mistakes
                        warnings.append(f"release log head {release_log.head_path(log_path)} could not be updated "
                                        f"({type(e).__name__}): a later loss of the log may go unnoticed; free space")
            except KeyboardInterrupt as e:
                # a second Ctrl-C as append returned: the entry may stand though `logged` was not yet set
                if not logged and not (sha and release_log.entry_of(release_log.read_log(log_path), sha)):
                    raise
                signum = getattr(e, "signum", None)
                if _holds(out, sha):
                    raise Interrupted(_complete(out), signum) from None
                raise Interrupted(f"interrupted after the release was logged, before it was put in place at {out}: "
                                  "nothing was released, but its log entry stands, so the budget counts as spent and a "
                                  "new run is a repeat (--allow-repeat)", signum) from None
            except (OSError, RuntimeError) as e:  # h5py reports a full disk as RuntimeError
                spent = ("; its log entry stands, so the budget counts as spent and a new run is a repeat "
                         "(--allow-repeat)") if logged else ""
                said = storage_error(e) if isinstance(e, OSError) else type(e).__name__
                raise MepfError(f"the release could not be written to {out} ({said}){spent}; free space "
                                "or fix the folder's permissions") from None
        if hits:  # what the run would have said besides, so that no note or warning is lost
            raise Interrupted(_complete(out, notes + warnings), hits[0])
        return EmbedResult(path=out, sha256=sha, ledger=ledger, repeat_of=len(repeats), warnings=warnings,
                           notes=notes)

    done = []

    def locked_release() -> EmbedResult:
        with release_log.locked(log_path) as lock:
            done.append(release(lock))
        return done[0]

    def heard_by_none(result: EmbedResult, said: str) -> EmbedResult:  # review 49 M1: the release stands
        return dataclasses.replace(result, warnings=[*result.warnings, (
            f"another rank stopped after the sums were exchanged ({said}): this release is complete and logged; that "
            "rank's own output says why it stopped")])

    # rank 0 alone writes: a rank that loses it here cannot tell whether it did
    try:
        with distributed.peers_lost("rank 0 was releasing: its output (or `mepf releases` on its release log) says "
                                    "whether the release was written; run again only if it was not"):
            return distributed.on_main(locked_release, on_lost=heard_by_none)
    except KeyboardInterrupt as e:  # while rank 0 told the others (review 51 M1): not "nothing was released"
        if not done or isinstance(e, Interrupted):
            raise
        raise Interrupted(_complete(out, done[0].notes + done[0].warnings), getattr(e, "signum", None)) from None
