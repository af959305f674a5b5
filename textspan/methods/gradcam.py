"""Grad-CAM (Selvaraju et al. 2017) on the last block of a ViT, in the two published recipes (`variant`):

- ``"gradeclip"`` (default): the Grad-ECLIP repository's baseline. Activations are the residual stream entering the
  last block (all tokens), channel weights the gradient of the image-text cosine averaged over all tokens, and the
  map ReLU(sum over channels of weight * activation) at the patches. (The last block's *output* cannot serve: only
  its CLS token reaches the embedding, so its patch gradients are 0.)
- ``"pytorch-grad-cam"``: pytorch-grad-cam's documented ViT recipe: the target layer is the last block's first norm
  (``blocks[-1].norm1``, open_clip's ``ln_1``), the reshape transform drops the CLS token, so the channel weights are
  the gradient averaged over the patch tokens; the map is ReLU(sum_c w_c a_c) over the patches. Its score here is
  the image-text cosine (pytorch-grad-cam's ``SimilarityToConceptTarget`` on the image embedding); a logit target
  scales the map by exp(logit_scale) and nothing else.

Attention-pooled towers (SigLIP): the same, with the gradient through the last block at every token and the pooling
head; every token is a patch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BadInputError
from . import register
from ._vit import batched_vjp, last_block_input, prompt_cotangents

VARIANTS = ("gradeclip", "pytorch-grad-cam")


@register("gradcam", towers=("cls", "attn"))
def gradcam(tower, images, T, variant: str = "gradeclip"):
    """Options: variant ("gradeclip", default: the Grad-ECLIP repository's baseline; "pytorch-grad-cam": that
    library's ViT recipe at the last block's first norm, patch tokens only)."""
    if variant not in VARIANTS:
        raise BadInputError(f"variant={variant!r}: one of {', '.join(VARIANTS)}")
    last = tower.blocks[-1]
    b = images.shape[0]
    x = last_block_input(tower, images)
    pooled = tower.pool_head is not None

    def through_block(x_in, a):  # the last block's output from its input stream and its attention norm's output
        q, k, v = last.qkv_normed(a)
        if pooled:
            heads = last.merge_heads(last.attention_probs(q, k) @ v)
            return F.normalize(tower.attention_pooled(last.after_mlp(last.after_heads(x_in, heads))), dim=-1)
        probs = last.attention_probs(q[:, :, :1], k)  # [b, H, 1, N]: only the CLS query reaches the embedding
        y = last.after_heads(x_in[:, :1], last.merge_heads(probs @ v))
        return tower.pooled_embedding(last.after_mlp(y)[:, 0])

    if variant == "gradeclip":
        acts = x
        fn = lambda x_in: through_block(x_in, last.norm_attn(x_in))  # noqa: E731
    else:
        with torch.no_grad():
            acts = last.norm_attn(x)
        fn = lambda a: through_block(x, a)  # noqa: E731
    grads = batched_vjp(fn, acts, prompt_cotangents(T, b))  # [P, b, N, D]
    p0 = tower.n_prefix
    with torch.no_grad():
        weights = grads.mean(dim=2) if variant == "gradeclip" else grads[:, :, p0:].mean(dim=2)  # [P, b, D]
        cam = F.relu(torch.einsum("pbd,bnd->bpn", weights, acts[:, p0:]))
    return cam.reshape(b, T.shape[0], *tower.grid_of(images))
