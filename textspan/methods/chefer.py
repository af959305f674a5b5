"""Chefer, Gur and Wolf (ICCV 2021), generic attention-model explainability, for the image tower: R = I; for each
block l from `start_layer`, R <- R + mean_heads(ReLU(dS/dA_l * A_l)) @ R, with A_l the post-softmax attention and S
the image-text cosine; the map is R's CLS row over the patches.

dS/dA_l is the full derivative through every later block (attention included): the forward adds a zero tensor to
each block's probabilities and the gradients are taken with respect to those, for all prompts in one batched
backward (chunked over prompts to bound memory). Attention-pooled towers (SigLIP): the row is the pooling head's
mean_heads(ReLU(dS/da * a)) (a: its probe attention, differentiated like the blocks') times R."""
from __future__ import annotations

import torch

from . import register
from ._vit import patch_columns, prompt_cotangents, start_block, stream_before

_CHUNK_ELEMENTS = 1 << 27


@register("chefer")
def chefer(tower, images, T, start_layer: int = 0):
    """Options: start_layer (default 0, all blocks; -1 is the last block only, the CLIP notebook's image default)."""
    blocks = tower.blocks
    L = len(blocks)
    start = start_block(start_layer, L)
    b, P = images.shape[0], T.shape[0]
    x0 = stream_before(tower, images, start)
    with torch.no_grad():
        N = x0.shape[1]
        H = tower.n_heads
        zeros = tuple(torch.zeros(b, H, N, N, dtype=x0.dtype, device=x0.device) for _ in range(start, L))
        pooled = tower.pool_head is not None
        if pooled:
            zeros = zeros + (torch.zeros(b, tower.pool_head.n_heads, N, dtype=x0.dtype, device=x0.device),)
    probs = []
    pool_probs = []

    def embedding(*deltas):
        x = x0
        for block, delta in zip(blocks[start:], deltas):
            t = block.forward(x, delta)
            probs.append(t.probs.detach())
            x = t.x_out
        if pooled:
            with torch.no_grad():
                pool_probs.append(tower.pool_head.probs(tower.norm_final(x)).detach())
            return torch.nn.functional.normalize(tower.attention_pooled(x, deltas[-1]), dim=-1)
        return tower.pooled_embedding(x[:, 0])

    _, vjp_fn = torch.func.vjp(embedding, *zeros)
    cot = prompt_cotangents(T, b)
    step = max(1, _CHUNK_ELEMENTS // max(1, (L - start) * b * H * N * N))
    eye = torch.eye(N, dtype=x0.dtype, device=x0.device)
    out = torch.empty(b, P, N, dtype=x0.dtype, device=x0.device)
    with torch.no_grad():
        for s in range(0, P, step):
            grads = torch.func.vmap(vjp_fn)(cot[s:s + step])  # per block: [p, b, H, N, N]
            R = eye.expand(grads[0].shape[0], b, N, N)
            for A, g in zip(probs, grads):
                cam = (g * A).clamp(min=0).mean(dim=2)  # [p, b, N, N]
                R = R + cam @ R
            if pooled:  # the probe's row: [p, b, N] @ R
                cam = (grads[-1] * pool_probs[0]).clamp(min=0).mean(dim=2)
                out[:, s:s + step] = (cam[:, :, None] @ R)[:, :, 0].transpose(0, 1)
            else:
                out[:, s:s + step] = R[:, :, 0].transpose(0, 1)
    return patch_columns(out, tower.grid_of(images))
