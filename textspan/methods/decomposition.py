"""The decomposition's own maps (heatmaps issue): per patch token, the direct contribution of the chosen heads to
the image embedding, dotted with each prompt; optionally relative to the mean over the prompts. Exact, one forward
pass, no gradients."""
from __future__ import annotations

from ..decomposition import project
from ..heatmaps import check_relative, patch_maps
from ..names import head_mask
from . import register


@register("decomposition", towers=("cls", "avg", "attn"))
def decomposition(tower, images, T, heads=None, layers=None, relative: bool = True):
    """Options: heads ("L11H3,L10H1" or [(l, h), ...]), layers ("-4:" or a list), relative (default True:
    subtract the mean map over the prompts; needs at least two prompts, else use relative=False)."""
    check_relative(relative, T.shape[0])
    mask = head_mask(tower.n_layers, tower.n_heads, heads, layers)
    p = project(tower, images, T, mask, any_size=True)
    return patch_maps(p, tower.grid_of(images), relative)
