"""The model reader and textspan's forward: the one module that knows a model library's attribute names.

`read_tower(model)` translates a stock open_clip image tower into a `Tower`: the patch embedding, class token and
positions, the pre-norm, one `Block` per residual block (norms, attention projections, heads, qk-norm, head scale,
layer scale, MLP) and the pooling (final norm and projection). Everything that computes with a model (the
decomposition, every explainer, the text side of zero-shot classifiers, training of the built-in model) goes
through this module; no other file names an open_clip attribute (a test greps for them). A new model family is a new
reader here.

The forward is written once: `Block.forward` runs one residual block from its weights, keeping as much of the
attention as the caller asks for (nothing, the CLS query row, or the full map, optionally with a tensor added to the
probabilities so that a gradient with respect to it is the gradient with respect to the probabilities). Our forward
equals the library's own ``encode_image`` (tested on every supported block kind: float64 1e-10, float32 1e-5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import BadInputError, UnsupportedModelError


# --------------------------------------------------------------------------------------------------------------------
# what a model is made of


def image_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The image tower of a CLIP model (or the tower itself when given one): open_clip's ``visual``, transformers'
    ``vision_model``."""
    if isinstance(model, Tower):
        return model.module
    sub = getattr(model, "visual", None)
    if isinstance(sub, torch.nn.Module):
        return sub
    while isinstance(getattr(model, "vision_model", None), torch.nn.Module):  # transformers nests its wrappers
        model = model.vision_model
    return model


def _is_transformers(module) -> bool:
    return type(module).__module__.startswith("transformers.")


@dataclass(eq=False)
class BlockTrace:
    """What one block computed (full attention kept). probs: [b, head, N, N] post-softmax; heads_out: [b, N, d_model]
    the attention output before out_proj (heads concatenated, head scale applied); y: the residual stream after
    attention; x_out: after the MLP."""

    x_in: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    probs: torch.Tensor
    heads_out: torch.Tensor
    y: torch.Tensor
    x_out: torch.Tensor
    hidden: Optional[torch.Tensor] = None  # [b, N, d_mlp] the MLP's pre-activation, when it is Linear-act-Linear


