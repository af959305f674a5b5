"""Grad-CAM (Selvaraju et al. 2017) with the usual ViT recipe, as in the Grad-ECLIP paper's baseline: activations
are the residual stream entering the last block (all tokens), the channel weights are the gradient of the image-text
cosine averaged over the tokens, and the map is ReLU(sum over channels of weight * activation) at the patches.
(The last block's *output* cannot serve: only its CLS token reaches the embedding, so its patch gradients are 0.)
Attention-pooled towers (SigLIP): the same, with the gradient through the last block at every token and the pooling
head; every token is a patch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._vit import batched_vjp, last_block_input, prompt_cotangents


@register("gradcam")
def gradcam(tower, images, T):
    """No options."""
    last = tower.blocks[-1]
    b = images.shape[0]
    x = last_block_input(tower, images)

    def pooled(x_in):  # [b, N, D] -> [b, d_embed], through the last block and the pooling head
        return F.normalize(tower.attention_pooled(last.forward(x_in).x_out), dim=-1)

    def embedding(x_in):  # [b, N, D] -> [b, d_embed], through the last block at the CLS query
        q, k, v = last.qkv(x_in)
        probs = last.attention_probs(q[:, :, :1], k)  # [b, H, 1, N]
        y = last.after_heads(x_in[:, :1], last.merge_heads(probs @ v))
        return tower.pooled_embedding(last.after_mlp(y)[:, 0])

    fn = pooled if tower.pool_head is not None else embedding
    grads = batched_vjp(fn, x, prompt_cotangents(T, b))  # [P, b, N, D]
    with torch.no_grad():
        weights = grads.mean(dim=2)  # [P, b, D]
        cam = F.relu(torch.einsum("pbd,bnd->bpn", weights, x[:, tower.n_prefix:]))
    return cam.reshape(b, T.shape[0], *tower.grid_of(images))
