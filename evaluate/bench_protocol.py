"""DPImageBench's utility protocol (evaluation/evaluator.py there, for non-CIFAR data), as its code runs it:

the synthetic set is shuffled with numpy's default_rng(0) and its first 55,000 images train each classifier
(inputs scaled to [-1, 1], no augmentation) for 50 epochs of batch 256 with Adam lr 0.01, decayed x0.2 every
20 epochs; an exponential moving average (0.9999, warmed up as (1+n)/(10+n)) of the weights is evaluated after
every epoch on the real validation hold-out; the figure is the test accuracy at the epoch of best validation
accuracy (ties go to the later epoch). Training resumes from a per-epoch state file, so that a run can be
split into calls of bounded time (a GPU lent for ten minutes at a time).
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mepf.artifacts.errors import MepfError
from mepf.artifacts.staging import atomic_path
from mepf.core.tensor_file import save
from mepf.progress import progress as progress_bar

from .benchnets import bench_classifier


@dataclass(frozen=True)
class BenchSchedule:
    epochs: int = 50
    batch_size: int = 256
    lr: float = 0.01
    step_epochs: int = 20
    gamma: float = 0.2
    ema: float = 0.9999
    n_train: int = 55000  # synthetic images the classifiers train on; their evaluator keeps the rest aside


class WeightEMA:
    """Their EMA: a shadow of the trainable parameters with decay min(decay, (1+n)/(10+n)) at the n-th update.
    Buffers (batch-norm statistics) are not averaged: evaluation uses the live model's."""

    def __init__(self, params, decay: float):
        self.decay, self.n = decay, 0
        self.shadow = [p.detach().clone() for p in params if p.requires_grad]

    def update(self, params) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        with torch.no_grad():  # s -= (1 - d) * (s - p), as three multi-tensor kernels (one per op, not per tensor)
            diff = torch._foreach_sub(self.shadow, [p for p in params if p.requires_grad])
            torch._foreach_mul_(diff, 1 - d)
            torch._foreach_sub_(self.shadow, diff)

    @contextmanager
    def applied(self, model):
        """The model with the averaged weights inside the block, its own weights restored after."""
        params = [p for p in model.parameters() if p.requires_grad]
        kept = [p.detach().clone() for p in params]
        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in zip(kept, params):
                    p.copy_(k)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "n": self.n, "shadow": self.shadow}

    def load_state_dict(self, d: dict) -> None:
        if len(d["shadow"]) != len(self.shadow) or any(s.shape != v.shape for s, v in zip(self.shadow, d["shadow"])):
            raise ValueError("the averaged weights do not fit the model")
        self.decay, self.n = d["decay"], d["n"]
        for s, v in zip(self.shadow, d["shadow"]):
            s.copy_(v)


def optimiser(model, schedule: BenchSchedule):
    """Adam at schedule.lr, its rate multiplied by gamma every step_epochs epochs (the scheduler steps per epoch)."""
    opt = torch.optim.Adam(model.parameters(), lr=schedule.lr)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=schedule.step_epochs, gamma=schedule.gamma)


def training_subset(images: np.ndarray, labels: np.ndarray, n_train: int):
    """Their split of the synthetic set: default_rng(0)'s permutation, the first n_train for training."""
    idx = np.random.default_rng(seed=0).permutation(len(images))[:n_train]
    return images[idx], labels[idx]


def as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], as their loaders' [0, 1] times 2 minus 1."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255).mul(2).sub(1)


