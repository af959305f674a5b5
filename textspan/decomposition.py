"""Exact decomposition of a CLIP ViT image embedding into direct contributions.

The image tower's output at the CLS token after the last block is a sum (the residual stream)

    r = z0 + sum_l ls1_l * attn_l + sum_l mlp_l,        z0 = ln_pre(cls_emb + pos_0),

and the attention output at the CLS query splits over heads h and source tokens m:

    attn_l = sum_{m,h} A[l,h][0,m] * W_O[l,h] v[l,h][m]  +  b_O[l]        (b_O spread as b_O / (N*H) per term).

ln_post is linearised with the image's own mean mu and std sigma of r (frozen), and every term t with a share s of
mu and beta becomes (gamma * (t - s*mu) / sigma + s*beta) @ P; the shares are 1/K for the L+1 "MLP-type" terms (the
embedding term z0 and each MLP) and 1/(K*N*H) for each attention term, with K = 2L+1, so the shares sum to one and

    sum of all terms = ln_post(r) @ P = e = encode_image(x).

Every term is finally divided by ||e||, so the identity textspan tests is ``Decomposition.total() == e / ||e||``
(float64: ~1e-15). This is the convention of Gandelsman et al. (ICLR 2024), so their numbers reproduce.

Only the CLS query row of each attention map is computed: the spatial terms cost one [b, N, H, d_head] x
[H, d_head, d_embed] product per layer on top of a plain forward, and nothing of size [N, N, H, D] is ever made.
Head-wise constants (W_O, layer scale, ln_post's gamma and the projection) are folded into one
[H, d_head, d_embed] matrix per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .models import check_decomposable, visual_of


@dataclass
class Decomposition:
    """Direct contributions to the normalised image embedding e/||e||.

    Attributes:
        heads: [batch, layer, token, head, d_embed] when spatial, else [batch, layer, head, d_embed]
            (summed over source tokens).
        mlps: [batch, layer + 1, d_embed]; index 0 is the embedding term (ln_pre output at CLS), index l+1 the MLP of
            block l.
        cls_to_cls: [batch, layer, head, d_embed], the source-token-0 (CLS -> CLS) attention terms.
        norm: [batch], ||e|| of the unnormalised embedding e = encode_image(x).
        embedding: [batch, d_embed], e / ||e|| from the same forward pass.
        ln_mean, ln_std: [batch], the frozen statistics of ln_post used to linearise it.
        spatial: whether `heads` keeps the token axis.
    """

    heads: torch.Tensor
    mlps: torch.Tensor
    cls_to_cls: torch.Tensor
    norm: torch.Tensor
    embedding: torch.Tensor
    ln_mean: torch.Tensor
    ln_std: torch.Tensor
    spatial: bool
    grid_size: tuple = field(default=(0, 0))

    @property
    def n_layers(self) -> int:
        return self.mlps.shape[1] - 1

    @property
    def n_heads(self) -> int:
        return self.heads.shape[-2]

    def head_terms(self) -> torch.Tensor:
        """[batch, layer, head, d_embed]: the head terms summed over source tokens."""
        return self.heads.sum(dim=2) if self.spatial else self.heads

    def total(self) -> torch.Tensor:
        """[batch, d_embed]: the sum of every term; equals e / ||e||."""
        return self.head_terms().sum(dim=(1, 2)) + self.mlps.sum(dim=1)

    def layer_attention(self) -> torch.Tensor:
        """[batch, layer, d_embed]: each layer's attention contribution (all heads and tokens)."""
        return self.head_terms().sum(dim=2)

    def to(self, *args, **kwargs) -> "Decomposition":
        moved = {k: (v.to(*args, **kwargs) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return Decomposition(**moved)


@dataclass
class _LayerState:
    """What one block leaves behind for the decomposition (CLS query only)."""

    o_cls: torch.Tensor  # [batch, head, d_head], attention-weighted values at the CLS query, before W_O
    attn_cls: torch.Tensor  # [batch, head, token], the CLS row of the attention map
    values: torch.Tensor  # [batch, head, token, d_head]
    mlp_cls: torch.Tensor  # [batch, d_model], the MLP output (after ls_2) at CLS


def _split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, n_heads, d // n_heads).transpose(1, 2)  # [batch, head, token, d_head]


def _attention_parts(block):
    """The attention weights of a stock open_clip block, whatever its attention class."""
    attn = block.attn
    custom = not isinstance(attn, torch.nn.MultiheadAttention)
    return dict(
        w_in=attn.in_proj_weight,
        b_in=attn.in_proj_bias,
        w_out=attn.out_proj.weight,
        b_out=attn.out_proj.bias,
        n_heads=attn.num_heads,
        ln_q=attn.ln_q if custom else None,
        ln_k=attn.ln_k if custom else None,
        logit_scale=attn.logit_scale if custom else None,
        logit_scale_max=getattr(attn, "logit_scale_max", None),
        head_scale=attn.head_scale if custom else None,
    )


def _block_forward(block, x: torch.Tensor, keep_values: bool):
    """One residual block of the image tower, computed from its weights. Returns (x_out, _LayerState)."""
    p = _attention_parts(block)
    n_heads = p["n_heads"]
    h = block.ln_1(x)
    q, k, v = F.linear(h, p["w_in"], p["b_in"]).chunk(3, dim=-1)
    q, k, v = (_split_heads(t, n_heads) for t in (q, k, v))  # [batch, head, token, d_head]
    if p["ln_q"] is not None:
        q, k = p["ln_q"](q), p["ln_k"](k)
    if p["logit_scale"] is not None:  # scaled cosine attention
        scale = torch.clamp(p["logit_scale"], max=p["logit_scale_max"]).exp()  # [head, 1, 1]
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) * scale).softmax(dim=-1)
        out = attn @ v
        attn_cls = attn[:, :, 0]
    else:
        out = F.scaled_dot_product_attention(q, k, v)  # [batch, head, token, d_head]
        logits_cls = q[:, :, :1] @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)  # [batch, head, 1, token]
        attn_cls = logits_cls.softmax(dim=-1).squeeze(2)  # [batch, head, token]
    o_cls = out[:, :, 0]
    if p["head_scale"] is not None:
        out = out * p["head_scale"]
    b, _, n, _ = out.shape
    attn_out = F.linear(out.transpose(1, 2).reshape(b, n, -1), p["w_out"], p["b_out"])
    x = x + block.ls_1(attn_out)
    mlp_out = block.ls_2(block.mlp(block.ln_2(x)))
    x = x + mlp_out
    return x, _LayerState(o_cls=o_cls, attn_cls=attn_cls, values=v if keep_values else None, mlp_cls=mlp_out[:, 0])


