"""The reader of open_clip's own VisionTransformer (OpenAI, LAION, DataComp, ... CLIP ViTs; CLIPA's average pool;
scaled-cosine attention, qk-norm, head scale, layer scale, and the LayerNorm between heads and out_proj of
`scale_attn_inner` configs, linearised like EVA's)."""
from __future__ import annotations

import torch

from ..engine import Block, Tower
from ..errors import UnsupportedModelError
from .common import affine, gamma

NAME = "open_clip ViT"


def matches(visual) -> bool:
    from open_clip.transformer import VisionTransformer

    return isinstance(visual, VisionTransformer)


def check(model, visual) -> None:
    """Refuse what the reader cannot reproduce exactly, with the reason."""
    from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

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
            if not isinstance(attn.ln_inner, (torch.nn.Identity, torch.nn.LayerNorm)):
                raise UnsupportedModelError(f"block {i}: inner norm {type(attn.ln_inner).__name__} is not a "
                                            f"LayerNorm")
            if not isinstance(block.ln_attn, torch.nn.Identity):
                raise UnsupportedModelError(f"block {i}: a LayerNorm after attention (scale_attn) is not supported")
        else:
            raise UnsupportedModelError(f"block {i}: unknown block type {type(block).__name__}")




def _block(block) -> Block:
    attn = block.attn
    custom = not isinstance(attn, torch.nn.MultiheadAttention)
    mlp = block.mlp
    parts = dict(mlp.named_children())
    simple_mlp = list(parts) == ["c_fc", "gelu", "c_proj"] or (
        list(parts) == ["c_fc", "gelu", "ln", "c_proj"] and isinstance(parts["ln"], torch.nn.Identity))
    inner = attn.ln_inner if custom and isinstance(getattr(attn, "ln_inner", None), torch.nn.LayerNorm) else None
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
        scale_attn_gamma=gamma(block.ls_1),
        norm_mlp=block.ln_2,
        mlp=mlp,
        scale_mlp=block.ls_2,
        scale_mlp_gamma=gamma(block.ls_2),
        fc_in=mlp.c_fc if simple_mlp else None,
        act=mlp.gelu if simple_mlp else None,
        fc_out=mlp.c_proj if simple_mlp else None,
        norm_mlp_affine=affine(block.ln_2) if isinstance(block.ln_2, torch.nn.LayerNorm) else None,
        norm_attn_affine=affine(block.ln_1) if isinstance(block.ln_1, torch.nn.LayerNorm) else None,
        inner_norm=inner,
        inner_norm_affine=affine(inner) if inner is not None else None,
    )



def read(model, visual) -> Tower:
    blocks = [_block(b) for b in visual.transformer.resblocks]
    b0 = visual.transformer.resblocks[0]
    avg = getattr(visual, "pool_type", "tok") == "avg"
    if avg and any(b.inner_norm is not None for b in blocks):
        raise UnsupportedModelError("an average-pooled tower with a LayerNorm between the heads and out_proj is not "
                                    "supported (the inner norm would need linearising at every patch query)")
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
        norm_final_affine=affine(visual.ln_post),
        projection=visual.proj,
        dropout_prob=float(getattr(visual.patch_dropout, "prob", 0.0)) if visual.training else 0.0,
        activation=type(b0.mlp.gelu).__name__ if hasattr(b0.mlp, "gelu") else "?",
        query="avg" if avg else "cls",
        family="open_clip (average pool)" if avg else "open_clip",
    )
