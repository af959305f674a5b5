"""Explainers under one API (DESIGN.md section 6): every method maps (model, images, text embeddings) to raw maps on
the patch grid, [b, P, grid_h, grid_w], batched over images and prompts, on a stock open_clip ViT that it leaves
exactly as it was.

    >>> maps = textspan.explain(model, images, text_embeddings, method="legrad")      # [b, P, gh, gw]
    >>> shown = textspan.upsample_maps(maps, 224)                                       # [b, P, 224, 224] in [0, 1]

Methods register themselves by name (one small file each); `list_methods()` lists them.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._vit import prepare, untouched
from ..errors import BadInputError

_REGISTRY: Dict[str, Callable] = {}
_TOWERS: Dict[str, Tuple[str, ...]] = {}  # method -> the tower kinds it is defined on
_INNER_NORM: Dict[str, bool] = {}  # method -> defined where a norm sits between the heads and out_proj (EVA)
_REQUIRES: Dict[str, Tuple[str, ...]] = {}  # method -> options it cannot run without (e.g. a neurons folder)
TOWER_KINDS = ("cls", "avg", "attn")  # CLS-pooled, average-pooled (CLIPA), attention-pooled (SigLIP)
_MODULES = ("decomposition", "legrad", "gradeclip", "gradcam", "rollout", "raw_attention", "chefer", "maskclip",
            "clip_surgery", "m2ib", "lrp", "partial_lrp", "neurons")


def register(name: str, towers: Sequence[str] = ("cls",), inner_norm: bool = True, requires: Sequence[str] = ()):
    """Decorator: register `fn(tower, images, T, **options) -> [b, P, gh, gw]` (tower: a `textspan.engine.Tower`)
    under `name` (`explain` checks the inputs, moves them to the model's device and dtype, and guards the model
    around the call).

    `towers` declares the image towers the method is defined on: ``"cls"`` (the embedding reads the CLS token),
    ``"avg"`` (the mean of the patch tokens, CLIPA) and ``"attn"`` (an attention-pooling head, SigLIP). This is the
    only place that says which methods run where: `list_methods(tower)`, `explain`'s refusal, `compare` and the
    evaluations all read it. ``inner_norm=False``: the method is written for out_proj acting on the heads' output
    directly, so it refuses towers with a norm in between (EVA). `requires`: options the method cannot run without
    (it is then left out of `list_methods()` unless ``with_required=True``: "every method" means every method that
    runs on images alone)."""
    unknown = set(towers) - set(TOWER_KINDS)
    if unknown:
        raise ValueError(f"register({name!r}): unknown tower kinds {sorted(unknown)}; known: {TOWER_KINDS}")

    def wrap(fn):
        _REGISTRY[name] = fn
        _TOWERS[name] = tuple(towers)
        _INNER_NORM[name] = bool(inner_norm)
        _REQUIRES[name] = tuple(requires)
        return fn
    return wrap


def _load_all() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


def tower_kind(tower) -> str:
    """"cls", "avg" or "attn": how a `textspan.engine.Tower` (or a model) pools its tokens into the embedding."""
    from ..engine import Tower, read_tower

    if not isinstance(tower, Tower):
        tower = read_tower(tower)
    if tower.pool_head is not None:
        return "attn"
    return "avg" if tower.query == "avg" else "cls"


def list_methods(tower=None, with_required: bool = False) -> List[str]:
    """Names of the registered explainers, in a fixed order; given a tower kind ("cls", "avg", "attn"), a
    `textspan.engine.Tower` or a model, only the methods defined on that tower. Methods that need an option to run
    (`method_requires`, e.g. ``neurons`` needs a neurons folder) only with ``with_required=True``."""
    _load_all()
    names = [m for m in _MODULES if m in _REGISTRY] + sorted(set(_REGISTRY) - set(_MODULES))
    if not with_required:
        names = [m for m in names if not _REQUIRES[m]]
    if tower is None:
        return names
    kind = tower if isinstance(tower, str) else tower_kind(tower)
    if kind not in TOWER_KINDS:
        raise BadInputError(f"unknown tower kind {kind!r}; known: {', '.join(TOWER_KINDS)}")
    inner = not isinstance(tower, str) and has_inner_norm(tower)
    return [m for m in names if kind in _TOWERS[m] and (_INNER_NORM[m] or not inner)]


def has_inner_norm(tower) -> bool:
    """Whether a tower (or model) has a norm between its heads' outputs and the residual stream (EVA's inner norm
    before out_proj, EVA02-E's post-norm after it)."""
    from ..engine import Tower, read_tower

    if not isinstance(tower, Tower):
        tower = read_tower(tower)
    return any(b.mixes_heads for b in tower.blocks)


def method_inner_norm(name: str) -> bool:
    """Whether method `name` is defined on towers with a norm between the heads and out_proj (EVA)."""
    get_method(name)
    return _INNER_NORM[name]


def method_requires(name: str) -> Tuple[str, ...]:
    """The options method `name` cannot run without (as it registered)."""
    get_method(name)
    return _REQUIRES[name]


def method_towers(name: str) -> Tuple[str, ...]:
    """The tower kinds method `name` is defined on (as it registered)."""
    get_method(name)
    return _TOWERS[name]


def get_method(name: str) -> Callable:
    _load_all()
    if name not in _REGISTRY:
        raise BadInputError(f"unknown explainer {name!r}; known: {', '.join(list_methods(with_required=True))}")
    return _REGISTRY[name]


def parse_options(items) -> dict:
    """Method options from KEY=VALUE strings (the command line's --option); values parsed as JSON when they are
    (true, 3, [10, 11]), else kept as strings."""
    import json

    out = {}
    for item in items:
        if "=" not in item:
            raise BadInputError(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def explain(model, images: torch.Tensor, text_embeddings, method: str = "legrad", **options) -> torch.Tensor:
    """Raw explanation maps of `method` for every image and prompt.

    Args:
        model: a stock open_clip CLIP model (or its image tower) with a ViT image tower.
        images: [b, 3, H, W] preprocessed; any size the positional embeddings can be resampled to (non-square
            grids included).
        text_embeddings: [P, d_embed] prompt embeddings, used as given (pass normalised text features).
        method: one of `list_methods()`.
        **options: the method's own options (see each method's docstring).

    Returns:
        [b, P, grid_h, grid_w] float maps on the patch grid, before any upsampling or normalisation, detached.
        The model's parameters, requires_grad flags and training flags are as before, also when the call raises.
    """
    fn = get_method(method)
    missing = [o for o in _REQUIRES[method] if o not in options]
    if missing:
        raise BadInputError(f"method {method!r} needs the option{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)} (--option {missing[0]}=...)")
    with untouched(model):
        tower, images, T = prepare(model, images, text_embeddings, method)
        maps = fn(tower, images, T, **options)
    return maps.detach()


def upsample_maps(maps: torch.Tensor, size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """[b, P, gh, gw] -> [b, P, size, size] (or the (height, width) given): bilinear upsampling
    (align_corners=False), then min-max normalisation of each map to [0, 1] (a constant map becomes 0)."""
    if maps.ndim != 4:
        raise BadInputError(f"maps must be [b, P, grid_h, grid_w]; got {tuple(maps.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    lo = up.amin(dim=(-2, -1), keepdim=True)
    hi = up.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (up - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(up))
