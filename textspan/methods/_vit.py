"""Shared plumbing of the explainers, on top of the engine's forward (`textspan.engine`): a guard that leaves the
model as it was, input checks, traces of the blocks a method differentiates, and batched vector-Jacobian products.
Nothing here registers a hook or rebinds a method: gradients are taken with respect to tensors of our forward.

Conventions: images [b, 3, H, W]; tokens first CLS then the patch grid in row-major order; per-head tensors
[b, head, token, d_head]; prompts P (text embeddings [P, d_embed], used as given: pass normalised text features).
Every method receives a `textspan.engine.Tower`.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch

from ..engine import BlockTrace, Tower, read_tower
from ..errors import BadInputError, UnsupportedModelError
from ..names import parse_layers

__all__ = ["BlockTrace", "untouched", "prepare", "trace", "last_block_input", "start_block", "batched_vjp",
           "prompt_cotangents", "patch_columns", "parse_layer_option"]


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


def prepare(model, images: torch.Tensor, text_embeddings, method: str = "") -> tuple:
    """(tower, images on the model's device/dtype, text embeddings [P, d_embed] likewise), checked."""
    from . import has_inner_norm, list_methods, method_inner_norm, method_towers, tower_kind

    tower = read_tower(model)
    like = tower.weight
    tower.check_images(images, any_size=True)
    kind = tower_kind(tower)
    if method and not method_inner_norm(method) and has_inner_norm(tower):
        raise UnsupportedModelError(
            f"method {method!r} is written for an output projection acting on the heads' outputs directly; this "
            f"{tower.family} tower has a LayerNorm between them and the residual stream (EVA's inner norm or "
            f"post-norm), which the method's published form does not include; on this tower these run: "
            f"{', '.join(list_methods(tower))}")
    if method and kind not in method_towers(method):
        runs = ", ".join(list_methods(kind))
        if kind == "avg":
            raise UnsupportedModelError(
                f"method {method!r} follows the CLS token, and this tower's embedding reads the mean of the patch "
                f"tokens (average pool); on average-pooled towers these run: {runs}")
        raise UnsupportedModelError(
            f"method {method!r} is defined through the CLS token, and this {tower.family} image tower has none (it "
            f"pools with attention); on attention-pooled towers these run: {runs}")
    T = torch.as_tensor(text_embeddings).to(device=like.device, dtype=like.dtype)
    if T.ndim == 1:
        T = T[None]
    if T.ndim != 2 or T.shape[1] != tower.d_embed:
        raise BadInputError(f"text_embeddings must be [prompts, {tower.d_embed}]; got {tuple(T.shape)}")
    return tower, tower.to_input(images).detach(), T.detach()


def trace(tower: Tower, images: torch.Tensor, keep: Sequence[int], antialias: bool = True) -> List[Optional[BlockTrace]]:
    """Run the tower without autograd: one entry per block, its `BlockTrace` for the blocks in `keep`, else None."""
    keep = set(keep)
    out: List[Optional[BlockTrace]] = []
    with torch.no_grad():
        x = tower.embed(images, antialias)
        for l, block in enumerate(tower.blocks):
            if l in keep:
                t = block.forward(x)
                out.append(t)
                x = t.x_out
            else:
                x = block.fast(x)
                out.append(None)
    return out


def stream_before(tower: Tower, images: torch.Tensor, start: int, antialias: bool = True) -> torch.Tensor:
    """[b, N, d_model]: the residual stream entering block `start` (no autograd)."""
    with torch.no_grad():
        x = tower.embed(images, antialias)
        for block in tower.blocks[:start]:
            x = block.fast(x)
    return x


def last_block_input(tower: Tower, images: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """[b, N, d_model]: the residual stream entering the last block (no autograd)."""
    return stream_before(tower, images, tower.n_layers - 1, antialias)


def start_block(start_layer: int, n_layers: int) -> int:
    """The index of the first block of a product over blocks (negative counts from the end), checked."""
    return parse_layers(int(start_layer), n_layers)[0]


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
    """[..., N] per-token values (the CLS token first, when there is one) -> [..., gh, gw] over the patch grid."""
    return values[..., values.shape[-1] - grid[0] * grid[1]:].reshape(*values.shape[:-1], *grid)


def final_stream(tower: Tower, images: torch.Tensor) -> torch.Tensor:
    """[b, N, d_model]: the residual stream after the last block (no autograd)."""
    with torch.no_grad():
        return tower.final_stream(images)


def grad_at_cls_output(tower: Tower, x: torch.Tensor, o_cls: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """[P, b, D]: the gradient of each prompt's score <t_p, e_hat> with respect to the last block's attention output
    at the CLS token before out_proj (heads concatenated; `o_cls` [b, D], `x` the stream entering the last block),
    through out_proj, the MLP and the pooling: one batched vector-Jacobian product for all prompts."""
    last = tower.blocks[-1]
    x_cls = x[:, :1].detach()

    def embedding(o):  # [b, D] -> [b, d_embed]
        y = last.after_heads(x_cls, o[:, None])
        return tower.pooled_embedding(last.after_mlp(y)[:, 0])

    return batched_vjp(embedding, o_cls, prompt_cotangents(T, x.shape[0]))


def parse_layer_option(layers, n_layers: int, default: Sequence[int]) -> List[int]:
    """Sorted distinct block indices from None (default), "all", a layer string, an int or a list."""
    chosen = list(default) if layers is None else parse_layers(layers, n_layers)
    return sorted(set(parse_layers(chosen, n_layers)))
