"""Model readers: one module per model library or family, each turning a stock model's image tower into a
`textspan.engine.Tower` (the compute types every analysis uses). Only the modules in this package name a model
library's attributes (a test greps the rest of the package).

A reader module defines ``NAME`` (the family, as the refusal lists it), ``matches(visual)`` (is this tower mine?),
``check(model, visual)`` (raise `UnsupportedModelError` with the reason when the tower cannot be reproduced exactly)
and ``read(model, visual) -> Tower``. Adding a family is one new module and one line in `READERS`.
"""
from __future__ import annotations

import importlib
from typing import List

import torch

from ..errors import UnsupportedModelError
from .common import image_tower

# most specific first: the timm readers look at open_clip's trunk, the open_clip reader at its own ViT
_MODULES = ("eva", "timm_vit", "transformers_clip", "open_clip_vit")


def readers() -> List:
    """The reader modules, in the order they are tried."""
    return [importlib.import_module(f"{__name__}.{m}") for m in _MODULES]


def families() -> List[str]:
    """The model families textspan reads."""
    return [r.NAME for r in readers()]


def find(model):
    """(reader module, image tower) of a model; `UnsupportedModelError` listing the supported families when none
    reads it."""
    visual = image_tower(model)
    for reader in readers():
        if reader.matches(visual):
            return reader, visual
    trunk = getattr(visual, "trunk", None)
    kind = type(visual).__name__ + (f" (timm trunk {type(trunk).__name__})" if trunk is not None else "")
    raise UnsupportedModelError(
        f"no textspan reader for this image tower, {kind}{_why(visual)}; textspan reads: {', '.join(families())}")


def _why(visual) -> str:
    name = type(visual).__name__
    if "ResNet" in name:
        return " (ResNets have no attention heads to decompose)"
    return ""


def check(model) -> None:
    """Raise `UnsupportedModelError` unless textspan's forward reproduces this image tower exactly."""
    reader, visual = find(model)
    reader.check(model, visual)


def read(model):
    """The `Tower` of a stock model (checked first), with the whole model's logit scale when it has one."""
    reader, visual = find(model)
    reader.check(model, visual)
    tower = reader.read(model, visual)
    scale = getattr(model, "logit_scale", None)
    if torch.is_tensor(scale):
        tower.score_scale = float(scale.detach().exp())
    return tower
