"""Train a generator from a released file alone, in a run folder (options.json, stats.jsonl, log,
grid PNGs, snapshots with every RNG state, generator.pt). Resumable; the result is the last step."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import secrets
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mepf.artifacts import load
from mepf.artifacts.errors import STORAGE_ERRORS, Interrupted, MepfError, storage_error
from mepf.artifacts.schema import trainable_geometry_problem
from mepf.artifacts.staging import write_text_atomic
from mepf.artifacts.versions import versions
from mepf.core import distributed
from mepf.core.device import resolve_device
from mepf.core.features import feature_map_from_spec, fold_batch_norm, fold_same_padding
from mepf.core.memory import keep_freed_memory
from mepf.core.signals import deferred_interrupts
from mepf.core.tensor_file import save_atomic
from mepf.progress import progress as progress_bar

from . import run_folder
from .checkpoint import load_tensors, save_generator, snapshot_problem
from .generators import GENERATORS, Z_DIM, build_generator, default_generator, fold_upsampling
from .global_norm import global_batch_norms
from .grid import save_grid
from .locate import locate_release
from .objective import Target, check_weight, fake_embeddings, layer_weight_vector, present, squared_distance
from .options import (
    COMPILE_MODES,
    COOLDOWN_FRACTION,
    GENERATOR_WIDTHS,
    LABELS,
    LR_SCHEDULES,
    OBJECTIVES,
    PRECISIONS,
    TrainOptions,
    options_problem,
    plain_numbers,
)
from .precision import Precision, legacy, resolve


def prepare(opts: TrainOptions, device=None):
    """Everything that can fail on bad input, before any file is written. `device`: one already chosen
    (under torchrun, this rank's GPU); else resolved from opts.device."""
    plain_numbers(opts)
    problem = options_problem(opts)
    if problem:
        raise MepfError(f"option {problem}")
    release = load(opts.release)
    if opts.objective not in OBJECTIVES:
        raise MepfError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    if opts.lr_schedule not in LR_SCHEDULES:
        raise MepfError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= opts.ema < 1:
        raise MepfError("--ema must be in [0, 1): the decay of the weight average (0 turns it off)")
    if opts.precision not in PRECISIONS:
        raise MepfError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if opts.labels not in LABELS:
        raise MepfError(f"--labels must be one of {', '.join(LABELS)}")
    if opts.compile not in COMPILE_MODES:
        raise MepfError(f"--compile must be one of {', '.join(COMPILE_MODES)}")
    extra = set(opts.moment_weights) - set(release.moments)
    if extra:
        raise MepfError(f"--moment-weights names {', '.join(sorted(extra))}, but the file releases "
                        f"{', '.join(release.moments)}")
    for m, w in opts.moment_weights.items():  # the CLI checks these too; TrainOptions given in Python is not
        check_weight("--moment-weights", m, w)
    if opts.moment_weights and not any(opts.moment_weights.get(m, 1.0) > 0 for m in release.moments):
        raise MepfError("--moment-weights gives every moment weight 0: nothing would be matched; keep one above 0")
    device = resolve_device(opts.device) if device is None else device
    if opts.compile != "none" and device.type == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        raise MepfError(f"--compile {opts.compile} on the CPU needs a C++ compiler (torch's inductor builds its "
                        "kernels with one) and none is on PATH; install g++ or leave --compile none")
    spec = release.features
    fmap = feature_map_from_spec(spec, opts.weights).to(device)
    if opts.layer_weights:  # names and values valid before anything is built
        layer_weight_vector(opts.layer_weights, fmap.layer_dims(spec.height, spec.width))
    if (problem := trainable_geometry_problem(spec.height, spec.width)) is not None:  # a file of another producer
        raise MepfError(f"{problem}; this file's images are {spec.height}x{spec.width}, so no generator trains from it")
    name = default_generator(spec.height) if opts.generator == "auto" else opts.generator
    arch = {"name": name, "image_size": spec.height, "channels": spec.channels,
            "num_classes": len(release.class_names), "z_dim": Z_DIM,
            "width": opts.width or GENERATOR_WIDTHS.get(name, 0)}
    build_generator(arch)  # validates the geometry for this generator
    return release, fmap, arch, device


#: the steps that compile with --compile (reduce-overhead records its CUDA graphs on the second)
COMPILE_STEPS = 2


def latest_snapshot(run: Path):
    snaps = run_folder.snapshots(run)
    return snaps[-1][1] if snaps else None


class Trainer:
    #: an experiment's extra term of the generator's loss, a function (trainer, x, y) -> (loss, {name: stat}) set
    #: on the class, added after the distance to the release (benchmarks/gram_oracle.py; no CLI option sets it)
    extra_term = None

    def __init__(self, opts: TrainOptions, release, fmap, arch, device, precision: Precision | None = None):
        """`precision`: the run's plan (resume passes the recorded one); None resolves opts.precision here. `fmap`
        becomes, in place, the plan's faster equivalent (padding and batch norms folded; compiled with --compile):
        pass one of its own."""
        self.opts, self.release, self.fmap, self.arch, self.device = opts, release, fmap, arch, device
        self.run = Path(opts.out)
        self.target = Target(release, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            self.G = build_generator(arch).to(device)
        self.G_ema = copy.deepcopy(self.G).eval() if opts.ema > 0 else None
        self.ranks = distributed.current()
        # labels and z of training batches: one stream per rank (rank 0's is the one-process stream)
        self.rng = torch.Generator().manual_seed(opts.seed + 1 + 7919 * self.ranks.rank)
        self.grid_z = torch.randn(10 * arch["num_classes"], Z_DIM,
                                  generator=torch.Generator().manual_seed(opts.seed + 2))
        betas = (0.5, 0.999)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=opts.lr, betas=betas)
        self.mavg = {m: torch.zeros_like(self.target.means[m], requires_grad=True) for m in self.target.moments}
        self.opt_m = torch.optim.Adam(list(self.mavg.values()), lr=opts.lr_mavg, betas=betas)
        self.weights = {m: float(opts.moment_weights.get(m, 1.0)) for m in self.target.moments}
        self.coord_weights = (layer_weight_vector(opts.layer_weights, fmap.layer_dims(fmap.spec.height,
                                                                                      fmap.spec.width), device)
                              if opts.layer_weights else None)
        self.step = 0
        self.run_id = None  # options.json's (start and resume set it); None in a run from before run ids
        self.complete = False  # set by resume: the run was already at its last step
        self.precision = precision or resolve(opts.precision, device)
        if self.precision.fast_paths:  # not in a run from before the plan: it resumes on the very same map
            fold_same_padding(self.fmap)  # the same map without the padding copies (tests/test_features_fused.py)
        if self.precision.bn_folded:
            fold_batch_norm(self.fmap)
        if self.precision.upsample_folded:  # the weights are unchanged: G_ema and generator.pt compute as written
            fold_upsampling(self.G)
        if self.precision.bn_global:  # under torchrun only; G_ema, grids and samples are in eval mode anyway
            global_batch_norms(self.G)
        if self.precision.channels_last:
            self.G = self.G.to(memory_format=torch.channels_last)
            self.fmap = self.fmap.to(memory_format=torch.channels_last)
        # what train_step calls: with --compile, the generator compiled (its state dict, grids and samples stay
        # those of self.G) and the extractor compiled in place (only training uses it)
        self.g_train = self.G
        if opts.compile != "none":
            self.g_train = torch.compile(self.G, mode=opts.compile)
            self.fmap.compile(mode=opts.compile)

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        return {"step": self.step, "run_id": self.run_id, "release_sha256": self.release.file_sha256,
                "generator": self.G.state_dict(),
                "generator_ema": self.G_ema.state_dict() if self.G_ema is not None else None,
                "opt_g": self.opt_g.state_dict(),
                "opt_m": self.opt_m.state_dict(), "mavg": {m: t.detach().cpu() for m, t in self.mavg.items()},
                "rng": self.rng.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "rng_ranks": self.rank_rng_states()}

    def rank_rng_states(self):
        """Every rank's batch RNG state (rank order), so that a distributed run resumes exactly."""
        if not self.ranks.active:
            return None
        state = self.rng.get_state()
        raw = distributed.all_gather_bytes(state.numpy().tobytes(), state.numel())
        return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw] if self.ranks.main else None

    def load_state(self, s: dict):
        self.step = s["step"]
        self.G.load_state_dict(s["generator"])
        if self.G_ema is not None:
            self.G_ema.load_state_dict(s.get("generator_ema") or s["generator"])
        with torch.no_grad():
            for m, t in s["mavg"].items():
                self.mavg[m].copy_(t)
        self.opt_g.load_state_dict(s["opt_g"])
        self.opt_m.load_state_dict(s["opt_m"])
        ranks = s.get("rng_ranks")
        if ranks is not None and len(ranks) == self.ranks.world:
            self.rng.set_state(ranks[self.ranks.rank])
        elif self.ranks.main:
            self.rng.set_state(s["rng"])
        else:  # the number of ranks changed: a stream of this rank and step, none drawn from before (review 44 H4)
            self.rng.manual_seed((self.opts.seed + 1 + 7919 * self.ranks.rank + 104_729 * (self.step + 1)) % (1 << 63))
        torch.set_rng_state(s["torch_rng"])
        if s["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda_rng"])

    # ---------------------------------------------------------------- training
    def sample_labels(self, b: int) -> torch.Tensor:
        """This rank's b training labels: class-balanced over the global batch, or drawn from the noisy prior."""
        k = self.arch["num_classes"]
        if self.opts.labels == "prior":
            return torch.multinomial(self.target.prior, b, replacement=True, generator=self.rng)
        if b % k == 0 or not self.precision.labels_rotated:  # every class b / k times; or as a run recorded before
            return (torch.arange(b) % k)[torch.randperm(b, generator=self.rng)]
        # the batch held classes 0 .. b-1 on every step, so a batch below K never trained the others (review 44 H1):
        # the global batch's classes run on from a start drawn each step, the same on every rank (from the seed and
        # the step: nothing to snapshot), each rank taking the next b; every class equally often on average
        start = int(torch.randint(k, (1,), generator=torch.Generator().manual_seed(
            (self.opts.seed * 1_000_003 + self.step) % (1 << 63))))
        return ((torch.arange(b) + start + self.ranks.rank * b) % k)[torch.randperm(b, generator=self.rng)]

    def train_step(self) -> dict:
        """One step; returns its statistics as detached 0-dim tensors (read them only when logging: reading
        one waits for the device)."""
        b, plan, dev = self.opts.batch_size, self.precision, self.device.type
        y = self.sample_labels(b).to(self.device)
        z = torch.randn(b, Z_DIM, generator=self.rng).to(self.device)
        if self.opts.compile == "reduce-overhead":  # CUDA graphs: a new step may reuse the last one's buffers
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=plan.generator == "bf16"):
            x = self.g_train(z, y)
        if plan.extractor == "fp32":
            x = x.float()
        if plan.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=plan.extractor == "bf16"):
            fake = fake_embeddings(self.fmap, x, y, self.target, fast=plan.fast_paths, sums_by=plan.class_sums)
        dist = squared_distance(self.target, fake)
        stats = {f"dist_{m}": d.detach() for m, d in dist.items()}
        if self.opts.objective == "plain":
            weighted = dist if self.coord_weights is None else squared_distance(self.target, fake, self.coord_weights)
            loss = sum(self.weights[m] * weighted[m] for m in dist)
        else:
            mloss = 0.0
            for m, (mu, p) in fake.items():
                diff = (self.target.means[m] - mu).detach()
                mloss = mloss + ((present(self.mavg[m], p) - present(diff, p)) ** 2).mean()
            self.opt_m.zero_grad(set_to_none=True)
            mloss.backward()
            self.opt_m.step()
            stats["mavg_loss"] = mloss.detach()
            loss = 0.0
            for m, (mu, p) in fake.items():
                v = present(self.mavg[m], p).detach()
                v = v if self.coord_weights is None else self.coord_weights * v
                loss = loss + self.weights[m] * -(v * present(mu, p)).sum(1).mean()
        if self.extra_term is not None:
            extra, extra_stats = self.extra_term(x, y)
            loss = loss + extra
            stats.update(extra_stats)
        lr = self.lr_at(self.step)
        for group in self.opt_g.param_groups:
            group["lr"] = lr
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.sync_replicas()
        self.opt_g.step()
        self.step += 1
        self.update_ema()
        return stats

    @torch.no_grad()
    def sync_replicas(self):
        """Under torchrun: every rank's loss is the global objective's share of its own samples, so the
        gradients are summed over ranks. Batch norms over the global batch leave every rank the same running
        statistics; a run recorded before them (per-rank batches) averages them. Each rank then takes the same step
        and the replicas stay equal."""
        if not self.ranks.active:
            return
        params = [p for p in self.G.parameters() if p.grad is not None]
        flat = distributed.all_sum_(torch.cat([p.grad.reshape(-1) for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p.grad))
        bufs = [b for b in self.G.buffers() if b.is_floating_point()] if not self.precision.bn_global else []
        if bufs:
            flat = distributed.all_sum_(torch.cat([b.reshape(-1) for b in bufs])) / self.ranks.world
            for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
                b.copy_(v.view_as(b))

    def lr_at(self, step: int) -> float:
        """The generator's learning rate at `step`: constant; cosine-annealed to 0 at opts.steps; or cooldown:
        constant, then linear to 0 over the last COOLDOWN_FRACTION of opts.steps (a run of N constant steps
        resumed with --steps M --lr-schedule cooldown, N <= (1 - COOLDOWN_FRACTION) M, equals a fresh one)."""
        if self.opts.lr_schedule == "constant":
            return self.opts.lr
        if self.opts.lr_schedule == "cooldown":
            start = self.opts.steps - COOLDOWN_FRACTION * self.opts.steps
            return self.opts.lr * min(1.0, max(0.0, (self.opts.steps - step) / (self.opts.steps - start)))
        return self.opts.lr * 0.5 * (1 + math.cos(math.pi * min(step, self.opts.steps) / self.opts.steps))

    @torch.no_grad()
    def update_ema(self):
        """Weights: exponential average with a warm-up (decay min(ema, (1+t)/(10+t))); buffers (BN
        statistics): copied, as they are already running averages."""
        if self.G_ema is None:
            return
        d = min(self.opts.ema, (1 + self.step) / (10 + self.step))
        for pe, p in zip(self.G_ema.parameters(), self.G.parameters()):
            pe.lerp_(p.detach(), 1 - d)
        for be, b in zip(self.G_ema.buffers(), self.G.buffers()):
            be.copy_(b)

    @property
    def output_generator(self):
        """What grids, generator.pt and sampling use: the weight average when there is one."""
        return self.G_ema if self.G_ema is not None else self.G

    def save_grid(self):
        k = self.arch["num_classes"]
        y = torch.arange(k).repeat_interleave(10)
        g = self.output_generator
        was_training = g.training
        g.eval()
        with torch.no_grad():
            x = g(self.grid_z.to(self.device), y.to(self.device)).float().cpu()
        g.train(was_training)
        save_grid(x, k, self.run / run_folder.grid_name(self.step),
                  row_labels=list(self.release.class_names) if self.release.labelled else None)

    def snapshot(self):
        state = self.state()  # a collective under torchrun: every rank takes part, rank 0 writes
        if not self.ranks.main:
            return
        save_atomic(state, self.run / run_folder.snapshot_name(self.step))
        for _, old in run_folder.snapshots(self.run)[:-2]:
            with contextlib.suppress(OSError):  # one that cannot be removed is left: the newest two are what counts
                old.unlink()

    def agreed_stop(self, hits: list) -> int | None:
        """The signal to stop on at this step boundary, or None: this process's first Ctrl-C or SIGTERM; under
        torchrun any rank's, agreed by all (one small all-reduce per step, on the CPU), so that every rank stops at
        the same step and they write its snapshot together (review 44 M1: each rank stopped at once, mid-step)."""
        if not self.ranks.active:
            return hits[0] if hits else None
        seen = distributed.all_sum_(torch.tensor([hits.count(signal.SIGINT), hits.count(signal.SIGTERM)]))
        if not bool(seen.any()):
            return None
        return signal.SIGTERM if int(seen[1]) else signal.SIGINT

    def stop(self, signum: int, log) -> None:
        """Ctrl-C or SIGTERM, taken between two steps: a snapshot of this step (so --resume continues exactly),
        then Interrupted with how far the run got and the command that goes on."""
        self.snapshot()
        if log is not None:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} interrupted at step {self.step}; snapshot written\n")
        raise Interrupted(f"interrupted at step {self.step} of {self.opts.steps}; a snapshot of this step was "
                          f"written; continue with: {run_folder.resume_command(self.run)}", signum)

    def fit(self, progress: bool = True):
        keep_freed_memory()  # per-step tensors reuse the same heap blocks instead of fresh pages
        o, main = self.opts, self.ranks.main
        with contextlib.ExitStack() as held:  # the log and stats files, closed however training ends
            log = held.enter_context(run_folder.open_append(self.run / run_folder.LOG)) if main else None
            sf = held.enter_context(run_folder.open_append(self.run / run_folder.STATS)) if main else None
            if main:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} training from step {self.step} to {o.steps}"
                          f"{f' on {self.ranks.world} ranks' if self.ranks.active else ''}\n")
            self._loop(log, sf, progress)
            if main and not (o.grid_every and self.step % o.grid_every == 0):
                self.save_grid()
            self.snapshot()
            if main:
                save_generator(self.run / run_folder.GENERATOR, self.output_generator, self.arch, self.release,
                               self.step, self.run_id)
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} done at step {self.step}\n")

    def _loop(self, log, sf, progress: bool):
        """The training steps, with stats every --log-every, grids and snapshots; Ctrl-C and SIGTERM are taken
        between steps."""
        o, main = self.opts, self.ranks.main
        t_last, s_last = time.perf_counter(), self.step
        # with --compile, the first COMPILE_STEPS steps of this process compile: left out of steps_per_s, and their
        # time (`compiled`) beyond as many steps at the rate that follows is the next record's compile_s
        compiling = COMPILE_STEPS if o.compile != "none" else 0
        t_start, compiled = t_last, None
        with (progress_bar(total=o.steps, initial=self.step, desc="synthesize", unit="step",
                           disable=not (progress and main)) as bar,
              deferred_interrupts(True, None if self.ranks.active else again(self.run)) as hits):
            while self.step < o.steps:
                if signum := self.agreed_stop(hits):
                    self.stop(signum, log)
                stats = self.train_step()
                bar.update(1)
                if main and (self.step % o.log_every == 0 or self.step == o.steps):
                    now = time.perf_counter()
                    rate = (self.step - s_last) / max(now - t_last, 1e-9)
                    t_last, s_last = now, self.step
                    stats = {k: float(v) for k, v in stats.items()}
                    rec = {"step": self.step, **stats, "steps_per_s": rate}
                    if compiled is not None:
                        rec["compile_s"] = max(0.0, compiled - COMPILE_STEPS / rate)
                        compiled = None
                    sf.write(json.dumps(rec) + "\n")
                    sf.flush()
                    log.write(json.dumps(rec) + "\n")
                    bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k.startswith("dist")} |
                                    {"it/s": f"{rate:.1f}"})
                if main and o.grid_every and self.step % o.grid_every == 0:
                    self.save_grid()
                if o.snapshot_every and self.step % o.snapshot_every == 0:
                    self.snapshot()
                if compiling:
                    compiling -= 1
                    if not compiling:
                        t_last, s_last = time.perf_counter(), self.step
                        compiled = t_last - t_start

