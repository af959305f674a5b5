"""textspan's compute types and forward: `Tower`, `Block`, the attention pool, and `read_tower`.

`read_tower(model)` asks the readers (`textspan.readers`: one module per model library or family) to translate a
stock image tower into a `Tower`: the patch embedding, class token and positions, the pre-norm, one `Block` per
residual block (norms, attention projections, heads, qk-norm, rotary embeddings, head scale, an inner norm, layer
scale, MLP) and the pooling (final norm, projection). Everything that computes with a model (the decomposition,
every explainer, the text side of zero-shot classifiers, training of the built-in model) goes through these types;
only the readers name a model library's attributes (a test greps the rest). A new model family is a new reader
module.

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
    inner_scale: Optional[torch.Tensor] = None  # [batch]: 1 / std of the heads' output at CLS (EVA's inner norm)
    post_scale: Optional[torch.Tensor] = None  # [batch]: 1 / std of the attention output at CLS (EVA02-E post-norm)


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
        norm_mlp_affine, norm_attn_affine: (weight, bias, eps) of norm_mlp / norm_attn when it is a LayerNorm (else
        None).
        inner_norm, inner_norm_affine: a LayerNorm over the concatenated heads before the output projection (EVA;
        None elsewhere): attn(x) = W_out inner_norm(heads) + b_out.
        rope: rotary position embeddings applied to q and k after the qk-norm (EVA; None elsewhere).
        post_norm_attn, post_norm_mlp: LayerNorms on the attention's and the MLP's outputs before the residual add
        (EVA02-E's post-norm blocks, whose norm_attn and norm_mlp are identities; None elsewhere).
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
    # EVA: a LayerNorm over the concatenated heads before the output projection, and rotary position embeddings
    inner_norm: Optional[Callable] = None
    inner_norm_affine: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]] = None
    rope: Optional[Callable] = None  # per-head q or k [b, head, N, d_head] -> rotated (the patch tokens)
    # EVA02-E: post-norm blocks, a LayerNorm on the attention's output after out_proj and one on the MLP's output
    post_norm_attn: Optional[Callable] = None
    post_norm_attn_affine: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]] = None
    post_norm_mlp: Optional[Callable] = None
    # (weight, bias, eps) of norm_attn when it is a LayerNorm (the neurons' second-order effects linearise it)
    norm_attn_affine: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]] = None

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
        """q and k after the per-head qk-norm, when the block has one, and the rotary embeddings, when it has
        them (in that order, as EVA computes them)."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
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
        """The residual stream after the attention: x_in + scale_attn(inner_norm(heads_out) W_out^T + b_out)."""
        if self.inner_norm is not None:
            heads_out = self.inner_norm(heads_out)
        out = F.linear(heads_out, self.w_out, self.b_out)
        if self.post_norm_attn is not None:
            out = self.post_norm_attn(out)
        return x_in + self.scale_attn(out)

    def mlp_out(self, y: torch.Tensor) -> torch.Tensor:
        """scale_mlp(mlp(norm_mlp(y))) (post_norm_mlp applied after the MLP when the block has one): what the MLP adds
        to the residual stream."""
        out = self.mlp(self.norm_mlp(y))
        if self.post_norm_mlp is not None:
            out = self.post_norm_mlp(out)
        return self.scale_mlp(out)

    @property
    def mixes_heads(self) -> bool:
        """Whether a norm sits between the heads' outputs and the residual stream (an inner norm before out_proj or
        a post-norm after it): linear per head only once its statistics are frozen."""
        return self.inner_norm is not None or self.post_norm_attn is not None

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
        merged = self.merge_heads(out)
        y = self.after_heads(x, merged)
        mlp_out = self.mlp_out(y)
        mlp_cls = mlp_out[:, 1:].mean(dim=1) if query == "avg" else mlp_out[:, 0]
        inner_scale = post_scale = None
        h_cls = merged[:, 0]
        if self.inner_norm is not None:  # the inner norm's frozen statistics at the pooled query (CLS)
            inner_scale = 1.0 / torch.sqrt(h_cls.var(dim=-1, unbiased=False) + self.inner_norm_affine[2])
            h_cls = self.inner_norm(h_cls)
        if self.post_norm_attn is not None:  # the post-norm's, on the attention output at CLS
            a_cls = F.linear(h_cls, self.w_out, self.b_out)
            post_scale = 1.0 / torch.sqrt(a_cls.var(dim=-1, unbiased=False) + self.post_norm_attn_affine[2])
        return y + mlp_out, ClsState(o_cls=o_cls, attn_cls=attn_cls, values=v if keep_values else None,
                                     mlp_cls=mlp_cls, inner_scale=inner_scale, post_scale=post_scale)

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
    projection_bias: Optional[torch.Tensor] = None  # [d_embed]: a bias after the projection (EVA's timm head)

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
        if b.fc_in is not None:
            return b.fc_in.out_features
        out = getattr(b.mlp, "fc2", None)  # a gated MLP (EVA's SwiGLU): the width its output projection reads
        return int(out.in_features) if isinstance(out, torch.nn.Linear) else 0

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
        e = e @ self.projection if self.projection is not None else e
        return e + self.projection_bias if self.projection_bias is not None else e

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
# reading a model: the readers (`textspan.readers`) do it


def read_tower(model: torch.nn.Module) -> Tower:
    """The `Tower` of a stock CLIP/SigLIP/EVA model (or of its image tower): see `textspan.readers`; refuses, with
    the reason, what no reader can reproduce exactly."""
    if isinstance(model, Tower):
        return model
    from .readers import read

    return read(model)


def check_decomposable(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` unless textspan's forward reproduces this image tower exactly."""
    if isinstance(model, Tower):
        return
    from .readers import check

    check(model)


# the rest of a CLIP model (its own encoders, logit scale, device) is read in `textspan.readers.common`; these names
# stay importable from here
_FROM_READERS = ("image_tower", "library_image_embedding", "library_text_embedding", "learned_logit_scale",
                 "logit_scale_and_bias", "model_device", "set_start_values")


def __getattr__(name: str):
    if name in _FROM_READERS:
        from .readers import common

        return getattr(common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