def _check_images(visual, images: torch.Tensor, any_size: bool = False) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a preprocessed batch [batch, 3, height, width]; got {tuple(images.shape)}")
    expected = tuple(visual.image_size)
    patch = tuple(visual.patch_size)
    if any_size:
        if images.shape[-2] < patch[0] or images.shape[-1] < patch[1]:
            raise ValueError(f"images of {tuple(images.shape[-2:])} px are smaller than one {patch} patch")
    elif tuple(images.shape[-2:]) != expected:
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} px but the model expects {expected}; use the model's preprocess")


def positional_embedding(visual, grid, antialias: bool = True) -> torch.Tensor:
    """[1 + gh * gw, d_model]: the model's positional embedding for a (gh, gw) patch grid. Other grids than the
    model's own get the patch part resampled bicubically, in float32, with antialiasing by default (timm's
    ``resample_abs_pos_embed`` convention; the Grad-ECLIP notebook resamples without); the model is not modified."""
    pos = visual.positional_embedding
    own = tuple(visual.grid_size)
    grid = tuple(int(g) for g in grid)
    if grid == own:
        return pos
    patch = pos[1:].float().reshape(1, own[0], own[1], -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
    return torch.cat([pos[:1], patch], dim=0)


def _embed(visual, images: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    x = visual.conv1(images)  # [batch, d_model, grid_h, grid_w]
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)  # [batch, grid tokens, d_model]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + positional_embedding(visual, grid, antialias).to(x.dtype)
    return visual.ln_pre(x)  # [batch, token, d_model]


def _run(model, images: torch.Tensor, keep_values: bool, any_size: bool = False) -> Iterator:
    """Our forward over the stock weights: yields ("embed", z) then ("layer", l, state) per block, then ("out", r)."""
    check_decomposable(model)
    visual = visual_of(model)
    if visual.training and getattr(visual.patch_dropout, "prob", 0.0) > 0:
        raise ValueError("patch dropout is active in training mode: call model.eval() before decomposing")
    _check_images(visual, images, any_size)
    dtype = visual.conv1.weight.dtype
    x = _embed(visual, images.to(device=visual.conv1.weight.device, dtype=dtype))
    yield "embed", x
    for l, block in enumerate(visual.transformer.resblocks):
        x, state = _block_forward(block, x, keep_values)
        yield "layer", l, state
    yield "out", x


def _post_params(visual, d_model: int, like: torch.Tensor):
    ln = visual.ln_post
    gamma = ln.weight if getattr(ln, "weight", None) is not None else torch.ones(d_model, dtype=like.dtype,
                                                                                 device=like.device)
    beta = ln.bias if getattr(ln, "bias", None) is not None else torch.zeros_like(gamma)
    proj = visual.proj if visual.proj is not None else torch.eye(d_model, dtype=like.dtype, device=like.device)
    return gamma.to(like.dtype), beta.to(like.dtype), proj.to(like.dtype), ln.eps


def _linearised_ln_post(visual, x_final, gamma, beta, proj, eps):
    """ln_post at CLS, frozen at the image's own statistics: (mu, sigma, e, ||e||, 1 / (sigma ||e||), offset), with
    e the unnormalised embedding and offset [batch, d_embed] the mean/beta part, (beta - gamma mu / sigma) @ P."""
    r = x_final[:, 0]  # [batch, d_model]
    mu = r.mean(dim=-1)
    sigma = torch.sqrt(r.var(dim=-1, unbiased=False) + eps)
    e = visual.ln_post(r)
    e = e @ visual.proj if visual.proj is not None else e
    norm = e.norm(dim=-1)
    offset = (beta - gamma * (mu / sigma)[:, None]) @ proj
    return mu, sigma, e, norm, 1.0 / (sigma * norm), offset


def forward_image(model, images: torch.Tensor) -> torch.Tensor:
    """[batch, d_embed]: the unnormalised image embedding from textspan's own forward (== ``encode_image``)."""
    with torch.no_grad():
        for item in _run(model, images, keep_values=False):
            if item[0] == "out":
                x = item[1]
        visual = visual_of(model)
        pooled = visual.ln_post(x[:, 0])
        return pooled @ visual.proj if visual.proj is not None else pooled


def _ls_gamma(ls, d_model, like):
    g = getattr(ls, "gamma", None)
    return g.to(like.dtype) if g is not None else torch.ones(d_model, dtype=like.dtype, device=like.device)


def _layer_fold(block, gamma, proj, like):
    """W_O (per head), layer scale, ln_post's gamma and the projection folded: ([head, d_head, d_embed], bias
    [d_embed] of out_proj pushed through the same map)."""
    p = _attention_parts(block)
    n_heads = p["n_heads"]
    d_model = p["w_out"].shape[0]
    ls1 = _ls_gamma(block.ls_1, d_model, like)
    w_out_t = p["w_out"].t().reshape(n_heads, d_model // n_heads, d_model)
    fold = (w_out_t * (ls1 * gamma)) @ proj
    if p["head_scale"] is not None:
        fold = fold * p["head_scale"].reshape(n_heads, 1, 1)
    bias = ((p["b_out"] * ls1 * gamma) @ proj) if p["b_out"] is not None else torch.zeros_like(proj[0])
    return fold, bias


@dataclass
class Projection:
    """The decomposition dotted with k directions (e.g. text embeddings), kept per source token.

    Attributes:
        tokens: [batch, token, k]: per source token, the selected heads' terms (summed over those heads and their
            layers) dotted with each direction.
        other_heads: [batch, k]: the unselected heads' terms (summed over tokens) dotted with the directions.
        mlps: [batch, k]: the MLP-type terms (embedding term included) dotted with the directions.
        norm: [batch], ||e||.
    ``tokens.sum(1) + other_heads + mlps`` equals ``(e / ||e||) @ directions.T``.
    """

    tokens: torch.Tensor
    other_heads: torch.Tensor
    mlps: torch.Tensor
    norm: torch.Tensor

    def total(self) -> torch.Tensor:
        return self.tokens.sum(dim=1) + self.other_heads + self.mlps


def project(model, images: torch.Tensor, directions: torch.Tensor, heads=None, any_size: bool = False) -> Projection:
    """The spatial decomposition dotted with `directions` [k, d_embed], without making the [b, L, N, H, d'] terms.

    Args:
        heads: None (all heads) or a boolean mask [n_layers, n_heads] of the heads whose terms go to `tokens`.
        any_size: accept other image sizes than the model's (positional embeddings resampled to the grid).

    Each layer costs one [b, H, N, d_head] x [H, d_head, k] product: for a few prompts this is far cheaper than the
    full spatial decomposition.
    """
    check_decomposable(model)
    visual = visual_of(model)
    with torch.no_grad():
        return _project(visual, images, directions, heads, any_size)


def _project(visual, images, directions, heads_mask, any_size=False) -> Projection:
    blocks = visual.transformer.resblocks
    L = len(blocks)
    H = blocks[0].attn.num_heads
    d_model = visual.transformer.width
    patch = visual.patch_size
    N = 1 + (images.shape[-2] // patch[0]) * (images.shape[-1] // patch[1])
    like = visual.conv1.weight
    gamma, beta, proj, eps = _post_params(visual, d_model, like)
    T = directions.to(device=like.device, dtype=like.dtype)  # [k, d_embed]
    if T.ndim != 2 or T.shape[1] != proj.shape[1]:
        raise ValueError(f"directions must be [k, {proj.shape[1]}] (the model's embedding width); got "
                         f"{tuple(T.shape)}")
    sel = torch.ones(L, H, dtype=torch.bool) if heads_mask is None else torch.as_tensor(heads_mask, dtype=torch.bool)
    if tuple(sel.shape) != (L, H):
        raise ValueError(f"heads mask must be [{L}, {H}]; got {tuple(sel.shape)}")
    b, k = images.shape[0], T.shape[0]
    K = 2 * L + 1
    tokens = torch.zeros(b, N, k, dtype=like.dtype, device=like.device)
    other = torch.zeros(b, k, dtype=like.dtype, device=like.device)
    token_bias = torch.zeros(k, dtype=like.dtype, device=like.device)
    mlps_raw = torch.zeros(b, d_model, dtype=like.dtype, device=like.device)
    x_final = None
    proj_t = proj @ T.t()  # [d_model, k]
    for item in _run(visual, images, keep_values=True, any_size=any_size):
        if item[0] == "embed":
            mlps_raw += item[1][:, 0]
        elif item[0] == "layer":
            l, st = item[1], item[2]
            # fold straight into the k directions: [H, d_head, k] and [k], never the [H, d_head, d_embed] fold
            fold_t, bias_t = _layer_fold(blocks[l], gamma, proj_t, like)
            on = sel[l].nonzero().flatten().tolist()
            off = (~sel[l]).nonzero().flatten().tolist()
            if on:
                weighted = st.attn_cls[:, on].unsqueeze(-1) * st.values[:, on]  # [b, h, N, d_head]
                tokens += torch.einsum("bhnd,hdk->bnk", weighted, fold_t[on])
                token_bias += bias_t * (len(on) / (N * H))
            if off:
                other += torch.einsum("bhd,hdk->bk", st.o_cls[:, off], fold_t[off]) + bias_t * (len(off) / H)
            mlps_raw += st.mlp_cls
        else:
            x_final = item[1]
    mu, sigma, e, norm, scale, offset = _linearised_ln_post(visual, x_final, gamma, beta, proj, eps)
    offset_t = offset @ T.t()  # [b, k]
    n_on, n_off = int(sel.sum()), int((~sel).sum())
    tokens = (tokens + token_bias) * scale[:, None, None] + (offset_t * (n_on / (K * N * H)) / norm[:, None])[:, None]
    other = other * scale[:, None] + offset_t * (n_off / (K * H)) / norm[:, None]
    mlps = ((mlps_raw * gamma) @ proj @ T.t()) * scale[:, None] + offset_t * ((L + 1) / K) / norm[:, None]
    return Projection(tokens=tokens, other_heads=other, mlps=mlps, norm=norm)


def decompose(model, images: torch.Tensor, spatial: bool = True) -> Decomposition:
    """Split the normalised image embeddings of a batch into per-(layer, head, token) and per-MLP terms.

    Args:
        model: a stock open_clip CLIP model (or its ``.visual``) with a ViT image tower, in eval mode.
        images: [batch, 3, H, W], preprocessed with the model's own transform.
        spatial: keep the source-token axis of the head terms ([b, L, N, H, d']); False sums it away
            ([b, L, H, d']) at almost no cost over a plain forward.

    Returns:
        A `Decomposition` whose ``total()`` equals ``encode_image(images)`` normalised, to float precision.

    Example:
        >>> import torch, textspan
        >>> model, _, _ = textspan.load_model("ViT-B-32")
        >>> d = textspan.decompose(model, torch.randn(2, 3, 224, 224), spatial=False)
        >>> d.heads.shape, d.mlps.shape
        (torch.Size([2, 12, 12, 512]), torch.Size([2, 13, 512]))
    """
    check_decomposable(model)
    visual = visual_of(model)
    with torch.no_grad():
        return _decompose(visual, images, spatial)


def _decompose(visual, images: torch.Tensor, spatial: bool) -> Decomposition:
    blocks = visual.transformer.resblocks
    n_layers = len(blocks)
    n_heads = blocks[0].attn.num_heads
    d_model = visual.transformer.width
    n_tokens = 1 + visual.grid_size[0] * visual.grid_size[1]
    like = visual.conv1.weight
    gamma, beta, proj, eps = _post_params(visual, d_model, like)
    d_embed = proj.shape[1]
    b = images.shape[0]
    K = 2 * n_layers + 1

    heads_out = None
    if spatial:
        heads_out = torch.empty(b, n_layers, n_tokens, n_heads, d_embed, dtype=like.dtype, device=like.device)
        buf = torch.empty(b, n_heads, n_tokens, d_embed, dtype=like.dtype, device=like.device)
        layer_bias = torch.empty(n_layers, d_embed, dtype=like.dtype, device=like.device)
    heads_ns = torch.empty(b, n_layers, n_heads, d_embed, dtype=like.dtype, device=like.device)
    cls_cls = torch.empty(b, n_layers, n_heads, d_embed, dtype=like.dtype, device=like.device)
    mlps_raw = torch.empty(b, n_layers + 1, d_model, dtype=like.dtype, device=like.device)

    x_final = None
    for item in _run(visual, images, keep_values=True):
        if item[0] == "embed":
            mlps_raw[:, 0] = item[1][:, 0]
        elif item[0] == "layer":
            l, st = item[1], item[2]
            fold, bias = _layer_fold(blocks[l], gamma, proj, like)
            # Non-spatial: sum over tokens of A[0,m] v[m] is the attention output at CLS.
            heads_ns[:, l] = torch.einsum("bhd,hde->bhe", st.o_cls, fold) + bias / n_heads
            cls_cls[:, l] = torch.einsum("bhd,hde->bhe", st.attn_cls[:, :, 0, None] * st.values[:, :, 0], fold)
            cls_cls[:, l] += bias / (n_tokens * n_heads)
            if spatial:
                weighted = st.attn_cls.unsqueeze(-1) * st.values  # [batch, head, token, d_head]
                torch.matmul(weighted, fold, out=buf)  # [batch, head, token, d_embed], one buffer for all layers
                heads_out[:, l].copy_(buf.transpose(1, 2))
                layer_bias[l] = bias / (n_tokens * n_heads)  # added with the final scaling, in the same pass
            mlps_raw[:, l + 1] = st.mlp_cls
        else:
            x_final = item[1]

    mu, sigma, e, norm, scale, offset = _linearised_ln_post(visual, x_final, gamma, beta, proj, eps)

    mlps = ((mlps_raw * gamma) @ proj) * scale[:, None, None] + (offset / (K * norm[:, None]))[:, None]
    heads_ns.mul_(scale[:, None, None, None]).add_((offset / (K * n_heads * norm[:, None]))[:, None, None])
    cls_cls.mul_(scale[:, None, None, None]).add_(
        (offset / (K * n_tokens * n_heads * norm[:, None]))[:, None, None])
    if spatial:
        # one fused pass over the big tensor: terms * scale + (layer bias * scale + offset share)
        const = layer_bias[None] * scale[:, None, None] + (offset / (K * n_tokens * n_heads * norm[:, None]))[:, None]
        torch.addcmul(const[:, :, None, None], heads_out, scale[:, None, None, None, None], out=heads_out)

    return Decomposition(
        heads=heads_out if spatial else heads_ns,
        mlps=mlps,
        cls_to_cls=cls_cls,
        norm=norm,
        embedding=e / norm[:, None],
        ln_mean=mu,
        ln_std=sigma,
        spatial=spatial,
        grid_size=tuple(visual.grid_size),
    )


def cls_attention(model, images: torch.Tensor) -> torch.Tensor:
    """[batch, layer, head, token]: the CLS query's attention weights of every block (rows sum to 1)."""
    check_decomposable(model)
    rows = []
    with torch.no_grad():
        for item in _run(visual_of(model), images, keep_values=False):
            if item[0] == "layer":
                rows.append(item[2].attn_cls)
    return torch.stack(rows, dim=1)