def start(opts: TrainOptions, progress: bool = True) -> Trainer:
    """A new run: validate, then create the run folder and write options.json before training. Under
    torchrun every rank trains (--batch-size per rank) and rank 0 alone writes the run folder."""
    ranks, device = distributed.join(opts.device, resolve_device)
    release, fmap, arch, device = distributed.guarded(lambda: prepare(opts, device))
    precision = resolve(opts.precision, device)
    distributed.agree_same("the training options (with --precision auto: what each node resolved it to; give "
                           "--precision explicitly on mixed nodes)",
                           {**_shared_options(opts, release), "precision_resolved": precision.to_json()})
    run = Path(opts.out)
    run_id = secrets.token_hex(16)  # snapshots and generator.pt carry it: a file of another run is told apart

    def create() -> int:
        if run.exists() and not run.is_dir():
            raise MepfError(f"--out {run} is a file; give a folder for the run")
        try:
            run.mkdir(parents=True, exist_ok=True)  # and its parents, as edm does
        except OSError as e:
            raise MepfError(f"run folder {run} cannot be created ({storage_error(e)}); choose another --out") from None
        held = run_folder.hold(run)
        if any(run.iterdir()):  # a run's folder (or another start on the same --out got there first)
            run_folder.release(held)
            raise MepfError(f"run folder {run} is not empty; choose a new --out or continue it with: "
                            f"{run_folder.resume_command(run)}")
        resolved = {**asdict(opts), "release": str(Path(opts.release).resolve()), "generator_arch": arch,
                    "device_resolved": str(device), "precision_resolved": precision.to_json(),
                    "ranks": ranks.world, "release_sha256": release.file_sha256,
                    "release_checksum": release.checksum, "release_bytes": Path(opts.release).stat().st_size,
                    "epsilon": release.epsilon, "delta": release.delta, "run_id": run_id,
                    "versions": versions("torch", "torchvision", "mepf", "h5py", "numpy")}
        try:
            write_text_atomic(run / run_folder.OPTIONS, json.dumps(resolved, indent=2, sort_keys=True))
        except BaseException:
            run_folder.release(held)
            raise
        return held

    held = distributed.on_main(create)
    try:
        with _resumable_when_interrupted(run, "was made"):
            trainer = Trainer(opts, release, fmap, arch, device, precision)
            trainer.run_id = run_id
            trainer.fit(progress)
    finally:
        run_folder.release(held)
    return trainer


