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
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ._repr import concise
from .engine import Block, Tower, read_tower
from .errors import BadInputError


@concise
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

    Attention-pooled towers (SigLIP; ``pool_heads is not None``): there is no CLS token, so the token axis holds the
    patch tokens only and `cls_to_cls` is None; `mlps` has L + 2 rows, the last one the pooling head's own terms
    (its MLP and every constant: the final norm's beta and the value bias through the pool, the pool's out_proj
    bias). Beside the trunk's terms, the published pooling-level split:
        pool_heads: [batch, pool head, token, d_embed] when spatial, else [batch, pool head, d_embed]: per pooling
            head g and token m, a[g, m] W_out[:, g] (W_v[g] xn_m + b_v[g]) (xn: the tokens after the final norm).
        pool_mlp: [batch, d_embed], the pooling MLP's term; pool_out_bias: [batch, d_embed], out_proj's bias.
    ``pool_heads`` summed + ``pool_mlp`` + ``pool_out_bias`` equals e / ||e|| too (`pool_total()`).
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
    pool_heads: Optional[torch.Tensor] = None
    pool_mlp: Optional[torch.Tensor] = None
    pool_out_bias: Optional[torch.Tensor] = None

    @property
    def n_layers(self) -> int:
        return self.heads.shape[1]

    def pool_total(self) -> torch.Tensor:
        """[batch, d_embed]: the pooling-level terms summed (attention-pooled towers); equals e / ||e||."""
        if self.pool_heads is None:
            raise BadInputError("this decomposition has no pooling-head terms (the tower pools at a CLS token)")
        ph = self.pool_heads.sum(dim=2) if self.spatial else self.pool_heads
        return ph.sum(dim=1) + self.pool_mlp + self.pool_out_bias

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


def _run(tower: Tower, images: torch.Tensor, keep_values: bool, any_size: bool = False) -> Iterator:
    """Our forward over the stock weights: yields ("embed", z) then ("layer", l, state) per block, then ("out", r)."""
    if tower.dropout_prob > 0:
        raise BadInputError("patch dropout is active in training mode: call model.eval() before decomposing")
    tower.check_images(images, any_size)
    x = tower.embed(tower.to_input(images))
    yield "embed", x
    for l, block in enumerate(tower.blocks):
        x, state = block.forward_cls(x, keep_values, tower.query)
        yield "layer", l, state
    yield "out", x


def _post_params(tower: Tower, like: torch.Tensor):
    d_model = tower.d_model
    weight, bias, eps = tower.norm_final_affine
    gamma = weight if weight is not None else torch.ones(d_model, dtype=like.dtype, device=like.device)
    beta = bias if bias is not None else torch.zeros_like(gamma)
    proj = tower.projection if tower.projection is not None else torch.eye(d_model, dtype=like.dtype, device=like.device)
    return gamma.to(like.dtype), beta.to(like.dtype), proj.to(like.dtype), eps


def _linearised_ln_post(tower: Tower, x_final, gamma, beta, proj, eps):
    """ln_post at CLS, frozen at the image's own statistics: (mu, sigma, e, ||e||, 1 / (sigma ||e||), offset), with
    e the unnormalised embedding and offset [batch, d_embed] the mean/beta part, (beta - gamma mu / sigma) @ P."""
    r = tower.pooled_token(x_final)  # [batch, d_model]: the CLS token, or the patch tokens' mean (average pool)
    mu = r.mean(dim=-1)
    sigma = torch.sqrt(r.var(dim=-1, unbiased=False) + eps)
    e = tower.pool(r)
    norm = e.norm(dim=-1)
    offset = (beta - gamma * (mu / sigma)[:, None]) @ proj
    if tower.projection_bias is not None:  # a bias after the projection (EVA): spread like ln_post's beta
        offset = offset + tower.projection_bias.to(offset.dtype)
    return mu, sigma, e, norm, 1.0 / (sigma * norm), offset


def forward_image(model, images: torch.Tensor) -> torch.Tensor:
    """[batch, d_embed]: the unnormalised image embedding from textspan's own forward (== ``encode_image``)."""
    tower = read_tower(model)
    with torch.no_grad():
        for item in _run(tower, images, keep_values=False):
            if item[0] == "out":
                x = item[1]
        return tower.pool_stream(x)


