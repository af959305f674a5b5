"""Shared plumbing of the explainers: textspan's own forward over a stock open_clip ViT, exposing what the methods
differentiate (attention probabilities, attention outputs, residual streams), and a guard that leaves the model as it
was. Nothing here registers a hook or rebinds a method: gradients are taken with respect to tensors of our forward.

Conventions: images [b, 3, H, W]; tokens first CLS then the patch grid in row-major order; per-head tensors
[b, head, token, d_head]; prompts P (text embeddings [P, d_embed], used as given: pass normalised text features).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..decomposition import _attention_parts, _block_forward, _check_images, _embed, _split_heads
from ..models import check_decomposable, visual_of


@contextlib.contextmanager
def untouched(model):
    """Run an explainer with gradients enabled and restore every requires_grad flag and training flag afterwards,
    also when the explainer raises. (Our forward never changes them; this makes it a guarantee.)"""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


def prepare(model, images: torch.Tensor, text_embeddings) -> tuple:
    """(visual, images on the model's device/dtype, text embeddings [P, d_embed] likewise), checked."""
    check_decomposable(model)
    visual = visual_of(model)
    like = visual.conv1.weight
    _check_images(visual, images, any_size=True)
    T = torch.as_tensor(text_embeddings).to(device=like.device, dtype=like.dtype)
    if T.ndim == 1:
        T = T[None]
    d_embed = visual.proj.shape[1] if visual.proj is not None else visual.transformer.width
    if T.ndim != 2 or T.shape[1] != d_embed:
        raise ValueError(f"text_embeddings must be [prompts, {d_embed}]; got {tuple(T.shape)}")
    return visual, images.to(device=like.device, dtype=like.dtype).detach(), T.detach()


def grid_of(visual, images: torch.Tensor) -> tuple:
    p = visual.patch_size
    return images.shape[-2] // p[0], images.shape[-1] // p[1]


def embed(visual, images: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """[b, N, d_model]: ln_pre(patches + CLS + positions), positions resampled to the image's grid when it differs
    from the model's (bicubic; with antialias as timm/LeGrad resample, without as the Grad-ECLIP notebook does)."""
    return _embed(visual, images, antialias)


@dataclass
class BlockTrace:
    """What one block computed. probs: [b, head, N, N] post-softmax; heads_out: [b, N, d_model], the attention
    output before out_proj (heads concatenated, head_scale applied); y: the residual stream after attention."""

    x_in: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    probs: torch.Tensor
    heads_out: torch.Tensor
    y: torch.Tensor
    x_out: torch.Tensor


def attention_probs(block, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[b, head, N, N] post-softmax attention of a block from its per-head q, k."""
    p = _attention_parts(block)
    if p["ln_q"] is not None:
        q, k = p["ln_q"](q), p["ln_k"](k)
    if p["logit_scale"] is not None:  # scaled cosine attention
        scale = torch.clamp(p["logit_scale"], max=p["logit_scale_max"]).exp()
        return (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2) * scale).softmax(dim=-1)
    return (q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)).softmax(dim=-1)


def qkv(block, x: torch.Tensor):
    """Per-head q, k, v [b, head, N, d_head] of a block's attention from its input residual stream x."""
    p = _attention_parts(block)
    q, k, v = F.linear(block.ln_1(x), p["w_in"], p["b_in"]).chunk(3, dim=-1)
    return tuple(_split_heads(t, p["n_heads"]) for t in (q, k, v))


def merge_heads(block, out: torch.Tensor) -> torch.Tensor:
    """[b, head, N, d_head] -> [b, N, d_model], head_scale applied (the input of out_proj)."""
    p = _attention_parts(block)
    if p["head_scale"] is not None:
        out = out * p["head_scale"]
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def after_heads(block, x_in: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
    """The residual stream after the attention: x_in + ls_1(out_proj(heads_out))."""
    p = _attention_parts(block)
    return x_in + block.ls_1(F.linear(heads_out, p["w_out"], p["b_out"]))


def after_mlp(block, y: torch.Tensor) -> torch.Tensor:
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def block_forward(block, x: torch.Tensor, delta: Optional[torch.Tensor] = None) -> BlockTrace:
    """One block with the full attention map made explicit; `delta` ([b, head, N, N]) is added to the
    probabilities, so that a gradient with respect to it is the gradient with respect to the probabilities."""
    q, k, v = qkv(block, x)
    probs = attention_probs(block, q, k)
    used = probs if delta is None else probs + delta
    heads_out = merge_heads(block, used @ v)
    y = after_heads(block, x, heads_out)
    return BlockTrace(x_in=x, q=q, k=k, v=v, probs=probs, heads_out=heads_out, y=y, x_out=after_mlp(block, y))


def pooled_embedding(visual, x_cls: torch.Tensor) -> torch.Tensor:
    """[b, d_embed] normalised image embedding from the final residual stream at CLS."""
    e = visual.ln_post(x_cls)
    if visual.proj is not None:
        e = e @ visual.proj
    return F.normalize(e, dim=-1)


def trace(visual, images: torch.Tensor, keep: Sequence[int], antialias: bool = True) -> List[Optional[BlockTrace]]:
    """Run the tower without autograd: one entry per block, its `BlockTrace` for the blocks in `keep`, else None."""
    blocks = visual.transformer.resblocks
    keep = set(keep)
    out: List[Optional[BlockTrace]] = []
    with torch.no_grad():
        x = embed(visual, images, antialias)
        for l, block in enumerate(blocks):
            if l in keep:
                t = block_forward(block, x)
                out.append(t)
                x = t.x_out
            else:
                x = _fast_block(block, x)
                out.append(None)
    return out


def last_block_input(visual, images: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """[b, N, d_model]: the residual stream entering the last block (no autograd)."""
    with torch.no_grad():
        x = embed(visual, images, antialias)
        for block in visual.transformer.resblocks[:-1]:
            x = _fast_block(block, x)
    return x


def start_block(start_layer: int, n_layers: int) -> int:
    """The index of the first block of a product over blocks (negative counts from the end), checked."""
    if not -n_layers <= int(start_layer) < n_layers:
        raise ValueError(f"start_layer {start_layer} is out of range for a {n_layers}-block model")
    return int(start_layer) % n_layers


def _fast_block(block, x: torch.Tensor) -> torch.Tensor:
    """One block, no internals kept (the decomposition's forward: fused attention where the block allows it)."""
    return _block_forward(block, x, keep_values=False)[0]


def batched_vjp(fn, primal: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """[P, *primal.shape]: the vector-Jacobian products of fn at `primal` with each of P cotangents
    ([P, *fn(primal).shape]), from one forward and one batched backward."""
    primal = primal.detach()
    _, vjp_fn = torch.func.vjp(fn, primal)
    return torch.func.vmap(vjp_fn)(cotangents)[0]


def prompt_cotangents(T: torch.Tensor, b: int) -> torch.Tensor:
    """[P, b, d_embed]: cotangent p is prompt p's embedding for every image (d <t_p, e_hat> / d e_hat = t_p)."""
    return T[:, None, :].expand(T.shape[0], b, T.shape[1]).contiguous()


def patch_columns(values: torch.Tensor, grid) -> torch.Tensor:
    """[..., N] per-token values (CLS first) -> [..., gh, gw] over the patch grid."""
    return values[..., 1:].reshape(*values.shape[:-1], *grid)


def parse_layer_option(layers, n_layers: int, default: Sequence[int]) -> List[int]:
    """Block indices from None (default), "all", an int or a list (negative counts from the end)."""
    if layers is None:
        chosen = list(default)
    elif isinstance(layers, str):
        if layers == "all":
            chosen = list(range(n_layers))
        else:
            from ..span import parse_layers
            chosen = parse_layers(layers, n_layers)
    elif isinstance(layers, int):
        chosen = [layers]
    else:
        chosen = list(layers)
    out = []
    for l in chosen:
        if not -n_layers <= int(l) < n_layers:
            raise ValueError(f"layer {l} is out of range for a {n_layers}-block model")
        out.append(int(l) % n_layers)
    if not out:
        raise ValueError("no layers chosen")
    return sorted(set(out))
