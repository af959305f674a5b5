"""Second-order effects of MLP neurons (Gandelsman, Efros & Steinhardt, ICLR 2025), exact, on stock models.

Neuron n of the MLP of block l writes, at every token t, ``u[t, n] = p[t, n] c_n + b / W`` into the residual stream
(p the post-activation, c_n the n-th column of the MLP's output projection times the block's layer scale, b its bias
likewise, W the MLP width). Its **second-order effect** is what the attention heads of the later blocks carry of it to
the pooled query (CLS, or the mean of the patch queries on average-pooled towers) and on into the embedding, each
norm frozen at the image's own statistics, with the published shares of the means and biases
(second_order_lens: ``prs_second_order_neurons_hook.py``, summed over the later blocks j > l and their heads h as
``compute_second_order_neuron_prs.py`` does). With K_j = 1 + 2 j the residual components entering block j,
K = 1 + 2 L, H heads:

    z[t, n]  = g1 * (u[t, n] - mu1[t] / (K_j W)) / s1[t] + beta1 / (K_j W)         ln_1 of block j, frozen per token
    y[n]     = sum_t A_h[t] (V_h z[t, n] + bv_h / (K_j W))                         the head's value map, CLS row A_h
    o[n]     = ls1 * (O_h y[n] + bo / (K_j H W))                                     out_proj (head h's columns)
    e2[j,h,n] = (gp * (o[n] - mup / (K_j K H W)) / sp + betap / (K_j K H W)) @ P / ||e||   ln_post frozen at CLS

and the effect is ``sum_{j>l, h} e2[j, h, n]`` ([b, W, d']). The published code multiplies by a constant 100; textspan
reports the effect without it. The **first-order (direct)** effect is the neuron's own term at the pooled token,
``(gp * (u[0, n] - mup / (K W)) / sp + betap / (K W)) @ P / ||e||``; summed over the neurons it is the
decomposition's MLP term of block l (tested).

The arithmetic follows from linearity: p[t, n] enters e2 only through ``a[j, h, n] = sum_t A_h[t] p[t, n] / s1[t]``
(N x W per head), times an image-independent direction ``G[j, h] c_n`` (G = P^T diag(gp ls1) O_h V_h diag(g1),
[d', d_model]), divided by sp; everything else is the same for every neuron of the image. So a layer's effects cost
one forward, the [N, W] products per later head, and [W, d'] per later head and image; no [N, W, d_model] tensor is
made. The published hook materialises [b, N, W, d_model] per head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ._repr import concise
from .engine import Tower, UnsupportedModelError, read_tower
from .errors import BadInputError


@concise
@dataclass
class NeuronEffects:
    """second_order [b, W, d'] (summed over the later heads), first_order [b, W, d'], per_head [b, L - l - 1, H, W, d']
    (when asked), the layer, and the image's embedding norm [b]."""

    layer: int
    second_order: torch.Tensor
    first_order: torch.Tensor
    per_head: Optional[torch.Tensor]
    norm: torch.Tensor


@dataclass
class _Trace:
    """What one forward leaves for the neurons of block `layer`."""

    post: torch.Tensor  # [b, N, W] post-activation of block `layer`'s MLP
    later: List[dict]  # per later block j: A [b, H, N] (pooled query's row), mu1 [b, N], s1 [b, N]
    pooled_mu: torch.Tensor  # [b]
    pooled_sigma: torch.Tensor  # [b]
    norm: torch.Tensor  # [b] ||e||
    pooled_post: torch.Tensor  # [b, W] post-activation at the pooled token (CLS, or the patches' mean)


def check_neuron_layer(tower: Tower, layer: int) -> int:
    """The layer index (negative counts from the end), refused with the reason when out of range, without later
    heads, or when the tower is not one textspan reads neurons of."""
    L = tower.n_layers
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise BadInputError(f"layer must be an integer; got {layer!r}")
    idx = layer + L if layer < 0 else layer
    if not 0 <= idx < L:
        raise BadInputError(f"layer {layer} is out of range: this tower has {L} blocks (0 .. {L - 1}, or -{L} .. -1)")
    if idx == L - 1:
        raise BadInputError(f"layer {layer} is the last block: no later attention head carries its neurons' output "
                            f"(second-order effects need a layer before {L - 1})")
    if tower.pool_head is not None:
        raise UnsupportedModelError("neuron effects follow the pooled query through the later heads; attention-pooled "
                                    f"towers ({tower.family}) are not supported yet")
    for j, block in enumerate(tower.blocks):
        if block.fc_in is None or block.act is None or block.fc_out is None:
            raise UnsupportedModelError(f"block {j}'s MLP is not Linear -> activation -> Linear (gated MLPs are not "
                                        f"supported for neurons yet)")
        if j > idx and (block.norm_attn_affine is None or block.mixes_heads):
            raise UnsupportedModelError(f"block {j} has no LayerNorm before its attention, or a norm after its heads "
                                        f"(EVA); its second-order paths are not linear per neuron")
    return idx


def _trace(tower: Tower, images: torch.Tensor, layer: int) -> _Trace:
    from .decomposition import _linearised_ln_post, _post_params

    tower.check_images(images)
    like = tower.weight
    gamma, beta, proj, eps = _post_params(tower, like)
    x = tower.embed(tower.to_input(images))
    later, post = [], None
    for j, block in enumerate(tower.blocks):
        if j > layer:
            e1 = block.norm_attn_affine[2]
            later.append({"mu1": x.mean(dim=-1), "s1": torch.sqrt(x.var(dim=-1, unbiased=False) + e1)})
        if j == layer:
            tr = block.forward(x)
            post = block.act(tr.hidden)  # [b, N, W]
            x = tr.x_out
        else:
            x, st = block.forward_cls(x, False, tower.query)
            if j > layer:
                later[-1]["A"] = st.attn_cls  # [b, H, N]
    mu, sigma, e, norm, _, _ = _linearised_ln_post(tower, x, gamma, beta, proj, eps)
    pooled_post = post[:, 1:].mean(dim=1) if tower.query == "avg" else post[:, 0]
    return _Trace(post=post, later=later, pooled_mu=mu, pooled_sigma=sigma, norm=norm, pooled_post=pooled_post)


def _head_parts(tower: Tower, j: int, like):
    """Per head of block j: O_h [D, d_head] (head gain folded), V_h [d_head, D], bv_h [d_head]; out bias [D]; ls1 [D];
    ln_1's (g1, beta1)."""
    block = tower.blocks[j]
    D, H = block.d_model, block.n_heads
    dh = D // H
    w_in = block.w_in.to(like.dtype)
    b_in = block.b_in.to(like.dtype) if block.b_in is not None else torch.zeros(3 * D, dtype=like.dtype,
                                                                                 device=like.device)
    V = w_in[2 * D:].reshape(H, dh, D)
    bv = b_in[2 * D:].reshape(H, dh)
    O = block.w_out.to(like.dtype).reshape(D, H, dh).permute(1, 0, 2)  # [H, D, d_head]
    if block.head_gain is not None:
        O = O * block.head_gain.reshape(H, 1, 1).to(like.dtype)
    bo = block.b_out.to(like.dtype) if block.b_out is not None else torch.zeros(D, dtype=like.dtype,
                                                                                device=like.device)
    ones = torch.ones(D, dtype=like.dtype, device=like.device)
    ls1 = block.scale_attn_gamma.to(like.dtype) if block.scale_attn_gamma is not None else ones
    g1, beta1, _ = block.norm_attn_affine
    g1 = g1.to(like.dtype) if g1 is not None else ones
    beta1 = beta1.to(like.dtype) if beta1 is not None else torch.zeros_like(ones)
    return O, V, bv, bo, ls1, g1, beta1


def _mlp_columns(tower: Tower, layer: int, like):
    """(c [D, W]: the MLP output projection's columns times layer scale, b [D]: its bias times layer scale)."""
    block = tower.blocks[layer]
    C = block.fc_out.weight.to(like.dtype)
    b = block.fc_out.bias.to(like.dtype) if block.fc_out.bias is not None else torch.zeros(C.shape[0], dtype=like.dtype,
                                                                                           device=like.device)
    if block.scale_mlp_gamma is not None:
        g = block.scale_mlp_gamma.to(like.dtype)
        C, b = C * g[:, None], b * g
    return C, b


def neuron_directions(model, layer: int) -> torch.Tensor:
    """[L - l - 1, W, H, d']: the image-independent direction of each neuron through each later head,
    P^T diag(gp ls1) O_h V_h diag(g1) c_n (its second-order effect is a per-image scalar times this, plus a part the
    same for every neuron)."""
    tower = read_tower(model)
    layer = check_neuron_layer(tower, layer)
    with torch.no_grad():
        return _directions(tower, layer, tower.weight)


def _directions(tower: Tower, layer: int, like) -> torch.Tensor:
    from .decomposition import _post_params

    gamma, _, proj, _ = _post_params(tower, like)
    C, _ = _mlp_columns(tower, layer, like)
    out = []
    for j in range(layer + 1, tower.n_layers):
        O, V, _, _, ls1, g1, _ = _head_parts(tower, j, like)
        left = torch.einsum("ed,hdk->hek", proj.t() * (gamma * ls1), O)  # [H, d', d_head]
        G = torch.einsum("hek,hkd->hed", left, V) * g1  # [H, d', D]
        out.append(torch.einsum("hed,dw->whe", G, C))  # [W, H, d']: neuron-major, for one bmm per block
    return torch.stack(out)


def neuron_effects(model, images: torch.Tensor, layer: int, *, per_head: bool = False,
                   directions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The second-order effects of every neuron of the MLP of block `layer` (see the module doc), without the
    published factor 100.

    Args:
        model: a CLIP model or image tower textspan decomposes (CLS or average-pooled ViT with LayerNorm blocks).
        images: [b, 3, H, W] preprocessed.
        layer: the MLP's block (negative counts from the end); it needs a later block.
        per_head: return each later head's part instead, [b, L - l - 1, H, W, d'] (summed over its two head axes
            it is the default result).
        directions: `neuron_directions(model, layer)`, to reuse across batches (computed when None).

    Returns:
        [b, W, d'] (W the MLP width, d' the embedding width). `first_order_effects` gives the direct effects beside
        it, `neuron_effect_parts` both at once (and the per-head parts) from one forward.

    Example:
        >>> model, preprocess, _ = textspan.load_model("shapes")                         # doctest: +SKIP
        >>> textspan.neuron_effects(model, images, layer=1).shape   # [b, d_mlp, d_embed]
    """
    parts = neuron_effect_parts(model, images, layer, per_head=per_head, directions=directions)
    return parts.per_head if per_head else parts.second_order


def first_order_effects(model, images: torch.Tensor, layer: int) -> torch.Tensor:
    """[b, W, d']: each neuron's direct (first-order) effect, its own term at the pooled token through the frozen
    ln_post; summed over the neurons it is the decomposition's MLP term of block `layer`."""
    return neuron_effect_parts(model, images, layer).first_order


def neuron_effect_parts(model, images: torch.Tensor, layer: int, *, per_head: bool = False,
                        directions: Optional[torch.Tensor] = None) -> NeuronEffects:
    """Second- and first-order effects (and, with `per_head`, the per-head parts) from one forward:
    a `NeuronEffects` (second_order, first_order [b, W, d'], per_head, the embedding norms)."""
    tower = read_tower(model)
    layer = check_neuron_layer(tower, layer)
    with torch.no_grad():
        return _effects(tower, images, layer, per_head, directions)


def _effects(tower: Tower, images, layer: int, per_head: bool, directions) -> NeuronEffects:
    from .decomposition import _post_params

    like = tower.weight
    gamma, beta, proj, _ = _post_params(tower, like)
    tr = _trace(tower, images, layer)
    dirs = _directions(tower, layer, like) if directions is None else directions.to(like.dtype)
    C, bc = _mlp_columns(tower, layer, like)
    W = C.shape[1]
    L, H = tower.n_layers, tower.n_heads
    K = 2 * L + 1
    b = images.shape[0]
    sp, mup, norm = tr.pooled_sigma, tr.pooled_mu, tr.norm  # [b]
    d_embed = proj.shape[1]
    acc = torch.zeros(W, b, d_embed, dtype=like.dtype, device=like.device)  # sum over heads of a * direction
    shared = torch.zeros(b, d_embed, dtype=like.dtype, device=like.device)  # what every neuron's effect shares
    parts = torch.empty(b, L - layer - 1, H, W, d_embed, dtype=like.dtype, device=like.device) if per_head else None
    for k, j in enumerate(range(layer + 1, L)):
        st = tr.later[k]
        A, mu1, s1 = st["A"], st["mu1"], st["s1"]  # [b, H, N], [b, N], [b, N]
        Kj = 2 * j + 1
        O, V, bv, bo, ls1, g1, beta1 = _head_parts(tower, j, like)
        a = torch.einsum("bhn,bnw->whb", A, tr.post / s1[:, :, None])  # [W, H, b]
        r = (A / s1[:, None]).sum(-1)  # [b, H]
        m = (A * (mu1 / s1)[:, None]).sum(-1)  # [b, H]
        sa = A.sum(-1)  # [b, H] (1)
        # the part of y every neuron shares, in d_model: r g1 b / W - m g1 / (K_j W) + sa beta1 / (K_j W)
        y0 = (r[..., None] * (g1 * bc) / W - m[..., None] * g1 / (Kj * W) + sa[..., None] * beta1 / (Kj * W))
        v0 = torch.einsum("hkd,bhd->bhk", V, y0) + sa[..., None] * bv / (Kj * W)  # [b, H, d_head]
        o0 = (torch.einsum("hek,bhk->bhe", O, v0) + bo / (Kj * H * W)) * ls1  # [b, H, D]
        share = Kj * K * H * W
        const = ((gamma * o0 - (gamma * mup[:, None, None] / share)) / sp[:, None, None] + beta / share) @ proj
        acc.baddbmm_(a.transpose(1, 2), dirs[k])  # [W, b, H] @ [W, H, d'] -> [W, b, d']
        shared += const.sum(dim=1)
        if per_head:  # [b, H, W, d']
            parts[:, k] = (a.permute(2, 1, 0)[..., None] * dirs[k].transpose(0, 1)[None] / sp[:, None, None, None]
                           + const[:, :, None]) / norm[:, None, None, None]
    second = (acc.transpose(0, 1) / sp[:, None, None] + shared[:, None]) / norm[:, None, None]
    u0 = tr.pooled_post[:, :, None] * C.t()[None] + bc / W  # [b, W, D]: each neuron's term at the pooled token
    first = ((gamma * (u0 - (mup / (K * W))[:, None, None])) / sp[:, None, None] + beta / (K * W)) @ proj
    first = first / norm[:, None, None]
    return NeuronEffects(layer=layer, second_order=second, first_order=first, per_head=parts, norm=norm)


__all__ = ["NeuronEffects", "check_neuron_layer", "first_order_effects", "neuron_directions", "neuron_effect_parts",
           "neuron_effects"]


def neuron_maps(model, images: torch.Tensor, layer: int, texts: torch.Tensor, neurons=None,
                directions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[b, len(neurons), k, N]: each neuron's second-order effect split by the source token it is read from,
    dotted with k text directions `texts` [k, d'] (neurons=None: all). Per token t, the token's own part of every
    term (A_h[t] times the neuron's output at t, its ln_1 mean and bias shares and the value bias share); the parts
    not tied to a token (out_proj's bias share, ln_post's mean and bias shares) are spread evenly over the N tokens,
    as the decomposition spreads its biases. Summed over the tokens, the maps equal `neuron_effects(...)` dotted
    with the texts (tested). Drop the prefix token(s) and reshape to the grid for a heatmap (`textspan.heatmaps`)."""
    tower = read_tower(model)
    layer = check_neuron_layer(tower, layer)
    with torch.no_grad():
        from .decomposition import _post_params

        like = tower.weight
        gamma, beta, proj, _ = _post_params(tower, like)
        T = texts.to(like.dtype).to(like.device)  # [k, d']
        tr = _trace(tower, images, layer)
        dirs = _directions(tower, layer, like) if directions is None else directions.to(like.dtype)
        sel = torch.arange(dirs.shape[1], device=like.device) if neurons is None else \
            torch.as_tensor(list(neurons), device=like.device)
        C, bc = _mlp_columns(tower, layer, like)
        W = C.shape[1]
        L, H = tower.n_layers, tower.n_heads
        K = 2 * L + 1
        b, N = tr.post.shape[:2]
        sp, mup, norm = tr.pooled_sigma, tr.pooled_mu, tr.norm
        post = tr.post[:, :, sel]  # [b, N, n]
        out = torch.zeros(b, len(sel), T.shape[0], N, dtype=like.dtype, device=like.device)
        for k, j in enumerate(range(layer + 1, L)):
            st = tr.later[k]
            A, mu1, s1 = st["A"], st["mu1"], st["s1"]  # [b, H, N]
            Kj = 2 * j + 1
            O, V, bv, bo, ls1, g1, beta1 = _head_parts(tower, j, like)
            dT = torch.einsum("whe,ke->whk", dirs[k][sel], T)  # [n, H, k]
            # the neuron's own part at each token: A_h[t] p[t, n] / s1[t] (direction . text)
            out += torch.einsum("bht,btn,nhk->bnkt", A / s1[:, None], post, dT) / sp[:, None, None, None]
            # the token-tied shares every neuron has: bias share, ln_1 mean and bias shares, value bias share
            y_t = ((g1 * bc / W)[None, None] / s1[:, :, None] - (mu1 / s1)[:, :, None] * g1 / (Kj * W)
                   + beta1 / (Kj * W))  # [b, N, D] before the attention weights
            v_t = torch.einsum("hkd,btd->bhtk", V, y_t) + bv[None, :, None] / (Kj * W)  # [b, H, N, d_head]
            o_t = torch.einsum("hek,bhtk->bhte", O, v_t * A[..., None]) * ls1  # [b, H, N, D]
            tok = ((gamma * o_t) / sp[:, None, None, None]) @ proj  # [b, H, N, d']
            share = Kj * K * H * W
            spread = (((gamma * bo * ls1 / (Kj * H * W) - gamma * mup[:, None] / share) / sp[:, None]
                       + beta / share) @ proj) * H / N  # [b, d'], per token, all heads
            out += (torch.einsum("bhte,ke->btk", tok, T) + (spread @ T.t())[:, None]).permute(0, 2, 1)[:, None]
        return out / norm[:, None, None, None]


__all__ += ["neuron_maps"]
