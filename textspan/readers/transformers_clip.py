"""The reader of Hugging Face transformers CLIP and SigLIP image towers (CLIPModel, CLIPVisionModel(WithProjection),
SiglipModel, SiglipVisionModel)."""
from __future__ import annotations

import torch

from ..engine import AttnPool, Block, Tower
from ..errors import UnsupportedModelError
from .common import affine, identity, is_transformers

NAME = "transformers CLIP / SigLIP"


def matches(visual) -> bool:
    return is_transformers(visual)


def check(model, vision) -> None:
    """Refuse what the reader cannot reproduce exactly, with the reason."""
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


def _block(layer) -> Block:
    attn, mlp = layer.self_attn, layer.mlp
    w_in = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)
    b_in = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], dim=0)
    if abs(attn.scale - attn.head_dim ** -0.5) > 1e-12:
        raise UnsupportedModelError(f"attention scale {attn.scale} is not 1/sqrt(d_head)")
    return Block(
        n_heads=attn.num_heads, norm_attn=layer.layer_norm1, w_in=w_in, b_in=b_in,
        w_out=attn.out_proj.weight, b_out=attn.out_proj.bias, q_norm=None, k_norm=None,
        cosine_scale=None, cosine_scale_max=None, head_gain=None,
        scale_attn=identity, scale_attn_gamma=None, norm_mlp=layer.layer_norm2, mlp=mlp, scale_mlp=identity,
        scale_mlp_gamma=None, fc_in=mlp.fc1, act=mlp.activation_fn, fc_out=mlp.fc2,
        norm_mlp_affine=affine(layer.layer_norm2),
        norm_attn_affine=affine(layer.layer_norm1),
    )


def read(model, vision) -> Tower:
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
    blocks = [_block(layer) for layer in vision.encoder.layers]
    return Tower(
        module=vision, patch_embed=emb.patch_embedding, weight=emb.patch_embedding.weight,
        cls_token=emb.class_embedding if clip else None, pos_embed=pos, image_size=(size, size),
        patch_size=(patch, patch), grid_size=grid, norm_pre=vision.pre_layrnorm if clip else identity,
        blocks=blocks, norm_final=vision.post_layernorm, norm_final_affine=affine(vision.post_layernorm),
        projection=proj.weight.t() if proj is not None else None, dropout_prob=0.0,
        activation=type(blocks[0].act).__name__, pool_head=attn_pool,
        family="transformers CLIP" if clip else "transformers SigLIP",
    )
