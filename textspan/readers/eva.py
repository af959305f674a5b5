"""The reader of EVA towers (open_clip's timm `Eva` trunks: EVA01, EVA02 CLIP).

EVA's blocks differ from a CLIP ViT in three ways, all compatible with an exact decomposition: rotary position
embeddings on q and k (they shape the attention pattern, which the decomposition freezes; the value path stays
linear); a LayerNorm over the concatenated heads before the output projection (`Block.inner_norm`, linearised at the
pooled query with its own mean and std, exact per head: see `textspan.decomposition._layer_fold`); SwiGLU MLPs with
an inner LayerNorm (one MLP term per block). The trunk's classifier head is the projection, with a bias
(`Tower.projection_bias`, spread over the terms like ln_post's beta)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..engine import Block, Tower
from ..errors import UnsupportedModelError
from .common import affine, as_callable, identity, timm_trunk

NAME = "open_clip timm EVA (EVA01, EVA02)"


def matches(visual) -> bool:
    trunk = timm_trunk(visual)
    return trunk is not None and type(trunk).__name__ == "Eva"


def check(model, visual) -> None:
    """EVA's blocks differ from a CLIP ViT by rotary embeddings on q and k (the attention pattern, which the
    decomposition freezes anyway), a LayerNorm over the concatenated heads before the output projection (linearised
    at the pooled query, exact per head) and SwiGLU MLPs with an inner LayerNorm (one MLP term per block)."""
    trunk = timm_trunk(visual)
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

    if trunk.cls_token is None or trunk.global_pool != "token":
        raise UnsupportedModelError(f"EVA trunk with global_pool={trunk.global_pool!r} and "
                                    f"{'a' if trunk.cls_token is not None else 'no'} CLS token: only CLS pooling "
                                    f"('token') is read")
    if getattr(trunk, "reg_token", None) is not None:
        raise UnsupportedModelError(
            "EVA trunks with register tokens are not supported yet: the pooled CLS reads them like any token, but the "
            "token layout (prefix tokens besides CLS) is not read")
    if getattr(trunk, "dynamic_img_size", False) or getattr(trunk, "rope_mixed", False):
        raise UnsupportedModelError("EVA trunks with dynamic image sizes or mixed (per-depth) rotary embeddings are "
                                    "not supported")
    if getattr(trunk, "no_embed_class", False):
        raise UnsupportedModelError("an EVA trunk whose positions exclude the CLS token (no_embed_class) is not "
                                    "supported")
    if getattr(trunk, "attn_pool", None) is not None or not isinstance(trunk.fc_norm, torch.nn.Identity):
        raise UnsupportedModelError("an EVA trunk with an attention pool or fc_norm is not supported")
    if not isinstance(trunk.patch_embed.norm, torch.nn.Identity):
        raise UnsupportedModelError("a norm inside the patch embedding is not supported")
    for name, _ in visual.head.named_children():
        if name not in ("drop", "proj"):
            raise UnsupportedModelError(f"open_clip timm head part {name!r} is not supported (only a linear proj)")
    if isinstance(trunk.head, torch.nn.Linear) and getattr(visual.head, "proj", None) is not None:
        raise UnsupportedModelError("two projections (the trunk's head and open_clip's proj) are not supported")
    for i, block in enumerate(trunk.blocks):
        if type(block) not in (EvaBlock, EvaBlockPostNorm) or type(block.attn) is not EvaAttention:
            raise UnsupportedModelError(f"block {i}: {type(block).__name__} is not timm's EvaBlock or "
                                        f"EvaBlockPostNorm")
        if type(block) is EvaBlockPostNorm and not (isinstance(block.norm1, torch.nn.LayerNorm)
                                                   and isinstance(block.norm2, torch.nn.LayerNorm)):
            raise UnsupportedModelError(f"block {i}: post-norms that are not LayerNorms are not supported")
        attn = block.attn
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"block {i}: a gate on the heads' output is not supported")
        if abs(float(attn.scale) - attn.head_dim ** -0.5) > 1e-12:
            raise UnsupportedModelError(f"block {i}: attention scale {attn.scale} is not 1/sqrt(d_head)")
        if not isinstance(attn.norm, (torch.nn.Identity, torch.nn.LayerNorm)):
            raise UnsupportedModelError(f"block {i}: inner norm {type(attn.norm).__name__} is not a LayerNorm")
        mlp = block.mlp
        if not (hasattr(mlp, "fc2") and (hasattr(mlp, "fc1_g") or hasattr(mlp, "fc1"))):
            raise UnsupportedModelError(f"block {i}: unknown MLP {type(mlp).__name__}")


def _rope(trunk, attn, n_patches: int) -> Optional[Callable]:
    """q or k [b, head, N, d_head] -> the same with timm's rotary embedding applied to the patch tokens (the prefix
    tokens are left as they are, as EvaAttention does). Cached embeddings are for the model's own grid only."""
    if trunk.rope is None:
        return None
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    npt = attn.num_prefix_tokens
    half = bool(getattr(attn, "rotate_half", False))

    def rotate(t: torch.Tensor) -> torch.Tensor:
        if t.shape[2] <= npt:  # prefix tokens only (e.g. the CLS query row): no rotation, as in EvaAttention
            return t
        if t.shape[2] - npt != n_patches:
            raise UnsupportedModelError(
                f"EVA towers are read at their own image size: their rotary embeddings are built for "
                f"{n_patches} patches; got {t.shape[2] - npt}")
        emb = trunk.rope.get_embed()
        return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], emb, half=half)], dim=2).type_as(t)

    return rotate


