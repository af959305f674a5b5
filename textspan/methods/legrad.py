"""LeGrad (Bousselham et al. 2024), on our forward and batched over images and prompts.

For each chosen block l: the image feature f_l = normalise(ln_post(mean over all tokens of block l's output) @ proj);
s_l = <t, f_l>; the map is ReLU(d s_l / d A_l), A_l block l's post-softmax attention probabilities [head, N, N],
averaged over heads and over all query rows, CLS key column dropped; summed over the chosen blocks.

Since s_l depends on A_l only through block l's attention output, d s_l / d A_l[h, i, j] = <g_i W_O,h, v_h[j]>, with
g_i = d s_l / d(attention output at token i) (after ls_1). g comes from one batched vector-Jacobian product through
block l's MLP and the pooling for all prompts at once; nothing is recomputed per prompt and no image is repeated.
"""
from __future__ import annotations

import torch

from ..decomposition import _attention_parts
from . import register
from ._vit import batched_vjp, grid_of, parse_layer_option, patch_columns, prompt_cotangents, trace

# Keep the [P, b, head, N, N] gradient below about this many elements per chunk of prompts.
_CHUNK_ELEMENTS = 1 << 26


@register("legrad")
def legrad(visual, images, T, layers=None):
    """Options: layers: None (default: the last two blocks, as the published code's layer_index=-2), "all", a
    layer string ("-4:") or a list of block indices."""
    blocks = visual.transformer.resblocks
    L = len(blocks)
    chosen = parse_layer_option(layers, L, default=[L - 2, L - 1] if L >= 2 else [L - 1])
    traces = trace(visual, images, chosen)
    b, P = images.shape[0], T.shape[0]
    grid = grid_of(visual, images)
    total = None
    for l in chosen:
        t, block = traces[l], blocks[l]
        relevance = _layer_relevance(visual, block, t, T)  # [b, P, N]
        total = relevance if total is None else total + relevance
    return patch_columns(total, grid)


def _layer_relevance(visual, block, t, T) -> torch.Tensor:
    b, H, N, dh = t.v.shape
    P = T.shape[0]
    p = _attention_parts(block)

    def feature(y):  # [b, N, D] -> [b, d_embed]
        x = y + block.ls_2(block.mlp(block.ln_2(y)))
        e = visual.ln_post(x.mean(dim=1))
        e = e @ visual.proj if visual.proj is not None else e
        return torch.nn.functional.normalize(e, dim=-1)

    d_y = batched_vjp(feature, t.y, prompt_cotangents(T, b))  # [P, b, N, D]
    d_attn = block.ls_1(d_y)  # layer scale is elementwise: its vjp is itself
    g = d_attn @ p["w_out"]  # [P, b, N, D]: gradient at the input of out_proj
    g = g.reshape(P, b, N, H, dh).permute(0, 1, 3, 2, 4)  # [P, b, H, N, dh]: per head, at (probs @ v)
    if p["head_scale"] is not None:
        g = g * p["head_scale"].reshape(1, 1, H, 1, 1)
    out = torch.empty(b, P, N, dtype=T.dtype, device=T.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * H * N * N))
    for s in range(0, P, step):
        grad_a = g[s:s + step] @ t.v.transpose(-1, -2).unsqueeze(0)  # [p, b, H, N(query), N(key)]
        out[:, s:s + step] = grad_a.clamp_(min=0).mean(dim=(2, 3)).transpose(0, 1)
    return out
