"""LRP (layer-wise relevance propagation) through the ViT with the rules of the published transformer LRP baseline
(Chefer, Gur and Wolf, CVPR 2021, hila-chefer/Transformer-Explainability: `baselines/ViT/ViT_orig_LRP.py` with
`modules/layers_lrp.py`, `LRP.generate_LRP(method="full")`, alpha = 1), on CLIP's image tower with the prompt as the
classifier head.

The rules, as that code applies them (every rule is linear in the relevance R, so all prompts propagate together):
- Linear (alpha 1, beta 0; the bias takes no relevance): with x+ = max(x, 0), x- = min(x, 0), W+ and W- likewise,
  R_in = x+ * ((R / (x+ W+ + x- W-)) W+) + x- * ((R / (2 x- W-)) W-); the second denominator is 2 x- W- as
  published (``Z2 + Z2``).
- Divisions are the published ``safe_divide``: a / (b + 1e-9), and 0 where b == 0.
- Add (x1 + x2): R_i = x_i * R / (x1 + x2); a copy of x used twice (Clone) gets x * (R1 / x + R2 / x).
- attention out = A V per head (einsum): R_A = A * ((R / (A V)) V^T) / 2, R_V = V * (A^T (R / (A V))) / 2; the
  softmax passes R_A unchanged to the logits, then Q K^T (unscaled): R_Q = Q * ((R_A / (Q K^T)) K) / 2 and
  R_K = K * ((R_A / (Q K^T))^T Q) / 2.
- LayerNorm, GELU, softmax, dropout and (here) layer scale, head scale, qk-norm, cosine attention's normalisation
  and the embedding's normalisation: R passes unchanged (Q and K above are the normed ones where a block norms them).
- Pooling the CLS token of the final norm's output n: R_n = n * R / n at CLS, 0 elsewhere.
- The input: R at the first block's input, through ``x + pos`` (Add), the patch tokens' part through the patch
  convolution with the z^B rule bounded by each image's smallest and largest input value, summed over channels.

CLIP's head: the score <e_hat, t> is a bias-free Linear from the normalised embedding e_hat with weight t (relevance
1 there, as the published one-hot), then ``proj`` (a bias-free Linear from ln_post's CLS output). The published
code returns a pixel map; textspan's map is its sum over each patch's pixels (the z^B rule's conservation, written
per patch), on the patch grid like every method. `partial_lrp` (its own file) stops at the last block's attention.

Refused: blocks whose MLP is not Linear -> activation -> Linear (gated MLPs: the published rules name no such layer);
attention-pooled and average-pooled towers.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from . import register

EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    den = b.clamp(min=EPS) + b.clamp(max=EPS)
    den = den + den.eq(0).to(den.dtype) * EPS
    return a / den * b.ne(0).to(b.dtype)


def linear_rule(R: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Relevance at a bias-free Linear's input x [..., in] from R [..., out] (weight w [out, in]), alpha 1."""
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    px, nx = x.clamp(min=0), x.clamp(max=0)
    z1, z2 = F.linear(px, pw), F.linear(nx, nw)
    return px * (safe_divide(R, z1 + z2) @ pw) + nx * (safe_divide(R, z2 + z2) @ nw)


def check_lrp(tower, what: str) -> None:
    for block in tower.blocks:
        if block.fc_in is None:
            raise UnsupportedModelError(
                f"{what} has rules for a Linear -> activation -> Linear MLP; this tower's blocks have another MLP")


class _Saved:
    """What the rules read of one block's forward (batch first; per-head tensors [b, head, N, d_head])."""

    def __init__(self, block, x):
        self.x = x
        self.a = block.norm_attn(x)
        self.q, self.k, self.v = block.qkv_normed(self.a)
        self.probs = block.attention_probs(self.q, self.k)
        self.qn, self.kn = block.logit_operands(self.q, self.k)  # what the logits multiply (unscaled)
        self.o = self.probs @ self.v
        self.heads = block.merge_heads(self.o)
        self.attn_out = block.scale_attn(F.linear(self.heads, block.w_out, block.b_out))
        self.y = x + self.attn_out
        self.m = block.norm_mlp(self.y)
        self.g = block.act(block.fc_in(self.m))
        self.mlp_out = block.scale_mlp(block.fc_out(self.g))
        self.x_out = self.y + self.mlp_out


def forward_saved(tower, images) -> tuple:
    """(tokens before the position add [b, N, D], positions [N, D], per-block `_Saved`), no autograd."""
    with torch.no_grad():
        tok, pos = tower.embed_parts(images)
        x = tower.norm_pre(tok + pos)
        saved: List[_Saved] = []
        for block in tower.blocks:
            s = _Saved(block, x)
            saved.append(s)
            x = s.x_out
    return tok, pos, saved


def head_relevance(tower, x_final: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """[P, b, N, D]: relevance at the last block's output, from relevance 1 at each prompt's score."""
    with torch.no_grad():
        n = tower.norm_final(x_final[:, 0])  # [b, D]
        e = n @ tower.projection if tower.projection is not None else n
        e_hat = F.normalize(e, dim=-1)
        # the text head (weight T: one output per prompt), from the published one-hot relevance at each prompt
        one_hot = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)[:, None].expand(-1, e_hat.shape[0], -1)
        R = linear_rule(one_hot, e_hat, T)  # [P, b, d]
        if tower.projection is not None:
            R = linear_rule(R, n, tower.projection.t())
        R = n * safe_divide(R, n)  # the CLS selection
        out = torch.zeros(T.shape[0], *x_final.shape, dtype=x_final.dtype, device=x_final.device)
        out[:, :, 0] = R
    return out


