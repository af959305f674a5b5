"""Raw attention: the last block's CLS-to-patch attention, averaged over heads (the same map for every prompt)."""
from __future__ import annotations

import torch

from . import register
from ._vit import attention_probs, grid_of, last_block_input, patch_columns, qkv


@register("raw_attention")
def raw_attention(visual, images, T):
    """No options. Prompt-independent: the map is repeated for each prompt."""
    blocks = visual.transformer.resblocks
    x = last_block_input(visual, images)
    with torch.no_grad():
        q, k, _ = qkv(blocks[-1], x)
        cls_row = attention_probs(blocks[-1], q[:, :, :1], k)[:, :, 0].mean(dim=1)  # [b, N]
    maps = patch_columns(cls_row, grid_of(visual, images))
    return maps[:, None].expand(-1, T.shape[0], -1, -1).contiguous()
