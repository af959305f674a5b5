"""Raw attention: the last block's CLS-to-patch attention, averaged over heads (the same map for every prompt).
Attention-pooled towers (SigLIP): the pooling head's probe-to-patch attention, averaged over the pooling heads."""
from __future__ import annotations

import torch

from . import register
from ._vit import final_stream, last_block_input, patch_columns


@register("raw_attention", towers=("cls", "attn"))
def raw_attention(tower, images, T):
    """No options. Prompt-independent: the map is repeated for each prompt."""
    if tower.pool_head is not None:
        x = final_stream(tower, images)
        with torch.no_grad():
            cls_row = tower.probe_attention(x).mean(dim=1)  # [b, N]
    else:
        last = tower.blocks[-1]
        x = last_block_input(tower, images)
        with torch.no_grad():
            q, k, _ = last.qkv(x)
            cls_row = last.attention_probs(q[:, :, :1], k)[:, :, 0].mean(dim=1)  # [b, N]
    maps = patch_columns(cls_row, tower.grid_of(images))
    return maps[:, None].expand(-1, T.shape[0], -1, -1).contiguous()
