"""The decomposition's own maps (heatmaps issue): per patch token, the direct contribution of the chosen heads to
the image embedding, dotted with each prompt; optionally relative to the mean over the prompts. Exact, one forward
pass, no gradients."""
from __future__ import annotations

from ..decomposition import project
from ..heatmaps import head_mask, patch_maps
from . import register
from ._vit import grid_of


@register("decomposition")
def decomposition(visual, images, T, heads=None, layers=None, relative: bool = True):
    """Options: heads ("L11H3,L10H1" or [(l, h), ...]), layers ("-4:" or a list), relative (default True:
    subtract the mean map over the prompts; with a single prompt use relative=False)."""
    mask = head_mask(visual, heads, layers)
    p = project(visual, images, T, mask, any_size=True)
    return patch_maps(p, grid_of(visual, images), relative)