def again(run: Path) -> str:
    """What a second Ctrl-C during a step says."""
    return ("interrupted again: stopped at once, without a snapshot of this step; continue from the last one (or the "
            f"run's start, if none was written) with: {run_folder.resume_command(run)}")


@contextlib.contextmanager
def _resumable_when_interrupted(run: Path, what: str):
    """Ctrl-C or SIGTERM outside the steps (set-up, the last save), a peer lost under torchrun (a rank killed, a
    node down: torch's own traceback on every other rank, review 44 L2), or a full disk (review 47 H1): the folder
    exists, so the message says to resume it."""
    try:
        with distributed.peers_lost(f"the run folder {run} {what}: continue from its last snapshot with: "
                                    f"{run_folder.resume_command(run)}"):
            yield
    except OSError as e:
        if e.errno not in STORAGE_ERRORS:
            raise
        raise MepfError(f"{storage_error(e)}; the run folder {run} {what}: free space (or fix the permissions) and "
                        f"continue from its last snapshot (or its start) with: {run_folder.resume_command(run)}"
                        ) from None
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        raise Interrupted(f"interrupted; the run folder {run} {what}: continue from its last snapshot (or its start) "
                          f"with: {run_folder.resume_command(run)}", getattr(e, "signum", None)) from None


#: options that may change when a run resumes: they take effect from the resumed step (recorded in options.json)
RESUMABLE = ("steps", "lr", "lr_mavg", "lr_schedule", "log_every", "snapshot_every", "grid_every", "device",
             "weights", "compile")