@dataclass(eq=False)
class ClsState:
    """What one block leaves behind for the decomposition (CLS query only)."""

    o_cls: torch.Tensor  # [batch, head, d_head], attention-weighted values at the CLS query, before W_O
    attn_cls: torch.Tensor  # [batch, head, token], the CLS row of the attention map
    values: Optional[torch.Tensor]  # [batch, head, token, d_head] when kept
    mlp_cls: torch.Tensor  # [batch, d_model], the MLP output (after layer scale) at CLS


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, N, d_model] -> [b, head, N, d_head]."""
    b, n, d = t.shape
    return t.view(b, n, n_heads, d // n_heads).transpose(1, 2)


@dataclass(eq=False)
class Block:
    """One pre-norm residual block: y = x + scale_attn(attn(norm_attn(x))), x_out = y + scale_mlp(mlp(norm_mlp(y))).

    Attributes (textspan's names; the reader below maps each to the library's):
        w_in, b_in: [3 d_model, d_model], [3 d_model] the q/k/v projection; w_out, b_out: the output projection.
        q_norm, k_norm: per-head qk-norm (or None); cosine_scale / cosine_scale_max: scaled cosine attention (or
        None); head_gain: [head, 1, 1] per-head output scale (or None).
        scale_attn, scale_mlp: layer-scale callables; scale_attn_gamma, scale_mlp_gamma their vectors (None: no
        layer scale).
        fc_in, act, fc_out: the MLP's parts when it is Linear -> elementwise activation -> Linear (else None);
        norm_mlp_affine: (weight, bias, eps) of norm_mlp when it is a LayerNorm (else None).
    """

    n_heads: int
    norm_attn: Callable
    w_in: torch.Tensor
    b_in: Optional[torch.Tensor]
    w_out: torch.Tensor
    b_out: Optional[torch.Tensor]
    q_norm: Optional[Callable]
    k_norm: Optional[Callable]
    cosine_scale: Optional[torch.Tensor]
    cosine_scale_max: Optional[float]
    head_gain: Optional[torch.Tensor]
    scale_attn: Callable
    scale_attn_gamma: Optional[torch.Tensor]
    norm_mlp: Callable
    mlp: Callable
    scale_mlp: Callable
    scale_mlp_gamma: Optional[torch.Tensor]
    fc_in: Optional[torch.nn.Linear]
    act: Optional[Callable]
    fc_out: Optional[torch.nn.Linear]
    norm_mlp_affine: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]]

    @property
    def d_model(self) -> int:
        return self.w_out.shape[0]

    # the attention, written once -------------------------------------------------------------------------------

    def qkv(self, x: torch.Tensor):
        """Per-head q, k, v [b, head, N, d_head] from the block's input residual stream x [b, N, d_model]."""
        return self.qkv_normed(self.norm_attn(x))

    def qkv_normed(self, a: torch.Tensor):
        """Per-head q, k, v [b, head, N, d_head] from the attention norm's output a [b, N, d_model]."""
        q, k, v = F.linear(a, self.w_in, self.b_in).chunk(3, dim=-1)
        return tuple(split_heads(t, self.n_heads) for t in (q, k, v))

    def _normed(self, q: torch.Tensor, k: torch.Tensor):
        """q and k after the per-head qk-norm, when the block has one."""
        if self.q_norm is not None:
            return self.q_norm(q), self.k_norm(k)
        return q, k

    def _unit(self, q: torch.Tensor, k: torch.Tensor):
        """(qk-normed) q and k as the logits multiply them: unit length under scaled cosine attention."""
        if self.cosine_scale is not None:
            return F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q, k

    def logit_operands(self, q: torch.Tensor, k: torch.Tensor):
        """(q', k') from per-head q, k: the logits are q' k'^T times the block's scale (qk-norm applied, and unit
        length under scaled cosine attention)."""
        return self._unit(*self._normed(q, k))

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Pre-softmax attention logits [b, head, rows, N] of (qk-normed) queries and keys."""
        qu, ku = self._unit(q, k)
        if self.cosine_scale is not None:  # scaled cosine attention
            scale = torch.clamp(self.cosine_scale, max=self.cosine_scale_max).exp()  # [head, 1, 1]
            return qu @ ku.transpose(-1, -2) * scale
        return qu @ ku.transpose(-1, -2) * (q.shape[-1] ** -0.5)

    def attention_probs(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[b, head, rows, N] post-softmax attention of the query rows q over the keys k."""
        return self._logits(*self._normed(q, k)).softmax(dim=-1)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """[b, head, N, d_head] -> [b, N, d_model], head scale applied (the input of the output projection)."""
        if self.head_gain is not None:
            out = out * self.head_gain
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)

    def after_heads(self, x_in: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention: x_in + scale_attn(heads_out W_out^T + b_out)."""
        return x_in + self.scale_attn(F.linear(heads_out, self.w_out, self.b_out))

    def mlp_out(self, y: torch.Tensor) -> torch.Tensor:
        """scale_mlp(mlp(norm_mlp(y))): what the MLP adds to the residual stream."""
        return self.scale_mlp(self.mlp(self.norm_mlp(y)))

    def after_mlp(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.mlp_out(y)

    # the block forward, written once ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, delta: Optional[torch.Tensor] = None) -> BlockTrace:
        """The block with the full attention map made explicit; `delta` ([b, head, N, N]) is added to the
        probabilities (a gradient with respect to it is the gradient with respect to the probabilities)."""
        q, k, v = self.qkv(x)
        probs = self.attention_probs(q, k)
        used = probs if delta is None else probs + delta
        heads_out = self.merge_heads(used @ v)
        y = self.after_heads(x, heads_out)
        if self.fc_in is None:
            return BlockTrace(x_in=x, q=q, k=k, v=v, probs=probs, heads_out=heads_out, y=y, x_out=self.after_mlp(y))
        hidden = self.fc_in(self.norm_mlp(y))  # the MLP's own steps, its pre-activation kept
        x_out = y + self.scale_mlp(self.fc_out(self.act(hidden)))
        return BlockTrace(x_in=x, q=q, k=k, v=v, probs=probs, heads_out=heads_out, y=y, x_out=x_out, hidden=hidden)

    def forward_cls(self, x: torch.Tensor, keep_values: bool = False,
                    query: str = "cls") -> Tuple[torch.Tensor, ClsState]:
        """The block with only the pooled query's attention row made explicit (fused attention for the rest, where
        the block allows it): (x_out, `ClsState`). ``query="cls"``: the CLS token's row; ``"avg"``: the mean of the
        patch tokens' rows (average-pooled towers, whose embedding reads the mean of the patch tokens)."""
        q, k, v = self.qkv(x)
        q, k = self._normed(q, k)
        if query == "avg":
            probs = self._logits(q, k).softmax(dim=-1)
            out = probs @ v
            attn_cls = probs[:, :, 1:].mean(dim=2)  # [batch, head, token]: the patch queries' mean row
            o_cls = out[:, :, 1:].mean(dim=2)
        else:
            if self.cosine_scale is None:
                out = F.scaled_dot_product_attention(q, k, v)  # [batch, head, token, d_head]
                attn_cls = self._logits(q[:, :, :1], k).softmax(dim=-1).squeeze(2)  # [batch, head, token]
            else:
                probs = self._logits(q, k).softmax(dim=-1)
                out = probs @ v
                attn_cls = probs[:, :, 0]
            o_cls = out[:, :, 0]
        y = self.after_heads(x, self.merge_heads(out))
        mlp_out = self.mlp_out(y)
        mlp_cls = mlp_out[:, 1:].mean(dim=1) if query == "avg" else mlp_out[:, 0]
        return y + mlp_out, ClsState(o_cls=o_cls, attn_cls=attn_cls, values=v if keep_values else None,
                                     mlp_cls=mlp_cls)

    def forward_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block with fused attention, keeping what every token receives: (x_out, heads_out [b, N, d_model]
        (heads concatenated, before the output projection), mlp_out [b, N, d_model])."""
        q, k, v = self.qkv(x)
        q, k = self._normed(q, k)
        if self.cosine_scale is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = self._logits(q, k).softmax(dim=-1) @ v
        heads_out = self.merge_heads(out)
        y = self.after_heads(x, heads_out)
        mlp_out = self.mlp_out(y)
        return y + mlp_out, heads_out, mlp_out

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output only."""
        return self.forward_cls(x)[0]



