"""Partial LRP (Voita et al. 2019, as the published transformer LRP baseline computes it: Chefer et al.'s
`generate_LRP(method="last_layer")` in hila-chefer/Transformer-Explainability): LRP from the prompt's score down to
the last block's attention probabilities with the rules of `lrp` (see textspan/methods/lrp.py), their relevance
clamped at 0, averaged over heads, the CLS token's row at the patches. Same refusals as `lrp`.
"""
from __future__ import annotations

import torch

from . import register
from ._vit import last_block_input, patch_columns
from .lrp import _Saved, block_relevance, check_lrp, head_relevance


@register("partial_lrp", towers=("cls",), inner_norm=False)
def partial_lrp(tower, images, T):
    """No options (alpha 1, the published setting)."""
    check_lrp(tower, "partial_lrp")
    last = tower.blocks[-1]
    with torch.no_grad():
        s = _Saved(last, last_block_input(tower, images))
        R = head_relevance(tower, s.x_out, T)
        R_attn = block_relevance(last, s, R, stop_at_attention=True, cls_only=True)  # [P, b, H, 1, N]
        cls_row = R_attn.clamp(min=0).mean(dim=2)[:, :, 0]  # [P, b, N]
    return patch_columns(cls_row, tower.grid_of(images)).transpose(0, 1)
