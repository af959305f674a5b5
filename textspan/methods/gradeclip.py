"""Grad-ECLIP (Zhao et al., ICML 2024) on the last block.

g = d cos(image, text) / d o_CLS, o the last block's attention output before out_proj (heads concatenated);
a_j = cosine of the CLS query with patch j's key over the full model width (the "loosened" attention: no softmax,
no heads), min-max normalised over the patches; map_j = ReLU(sum_c g_c v_j,c a_j), v_j patch j's value vector
(in_proj bias included). Only the CLS row of o reaches the embedding, so g is one batched vector-Jacobian product
through the last block's out_proj, MLP and pooling, for all prompts at once.

By default the forward goes through the model's own heads (the model's output is unchanged). The published notebook
recomputes the last block's attention as a single head as wide as the model (softmax(q k^T / sqrt(d_model))), which
changes the embedding and so g; ``single_head=True`` does the same (and resamples positional embeddings without
antialiasing, as the notebook does), to reproduce the published maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._vit import grad_at_cls_output, last_block_input


@register("gradeclip", towers=("cls",))
def gradeclip(tower, images, T, single_head: bool = False):
    """Options: single_head (default False; True reproduces the published notebook's one-wide-head last block)."""
    last = tower.blocks[-1]
    b = images.shape[0]
    x = last_block_input(tower, images, antialias=not single_head)
    with torch.no_grad():
        q, k, v = last.qkv(x)  # [b, H, N, d_head]
        if last.rope is not None:  # EVA: the query-key similarity with the rotary embeddings the attention uses
            q, k = last.rope(q), last.rope(k)
        _, H, N, dh = q.shape
        q_full = q.transpose(1, 2).reshape(b, N, H * dh)  # [b, N, D]
        k_full = k.transpose(1, 2).reshape(b, N, H * dh)
        v_full = v.transpose(1, 2).reshape(b, N, H * dh)
        if single_head:
            probs = (q_full @ k_full.transpose(-1, -2) * (q_full.shape[-1] ** -0.5)).softmax(dim=-1)
            o_cls = (probs[:, :1] @ v_full)[:, 0]  # [b, D]
        else:
            probs = last.attention_probs(q[:, :, :1], k)  # [b, H, 1, N]
            o_cls = last.merge_heads(probs @ v)[:, 0]
    g = grad_at_cls_output(tower, x, o_cls, T)  # [P, b, D]
    with torch.no_grad():
        cos = (F.normalize(q_full[:, :1], dim=-1) * F.normalize(k_full[:, 1:], dim=-1)).sum(-1)  # [b, N - 1]
        lo, hi = cos.amin(dim=-1, keepdim=True), cos.amax(dim=-1, keepdim=True)
        a = (cos - lo) / (hi - lo)
        # sum_c g_c * v_jc * a_j, in the notebook's order of operations
        maps = torch.einsum("pbc,bjc->bpj", g, v_full[:, 1:]) * a[:, None]
        maps = F.relu(maps)
    return maps.reshape(b, T.shape[0], *tower.grid_of(images))
