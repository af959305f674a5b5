"""Chefer, Gur and Wolf (ICCV 2021), generic attention-model explainability, for the image tower: R = I; for each
block l from `start_layer`, R <- R + mean_heads(ReLU(dS/dA_l * A_l)) @ R, with A_l the post-softmax attention and S
the prompt's score; the map is R's CLS row over the patches.

Defaults follow the published CLIP notebook (Transformer-MM-Explainability, `interpret`): S is the **logit**, the
cosine times the model's own exp(logit_scale), and only the **last block** is used (``start_layer=-1``).
``target="cosine"`` differentiates the cosine; ``start_layer=0`` takes every block (the two are not proportional
then: R = R + cam @ R is not linear in the scale of S).

Last block only (the default, CLS towers): only the CLS query's output reaches the embedding, so dS/dA is zero off
the CLS row and the map is mean_heads(ReLU(g_h . v_h,j * A_h[0, j])), g_h the gradient at head h's CLS attention
output: one batched vector-Jacobian product through out_proj, the MLP and the pooling for all prompts, no pass
through the other blocks' attention maps. More blocks: dS/dA_l is the full derivative through every later block
(attention included): the forward adds a zero tensor to each block's probabilities and the gradients are taken with
respect to those, for all prompts in one batched backward (chunked over prompts to bound memory). Attention-pooled
towers (SigLIP): the row is the pooling head's mean_heads(ReLU(dS/da * a)) (a: its probe attention, differentiated
like the blocks') times R.
"""
from __future__ import annotations

import torch

from ..errors import BadInputError
from . import register
from ._vit import grad_at_cls_output, last_block_input, patch_columns, prompt_cotangents, start_block, stream_before

_CHUNK_ELEMENTS = 1 << 27
TARGETS = ("logit", "cosine")


@register("chefer", towers=("cls", "attn"))
def chefer(tower, images, T, start_layer: int = -1, target: str = "logit"):
    """Options: start_layer (default -1: the last block only, the CLIP notebook's default; 0: all blocks),
    target ("logit", default: the cosine times the model's exp(logit_scale), as the notebook; or "cosine")."""
    if target not in TARGETS:
        raise BadInputError(f"target={target!r}: one of {', '.join(TARGETS)}")
    scale = 1.0
    if target == "logit":
        if tower.score_scale is None:
            raise BadInputError("target='logit' needs the model's logit scale: pass the whole CLIP model (not its "
                                "image tower), or target='cosine'")
        scale = tower.score_scale
    blocks = tower.blocks
    L = len(blocks)
    start = start_block(start_layer, L)
    if start == L - 1 and tower.pool_head is None and tower.query == "cls":
        return _last_block(tower, images, T * scale)
    return _through_blocks(tower, images, T * scale, start)


def _last_block(tower, images, T):
    """The last block only, at the CLS row (see the module doc)."""
    last = tower.blocks[-1]
    b = images.shape[0]
    x = last_block_input(tower, images)
    with torch.no_grad():
        q, k, v = last.qkv(x)  # [b, H, N, d_head]
        probs = last.attention_probs(q[:, :, :1], k)  # [b, H, 1, N]
        o_cls = last.merge_heads(probs @ v)[:, 0]  # [b, D], head scale applied
    g = grad_at_cls_output(tower, x, o_cls, T)  # [P, b, D]: dS / d(heads_out at CLS)
    with torch.no_grad():
        P, H, dh = T.shape[0], last.n_heads, v.shape[-1]
        g = g.view(P, b, H, dh)
        if last.head_gain is not None:
            g = g * last.head_gain.reshape(1, 1, H, 1)
        grad_a = torch.einsum("pbhk,bhnk->pbhn", g, v)  # dS / dA[h, 0, n]
        cam = (grad_a * probs[:, :, 0][None]).clamp(min=0).mean(dim=2)  # [P, b, N]
    return patch_columns(cam.transpose(0, 1), tower.grid_of(images))


def _through_blocks(tower, images, T, start):
    blocks = tower.blocks
    L = len(blocks)
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
                pool_probs.append(tower.probe_attention(x).detach())
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