def accuracy(model, x: torch.Tensor, y: torch.Tensor, device, batch: int = 1000) -> float:
    """Percent correct, in eval mode, without gradients."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            correct += int((model(x[s:s + batch].to(device)).argmax(1) == y[s:s + batch].to(device)).sum())
    return 100.0 * correct / len(x)


def better(val_acc: float, best_val: float | None) -> bool:
    """Their selection rule: a validation accuracy at least as good as the best so far takes the place."""
    return best_val is None or val_acc >= best_val


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def train_classifier(kind: str, train, val, test, num_classes: int, schedule: BenchSchedule = BenchSchedule(),
                     seed: int = 0, device="cpu", state_path: Path | None = None, deadline: float | None = None,
                     progress: bool = False, train_key: str | None = None, first_epoch_s: float = 0.0) -> dict:
    """Train one classifier under the protocol on `train` (uint8 images, labels), selecting on `val` and
    reporting on `test`. With `state_path` it resumes from, and saves after every epoch to, that file; with
    `deadline` (time.time()) it stops before an epoch that would end past it (the first epoch's length is
    `first_epoch_s`, an estimate) and says it is not finished. `train_key` names the training images in the
    state (a generator's SHA-256, n and seed), so that a resume on another machine, whose kernels may round a
    sampled pixel differently, continues; without it the images' bytes name them."""
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # dropout draws from the global generators: seeded, and given back
        torch.manual_seed(seed)
        return _train(kind, train, val, test, num_classes, schedule, seed, device, state_path, deadline, progress,
                      train_key, first_epoch_s)


def _load_state(state_path: Path, key: str) -> dict:
    fix = "pass --overwrite to start afresh, or choose another --out"
    try:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, one line
        raise MepfError(f"{state_path} is not a training state this mepf wrote ({type(e).__name__}); {fix}") from None
    if not isinstance(saved, dict) or not all(k in saved for k in ("key", "model", "opt", "sched", "ema", "shuffle",
                                                                     "torch_rng", "state")):
        raise MepfError(f"{state_path} is not a training state this mepf wrote; {fix}")
    if saved["key"] != key:
        raise MepfError(f"{state_path} is the saved training of another evaluation (other images, classifier or "
                        f"schedule); {fix}")
    return saved


def _check_state(state, epochs: int) -> None:
    """The progress record of a state: epochs run, one history entry each, and the selected epoch among them."""
    ok = (isinstance(state, dict) and type(state.get("epoch")) is int and 0 <= state["epoch"] <= epochs
          and isinstance(state.get("history"), list) and len(state["history"]) == state["epoch"]
          and all(isinstance(h, dict) and isinstance(h.get("seconds"), float) for h in state["history"])
          and isinstance(state.get("seconds"), float)
          and (state.get("best") is None) == (state["epoch"] == 0)
          and (state["best"] is None or (isinstance(state["best"], dict) and all(
              isinstance(state["best"].get(k), (int, float)) for k in ("epoch", "val", "test")))))
    if not ok:
        raise ValueError("its progress record is not one this mepf writes")


def _train(kind, train, val, test, num_classes, schedule, seed, device, state_path, deadline, progress, train_key,
           first_epoch_s) -> dict:
    (xt, yt), (xv, yv), (xe, ye) = train, val, test
    key = (f"{train_key or _digest(xt, yt)}|{_digest(xv, yv, xe, ye)}|{kind}|{seed}|"
           f"{sorted(asdict(schedule).items())}|{num_classes}")
    model = bench_classifier(kind, xt.shape[-1], xt.shape[1], num_classes).to(device)
    opt, sched = optimiser(model, schedule)
    ema = WeightEMA(model.parameters(), schedule.ema)
    shuffle = torch.Generator().manual_seed(seed)  # their DataLoader(shuffle=True), on a generator of its own
    state = {"epoch": 0, "history": [], "best": None, "seconds": 0.0}
    if state_path is not None and Path(state_path).exists():
        saved = _load_state(Path(state_path), key)
        try:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
            ema.load_state_dict(saved["ema"])
            shuffle.set_state(saved["shuffle"])
            torch.set_rng_state(saved["torch_rng"])
            if device.type == "cuda" and saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(saved["cuda_rng"], device)
            state = saved["state"]
            _check_state(state, schedule.epochs)
        except Exception as e:  # noqa: BLE001
            raise MepfError(f"{state_path} does not fit this classifier ({type(e).__name__}); pass --overwrite to "
                            "start afresh, or choose another --out") from None
    # on the device once (a few hundred MB at most), not a batch at a time: the same values, no per-step copies
    x_train, y_train = as_input(xt).to(device), torch.from_numpy(yt.astype(np.int64)).to(device)
    x_val, y_val = as_input(xv).to(device), torch.from_numpy(yv.astype(np.int64)).to(device)
    x_test, y_test = as_input(xe).to(device), torch.from_numpy(ye.astype(np.int64)).to(device)
    per_epoch = -(-len(x_train) // schedule.batch_size)
    bar = progress_bar(total=schedule.epochs * per_epoch, initial=state["epoch"] * per_epoch, desc=kind, unit="step",
                       disable=not progress, leave=False)
    last = state["history"][-1]["seconds"] if state["history"] else first_epoch_s
    while state["epoch"] < schedule.epochs:
        if deadline is not None and time.time() + last > deadline:
            break
        t0 = time.perf_counter()
        model.train()
        # to the device once an epoch: torch's blocking host-to-device copy waits for the device's queue, so a
        # copy per step kept the host from launching the next step while this one ran (13 s epochs of ResNet-110
        # on an H200, against 8 s of its bare steps)
        perm = torch.randperm(len(x_train), generator=shuffle).to(device)
        for s in range(0, len(x_train), schedule.batch_size):
            idx = perm[s:s + schedule.batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model.parameters())
            bar.update(1)
        sched.step()
        with ema.applied(model):
            val_acc = accuracy(model, x_val, y_val, device)
            # the test set is only read where it can be the answer: at an epoch the rule selects
            best_val = state["best"]["val"] if state["best"] else None
            test_acc = accuracy(model, x_test, y_test, device) if better(val_acc, best_val) else None
        last = time.perf_counter() - t0
        state["epoch"] += 1
        state["seconds"] += last
        state["history"].append({"epoch": state["epoch"], "val": val_acc, "test": test_acc, "seconds": last,
                                 "loss": loss.item()})
        if test_acc is not None:
            state["best"] = {"epoch": state["epoch"], "val": val_acc, "test": test_acc}
        if state_path is not None:
            Path(state_path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(Path(state_path), ".pt") as tmp:
                save({"key": key, "model": model.state_dict(), "opt": opt.state_dict(),
                      "sched": sched.state_dict(), "ema": ema.state_dict(), "shuffle": shuffle.get_state(),
                      "torch_rng": torch.get_rng_state(), "state": state,
                      "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, tmp,
                     shown=state_path)
    bar.close()
    best = state["best"] or {}
    return {"finished": state["epoch"] >= schedule.epochs, "epochs_done": state["epoch"],
            "test_at_best_val": best.get("test"), "best_val": best.get("val"), "best_epoch": best.get("epoch"),
            "seconds": state["seconds"], "params": sum(p.numel() for p in model.parameters()),
            "history": state["history"]}


def summarise(results: dict) -> dict:
    """Mean and maximum over the classifiers of their selected test accuracy (percent). DPImageBench's tables
    show the maximum: their published logs list [85.48, 87.11, 86.11] for PrivImage on Fashion-MNIST at eps 10
    (mean 86.23) and the table reads 87.1."""
    done = {k: r["test_at_best_val"] for k, r in results.items() if r["finished"]}
    if not done or len(done) < len(results):
        return {"complete": False}
    v = list(done.values())
    return {"complete": True, "mean": float(np.mean(v)), "max": float(np.max(v)), "std": float(np.std(v))}
