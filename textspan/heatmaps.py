"""Spatial heatmaps from the decomposition (DESIGN.md section 6).

The map of prompt t over the patch grid is, per patch token m, the sum over the chosen layers and heads of the
direct terms of m, dotted with t's embedding: "how much does this patch, through these heads, push the image
embedding towards t". With ``relative=True`` each prompt's map is shown relative to the mean map over the prompts
(what distinguishes the prompt from the others). Computed by `textspan.decomposition.project`: one small product per
layer, never the [b, L, N, H, d'] terms.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

from .decomposition import project
from .models import model_info
from .span import parse_heads, parse_layers

HeadsArg = Optional[Union[str, Iterable[Tuple[int, int]]]]


def head_mask(model, heads: HeadsArg = None, layers: Optional[Union[str, Sequence[int]]] = None) -> torch.Tensor:
    """[L, H] boolean mask from heads ("L11H3,L10H1" or [(11, 3), ...]) and/or layers ("-4:" or [8, 9]); all heads
    when both are None."""
    info = model_info(model)
    L, H = info.n_layers, info.n_heads
    if heads is None and layers is None:
        return torch.ones(L, H, dtype=torch.bool)
    mask = torch.zeros(L, H, dtype=torch.bool)
    if heads is not None:
        pairs = parse_heads(heads, L, H) if isinstance(heads, str) else [(l % L, h) for l, h in heads]
        for l, h in pairs:
            mask[l, h] = True
    if layers is not None:
        chosen = parse_layers(layers, L) if isinstance(layers, str) else [l % L for l in layers]
        mask[chosen] = True
    return mask


def heatmaps(model, images: torch.Tensor, text_embeddings, heads: HeadsArg = None,
             layers: Optional[Union[str, Sequence[int]]] = None, relative: bool = True) -> torch.Tensor:
    """Per-prompt maps on the patch grid.

    Args:
        model: a decomposable open_clip CLIP model.
        images: [b, 3, H, W] preprocessed.
        text_embeddings: [k, d'] prompt embeddings (normalised text features).
        heads, layers: restrict the maps to these heads / layers (default: all).
        relative: subtract, per patch, the mean over the k prompts.

    Returns:
        [b, k, grid_h, grid_w] maps (patch tokens only; before any upsampling).
    """
    T = torch.as_tensor(text_embeddings)
    p = project(model, images, T, head_mask(model, heads, layers))
    return patch_maps(p, model_info(model).grid_size, relative)


def patch_maps(projection, grid_size, relative: bool = True) -> torch.Tensor:
    """[b, k, grid_h, grid_w]: the patch tokens of a `Projection`, optionally relative to the mean over the k
    directions. (`projection.total()` gives the image-direction similarities of the same forward pass.)"""
    b, _, k = projection.tokens.shape
    maps = projection.tokens[:, 1:].transpose(1, 2).reshape(b, k, *grid_size)
    if relative:
        maps = maps - maps.mean(dim=1, keepdim=True)
    return maps
