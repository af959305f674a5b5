"""Grad-CAM (Selvaraju et al. 2017) with the usual ViT recipe, as in the Grad-ECLIP paper's baseline: activations
are the residual stream entering the last block (all tokens), the channel weights are the gradient of the image-text
cosine averaged over the tokens, and the map is ReLU(sum over channels of weight * activation) at the patches.
(The last block's *output* cannot serve: only its CLS token reaches the embedding, so its patch gradients are 0.)"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._vit import after_heads, after_mlp, attention_probs, batched_vjp, grid_of, last_block_input, merge_heads, \
    pooled_embedding, prompt_cotangents, qkv


@register("gradcam")
def gradcam(visual, images, T):
    """No options."""
    blocks = visual.transformer.resblocks
    last = blocks[-1]
    b = images.shape[0]
    x = last_block_input(visual, images)

    def embedding(x_in):  # [b, N, D] -> [b, d_embed], through the last block at the CLS query
        q, k, v = qkv(last, x_in)
        probs = attention_probs(last, q[:, :, :1], k)  # [b, H, 1, N]
        y = after_heads(last, x_in[:, :1], merge_heads(last, probs @ v))
        return pooled_embedding(visual, after_mlp(last, y)[:, 0])

    grads = batched_vjp(embedding, x, prompt_cotangents(T, b))  # [P, b, N, D]
    with torch.no_grad():
        weights = grads.mean(dim=2)  # [P, b, D]
        cam = F.relu(torch.einsum("pbd,bnd->bpn", weights, x[:, 1:]))
    return cam.reshape(b, T.shape[0], *grid_of(visual, images))
