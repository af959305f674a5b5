"""LeGrad (Bousselham et al. 2024), on our forward and batched over images and prompts.

For each chosen block l: the image feature f_l = normalise(ln_post(mean over all tokens of block l's output) @ proj);
s_l = <t, f_l>; the map is ReLU(d s_l / d A_l), A_l block l's post-softmax attention probabilities [head, N, N],
averaged over heads and over all query rows, CLS key column dropped; summed over the chosen blocks.

Since s_l depends on A_l only through block l's attention output, d s_l / d A_l[h, i, j] = <g_i W_O,h, v_h[j]>, with
g_i = d s_l / d(attention output at token i) (after ls_1). g comes from one batched vector-Jacobian product through
block l's MLP and the pooling for all prompts at once; nothing is recomputed per prompt and no image is repeated.
Attention-pooled towers (SigLIP): the published SigLIP variant, see `_pooled_relevance` (its optional "correction"
with the embedding of an empty prompt is not applied).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from ._vit import batched_vjp, parse_layer_option, patch_columns, prompt_cotangents, trace

# Keep the [P, b, head, N, N] gradient below about this many elements per chunk of prompts.
_CHUNK_ELEMENTS = 1 << 26


@register("legrad", towers=("cls", "attn"), inner_norm=False)
def legrad(tower, images, T, layers=None):
    """Options: layers: None (default: the last two blocks, as the published code's layer_index=-2), "all", a
    layer string ("-4:") or a list of block indices."""
    blocks = tower.blocks
    L = len(blocks)
    chosen = parse_layer_option(layers, L, default=[L - 2, L - 1] if L >= 2 else [L - 1])
    traces = trace(tower, images, chosen)
    grid = tower.grid_of(images)
    total = None
    for l in chosen:
        t, block = traces[l], blocks[l]
        if tower.pool_head is not None:
            relevance = _pooled_relevance(tower, t.x_out, T)
        else:
            relevance = _layer_relevance(tower, block, t, T)  # [b, P, N]
        total = relevance if total is None else total + relevance
    return patch_columns(total, grid)


def _layer_relevance(tower, block, t, T) -> torch.Tensor:
    """[b, P, N]: block l's LeGrad relevance per key token, for every image and prompt."""
    b, H, N, dh = t.v.shape
    P = T.shape[0]

    def feature(m):  # [b, D] mean residual stream after block l -> [b, d_embed]
        return tower.pooled_embedding(m)

    with torch.no_grad():
        m = t.x_out.mean(dim=1)
    cot_m = batched_vjp(feature, m, prompt_cotangents(T, b))  # [P, b, D]
    ls1 = _gamma(block.scale_attn_gamma, t.y)
    w_g = ls1[:, None] * block.w_out  # d(heads_out) = d(y) * ls1 @ W_out
    gain = block.head_gain.reshape(1, 1, H, 1, 1) if block.head_gain is not None else None
    out = torch.empty(b, P, N, dtype=T.dtype, device=T.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * H * N * N, b * N * 4 * t.y.shape[-1]))
    tail = _MeanTail(block, t.y, t.hidden)
    for s in range(0, P, step):
        d_y = tail.vjp(cot_m[s:s + step])  # [p, b, N, D]
        g = (d_y @ w_g).reshape(-1, b, N, H, dh).transpose(2, 3)  # [p, b, H, N, dh]: at (probs @ v)
        if gain is not None:
            g = g * gain
        grad_a = g @ t.v.transpose(-1, -2).unsqueeze(0)  # [p, b, H, N(query), N(key)]
        out[:, s:s + step] = grad_a.clamp_(min=0).mean(dim=(2, 3)).transpose(0, 1)
    return out


def _pooled_relevance(tower, x, T) -> torch.Tensor:
    """[b, P, N]: LeGrad on an attention-pooled tower (the published SigLIP variant): the pooling head applied to block
    l's output tokens as they are (no final norm, as the published code does), s_l = <t, normalise(pooled)>, and
    ReLU(d s_l / d a) for the probe's attention a [G, N], averaged over the pooling heads."""
    b, N = x.shape[:2]
    G = tower.pool_head.n_heads
    x = x.detach()
    with torch.no_grad():
        a = tower.pool_head.probs(x)

    def feature(delta):
        return F.normalize(tower.attention_pooled(x, delta, normed=False, probs=a), dim=-1)

    zero = torch.zeros(b, G, N, dtype=x.dtype, device=x.device)
    grads = batched_vjp(feature, zero, prompt_cotangents(T, b))  # [P, b, G, N]
    return grads.clamp(min=0).mean(dim=2).transpose(0, 1)


def _gamma(g, like):
    return g if g is not None else torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)


class _MeanTail:
    """Vector-Jacobian products of y -> mean over tokens of (y + ls_2(mlp(ln_2(y)))) for many cotangents.

    The cotangent of every token's output is the same c / N, so the MLP's output matmul is done once per prompt
    ([P, b, 4D]) rather than per token; only (c W_out * act'(h)) W_in runs per token. Blocks of another structure
    (ln_2 not a LayerNorm, or an MLP other than Linear -> elementwise activation -> Linear) go through torch.func
    instead."""

    def __init__(self, block, y, hidden):
        self.block, self.y = block, y
        self.fast = block.norm_mlp_affine is not None and block.fc_in is not None
        if not self.fast:
            return
        ln_w, _, eps = block.norm_mlp_affine
        with torch.no_grad():
            mu = y.mean(dim=-1, keepdim=True)
            self.rstd = (y.var(dim=-1, unbiased=False, keepdim=True) + eps).rsqrt()
            self.yhat = (y - mu) * self.rstd
            self.ln_w = ln_w if ln_w is not None else torch.ones_like(mu[0, 0].expand(y.shape[-1]))
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)  # the trace's MLP pre-activation (kept when fc_in exists)
            self.act_grad = torch.autograd.grad(block.act(h).sum(), h)[0]  # elementwise activation: its derivative
        self.ls2 = _gamma(block.scale_mlp_gamma, y)

    def vjp(self, cot_m: torch.Tensor) -> torch.Tensor:
        block, y = self.block, self.y
        N = y.shape[1]
        if not self.fast:
            return batched_vjp(lambda v: block.after_mlp(v).mean(dim=1), y, cot_m)
        with torch.no_grad():
            c = cot_m / N  # [P, b, D], the cotangent of every token's output
            u = (c * self.ls2) @ block.fc_out.weight  # [P, b, 4D]
            dz = (u[:, :, None, :] * self.act_grad) @ block.fc_in.weight  # [P, b, N, D]
            dzh = dz * self.ln_w
            d_y = self.rstd * (dzh - dzh.mean(dim=-1, keepdim=True)
                               - self.yhat * (dzh * self.yhat).mean(dim=-1, keepdim=True))
            return d_y + c[:, :, None, :]