def _shared_options(opts: TrainOptions, release) -> dict:
    """What every rank of one run must share: the options but the paths and device of each node, and the
    release by its SHA-256 (ranks that trained with other steps or rates would diverge, or wait forever)."""
    return {**{k: v for k, v in asdict(opts).items() if k not in ("out", "release", "device", "weights")},
            "release": release.file_sha256}


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def optimiser_problem(trainer: Trainer, state: dict) -> str | None:
    """Where a snapshot's optimiser and moving averages do not fit this run: settings of another kind (flags
    equal, numbers finite and not negative; keys another torch version lacks or adds are left to torch, which
    fills in defaults), state tensors not of their parameter's shape or not finite, second moments below 0,
    moving averages of another shape. None where they fit."""
    def same_kind(mine, theirs) -> bool:
        if mine is None or isinstance(mine, (bool, str)):
            return type(theirs) is type(mine) and theirs == mine
        if isinstance(mine, (int, float)):
            return type(theirs) in (int, float) and math.isfinite(theirs) and theirs >= 0
        if isinstance(mine, (tuple, list)):
            return isinstance(theirs, (tuple, list)) and len(theirs) == len(mine) and all(map(same_kind, mine, theirs))
        return False

    def plain(v) -> bool:  # a setting this torch does not have: harmless only as a flag or a number
        return v is None or type(v) is bool or (type(v) in (int, float) and math.isfinite(v))

    for name in ("opt_g", "opt_m"):
        opt = getattr(trainer, name)
        ours = opt.state_dict()["param_groups"]
        saved = state.get(name)
        theirs = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(theirs, list) or len(theirs) != len(ours) or not isinstance(saved.get("state"), dict):
            return name
        for a, b in zip(ours, theirs):
            if not isinstance(b, dict) or b.get("params") != a["params"]:
                return name
            bad = [k for k in a if k in b and k != "params" and not same_kind(a[k], b[k])]
            bad += [k for k in b if k not in a and not plain(b[k])]
            if "betas" in b and same_kind(a.get("betas"), b["betas"]) and not all(x < 1 for x in b["betas"]):
                bad.append("betas")
            if "eps" in b and type(b["eps"]) in (int, float) and not b["eps"] > 0:
                bad.append("eps")
            if bad:
                return f"{name} {', '.join(sorted(map(str, bad)))}"
        params = [p for g in opt.param_groups for p in g["params"]]
        moments = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if ours[0].get("amsgrad") else set())
        for i, entry in saved["state"].items():
            if type(i) is not int or not 0 <= i < len(params) or not isinstance(entry, dict) or set(entry) != moments:
                return f"{name} state"
            for k, t in entry.items():
                shape = () if k == "step" else params[i].shape
                if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == shape
                        and bool(torch.isfinite(t).all()) and (k not in ("step", "exp_avg_sq", "max_exp_avg_sq")
                                                               or bool((t >= 0).all()))):
                    return f"{name} state {k}"
    mavg = state.get("mavg")
    if not (isinstance(mavg, dict) and set(mavg) == set(trainer.mavg) and all(
            isinstance(t, torch.Tensor) and t.shape == trainer.mavg[m].shape and bool(torch.isfinite(t).all())
            for m, t in mavg.items())):
        return "mavg"
    return None