@dataclass(eq=False)
class AttnPool:
    """Multi-head attention pooling with a learned probe (SigLIP's "MAP" head), as textspan computes with it.

    pooled = y + mlp(norm(y)),  y = sum_g W_out[:, g] (sum_m a[g, m] v[g, m]) + b_out,
    a[g] = softmax_m(q_g . k[g, m] / sqrt(d_head)),  q = W_q probe + b_q,  k, v = W_k xn + b_k, W_v xn + b_v,
    with xn the tokens after the trunk's final per-token norm.
    """

    n_heads: int
    probe: torch.Tensor  # [d_model]
    w_q: torch.Tensor
    b_q: Optional[torch.Tensor]
    w_k: torch.Tensor
    b_k: Optional[torch.Tensor]
    w_v: torch.Tensor
    b_v: Optional[torch.Tensor]
    w_out: torch.Tensor
    b_out: Optional[torch.Tensor]
    norm: Callable
    mlp: Optional[Callable]

    @property
    def d_head(self) -> int:
        return self.w_out.shape[1] // self.n_heads

    def probs(self, xn: torch.Tensor) -> torch.Tensor:
        """[b, G, N]: the probe's attention over the tokens xn [b, N, d_model]."""
        q = F.linear(self.probe.to(xn.dtype), self.w_q, self.b_q).view(self.n_heads, 1, self.d_head)
        k = split_heads(F.linear(xn, self.w_k, self.b_k), self.n_heads)  # [b, G, N, d_head]
        return ((q @ k.transpose(-1, -2)) * (self.d_head ** -0.5)).softmax(dim=-1).squeeze(2)

    def values(self, xn: torch.Tensor) -> torch.Tensor:
        """[b, G, N, d_head]: per pooling head the value of each token (value bias included)."""
        return split_heads(F.linear(xn, self.w_v, self.b_v), self.n_heads)

    def head_out(self, probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """[b, d_model]: the attention output after out_proj (its bias included)."""
        o = (probs.unsqueeze(-1) * values).sum(dim=2)  # [b, G, d_head]
        return F.linear(o.reshape(o.shape[0], -1), self.w_out, self.b_out)

    def mlp_term(self, y: torch.Tensor) -> torch.Tensor:
        """[b, d_model]: what the pooling MLP adds to the pooled vector (0 without an MLP)."""
        return self.mlp(self.norm(y)) if self.mlp is not None else torch.zeros_like(y)

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        y = self.head_out(self.probs(xn), self.values(xn))
        return y + self.mlp_term(y)

@dataclass(eq=False)
class Tower:
    """A ViT image tower as textspan computes with it: CLS-token pooling (final norm at CLS, projection), or
    attention pooling (`pool_head`: final norm on every token, the pooling head, projection).

    Shapes: images [b, 3, H, W]; tokens [b, N, d_model]: the CLS token first when the tower has one (`n_prefix` 1),
    then the patch grid row-major.
    """

    module: torch.nn.Module
    patch_embed: Callable
    weight: torch.Tensor  # the patch embedding's weight: the tower's device and dtype
    cls_token: Optional[torch.Tensor]  # None: no CLS token (attention-pooled towers)
    pos_embed: torch.Tensor  # [n_prefix + grid tokens, d_model]
    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    grid_size: Tuple[int, int]
    norm_pre: Callable
    blocks: List[Block]
    norm_final: Callable
    norm_final_affine: Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]
    projection: Optional[torch.Tensor]
    dropout_prob: float
    activation: str
    pool_head: Optional[AttnPool] = None
    family: str = "open_clip"
    query: str = "cls"  # the token the embedding reads: "cls", or "avg" (the mean of the patch tokens, e.g. CLIPA)
    score_scale: Optional[float] = None  # exp(logit_scale) of the whole model, when read from one (None: a tower)

    def pooled_token(self, x: torch.Tensor) -> torch.Tensor:
        """[b, d_model]: what the final norm reads from a token stream [b, N, d_model] (CLS-read towers)."""
        return x[:, 1:].mean(dim=1) if self.query == "avg" else x[:, 0]

    @property
    def n_prefix(self) -> int:
        """1 when the tokens start with a CLS token, else 0."""
        return 0 if self.cls_token is None else 1

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.grid_size[0] * self.grid_size[1]

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def n_heads(self) -> int:
        return self.blocks[0].n_heads

    @property
    def d_model(self) -> int:
        return self.blocks[0].d_model

    @property
    def d_embed(self) -> int:
        return self.projection.shape[1] if self.projection is not None else self.d_model

    @property
    def d_mlp(self) -> int:
        b = self.blocks[0]
        return b.fc_in.out_features if b.fc_in is not None else 0

    @property
    def layer_scale(self) -> bool:
        return self.blocks[0].scale_attn_gamma is not None

    def check_images(self, images: torch.Tensor, any_size: bool = False) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise BadInputError(f"images must be a preprocessed batch [batch, 3, height, width]; got "
                             f"{tuple(images.shape)}")
        if any_size:
            if images.shape[-2] < self.patch_size[0] or images.shape[-1] < self.patch_size[1]:
                raise BadInputError(f"images of {tuple(images.shape[-2:])} px are smaller than one {self.patch_size} "
                                 f"patch")
        elif tuple(images.shape[-2:]) != self.image_size:
            raise BadInputError(f"images are {tuple(images.shape[-2:])} px but the model expects {self.image_size}; use "
                             f"the model's preprocess")

    def grid_of(self, images: torch.Tensor) -> Tuple[int, int]:
        return images.shape[-2] // self.patch_size[0], images.shape[-1] // self.patch_size[1]

    def positions(self, grid, antialias: bool = True) -> torch.Tensor:
        """[1 + gh * gw, d_model]: the positional embedding for a (gh, gw) patch grid. Other grids than the model's
        own get the patch part resampled bicubically, in float32, with antialiasing by default (timm's
        ``resample_abs_pos_embed`` convention; the Grad-ECLIP notebook resamples without); nothing is modified."""
        pos = self.pos_embed
        own = self.grid_size
        grid = tuple(int(g) for g in grid)
        if grid == own:
            return pos
        p = self.n_prefix
        patch = pos[p:].float().reshape(1, own[0], own[1], -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
        patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([pos[:p], patch], dim=0)

    def embed_parts(self, images: torch.Tensor, antialias: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens [b, N, d_model]: CLS (when the tower has one) and the patch embeddings, before the positions;
        positions [N, d_model]): the two terms `embed` adds."""
        x = self.patch_embed(images)  # [batch, d_model, grid_h, grid_w]
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [batch, grid tokens, d_model]
        if self.cls_token is not None:
            cls = self.cls_token.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return x, self.positions(grid, antialias).to(x.dtype)

    def embed(self, images: torch.Tensor, antialias: bool = True) -> torch.Tensor:
        """[b, N, d_model]: norm_pre(patches + CLS (when the tower has one) + positions)."""
        tokens, positions = self.embed_parts(images, antialias)
        return self.norm_pre(tokens + positions)

    def pool(self, x_cls: torch.Tensor) -> torch.Tensor:
        """[b, d_embed]: the unnormalised embedding from the final residual stream at CLS (final norm, projection)."""
        e = self.norm_final(x_cls)
        return e @ self.projection if self.projection is not None else e

    def pool_stream(self, x: torch.Tensor) -> torch.Tensor:
        """[b, d_embed]: the unnormalised embedding from the whole final residual stream [b, N, d_model]."""
        if self.pool_head is None:
            return self.pool(self.pooled_token(x))
        e = self.pool_head.forward(self.norm_final(x))
        return e @ self.projection if self.projection is not None else e

    def probe_attention(self, x: torch.Tensor) -> torch.Tensor:
        """[b, G, N]: the pooling head's probe attention over the final stream x [b, N, d_model] (after the final
        per-token norm), the attention the embedding is pooled with."""
        return self.pool_head.probs(self.norm_final(x))

    def attention_pooled(self, x: torch.Tensor, delta: Optional[torch.Tensor] = None, normed: bool = True,
                         probs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[b, d_embed] unnormalised: the pooling head (and projection) on the token stream x [b, N, d_model], after
        the final per-token norm unless ``normed=False``; `delta` ([b, G, N]) is added to the probe's attention (a
        gradient with respect to it is the gradient with respect to those probabilities); `probs` replaces them."""
        pool = self.pool_head
        xn = self.norm_final(x) if normed else x
        a = pool.probs(xn) if probs is None else probs
        if delta is not None:
            a = a + delta
        y = pool.head_out(a, pool.values(xn))
        e = y + pool.mlp_term(y)
        return e @ self.projection if self.projection is not None else e

    def require_cls(self, what: str) -> None:
        """Refuse a computation defined through the CLS token on an attention-pooled tower."""
        if self.pool_head is not None:
            raise UnsupportedModelError(
                f"{what} follows the CLS token, and this {self.family} image tower has none (it pools with attention); "
                f"not supported for attention-pooled towers yet")

    def pooled_embedding(self, x_cls: torch.Tensor) -> torch.Tensor:
        """[b, d_embed]: the normalised embedding from the final residual stream at CLS."""
        return F.normalize(self.pool(x_cls), dim=-1)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(device=self.weight.device, dtype=self.weight.dtype)

    def final_stream(self, images: torch.Tensor) -> torch.Tensor:
        """[b, N, d_model]: the residual stream after the last block (no internals kept)."""
        x = self.embed(self.to_input(images))
        for block in self.blocks:
            x = block.fast(x)
        return x


