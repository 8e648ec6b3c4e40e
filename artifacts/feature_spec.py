"""The feature map a release was made with, typed (docs/artifact-format.md, `feature_spec`). Torch-free: the CLI's
`info`, `mepf audit` and stage 2 read it; mepf.core.features builds the extractor it describes."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .errors import MepfError
from .schema import feature_spec_problem

#: which norm bound each moment's feature vector is scaled to
MOMENT_NORMS = {"S1": "C1", "S2": "C2"}


@dataclass(frozen=True)
class FeatureSpec:
    backbone: str
    weights: str  # pretrained, random or file
    weight_source: str
    weight_seed: int | None
    weights_sha256: str
    layers: tuple
    pixel_weight: float | None  # None: no `pixels` layer
    pooling: str
    height: int
    width: int
    channels: int
    resize: tuple | None  # (H, W) the map upsamples to inside; None: the input size
    preprocessing: str
    C1: float
    C2: float
    dim: int
    #: the JSON object exactly as stored (with `mode`, `norm_target`, `versions`): what is written and hashed
    stored: dict = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_json(cls, spec) -> FeatureSpec:
        """The typed spec of a stored JSON object; one line naming the field if it is not a valid spec."""
        problem = feature_spec_problem(spec)
        if problem:
            raise MepfError(f"{problem}; this is not a feature spec mepf wrote")
        inp, r = spec["input"], spec.get("resize")  # resize and pixel_weight are absent in older files
        return cls(backbone=spec["backbone"], weights=spec["weights"], weight_source=spec["weight_source"],
                   weight_seed=spec.get("weight_seed"), weights_sha256=spec["weights_sha256"],
                   layers=tuple(spec["layers"]), pixel_weight=spec.get("pixel_weight"), pooling=spec["pooling"],
                   height=inp["height"], width=inp["width"], channels=inp["channels"],
                   resize=None if not r else (r["height"], r["width"]), preprocessing=spec["preprocessing"],
                   C1=float(spec["C1"]), C2=float(spec["C2"]), dim=spec["dim"], stored=copy.deepcopy(spec))

    def as_json(self) -> dict:
        """The object as stored in the file (a copy)."""
        return copy.deepcopy(self.stored)

    def norm(self, moment: str) -> float:
        """C of moment 'S1' (C1) or 'S2' (C2): the norm its feature vectors are scaled to."""
        return getattr(self, MOMENT_NORMS[moment])

    @property
    def image_size(self) -> tuple:
        """(H, W) of the images the map takes, and generators draw."""
        return self.height, self.width

    def summary(self) -> str:
        """One line for `mepf info`."""
        return (f"{self.backbone} ({self.weight_source}), {len(self.layers)} layers, pooling {self.pooling}, "
                f"D={self.dim}" + (f", at {self.resize[0]}x{self.resize[1]}" if self.resize else "")
                + (f", pixels x{self.pixel_weight:g}" if self.pixel_weight else ""))