def _check_changes(saved: dict, changes: dict) -> dict:
    """The options given on resuming that differ from the run's: those in RESUMABLE are returned; any other
    is refused, as it would make another run (architecture, seed, objective, labels, batch, precision)."""
    fields = TrainOptions.__dataclass_fields__
    differ = {k: v for k, v in changes.items() if k in fields and v != saved.get(k)}
    fixed = sorted(k for k in differ if k not in RESUMABLE)
    if fixed:
        shown = ", ".join(f"--{k.replace('_', '-')} (the run's is {saved.get(k)!r}"
                          f"{', the default' if k == 'width' and saved.get(k) == 0 else ''})" for k in fixed)
        raise MepfError(f"{shown} cannot change when a run resumes: it would be another run; start a new run with "
                        "--out NEW_DIR, or resume without it")
    return differ


def resume_plan(run_dir, changes: dict) -> tuple:
    """What resuming `run_dir` with `changes` would apply, refused as resume refuses it (what --dry-run shows):
    (the run's saved options, the options that change, the run's TrainOptions before they change)."""
    run = Path(run_dir)
    saved = run_folder.read_options(run)
    differ = _check_changes(saved, changes)
    given = dataclasses.replace(TrainOptions(release="", out=""), **differ)  # options given again, from Python too
    plain_numbers(given)
    differ = {k: getattr(given, k) for k in differ}
    fields = TrainOptions.__dataclass_fields__
    opts = TrainOptions(**{k: v for k, v in saved.items() if k in fields})
    opts.out = str(run)  # the folder may have been moved or copied since it was started
    problem = options_problem(opts) or (None if _is_sha256(saved["release_sha256"]) else "release_sha256")
    if problem:
        raise MepfError(f"{run / run_folder.OPTIONS} holds {problem}; the run folder is damaged (or not a run's)")
    problem = options_problem(dataclasses.replace(opts, **differ))
    if problem:
        raise MepfError(f"option {problem}")
    done = run_folder.snapshots(run)
    if "steps" in differ and done:  # by the snapshots' names; resume checks the step of the one it loads again
        check_ahead(run, done[-1][0], differ["steps"])
    return saved, differ, opts


