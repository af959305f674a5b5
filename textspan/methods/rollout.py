"""Attention rollout (Abnar and Zuidema 2020): per block, the head-averaged attention plus the identity, rows
renormalised; multiplied through the blocks (R = A_L ... A_s); the map is R's CLS row over the patches. Prompt-
independent: the same map for every prompt. Attention-pooled towers (SigLIP): the row is the pooling head's probe
attention (averaged over its heads) times R."""
from __future__ import annotations

import torch

from . import register
from ._vit import patch_columns, start_block


@register("rollout", towers=("cls", "attn"))
def rollout(tower, images, T, start_layer: int = 0):
    """Options: start_layer (default 0; negative counts from the end): the first block taken into the product."""
    start = start_block(start_layer, tower.n_layers)
    with torch.no_grad():
        x = tower.embed(images)
        R = None
        for l, block in enumerate(tower.blocks):
            t = block.forward(x)  # t.probs: [b, H, N, N]
            if l >= start:
                A = t.probs.mean(dim=1) + torch.eye(t.probs.shape[-1], dtype=t.probs.dtype, device=t.probs.device)
                A = A / A.sum(dim=-1, keepdim=True)
                R = A if R is None else A @ R
            x = t.x_out
        if tower.pool_head is not None:
            probe = tower.probe_attention(x).mean(dim=1)  # [b, N]
            row = (probe[:, None] @ R)[:, 0]
        else:
            row = R[:, 0]
    maps = patch_columns(row, tower.grid_of(images))
    return maps[:, None].expand(-1, T.shape[0], -1, -1).contiguous()