def _layer_fold(block: Block, gamma, proj, like):
    """W_O (per head), layer scale, ln_post's gamma and the projection folded: ([head, d_head, d_embed], bias
    [d_embed] of out_proj pushed through the same map, and None or a second bias [d_embed] to be multiplied by the
    image's 1/s of a post-norm, see `_bias`).

    A norm between the heads and the residual stream is linearised at the pooled query with its own mean and std s
    (frozen, as ln_post is), so each head's term stays exact:
    - an inner norm over the concatenated heads before out_proj (EVA): head h's output u (its slice of the D
      features) reaches out_proj as g * (u - mean over the D features of u) / s: the fold is
      W_out[:, h] diag(g_h) - (1/D) (W_out g) 1^T, times the image's 1/s (`ClsState.inner_scale`); its bias joins
      out_proj's (W_out beta + b_out);
    - a post-norm on the attention's output after out_proj (EVA02-E): g * C(W_out u_h) / s, C the centring over the
      D features: the fold's rows are centred and scaled by g, times the image's 1/s (`ClsState.post_scale`); out_proj's
      bias becomes g * C(b_out) / s (per image) plus the norm's own bias."""
    n_heads, d_model = block.n_heads, block.d_model
    g = block.scale_attn_gamma
    ones = torch.ones(d_model, dtype=like.dtype, device=like.device)
    ls1 = g.to(like.dtype) if g is not None else ones
    w_out = block.w_out.to(like.dtype)
    b_out = block.b_out.to(like.dtype) if block.b_out is not None else torch.zeros(d_model, dtype=like.dtype,
                                                                                     device=like.device)
    if block.inner_norm_affine is not None:
        w_in, b_in, _ = block.inner_norm_affine
        g_in = w_in.to(like.dtype) if w_in is not None else ones
        if b_in is not None:
            b_out = w_out @ b_in.to(like.dtype) + b_out
        w_out = w_out * g_in - ((w_out @ g_in) / d_model)[:, None]  # what one unit of a head feature removes via the mean
    scaled_bias = None
    if block.post_norm_attn_affine is not None:
        w_p, b_p, _ = block.post_norm_attn_affine
        g_p = w_p.to(like.dtype) if w_p is not None else ones
        w_out = (w_out - w_out.mean(dim=0, keepdim=True)) * g_p[:, None]
        scaled_bias = ((b_out - b_out.mean()) * g_p * ls1 * gamma) @ proj
        b_out = b_p.to(like.dtype) if b_p is not None else torch.zeros_like(b_out)
    w_out_t = w_out.t().reshape(n_heads, d_model // n_heads, d_model)
    fold = (w_out_t * (ls1 * gamma)) @ proj
    if block.head_gain is not None:
        fold = fold * block.head_gain.reshape(n_heads, 1, 1)
    bias = (b_out * ls1 * gamma) @ proj
    return fold, bias, scaled_bias


def _inner(st, t: torch.Tensor) -> torch.Tensor:
    """Per-head outputs [b, ...] times the image's 1/s of the block's inner norm and post-norm (EVA), else as they
    are."""
    for f in (st.inner_scale, st.post_scale):
        if f is not None:
            t = t * f.reshape(-1, *([1] * (t.ndim - 1)))
    return t


def _bias(st, bias: torch.Tensor, scaled_bias) -> torch.Tensor:
    """The layer's bias: [d] (the same for every image), or [b, d] with a post-norm's per-image share."""
    return bias if scaled_bias is None else bias + st.post_scale[:, None] * scaled_bias


@concise
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
    tower = read_tower(model)
    with torch.no_grad():
        return _project(tower, images, directions, heads, any_size)


def _project_pooled(tower: Tower, images, T, sel) -> Projection:
    """`project` for attention-pooled towers, through the spatial decomposition of the batch (its [b, L, N, H, d']
    terms are made, one batch at a time)."""
    d = _decompose_pooled(tower, images, spatial=True)
    on, off = sel.to(d.heads.dtype).to(d.heads.device), (~sel).to(d.heads.dtype).to(d.heads.device)
    tokens = torch.einsum("blnhe,lh,ke->bnk", d.heads, on, T)
    other = torch.einsum("blnhe,lh,ke->bk", d.heads, off, T)
    return Projection(tokens=tokens, other_heads=other, mlps=d.mlps.sum(dim=1) @ T.t(), norm=d.norm)


def _project(tower: Tower, images, directions, heads_mask, any_size=False) -> Projection:
    blocks = tower.blocks
    L, H, d_model = tower.n_layers, tower.n_heads, tower.d_model
    gh, gw = tower.grid_of(images)
    N = 1 + gh * gw
    like = tower.weight
    gamma, beta, proj, eps = _post_params(tower, like)
    T = directions.to(device=like.device, dtype=like.dtype)  # [k, d_embed]
    if T.ndim != 2 or T.shape[1] != proj.shape[1]:
        raise BadInputError(f"directions must be [k, {proj.shape[1]}] (the model's embedding width); got "
                         f"{tuple(T.shape)}")
    sel = torch.ones(L, H, dtype=torch.bool) if heads_mask is None else torch.as_tensor(heads_mask, dtype=torch.bool)
    if tuple(sel.shape) != (L, H):
        raise BadInputError(f"heads mask must be [{L}, {H}]; got {tuple(sel.shape)}")
    if tower.pool_head is not None:
        if any_size and tuple(images.shape[-2:]) != tower.image_size:
            raise BadInputError(f"attention-pooled towers are decomposed at their own image size {tower.image_size}; "
                                f"got {tuple(images.shape[-2:])}")
        return _project_pooled(tower, tower.to_input(images), T, sel)
    b, k = images.shape[0], T.shape[0]
    K = 2 * L + 1
    tokens = torch.zeros(b, N, k, dtype=like.dtype, device=like.device)
    other = torch.zeros(b, k, dtype=like.dtype, device=like.device)
    token_bias = torch.zeros(b, k, dtype=like.dtype, device=like.device)
    mlps_raw = torch.zeros(b, d_model, dtype=like.dtype, device=like.device)
    x_final = None
    proj_t = proj @ T.t()  # [d_model, k]
    for item in _run(tower, images, keep_values=True, any_size=any_size):
        if item[0] == "embed":
            mlps_raw += tower.pooled_token(item[1])
        elif item[0] == "layer":
            l, st = item[1], item[2]
            # fold straight into the k directions: [H, d_head, k] and [k], never the [H, d_head, d_embed] fold
            fold_t, bias_t, scaled_t = _layer_fold(blocks[l], gamma, proj_t, like)
            bias_t = _bias(st, bias_t, scaled_t)  # [k], or [b, k] under a post-norm
            on = sel[l].nonzero().flatten().tolist()
            off = (~sel[l]).nonzero().flatten().tolist()
            if on:
                weighted = _inner(st, st.attn_cls[:, on].unsqueeze(-1) * st.values[:, on])  # [b, h, N, d_head]
                tokens += torch.einsum("bhnd,hdk->bnk", weighted, fold_t[on])
                token_bias += bias_t * (len(on) / (N * H))
            if off:
                other += torch.einsum("bhd,hdk->bk", _inner(st, st.o_cls[:, off]), fold_t[off]) \
                    + bias_t * (len(off) / H)
            mlps_raw += st.mlp_cls
        else:
            x_final = item[1]
    mu, sigma, e, norm, scale, offset = _linearised_ln_post(tower, x_final, gamma, beta, proj, eps)
    offset_t = offset @ T.t()  # [b, k]
    n_on, n_off = int(sel.sum()), int((~sel).sum())
    tokens = (tokens + token_bias[:, None]) * scale[:, None, None] \
        + (offset_t * (n_on / (K * N * H)) / norm[:, None])[:, None]
    other = other * scale[:, None] + offset_t * (n_off / (K * H)) / norm[:, None]
    mlps = ((mlps_raw * gamma) @ proj @ T.t()) * scale[:, None] + offset_t * ((L + 1) / K) / norm[:, None]
    return Projection(tokens=tokens, other_heads=other, mlps=mlps, norm=norm)


def decompose(model, images: torch.Tensor, spatial: bool = True) -> Decomposition:
    """Split the normalised image embeddings of a batch into per-(layer, head, token) and per-MLP terms.

    Args:
        model: a stock open_clip CLIP model (or its image tower) with a ViT image tower, in eval mode.
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
    tower = read_tower(model)
    with torch.no_grad():
        if tower.pool_head is not None:
            return _decompose_pooled(tower, images, spatial)
        return _decompose(tower, images, spatial)


def _decompose(tower: Tower, images: torch.Tensor, spatial: bool) -> Decomposition:
    blocks = tower.blocks
    n_layers, n_heads, d_model = tower.n_layers, tower.n_heads, tower.d_model
    n_tokens = 1 + tower.grid_size[0] * tower.grid_size[1]
    like = tower.weight
    gamma, beta, proj, eps = _post_params(tower, like)
    d_embed = proj.shape[1]
    b = images.shape[0]
    K = 2 * n_layers + 1

    heads_out = None
    if spatial:
        heads_out = torch.empty(b, n_layers, n_tokens, n_heads, d_embed, dtype=like.dtype, device=like.device)
        buf = torch.empty(b, n_heads, n_tokens, d_embed, dtype=like.dtype, device=like.device)
        layer_bias = torch.empty(b, n_layers, d_embed, dtype=like.dtype, device=like.device)
    heads_ns = torch.empty(b, n_layers, n_heads, d_embed, dtype=like.dtype, device=like.device)
    cls_cls = torch.empty(b, n_layers, n_heads, d_embed, dtype=like.dtype, device=like.device)
    mlps_raw = torch.empty(b, n_layers + 1, d_model, dtype=like.dtype, device=like.device)

    x_final = None
    for item in _run(tower, images, keep_values=True):
        if item[0] == "embed":
            mlps_raw[:, 0] = tower.pooled_token(item[1])
        elif item[0] == "layer":
            l, st = item[1], item[2]
            fold, bias, scaled = _layer_fold(blocks[l], gamma, proj, like)
            bias = _bias(st, bias, scaled)  # [d'], or [b, d'] under a post-norm
            # Non-spatial: sum over tokens of A[0,m] v[m] is the attention output at CLS.
            bias = bias.expand(b, -1)  # [b, d']
            heads_ns[:, l] = torch.einsum("bhd,hde->bhe", _inner(st, st.o_cls), fold) + bias[:, None] / n_heads
            cls_cls[:, l] = torch.einsum("bhd,hde->bhe",
                                         _inner(st, st.attn_cls[:, :, 0, None] * st.values[:, :, 0]), fold)
            cls_cls[:, l] += bias[:, None] / (n_tokens * n_heads)
            if spatial:
                weighted = _inner(st, st.attn_cls.unsqueeze(-1) * st.values)  # [batch, head, token, d_head]
                torch.matmul(weighted, fold, out=buf)  # [batch, head, token, d_embed], one buffer for all layers
                heads_out[:, l].copy_(buf.transpose(1, 2))
                layer_bias[:, l] = bias / (n_tokens * n_heads)  # added with the final scaling, in the same pass
            mlps_raw[:, l + 1] = st.mlp_cls
        else:
            x_final = item[1]

    mu, sigma, e, norm, scale, offset = _linearised_ln_post(tower, x_final, gamma, beta, proj, eps)

    mlps = ((mlps_raw * gamma) @ proj) * scale[:, None, None] + (offset / (K * norm[:, None]))[:, None]
    heads_ns.mul_(scale[:, None, None, None]).add_((offset / (K * n_heads * norm[:, None]))[:, None, None])
    cls_cls.mul_(scale[:, None, None, None]).add_(
        (offset / (K * n_tokens * n_heads * norm[:, None]))[:, None, None])
    if spatial:
        # one fused pass over the big tensor: terms * scale + (layer bias * scale + offset share)
        const = layer_bias * scale[:, None, None] + (offset / (K * n_tokens * n_heads * norm[:, None]))[:, None]
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
        grid_size=tuple(tower.grid_size),
    )


def _center(t: torch.Tensor) -> torch.Tensor:
    """t minus its mean over the last (d_model) axis: the part of a residual-stream term the final norm sees."""
    return t - t.mean(dim=-1, keepdim=True)


def _decompose_pooled(tower: Tower, images: torch.Tensor, spatial: bool) -> Decomposition:
    """The decomposition of an attention-pooled tower (see `Decomposition`).

    The final norm is linearised per token m with the token's own mean and std (sigma_m): centring is linear, so
    every residual-stream term c_m reaches the pooled vector as sum_g sum_m a[g, m] / sigma_m * F_g center(c_m), with
    F_g = W_out[:, g] W_v[g] diag(gamma) (then the projection). Attention terms are computed from the per-head
    outputs at every token weighted by a[g, m] / sigma_m (non-spatial), or from the full attention maps (spatial:
    sum_m a[g, m] / sigma_m A[m, n] weights source token n); nothing of size [N, N, H, d'] is made.
    """
    if tower.dropout_prob > 0:
        raise BadInputError("patch dropout is active in training mode: call model.eval() before decomposing")
    tower.check_images(images)
    pool = tower.pool_head
    blocks = tower.blocks
    L, H, d_model = tower.n_layers, tower.n_heads, tower.d_model
    G, dg = pool.n_heads, pool.d_head
    dh = d_model // H
    like = tower.weight
    dt, dev = like.dtype, like.device
    weight, beta, eps = tower.norm_final_affine
    gamma = weight.to(dt) if weight is not None else torch.ones(d_model, dtype=dt, device=dev)
    beta = beta.to(dt) if beta is not None else torch.zeros(d_model, dtype=dt, device=dev)
    proj = tower.projection.to(dt) if tower.projection is not None else None

    def to_e(t):  # d_model -> d_embed: the projection, when the tower has one
        return t @ proj if proj is not None else t

    # the forward, keeping what every token receives
    x = tower.embed(tower.to_input(images))
    embed = x
    heads_out, mlp_out, traces = [], [], []
    for block in blocks:
        if spatial:
            t = block.forward(x)
            traces.append((t.probs, t.v))
            heads_out.append(t.heads_out)
            mlp_out.append(t.x_out - t.y)
            x = t.x_out
        else:
            x, ho, mo = block.forward_tokens(x)
            heads_out.append(ho)
            mlp_out.append(mo)
    b, N, _ = x.shape

    # the pool at the image's own statistics
    mu = x.mean(dim=-1)  # [b, N]
    sigma = torch.sqrt(x.var(dim=-1, unbiased=False) + eps)  # [b, N]
    xn = tower.norm_final(x)
    a = pool.probs(xn)  # [b, G, N]
    vals = pool.values(xn)  # [b, G, N, dg]
    y = pool.head_out(a, vals)
    mlp_term = pool.mlp_term(y)
    e = to_e(y + mlp_term)
    norm = e.norm(dim=-1)
    inv = 1.0 / norm  # [b]

    # F_g = Vg[g] @ Bg[g]: Vg [G, d_model, dg] the value path (gamma folded), Bg [G, dg, d_embed] out_proj's slice
    # of head g then the projection. Kept factored (rank dg): never a [G, d_model, d_embed] product.
    w_out_g = pool.w_out.t().reshape(G, dg, d_model).to(dt)  # rows of W_out^T per head
    w_v_g = pool.w_v.reshape(G, dg, d_model).to(dt)
    Vg = (gamma[None, :, None] * w_v_g.transpose(1, 2)).contiguous()  # [G, d_model, dg]
    Bg = to_e(w_out_g).contiguous()  # [G, dg, d_embed]
    d_embed = Bg.shape[-1]
    w = a / sigma[:, None, :]  # [b, G, N]
    s_g = w.sum(dim=-1)  # [b, G]

    def through(u):  # u [b, G, d_model]: centred inputs per pool head -> [b, d_embed], summed over g
        return torch.einsum("bgc,gce->be", torch.einsum("bgd,gdc->bgc", u, Vg), Bg)

    def token_term(c):  # c [b, N, d_model] a residual-stream term at every token -> [b, d_embed]
        return through(_center(torch.einsum("bgn,bnd->bgd", w, c)))

    mlps = torch.empty(b, L + 2, d_embed, dtype=dt, device=dev)
    mlps[:, 0] = token_term(embed)
    heads = torch.empty((b, L, N, H, d_embed) if spatial else (b, L, H, d_embed), dtype=dt, device=dev)
    for l, block in enumerate(blocks):
        g1 = block.scale_attn_gamma
        ls1 = g1.to(dt) if g1 is not None else torch.ones(d_model, dtype=dt, device=dev)
        w_o = (block.w_out.t().reshape(H, dh, d_model).to(dt) * ls1).contiguous()  # [H, dh, d_model], layer scale
        if block.head_gain is not None:
            w_o = w_o * block.head_gain.reshape(H, 1, 1)
        w_o = _center(w_o)  # centring is linear: fold it into W_O
        if block.b_out is not None:  # out_proj's bias reaches every token: spread evenly over the heads (and tokens)
            bias_term = through(_center(block.b_out.to(dt) * ls1)[None, None] * s_g[..., None]) / H  # [b, d_embed]
        else:
            bias_term = torch.zeros(b, d_embed, dtype=dt, device=dev)
        if spatial:
            A = torch.einsum("hkd,gdc->ghkc", w_o, Vg)  # [G, H, dh, dg]: head h's output into pool head g's values
            probs, v = traces[l]  # [b, H, N, N], [b, H, N, dh]
            beta_w = torch.einsum("bgm,bhmn->bghn", w, probs)  # weight of source token n per pool head g
            Y = torch.einsum("bhnk,ghkc->bhngc", v, A) * beta_w.permute(0, 2, 3, 1).unsqueeze(-1)
            heads[:, l] = torch.einsum("bhngc,gce->bnhe", Y, Bg) + bias_term[:, None, None] / N
        else:
            o = heads_out[l].reshape(b, N, H, dh)
            r = torch.einsum("bgn,bnhd->bghd", w, o)  # [b, G, H, dh]
            # explicit batched products (einsum would re-lay the weights out on every call)
            u = torch.bmm(r.permute(2, 0, 1, 3).reshape(H, b * G, dh), w_o)  # [H, b*G, d_model]
            u = u.view(H, b, G, d_model).permute(2, 1, 0, 3).reshape(G, b * H, d_model)
            t = torch.bmm(torch.bmm(u, Vg), Bg).sum(dim=0)  # [b*H, d_embed]
            heads[:, l] = t.view(b, H, d_embed) + bias_term[:, None]
        mlps[:, l + 1] = token_term(mlp_out[l])
    # the pooling head's own terms: every constant and its MLP
    const = torch.einsum("d,gdc,gcm->m", beta, w_v_g.transpose(1, 2), w_out_g)  # beta through each value path
    if pool.b_v is not None:
        const = const + F.linear(pool.b_v.to(dt), pool.w_out.to(dt))
    out_bias = pool.b_out.to(dt) if pool.b_out is not None else torch.zeros(d_model, dtype=dt, device=dev)
    mlps[:, L + 1] = to_e(const + out_bias)[None] + to_e(mlp_term)
    heads.mul_(inv.view(b, *([1] * (heads.ndim - 1))))
    mlps.mul_(inv[:, None, None])

    # the published pooling-level split: a[g, m] W_out[:, g] v[g, m] per pooling head and token
    if spatial:
        pool_heads = to_e(torch.einsum("bgnk,gkd->bgnd", a.unsqueeze(-1) * vals, w_out_g))  # [b, G, N, d_embed]
    else:
        pool_heads = to_e(torch.einsum("bgk,gkd->bgd", (a.unsqueeze(-1) * vals).sum(dim=2), w_out_g))
    return Decomposition(
        heads=heads, mlps=mlps, cls_to_cls=None, norm=norm, embedding=e * inv[:, None], ln_mean=mu, ln_std=sigma,
        spatial=spatial, grid_size=tuple(tower.grid_size), pool_heads=pool_heads * inv.view(b, 1, *([1] * (pool_heads.ndim - 2))),
        pool_mlp=to_e(mlp_term) * inv[:, None], pool_out_bias=to_e(out_bias)[None] * inv[:, None])


def pool_projection(model, images: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """[b, G, N, k]: an attention-pooled tower's published pooling-level terms (per pooling head g and token m,
    a[g, m] W_out[:, g] (W_v[g] xn_m + b_v[g]), divided by ||e||) dotted with `directions` [k, d_embed]; one plain
    forward and one small product, never the [b, G, N, d'] terms."""
    tower = read_tower(model)
    if tower.pool_head is None:
        raise BadInputError("pooling-head maps need an attention-pooled tower (SigLIP); this one pools at a CLS token")
    like = tower.weight
    T = torch.as_tensor(directions).to(device=like.device, dtype=like.dtype)
    T = T[None] if T.ndim == 1 else T
    if T.ndim != 2 or T.shape[1] != tower.d_embed:
        raise BadInputError(f"directions must be [k, {tower.d_embed}]; got {tuple(T.shape)}")
    tower.check_images(images)
    pool = tower.pool_head
    G, dg = pool.n_heads, pool.d_head
    with torch.no_grad():
        x = tower.final_stream(images)
        xn = tower.norm_final(x)
        a, vals = pool.probs(xn), pool.values(xn)
        e = tower.attention_pooled(x)
        to_k = pool.w_out.t().reshape(G, dg, -1)  # [G, dg, d_model]
        to_k = to_k @ (tower.projection @ T.t() if tower.projection is not None else T.t())  # [G, dg, k]
        out = torch.einsum("bgn,bgnc,gck->bgnk", a, vals, to_k)
        return out / e.norm(dim=-1)[:, None, None, None]


def cls_attention(model, images: torch.Tensor) -> torch.Tensor:
    """[batch, layer, head, token]: the CLS query's attention weights of every block (rows sum to 1)."""
    rows = []
    with torch.no_grad():
        for item in _run(read_tower(model), images, keep_values=False):
            if item[0] == "layer":
                rows.append(item[2].attn_cls)
    return torch.stack(rows, dim=1)
