"""Names and defaults written once: every CLI choice list is the torch-free name tuple of its options module, each
tuple equals the registry that implements it, and every CLI default is its options dataclass's default."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from mepf.artifacts.errors import MepfError
from mepf.artifacts.ledger import sensitivity
from mepf.cli import main
from mepf.core import names
from mepf.core.device import resolve_device
from mepf.core.features import BACKBONES, build_feature_map
from mepf.embed import options as eo
from mepf.embed.datasets import named_source
from mepf.embed.release import MOMENTS
from mepf.embed.transform import Transform
from mepf.evaluate import options as vo
from mepf.synthesize import options as so
from mepf.synthesize.generators import GENERATORS

#: (command, option) -> the names it must offer, read from where they are written
CHOICES = {
    ("embed", "relation"): eo.RELATIONS, ("embed", "moments"): eo.MOMENT_SETS, ("embed", "crop"): eo.CROPS,
    ("embed", "bad_records"): eo.BAD_RECORDS,
    ("embed", "backbone"): names.BACKBONE_NAMES, ("embed", "pooling"): names.POOLINGS,
    ("embed", "device"): names.DEVICES, ("synthesize", "device"): names.DEVICES, ("sample", "device"): names.DEVICES,
    ("evaluate", "device"): names.DEVICES, ("synthesize", "generator"): ("auto", *so.GENERATOR_NAMES),
    ("synthesize", "objective"): so.OBJECTIVES, ("synthesize", "lr_schedule"): so.LR_SCHEDULES,
    ("synthesize", "precision"): so.PRECISIONS, ("synthesize", "labels"): so.LABELS, ("sample", "labels"): so.LABELS,
    ("synthesize", "compile_mode"): so.COMPILE_MODES,
    ("sample", "fmt"): so.SAMPLE_FORMATS, ("evaluate", "protocol"): vo.PROTOCOLS,
}
OPTIONS = {"embed": eo.EmbedOptions, "synthesize": so.TrainOptions, "sample": so.SampleOptions,
           "evaluate": vo.EvaluateOptions}


def _param(command, name):
    return next(p for p in main.commands[command].params if p.name == name)


@pytest.mark.parametrize("command,name", sorted(CHOICES))
def test_each_cli_choice_list_is_its_name_tuple(command, name):
    assert tuple(_param(command, name).type.choices) == tuple(CHOICES[command, name])


def test_every_click_choice_is_covered_above():
    """A new choice option must be read from a name tuple too (--channels is a number, 1 or 3)."""
    for command, cmd in main.commands.items():
        for p in getattr(cmd, "params", []):
            if hasattr(p.type, "choices") and p.name != "channels":
                assert (command, p.name) in CHOICES, (command, p.name)


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_each_cli_default_is_its_dataclass_default(command):
    fields = {f.name: f for f in dataclasses.fields(OPTIONS[command])}
    checked = 0
    for p in main.commands[command].params:
        f = fields.get(p.name)
        if f is None or f.default is dataclasses.MISSING or p.default is None or getattr(p, "is_flag", False):
            continue  # None on the command line: "not given" (resolved later, from the same dataclass)
        want = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        assert p.default == want, (command, p.name)
        checked += 1
    assert checked >= 3


def test_the_registries_are_the_name_tuples():
    assert tuple(BACKBONES) == names.BACKBONE_NAMES
    assert {b.default_pooling for b in BACKBONES.values()} <= set(names.POOLINGS)
    assert tuple(GENERATORS) == so.GENERATOR_NAMES and tuple(so.GENERATOR_WIDTHS) == so.GENERATOR_NAMES
    assert tuple(MOMENTS) == eo.MOMENT_SETS
    for name, cls in GENERATORS.items():  # one width table: the constructors' defaults are read from it
        assert inspect.signature(cls).parameters["width"].default == so.GENERATOR_WIDTHS[name]


@pytest.mark.parametrize("pooling", names.POOLINGS)
def test_every_pooling_builds(pooling):
    _, spec = build_feature_map("resnet18", "random", ["pixels"], pooling, image_size=(8, 8), channels=1)
    assert spec["pooling"] == pooling and spec["dim"] == (1 if pooling == "mean" else 64)


def test_every_device_name_is_understood():
    assert resolve_device("cpu") == torch.device("cpu")
    for d in names.DEVICES:
        try:
            resolve_device(d)
        except MepfError as e:
            assert "not available" in str(e) or "no CUDA" in str(e), e
    with pytest.raises(MepfError, match="unknown device"):
        resolve_device("tpu")


def test_every_relation_crop_and_dataset_is_implemented(tmp_path):
    for r in eo.RELATIONS:
        assert sensitivity(r, "S1", 1.0, 1.0)[0] > 0
    for c in eo.CROPS:
        assert Transform((8, 8), 1, c)(torch.rand(1, 10, 12, 1)).shape == (1, 1, 8, 8)
    for d in eo.DATASETS:  # each named dataset is found or refused for want of files, never as unknown
        try:
            named_source(f"{d}:test", data_root=tmp_path, download=False)
        except MepfError as e:
            assert "unknown dataset" not in str(e), e
    with pytest.raises(MepfError, match="unknown dataset"):
        named_source("imagenet", data_root=tmp_path, download=False)


def test_help_states_the_defaults_from_their_constants(monkeypatch, tmp_path):
    from click.testing import CliRunner

    help_text = " ".join(CliRunner().invoke(main, ["synthesize", "--help"]).output.split())
    assert f"[default: {so.TrainOptions.steps};" in help_text
    assert all(f"{w} for {g}" in help_text for g, w in so.GENERATOR_WIDTHS.items())
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    from mepf.embed.release_log import default_log_path

    var, _, below = eo.RELEASE_LOG
    assert default_log_path() == tmp_path / below and f"${var}/{below}" in eo.default_path_text(eo.RELEASE_LOG)