def block_relevance(block, s: _Saved, R: torch.Tensor, stop_at_attention: bool = False,
                    cls_only: bool = False) -> torch.Tensor:
    """Relevance at the block's input from R [P, b, N, D] at its output; with ``stop_at_attention``, the relevance
    of the attention probabilities instead ([P, b, head, rows, N], after the published halving). ``cls_only``: R is
    zero but at the CLS token (the last block), so the token-wise rules run on that row only; the result is the same
    as on every row (the other rows' relevance is 0 exactly)."""
    r = slice(0, 1) if cls_only else slice(None)
    y, mlp_out, x, attn_out = s.y[:, r], s.mlp_out[:, r], s.x[:, r], s.attn_out[:, r]
    R = R[..., r, :]
    S = safe_divide(R, y + mlp_out)
    R_y, R_m = y * S, mlp_out * S
    R_m = linear_rule(linear_rule(R_m, s.g[:, r], block.fc_out.weight), s.m[:, r], block.fc_in.weight)
    R = y * (safe_divide(R_y, y) + safe_divide(R_m, y))
    S = safe_divide(R, x + attn_out)
    R_x, R_a = x * S, attn_out * S
    R_h = linear_rule(R_a, s.heads[:, r], block.w_out)  # [P, b, rows, D]
    R_o = R_h.unflatten(-1, (block.n_heads, -1)).transpose(-3, -2)  # [P, b, H, rows, dh]
    S = safe_divide(R_o, s.o[:, :, r])
    probs = s.probs[:, :, r]
    R_attn = probs * (S @ s.v.transpose(-1, -2)) / 2
    if stop_at_attention:
        return R_attn
    R_v = s.v * (probs.transpose(-1, -2) @ S) / 2
    qn = s.qn[:, :, r]
    S = safe_divide(R_attn, qn @ s.kn.transpose(-1, -2))
    R_q = qn * (S @ s.kn) / 2
    R_k = s.kn * (S.transpose(-1, -2) @ qn) / 2
    merge = lambda t: t.transpose(-3, -2).flatten(-2)  # noqa: E731  [.., H, N, dh] -> [.., N, H * dh]
    R_q, R_k, R_v = merge(R_q), merge(R_k), merge(R_v)
    if cls_only:  # back to every row: the others hold no relevance
        R_q = torch.cat([R_q, R_q.new_zeros(*R_q.shape[:-2], s.x.shape[1] - 1, R_q.shape[-1])], dim=-2)
        R_x = torch.cat([R_x, R_x.new_zeros(*R_x.shape[:-2], s.x.shape[1] - 1, R_x.shape[-1])], dim=-2)
    R_an = linear_rule(torch.cat([R_q, R_k, R_v], dim=-1), s.a, block.w_in)
    return s.x * (safe_divide(R_x, s.x) + safe_divide(R_an, s.x))


def patch_relevance(tower, images, tok, pos, R) -> torch.Tensor:
    """[P, b, gh, gw]: R [P, b, N, D] at the first block's input, through the position add and the patch
    convolution's z^B rule, summed over each patch's pixels and channels."""
    with torch.no_grad():
        R_tok = tok * safe_divide(R, tok + pos)
        R_p = R_tok[..., tower.n_prefix:, :]  # [P, b, gh * gw, D]
        w = tower.weight  # [D, 3, ph, pw]
        lo = images.amin(dim=(1, 2, 3))  # [b]
        hi = images.amax(dim=(1, 2, 3))
        z = tower.patch_embed(images).flatten(2).transpose(1, 2)  # [b, gh * gw, D] (no bias: CLIP's convolution)
        if getattr(tower.patch_embed, "bias", None) is not None:
            z = z - tower.patch_embed.bias
        sum_pw = w.clamp(min=0).sum(dim=(1, 2, 3))  # [D]
        sum_nw = w.clamp(max=0).sum(dim=(1, 2, 3))
        base = z - (lo[:, None, None] * sum_pw + hi[:, None, None] * sum_nw)  # [b, gh * gw, D]
        per_patch = (R_p / (base + EPS) * base).sum(dim=-1)  # the z^B relevance summed over the patch's pixels
    return per_patch.reshape(*per_patch.shape[:2], *tower.grid_of(images))


@register("lrp", towers=("cls",), inner_norm=False)
def lrp(tower, images, T):
    """No options (alpha 1, the published setting)."""
    check_lrp(tower, "lrp")
    tok, pos, saved = forward_saved(tower, images)
    with torch.no_grad():
        R = head_relevance(tower, saved[-1].x_out, T)
        for i, (block, s) in enumerate(zip(reversed(tower.blocks), reversed(saved))):
            R = block_relevance(block, s, R, cls_only=i == 0)  # the last block: relevance at CLS only
    return patch_relevance(tower, images, tok, pos, R).transpose(0, 1)
