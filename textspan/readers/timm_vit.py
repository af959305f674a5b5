"""The reader of open_clip's timm ViT trunks with attention pooling (SigLIP, SigLIP 2): the trunk's blocks, the
attention-pooling head (one probe), the projection."""
from __future__ import annotations

import torch

from ..engine import AttnPool, Block, Tower
from ..errors import UnsupportedModelError
from .common import affine, as_callable, gamma, timm_trunk

NAME = "open_clip timm ViT (SigLIP)"


def matches(visual) -> bool:
    trunk = timm_trunk(visual)
    return trunk is not None and type(trunk).__name__ == "VisionTransformer"


def check(model, visual) -> None:
    """Refuse what the reader cannot reproduce exactly, with the reason."""
    trunk = timm_trunk(visual)
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(trunk, VisionTransformer):
        raise UnsupportedModelError(f"timm trunk {type(trunk).__name__} is not a timm VisionTransformer")
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


def _block(block) -> Block:
    attn, mlp = block.attn, block.mlp
    return Block(
        n_heads=attn.num_heads, norm_attn=block.norm1, w_in=attn.qkv.weight, b_in=attn.qkv.bias,
        w_out=attn.proj.weight, b_out=attn.proj.bias,
        q_norm=None if isinstance(attn.q_norm, torch.nn.Identity) else attn.q_norm,
        k_norm=None if isinstance(attn.k_norm, torch.nn.Identity) else attn.k_norm,
        cosine_scale=None, cosine_scale_max=None, head_gain=None,
        scale_attn=as_callable(block.ls1), scale_attn_gamma=gamma(block.ls1),
        norm_mlp=block.norm2, mlp=mlp, scale_mlp=as_callable(block.ls2), scale_mlp_gamma=gamma(block.ls2),
        fc_in=mlp.fc1, act=mlp.act, fc_out=mlp.fc2,
        norm_mlp_affine=affine(block.norm2) if isinstance(block.norm2, torch.nn.LayerNorm) else None,
        norm_attn_affine=affine(block.norm1) if isinstance(block.norm1, torch.nn.LayerNorm) else None,
    )


def read(model, visual) -> Tower:
    trunk = timm_trunk(visual)
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
    blocks = [_block(b) for b in trunk.blocks]
    grid = tuple(pe.grid_size)
    return Tower(
        module=visual, patch_embed=pe.proj, weight=pe.proj.weight, cls_token=None,
        pos_embed=trunk.pos_embed[0] if trunk.pos_embed is not None else torch.zeros(grid[0] * grid[1], d),
        image_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), grid_size=grid,
        norm_pre=as_callable(trunk.norm_pre), blocks=blocks, norm_final=trunk.norm,
        norm_final_affine=affine(trunk.norm), projection=proj.weight.t() if proj is not None else None,
        dropout_prob=float(getattr(trunk.patch_drop, "prob", 0.0)) if trunk.training else 0.0,
        activation=type(trunk.blocks[0].mlp.act).__name__, pool_head=attn_pool, family="open_clip timm (SigLIP)",
    )
