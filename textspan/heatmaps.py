"""Spatial heatmaps from the decomposition (DESIGN.md section 6).

The map of prompt t over the patch grid is, per patch token m, the sum over the chosen layers and heads of the
direct terms of m, dotted with t's embedding: "how much does this patch, through these heads, push the image
embedding towards t". With ``relative=True`` each prompt's map is shown relative to the mean map over the prompts
(what distinguishes the prompt from the others). Computed by `textspan.decomposition.project`: one small product per
layer, never the [b, L, N, H, d'] terms.
"""
from __future__ import annotations

import torch

from .decomposition import pool_projection, project
from .engine import read_tower
from .errors import BadInputError
from .names import HeadsArg, LayersArg
from .names import head_mask as _mask


def head_mask(model, heads: HeadsArg = None, layers: LayersArg = None) -> torch.Tensor:
    """[L, H] boolean mask from heads ("L11H3,L10H1" or [(11, 3), ...]) and/or layers ("-4:" or [8, 9]); all heads
    when both are None. Out-of-range heads or layers are an error naming the value and the model's size."""
    tower = read_tower(model)
    return _mask(tower.n_layers, tower.n_heads, heads, layers)


def check_relative(relative: bool, n_prompts: int) -> None:
    """A map relative to the mean over prompts needs two prompts at least (one prompt's relative map is all
    zeros)."""
    if relative and n_prompts < 2:
        raise BadInputError("relative maps subtract the mean over the prompts, so one prompt gives all zeros: pass at "
                            "least two prompts, or relative=False (--absolute) for the prompt's own map")


def heatmaps(model, images: torch.Tensor, text_embeddings, heads: HeadsArg = None, layers: LayersArg = None,
             relative: bool = True) -> torch.Tensor:
    """Per-prompt maps on the patch grid.

    Args:
        model: a decomposable open_clip CLIP model.
        images: [b, 3, H, W] preprocessed.
        text_embeddings: [k, d'] prompt embeddings (normalised text features).
        heads, layers: restrict the maps to these heads / layers (default: all).
        relative: subtract, per patch, the mean over the k prompts (needs k >= 2).

    Returns:
        [b, k, grid_h, grid_w] maps (patch tokens only; before any upsampling).
    """
    T = torch.as_tensor(text_embeddings)
    check_relative(relative, 1 if T.ndim == 1 else T.shape[0])
    tower = read_tower(model)
    p = project(tower, images, T, _mask(tower.n_layers, tower.n_heads, heads, layers))
    return patch_maps(p, tower.grid_size, relative)


def patch_maps(projection, grid_size, relative: bool = True) -> torch.Tensor:
    """[b, k, grid_h, grid_w]: the patch tokens of a `Projection`, optionally relative to the mean over the k
    directions. (`projection.total()` gives the image-direction similarities of the same forward pass.)"""
    b, _, k = projection.tokens.shape
    n_patch = grid_size[0] * grid_size[1]  # the patch tokens are the last ones (after the CLS token, if any)
    maps = projection.tokens[:, -n_patch:].transpose(1, 2).reshape(b, k, *grid_size)
    if relative:
        maps = maps - maps.mean(dim=1, keepdim=True)
    return maps


def pool_head_maps(model, images: torch.Tensor, text_embeddings, relative: bool = True) -> torch.Tensor:
    """[b, G, k, grid_h, grid_w]: per pooling head of an attention-pooled tower (SigLIP) and prompt, the published
    pooling-level terms of each patch dotted with the prompt (relative: minus the mean over the prompts). Summed over
    heads and patches, plus the pooling MLP's and out_proj bias's terms, they give the image-prompt cosine."""
    T = torch.as_tensor(text_embeddings)
    check_relative(relative, 1 if T.ndim == 1 else T.shape[0])
    tower = read_tower(model)
    p = pool_projection(tower, images, T)  # [b, G, N, k]
    b, G, N, k = p.shape
    maps = p.permute(0, 1, 3, 2).reshape(b, G, k, *tower.grid_size)
    if relative:
        maps = maps - maps.mean(dim=2, keepdim=True)
    return maps