# --------------------------------------------------------------------------------------------------------------------
# the open_clip reader


def check_decomposable(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` unless textspan's forward reproduces this image tower exactly."""
    if isinstance(model, Tower):
        return
    visual = image_tower(model)
    if _is_transformers(visual):
        _check_hf(visual)
        return
    if _timm_trunk(visual) is not None:
        _check_timm(visual)
        return
    from open_clip.transformer import (
        Attention,
        CustomResidualAttentionBlock,
        ResidualAttentionBlock,
        VisionTransformer,
    )

    visual = image_tower(model)
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"textspan decomposes ViT image towers (open_clip VisionTransformer, open_clip timm ViT trunks, "
            f"transformers CLIP/SigLIP); this model's is {type(visual).__name__}{_refusal_reason(visual)}")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            "CoCa's attentional pooling (attn_pool: 256 latent queries through cross-attention, then a contrastive "
            "token) is not supported: its contrastive embedding is one of 256 pooled latents, each attending over "
            "all tokens after a LayerNorm (ln_post before the pooler); textspan's attention-pooling reader covers "
            "one probe (SigLIP) only")
    pool_type = getattr(visual, "pool_type", "tok")
    if pool_type == "avg" and not getattr(visual, "final_ln_after_pool", False):
        raise UnsupportedModelError(
            "pool_type='avg' with ln_post before the pool (final_ln_after_pool=False) is not supported: ln_post would "
            "need linearising per token; average-pooled towers with ln_post after the pool (CLIPA) are")
    if pool_type == "avg" and getattr(visual, "class_embedding", None) is None:
        raise UnsupportedModelError("an average-pooled tower without a class token is not supported")
    if pool_type not in ("tok", "avg"):
        raise UnsupportedModelError(
            f"pool_type={pool_type!r} is not supported: the decomposition reads the CLS token ('tok') or the mean of "
            f"the patch tokens ('avg')")
    for i, block in enumerate(visual.transformer.resblocks):
        if isinstance(block, ResidualAttentionBlock):
            if hasattr(block, "ln_1_kv"):
                raise UnsupportedModelError(f"block {i} is a cross-attention block")
            if block.attn.in_proj_weight is None:
                raise UnsupportedModelError(f"block {i}: separate q/k/v projections are not supported")
        elif isinstance(block, CustomResidualAttentionBlock):
            attn = block.attn
            if not isinstance(attn, Attention):
                raise UnsupportedModelError(f"block {i}: unknown attention module {type(attn).__name__}")
            if not isinstance(attn.ln_inner, torch.nn.Identity):
                raise UnsupportedModelError(
                    f"block {i}: a LayerNorm between the heads and out_proj (scale_attn_inner) mixes the heads, so "
                    f"per-head terms are not exact")
            if not isinstance(block.ln_attn, torch.nn.Identity):
                raise UnsupportedModelError(f"block {i}: a LayerNorm after attention (scale_attn) is not supported")
        else:
            raise UnsupportedModelError(f"block {i}: unknown block type {type(block).__name__}")


def _gamma(ls) -> Optional[torch.Tensor]:
    return getattr(ls, "gamma", None)


def _affine(ln) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]:
    return getattr(ln, "weight", None), getattr(ln, "bias", None), getattr(ln, "eps", 1e-5)


def _read_block(block) -> Block:
    attn = block.attn
    custom = not isinstance(attn, torch.nn.MultiheadAttention)
    mlp = block.mlp
    parts = dict(mlp.named_children())
    simple_mlp = list(parts) == ["c_fc", "gelu", "c_proj"] or (
        list(parts) == ["c_fc", "gelu", "ln", "c_proj"] and isinstance(parts["ln"], torch.nn.Identity))
    return Block(
        n_heads=attn.num_heads,
        norm_attn=block.ln_1,
        w_in=attn.in_proj_weight,
        b_in=attn.in_proj_bias,
        w_out=attn.out_proj.weight,
        b_out=attn.out_proj.bias,
        q_norm=attn.ln_q if custom else None,
        k_norm=attn.ln_k if custom else None,
        cosine_scale=attn.logit_scale if custom else None,
        cosine_scale_max=getattr(attn, "logit_scale_max", None),
        head_gain=attn.head_scale if custom else None,
        scale_attn=block.ls_1,
        scale_attn_gamma=_gamma(block.ls_1),
        norm_mlp=block.ln_2,
        mlp=mlp,
        scale_mlp=block.ls_2,
        scale_mlp_gamma=_gamma(block.ls_2),
        fc_in=mlp.c_fc if simple_mlp else None,
        act=mlp.gelu if simple_mlp else None,
        fc_out=mlp.c_proj if simple_mlp else None,
        norm_mlp_affine=_affine(block.ln_2) if isinstance(block.ln_2, torch.nn.LayerNorm) else None,
    )


def read_tower(model: torch.nn.Module) -> Tower:
    """The `Tower` of a stock CLIP/SigLIP model (or of its image tower): open_clip ViTs, open_clip timm ViT trunks
    (SigLIP, SigLIP 2), transformers CLIP and SigLIP; refuses what it cannot reproduce."""
    if isinstance(model, Tower):
        return model
    tower = _read_tower(model)
    scale = getattr(model, "logit_scale", None)
    if torch.is_tensor(scale):
        tower.score_scale = float(scale.detach().exp())
    return tower


def _read_tower(model: torch.nn.Module) -> Tower:
    check_decomposable(model)
    visual = image_tower(model)
    if _is_transformers(visual):
        return _read_hf(model, visual)
    if _timm_trunk(visual) is not None:
        return _read_timm(visual)
    blocks = [_read_block(b) for b in visual.transformer.resblocks]
    b0 = visual.transformer.resblocks[0]
    return Tower(
        module=visual,
        patch_embed=visual.conv1,
        weight=visual.conv1.weight,
        cls_token=visual.class_embedding,
        pos_embed=visual.positional_embedding,
        image_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        grid_size=tuple(visual.grid_size),
        norm_pre=visual.ln_pre,
        blocks=blocks,
        norm_final=visual.ln_post,
        norm_final_affine=_affine(visual.ln_post),
        projection=visual.proj,
        dropout_prob=float(getattr(visual.patch_dropout, "prob", 0.0)) if visual.training else 0.0,
        activation=type(b0.mlp.gelu).__name__ if hasattr(b0.mlp, "gelu") else "?",
        query="avg" if getattr(visual, "pool_type", "tok") == "avg" else "cls",
        family="open_clip (average pool)" if getattr(visual, "pool_type", "tok") == "avg" else "open_clip",
    )


def _refusal_reason(visual) -> str:
    name = type(visual).__name__
    if "EVA" in name or "Eva" in name:
        return (" (EVA towers: rotary position embeddings make attention depend on token positions inside q.k, which "
                "the decomposition handles, but their SwiGLU MLPs and sub-LayerNorms are read by no reader yet)")
    if "ResNet" in name:
        return " (ResNets have no heads to decompose)"
    return ""


def _identity(x):
    return x


def _callable(module) -> Callable:
    return _identity if module is None or isinstance(module, torch.nn.Identity) else module


# ---- open_clip's timm trunks (SigLIP, SigLIP 2) ------------------------------------------------------------------


def _timm_trunk(visual):
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return None
    return trunk if type(trunk).__module__.startswith("timm.") else None


def _check_timm(visual) -> None:
    trunk = _timm_trunk(visual)
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(trunk, VisionTransformer):
        raise UnsupportedModelError(f"timm trunk {type(trunk).__name__} is not a timm VisionTransformer"
                                    f"{_refusal_reason(trunk)}")
    if getattr(trunk, "reg_token", None) is not None:
        raise UnsupportedModelError("timm trunks with register tokens are not supported")
    if trunk.attn_pool is None:
        raise UnsupportedModelError(
            f"timm trunk with global_pool={trunk.global_pool!r}: only attention pooling ('map', SigLIP) and no other "
            f"pooling is read")
    pool = trunk.attn_pool
    if not isinstance(pool, AttentionPoolLatent) or pool.latent_len != 1 or pool.pos_embed is not None \
            or not isinstance(pool.q_norm, torch.nn.Identity) or pool.pool != "token":
        raise UnsupportedModelError("the attention pool must be timm's AttentionPoolLatent with one latent, no "
                                    "position embedding and no qk-norm")
    if trunk.cls_token is not None and not trunk.pool_include_prefix:
        raise UnsupportedModelError("a CLS token that the attention pool does not see is not supported")
    if trunk.cls_token is not None:
        raise UnsupportedModelError("timm trunks with both a CLS token and an attention pool are not supported")
    if not isinstance(trunk.fc_norm, torch.nn.Identity) or not isinstance(trunk.head, torch.nn.Identity):
        raise UnsupportedModelError("a timm trunk with a classifier head or fc_norm after the pool is not supported")
    for name, mod in visual.head.named_children():
        if name not in ("drop", "proj"):
            raise UnsupportedModelError(f"open_clip timm head part {name!r} is not supported (only a linear proj)")
    for i, block in enumerate(trunk.blocks):
        if type(block) is not Block or type(block.attn) is not Attention:
            raise UnsupportedModelError(f"block {i}: {type(block).__name__} is not a plain timm ViT block")
        attn = block.attn
        if not isinstance(attn.norm, torch.nn.Identity) or getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"block {i}: a norm or gate between the heads and proj mixes the heads")
        if not isinstance(block.mlp.norm, torch.nn.Identity) or not hasattr(block.mlp, "fc1"):
            raise UnsupportedModelError(f"block {i}: only Linear -> activation -> Linear MLPs are supported")


def _timm_block(block) -> Block:
    attn, mlp = block.attn, block.mlp
    return Block(
        n_heads=attn.num_heads, norm_attn=block.norm1, w_in=attn.qkv.weight, b_in=attn.qkv.bias,
        w_out=attn.proj.weight, b_out=attn.proj.bias,
        q_norm=None if isinstance(attn.q_norm, torch.nn.Identity) else attn.q_norm,
        k_norm=None if isinstance(attn.k_norm, torch.nn.Identity) else attn.k_norm,
        cosine_scale=None, cosine_scale_max=None, head_gain=None,
        scale_attn=_callable(block.ls1), scale_attn_gamma=_gamma(block.ls1),
        norm_mlp=block.norm2, mlp=mlp, scale_mlp=_callable(block.ls2), scale_mlp_gamma=_gamma(block.ls2),
        fc_in=mlp.fc1, act=mlp.act, fc_out=mlp.fc2,
        norm_mlp_affine=_affine(block.norm2) if isinstance(block.norm2, torch.nn.LayerNorm) else None,
    )


def _read_timm(visual) -> Tower:
    trunk = _timm_trunk(visual)
    pool = trunk.attn_pool
    d = trunk.embed_dim
    w_k, w_v = pool.kv.weight.chunk(2, dim=0)
    b_k, b_v = pool.kv.bias.chunk(2, dim=0) if pool.kv.bias is not None else (None, None)
    attn_pool = AttnPool(
        n_heads=pool.num_heads, probe=pool.latent[0, 0], w_q=pool.q.weight, b_q=pool.q.bias, w_k=w_k, b_k=b_k,
        w_v=w_v, b_v=b_v, w_out=pool.proj.weight, b_out=pool.proj.bias, norm=pool.norm, mlp=pool.mlp)
    proj = getattr(visual.head, "proj", None)
    if proj is not None and proj.bias is not None:
        raise UnsupportedModelError("a projection with a bias after the attention pool is not supported")
    pe = trunk.patch_embed
    if not isinstance(pe.norm, torch.nn.Identity):
        raise UnsupportedModelError("a norm inside the patch embedding is not supported")
    blocks = [_timm_block(b) for b in trunk.blocks]
    grid = tuple(pe.grid_size)
    return Tower(
        module=visual, patch_embed=pe.proj, weight=pe.proj.weight, cls_token=None,
        pos_embed=trunk.pos_embed[0] if trunk.pos_embed is not None else torch.zeros(grid[0] * grid[1], d),
        image_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), grid_size=grid,
        norm_pre=_callable(trunk.norm_pre), blocks=blocks, norm_final=trunk.norm,
        norm_final_affine=_affine(trunk.norm), projection=proj.weight.t() if proj is not None else None,
        dropout_prob=float(getattr(trunk.patch_drop, "prob", 0.0)) if trunk.training else 0.0,
        activation=type(trunk.blocks[0].mlp.act).__name__, pool_head=attn_pool, family="open_clip timm (SigLIP)",
    )


# ---- transformers CLIP and SigLIP ---------------------------------------------------------------------------------


def _check_hf(vision) -> None:
    name = type(vision).__name__
    if "Siglip2" in name:
        raise UnsupportedModelError(
            "transformers' SigLIP 2 (Siglip2Model) takes pre-patchified variable-resolution inputs (pixel_values as "
            "[batch, patches, 3 * p * p] with spatial_shapes and a patch mask), not images; load SigLIP 2 through "
            "open_clip instead (e.g. 'ViT-B-16-SigLIP2', its timm trunk), which textspan reads")
    if not all(hasattr(vision, a) for a in ("embeddings", "encoder", "post_layernorm")) \
            or not ("CLIP" in name or "Siglip" in name):
        raise UnsupportedModelError(
            f"transformers image tower {name} is not supported (CLIPModel, CLIPVisionModel(WithProjection), "
            f"SiglipModel and SiglipVisionModel are)")
    for i, layer in enumerate(vision.encoder.layers):
        if not all(hasattr(layer.self_attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
            raise UnsupportedModelError(f"layer {i}: unknown attention {type(layer.self_attn).__name__}")
        if not hasattr(layer.mlp, "fc1"):
            raise UnsupportedModelError(f"layer {i}: unknown MLP {type(layer.mlp).__name__}")
    if not hasattr(vision, "pre_layrnorm") and getattr(vision, "head", None) is None:
        raise UnsupportedModelError("a SigLIP tower without its pooling head (vision_use_head=False) has no embedding")


def _hf_block(layer) -> Block:
    attn, mlp = layer.self_attn, layer.mlp
    w_in = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)
    b_in = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], dim=0)
    if abs(attn.scale - attn.head_dim ** -0.5) > 1e-12:
        raise UnsupportedModelError(f"attention scale {attn.scale} is not 1/sqrt(d_head)")
    return Block(
        n_heads=attn.num_heads, norm_attn=layer.layer_norm1, w_in=w_in, b_in=b_in,
        w_out=attn.out_proj.weight, b_out=attn.out_proj.bias, q_norm=None, k_norm=None,
        cosine_scale=None, cosine_scale_max=None, head_gain=None,
        scale_attn=_identity, scale_attn_gamma=None, norm_mlp=layer.layer_norm2, mlp=mlp, scale_mlp=_identity,
        scale_mlp_gamma=None, fc_in=mlp.fc1, act=mlp.activation_fn, fc_out=mlp.fc2,
        norm_mlp_affine=_affine(layer.layer_norm2),
    )


def _read_hf(model, vision) -> Tower:
    emb = vision.embeddings
    clip = hasattr(vision, "pre_layrnorm")  # CLIP: CLS token, pre-norm; SigLIP: neither, an attention-pooling head
    size = int(emb.image_size)
    patch = int(emb.patch_size)
    grid = (size // patch, size // patch)
    proj = getattr(model, "visual_projection", None)
    if proj is not None and proj.bias is not None:
        raise UnsupportedModelError("a visual projection with a bias is not supported")
    pos = emb.position_embedding.weight
    if clip:
        attn_pool = None
    else:
        head = vision.head
        mha = head.attention
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3, dim=0)
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3, dim=0) if mha.in_proj_bias is not None else (None,) * 3
        attn_pool = AttnPool(n_heads=mha.num_heads, probe=head.probe[0, 0], w_q=w_q, b_q=b_q, w_k=w_k, b_k=b_k,
                             w_v=w_v, b_v=b_v, w_out=mha.out_proj.weight, b_out=mha.out_proj.bias,
                             norm=head.layernorm, mlp=head.mlp)
    blocks = [_hf_block(layer) for layer in vision.encoder.layers]
    return Tower(
        module=vision, patch_embed=emb.patch_embedding, weight=emb.patch_embedding.weight,
        cls_token=emb.class_embedding if clip else None, pos_embed=pos, image_size=(size, size),
        patch_size=(patch, patch), grid_size=grid, norm_pre=vision.pre_layrnorm if clip else _identity,
        blocks=blocks, norm_final=vision.post_layernorm, norm_final_affine=_affine(vision.post_layernorm),
        projection=proj.weight.t() if proj is not None else None, dropout_prob=0.0,
        activation=type(blocks[0].act).__name__, pool_head=attn_pool,
        family="transformers CLIP" if clip else "transformers SigLIP",
    )


# --------------------------------------------------------------------------------------------------------------------
# the rest of a CLIP model: its own encoders and logit scale


def _features(out) -> torch.Tensor:
    """A transformers features call's tensor (v5 returns an output object with the features as pooler_output)."""
    if torch.is_tensor(out):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        t = getattr(out, name, None)
        if t is not None:
            return t
    raise UnsupportedModelError(f"cannot read features from {type(out).__name__}")


def library_image_embedding(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[b, d_embed]: the library's own (unnormalised) image embedding."""
    if hasattr(model, "encode_image"):
        return model.encode_image(images)
    if _is_transformers(model):
        if hasattr(model, "get_image_features"):
            return _features(model.get_image_features(pixel_values=images))
        return _features(model(pixel_values=images))
    return model(images)


def library_text_embedding(model: torch.nn.Module, tokens) -> torch.Tensor:
    """[M, d_embed]: the library's own (unnormalised) text embedding. `tokens`: what the model's tokenizer returns
    (token ids, or a transformers ``BatchEncoding``)."""
    if _is_transformers(model):
        if not hasattr(model, "get_text_features"):
            raise UnsupportedModelError(f"{type(model).__name__} has no text tower (pass the whole CLIPModel or "
                                        f"SiglipModel)")
        kw = dict(tokens) if not torch.is_tensor(tokens) else {"input_ids": tokens}
        return _features(model.get_text_features(**kw))
    if not hasattr(model, "encode_text"):
        raise UnsupportedModelError("this model has no text tower (pass the whole CLIP model, not its image tower)")
    return model.encode_text(tokens)


def learned_logit_scale(model: torch.nn.Module) -> torch.Tensor:
    """The learnable log logit scale of a CLIP model (a parameter: training clamps it in place)."""
    return model.logit_scale


def logit_scale_and_bias(model: torch.nn.Module) -> Tuple[float, Optional[float]]:
    """(exp(logit_scale), logit_bias or None): how the model scores an image-text pair from the cosine. A bias means
    a sigmoid model (SigLIP: p = sigmoid(scale * cos + bias)); None a softmax one (CLIP)."""
    scale = getattr(model, "logit_scale", None)
    bias = getattr(model, "logit_bias", None)
    return (float(scale.detach().exp()) if scale is not None else 1.0), (float(bias.detach()) if bias is not None else None)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def set_start_values(model: torch.nn.Module, positions: Optional[torch.Tensor] = None,
                     log_logit_scale: Optional[float] = None) -> None:
    """Set initial values before training (the built-in model's sin-cos positions and logit scale)."""
    with torch.no_grad():
        if positions is not None:
            image_tower(model).positional_embedding.copy_(positions)
        if log_logit_scale is not None:
            model.logit_scale.fill_(log_logit_scale)
