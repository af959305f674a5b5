"""CLIP Surgery (Li et al. 2023) as its published code computes it (xmed-lab/CLIP_Surgery: `clip_surgery_model.py`,
`clip.py`; the Grad-ECLIP repository's `clip_surgery_map` calls the same functions).

Architecture surgery: the last `surgery_layers` blocks (6 in the published code) run a second path beside the
model's own. Both use the own path's q, k, v (from ``ln_1`` of the own path); the new path adds, per block, only
``out_proj(softmax(v v^T / sqrt(d_head)) @ v)`` (v-v attention, per head, no MLP), starting from the stream
entering the first of those blocks. The features are ``proj(ln_post(.))`` of the new path's tokens, the CLS token
taken from the own path, divided by their norm over the *tokens* (as the published demo and ``clip_surgery_map`` do).

Feature surgery (``clip_feature_surgery``): per token i and text p, s[i, p] = sum_c (f_i,c t_p,c w_p - mean over the
texts of the same), w = softmax(2 f_0 . t) / its mean over the texts, from the CLS token's feature f_0 and the same
for every token (as published): the feature shared by all texts is removed.
The texts are the prompts plus `redundant_texts` (the published evaluation adds 59 PASCAL-Context class names); the
map of each prompt is s over the patches, before the published min-max and upsampling.

One prompt alone (and no redundant texts) gives all zeros, so it is refused. Layer scale and head scale are the
model's own; positions of other input sizes are resampled as for every textspan method (the published code resizes
them bilinearly, in place).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import BadInputError
from . import register
from ._vit import stream_before


@register("clip_surgery", towers=("cls",))
def clip_surgery(tower, images, T, redundant_texts: Optional[torch.Tensor] = None,
                 surgery_layers: Optional[int] = None):
    """Options: redundant_texts ([M, d_embed] more text embeddings whose shared feature is removed too, e.g. the
    embeddings of background class names), surgery_layers (default: 6, the published number, or every block of a
    shallower model: the last blocks given the v-v path)."""
    texts = T
    if redundant_texts is not None:
        R = torch.as_tensor(redundant_texts).to(device=T.device, dtype=T.dtype)
        if R.ndim != 2 or R.shape[1] != T.shape[1]:
            raise BadInputError(f"redundant_texts must be [M, {T.shape[1]}]; got {tuple(R.shape)}")
        texts = torch.cat([T, R], dim=0)
    if texts.shape[0] < 2:
        raise BadInputError("clip_surgery removes the feature shared by the texts, so one text gives all zeros: pass "
                            "at least two prompts or redundant_texts")
    L = tower.n_layers
    n = min(6, L) if surgery_layers is None else int(surgery_layers)
    if not 1 <= n <= L:
        raise BadInputError(f"surgery_layers={surgery_layers} must be between 1 and the model's {L} layers")
    with torch.no_grad():
        x = stream_before(tower, images, L - n)
        new = x
        for block in tower.blocks[L - n:]:
            q, k, v = block.qkv(x)  # the own path's q, k, v
            probs = block.attention_probs(q, k)
            vv = (v @ v.transpose(-1, -2) * (v.shape[-1] ** -0.5)).softmax(dim=-1)
            new = block.after_heads(new, block.merge_heads(vv @ v))  # v-v path: attention only, no MLP
            x = block.after_mlp(block.after_heads(x, block.merge_heads(probs @ v)))
        tokens = torch.cat([x[:, :1], new[:, 1:]], dim=1)  # CLS from the own path
        f = tower.pool(tokens)  # ln_post, proj per token: [b, N, d_embed]
        f = f / f.norm(dim=1, keepdim=True)  # over the tokens, as published
        # feature surgery: one weight per text from the CLS token's similarities (the published
        # `clip_feature_surgery` computes `prob` from image_features[:, :1]), applied to every token
        prob = (2 * (f[:, :1] @ texts.t())).softmax(dim=-1)  # [b, 1, n_texts]
        w = prob / prob.mean(dim=-1, keepdim=True)
        # sum_c (f_ic t_pc w_p - mean_q f_ic t_qc w_q) = w_p (f_i . t_p) - mean_q w_q (f_i . t_q): no
        # [b, N, n_texts, d_embed] product is made
        sim = (f @ texts.t()) * w  # [b, N, n_texts]
        s = sim - sim.mean(dim=-1, keepdim=True)
    P = T.shape[0]
    b = images.shape[0]
    return s[:, 1:, :P].transpose(1, 2).reshape(b, P, *tower.grid_of(images))
