"""MaskCLIP (Zhou, Loy and Dai, ECCV 2022) as the Grad-ECLIP repository's baseline computes it (`generate_emap.py`,
`clip_encode_dense` and `mask_clip`): the last block's value path applied to every token, its output compared with
the prompt, weighted by how similar each patch's key is to the CLS token's key.

    v_final_j = proj(ln_post(y_j + ls_2(mlp(ln_2(y_j))))),  y_j = x_j + ls_1(out_proj(v_j))
    map_j = cos(v_final_j, t) * cos(out_proj(k_CLS), out_proj(k_j))

with x the residual stream entering the last block, v_j and k_j patch j's value and key from the last block's
in_proj (biases included; keys before any qk-norm), out_proj with its bias (applied to the keys too, as the published
code does). No ReLU: the raw map can be negative. Layer scale is the model's own (the published code runs OpenAI
CLIP, which has none). No gradient: one forward to the last block and a few products.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._vit import last_block_input


@register("maskclip", towers=("cls",), inner_norm=False)
def maskclip(tower, images, T):
    """No options."""
    last = tower.blocks[-1]
    b = images.shape[0]
    x = last_block_input(tower, images)
    with torch.no_grad():
        q, k, v = last.qkv(x)  # [b, H, N, d_head]
        y = last.after_heads(x, last.merge_heads(v))  # the value path at every token, with the residual
        out = last.after_mlp(y)[:, 1:]  # [b, N - 1, D]
        v_final = F.normalize(tower.pool(out), dim=-1)  # ln_post and proj per token: [b, N - 1, d_embed]
        cos_v = v_final @ T.t()  # [b, N - 1, P]
        k_full = k.transpose(1, 2).reshape(b, k.shape[2], -1)  # [b, N, D], heads concatenated
        k_out = F.normalize(F.linear(k_full, last.w_out, last.b_out), dim=-1)
        cos_k = (k_out[:, :1] * k_out[:, 1:]).sum(dim=-1)  # [b, N - 1]
        maps = cos_v * cos_k[..., None]
    return maps.transpose(1, 2).reshape(b, T.shape[0], *tower.grid_of(images))