def generator_step(run: Path, saved: dict) -> int | None:
    """The step of the run's generator.pt where it is this run's (its run id and release), else None: none, one
    that cannot be read, or another run's (a run stopped between its last snapshot and generator.pt, or one whose
    generator.pt was replaced: resume writes it again from the snapshot)."""
    if not (run / run_folder.GENERATOR).is_file():
        return None
    try:
        obj, _ = load_tensors(run / run_folder.GENERATOR, "generator")
    except (MepfError, OSError):
        return None
    if not (isinstance(obj, dict) and type(obj.get("step")) is int):
        return None
    ours = {"run_id": obj.get("run_id"), "release_sha256": obj.get("release_sha256")}  # a generator names its release
    return obj["step"] if run_folder.of_another_run(ours, saved) is None else None


def check_ahead(run: Path, step: int, steps: int) -> None:
    """--steps given again may not be below the step the run is at."""
    if steps < step:
        raise MepfError(f"{run} is at step {step}; --steps {steps} would go back: give --steps above {step} to train "
                        "further")


def resume(run_dir, changes: dict | None = None, release: str | None = None, progress: bool = True,
           steps: int | None = None) -> Trainer:
    """Continue a run from its latest snapshot, under torchrun too. `changes`: options given again (those in
    RESUMABLE take effect from the resumed step, the others must equal the run's); `release`: the released
    file, wherever it is now (any file with the run's SHA-256; else the run's recorded path or a release
    beside the run folder)."""
    run = Path(run_dir)
    changes = {**(changes or {}), **({"steps": steps} if steps is not None else {})}
    saved, differ, opts = resume_plan(run, changes)
    with contextlib.ExitStack() as holds:
        return _resumed(run, saved, differ, opts, release, progress, holds)