def _block(trunk, block, n_patches: int) -> Block:
    attn, mlp = block.attn, block.mlp
    d = attn.q_proj.weight.shape[1] if attn.qkv is None else attn.qkv.weight.shape[1]
    if attn.qkv is None:
        w_in = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)
        parts = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
    else:
        w_in = attn.qkv.weight
        parts = [attn.q_bias, attn.k_bias, attn.v_bias] if attn.q_bias is not None else [None] * 3
        if attn.qkv.bias is not None:
            parts = list(attn.qkv.bias.chunk(3)) if parts[0] is None else \
                [a + b for a, b in zip(parts, attn.qkv.bias.chunk(3))]
    b_in = None
    if any(b is not None for b in parts):
        b_in = torch.cat([b if b is not None else torch.zeros(d, dtype=w_in.dtype, device=w_in.device)
                          for b in parts])
    inner = attn.norm if isinstance(attn.norm, torch.nn.LayerNorm) else None
    gamma_1 = getattr(block, "gamma_1", None)
    gamma_2 = getattr(block, "gamma_2", None)
    post = type(block).__name__ == "EvaBlockPostNorm"  # EVA02-E: x + norm1(attn(x)), then x + norm2(mlp(x))
    return Block(
        n_heads=attn.num_heads, norm_attn=identity if post else block.norm1, w_in=w_in, b_in=b_in,
        w_out=attn.proj.weight, b_out=attn.proj.bias,
        q_norm=None if isinstance(attn.q_norm, torch.nn.Identity) else attn.q_norm,
        k_norm=None if isinstance(attn.k_norm, torch.nn.Identity) else attn.k_norm,
        cosine_scale=None, cosine_scale_max=None, head_gain=None,
        scale_attn=(lambda t, g=gamma_1: g * t) if gamma_1 is not None else identity, scale_attn_gamma=gamma_1,
        norm_mlp=identity if post else block.norm2, mlp=mlp,
        scale_mlp=(lambda t, g=gamma_2: g * t) if gamma_2 is not None else identity, scale_mlp_gamma=gamma_2,
        fc_in=None, act=None, fc_out=None,  # SwiGLU (two input projections, an inner norm): not Linear-act-Linear
        norm_mlp_affine=affine(block.norm2) if isinstance(block.norm2, torch.nn.LayerNorm) and not post else None,
        norm_attn_affine=affine(block.norm1) if isinstance(block.norm1, torch.nn.LayerNorm) and not post else None,
        inner_norm=inner, inner_norm_affine=affine(inner) if inner is not None else None,
        rope=_rope(trunk, attn, n_patches),
        post_norm_attn=block.norm1 if post else None, post_norm_attn_affine=affine(block.norm1) if post else None,
        post_norm_mlp=block.norm2 if post else None,
    )


def read(model, visual) -> Tower:
    trunk = timm_trunk(visual)
    pe = trunk.patch_embed
    grid = tuple(pe.grid_size)
    head = trunk.head if isinstance(trunk.head, torch.nn.Linear) else getattr(visual.head, "proj", None)
    blocks = [_block(trunk, b, grid[0] * grid[1]) for b in trunk.blocks]
    mlp = trunk.blocks[0].mlp
    return Tower(
        module=visual, patch_embed=pe.proj, weight=pe.proj.weight, cls_token=trunk.cls_token[0, 0],
        pos_embed=trunk.pos_embed[0], image_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size),
        grid_size=grid, norm_pre=as_callable(trunk.norm_pre), blocks=blocks, norm_final=trunk.norm,
        norm_final_affine=affine(trunk.norm), projection=head.weight.t() if head is not None else None,
        dropout_prob=float(getattr(trunk.patch_drop, "prob", 0.0)) if trunk.training and trunk.patch_drop else 0.0,
        activation=type(getattr(mlp, "act", None)).__name__, family="open_clip timm (EVA)",
        projection_bias=head.bias if head is not None else None,
    )