def _resumed(run: Path, saved: dict, differ: dict, opts: TrainOptions, release: str | None, progress: bool,
             holds: contextlib.ExitStack) -> Trainer:
    """resume() from its plan; the run folder held (in `holds`) from the ranks' joining until it returns."""
    size = saved.get("release_bytes") if type(saved.get("release_bytes")) is int else None
    found = locate_release(saved["release_sha256"], run, saved.get("release"), release, size=size)
    opts.release = str(found)
    recorded = saved.get("generator_arch")
    if opts.generator == "auto" and isinstance(recorded, dict) and recorded.get("name") in GENERATORS:
        opts.generator = recorded["name"]  # auto as it resolved when the run started: its choice may differ since
    for k in ("device", "weights", "compile"):  # the trainer is built with them
        if k in differ:
            setattr(opts, k, differ[k])
    ranks, device = distributed.join(opts.device, resolve_device)
    holds.callback(run_folder.release, distributed.on_main(lambda: run_folder.hold(run)))  # rank 0's, once joined
    release_file, fmap, arch, device = distributed.guarded(lambda: prepare(opts, device))
    if release_file.file_sha256 != saved["release_sha256"]:
        raise MepfError(f"the released file {opts.release} changed while it was read; resume needs the same file")
    precision = (Precision.from_json(saved["precision_resolved"]) if "precision_resolved" in saved
                 else legacy(opts.precision, device))
    trainer = Trainer(opts, release_file, fmap, arch, device, precision)
    trainer.run_id = run_folder.run_id_of(saved)
    snap = latest_snapshot(run)
    kept = generator_step(run, saved) if snap is None else None
    if kept:  # a run kept for its result alone (docs/results/generators): never trained over from step 0
        raise MepfError(f"{run} holds a generator.pt at step {kept} but no snapshot to continue from; start a new "
                        "run with `mepf synthesize FILE --out NEW_DIR`")
    if snap is not None:
        def load_snapshot():
            state, problem = snapshot_problem(snap, run_folder.snapshots(run)[-1][0], saved)
            if problem:
                raise MepfError(problem)
            problem = optimiser_problem(trainer, state)
            if problem:
                raise MepfError(f"snapshot {snap} holds optimiser settings or state this run does not make "
                                f"({problem}); move it away to resume from the one before")
            try:
                trainer.load_state(state)
            except (KeyError, IndexError, RuntimeError, TypeError, ValueError, AttributeError) as e:
                raise MepfError(f"snapshot {snap} does not fit this run ({type(e).__name__}); move it away to resume "
                                "from the one before") from None

        distributed.guarded(load_snapshot)
    step = trainer.step
    steps = differ.get("steps", opts.steps)
    distributed.agree_same("the training options (the run's, and those given again on resuming), or its step",
                           {**_shared_options(dataclasses.replace(opts, **differ), release_file), "at": step})
    check_ahead(run, step, steps)
    trainer.complete = steps == step and generator_step(run, saved) == step  # else written from the snapshot
    if trainer.complete:
        return trainer
    for k, v in differ.items():
        setattr(opts, k, v)
    for group in trainer.opt_m.param_groups:  # the snapshot's optimiser state carries the old rate
        group["lr"] = opts.lr_mavg

    # another number of ranks is another global batch (ranks x --batch-size) from here on: recorded as a change
    moved = {"ranks": trainer.ranks.world} if saved.get("ranks", 1) != trainer.ranks.world else {}

    def record():  # options.json: the values now in force, and what changed at which step
        changed = {**differ, **moved}
        if not changed:
            return
        log = list(saved.get("changes", []))
        log += [{"step": step, "option": k, "from": saved.get(k), "to": v} for k, v in sorted(changed.items())]
        updated = {**saved, **changed, "release": str(Path(found).resolve()), "changes": log}
        write_text_atomic(run / run_folder.OPTIONS, json.dumps(updated, indent=2, sort_keys=True))

    def trim_stats():  # drop records past the snapshot: they will be written again
        stats = run / run_folder.STATS
        if stats.exists():  # each line checked to be a record with a step
            keep = [line for line, r in run_folder.iter_stats(run) if r["step"] <= trainer.step]
            write_text_atomic(stats, "".join(line + "\n" for line in keep))

    distributed.on_main(record)
    def trim_grids():  # grids past the snapshot show a generator the run no longer has (review 44 L1)
        for p in run_folder.grids_past(run, trainer.step):
            p.unlink()

    distributed.on_main(trim_stats)
    distributed.on_main(trim_grids)
    with _resumable_when_interrupted(run, "holds its snapshots"):
        trainer.fit(progress)
    return trainer
