"""M2IB, the multi-modal information bottleneck (Wang et al., NeurIPS 2023), as its published code computes the
image map (YingWANGG/M2IB `scripts/iba.py` and `scripts/methods.py`, `vision_heatmap_iba`; the Grad-ECLIP
repository calls the same function with layer 9, beta 0.1, var 1).

Per image and prompt, a mask alpha [N, d_model] (every token and channel, initialised to 5) is learnt on the
residual stream x leaving block `layer`:

    lam = sigmoid(alpha),  t = x * lam + sqrt((1 - lam)^2) * eps,  eps ~ N(0, 1)   (`samples` draws per step)
    capacity = -0.5 * (1 + log((1 - lam)^2) - (x * lam)^2 - (1 - lam)^2)          (KL to N(0, 1), per entry)
    loss = beta * mean(capacity) - mean over draws of cos(t_p, e(t))

with e(t) the image embedding from t through the remaining blocks and the tower's pooling, t_p the prompt; Adam
(lr `lr`) for `steps` steps. The map is the capacity summed over channels at the patch tokens, taken at the last
step's forward (before its update), as the published code reads `buffer_capacity`. The published `var` argument is
not used by its bottleneck (x is not standardised), so there is no such option here.

Randomness: each (image, prompt) pair draws its noise from its own generator seeded with `seed`, in the published
order ([samples, N, d_model] per step), so a map does not depend on what else is in the batch, and equals the
published code run after ``torch.manual_seed(seed)`` on the same device. Pairs are optimised together in chunks of
`chunk` (Adam is per entry, so this changes nothing but speed and memory). Gradients are taken with
``torch.autograd.grad`` only with respect to the mask: the model's parameters get no ``.grad``.

Every tower kind runs it (CLS-read, average-pooled and attention-pooled): the embedding is the tower's own pooling.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import BadInputError
from . import register
from ._vit import patch_columns, stream_before

INITIAL_ALPHA = 5.0


def default_layer(n_layers: int) -> int:
    """Block 9 of a 12-block tower (the published setting): three blocks from the end, or block 0 if shallower."""
    return max(n_layers - 3, 0)


@register("m2ib", towers=("cls", "avg", "attn"))
def m2ib(tower, images, T, layer: Optional[int] = None, beta: float = 0.1, steps: int = 10, lr: float = 1.0,
         samples: int = 10, seed: int = 0, chunk: int = 4):
    """Options: layer (the block whose output is masked; default three from the end, 9 on ViT-B; negative counts
    from the end), beta (0.1), steps (10), lr (1.0, Adam), samples (10 noise draws per step, the published batch),
    seed (0), chunk (pairs optimised at once, 4; no effect on the maps)."""
    L = tower.n_layers
    layer = default_layer(L) if layer is None else int(layer)
    if layer < 0:
        layer += L
    if not 0 <= layer < L:
        raise BadInputError(f"layer must index one of the model's {L} blocks; got the option {layer}")
    for name, value in (("steps", steps), ("samples", samples), ("chunk", chunk)):
        if int(value) != value or value < 1:
            raise BadInputError(f"{name} must be a whole number >= 1; got {value!r}")
    if not lr > 0 or not beta >= 0:
        raise BadInputError(f"lr must be > 0 and beta >= 0; got lr={lr!r}, beta={beta!r}")
    x = stream_before(tower, images, layer + 1)  # the output of block `layer`: [b, N, D]
    b, N, D = x.shape
    P = T.shape[0]
    pairs = [(i, p) for i in range(b) for p in range(P)]
    out = torch.empty(b, P, N, device=x.device, dtype=x.dtype)
    for start in range(0, len(pairs), int(chunk)):
        part = pairs[start:start + int(chunk)]
        imgs = [i for i, _ in part]
        prm = [p for _, p in part]
        cap = _optimise(tower, x[imgs], T[prm], layer, float(beta), int(steps), float(lr), int(samples), int(seed))
        out[imgs, prm] = torch.nansum(cap, dim=-1)
    return patch_columns(out, tower.grid_of(images))


def _optimise(tower, x, t, layer, beta, steps, lr, samples, seed) -> torch.Tensor:
    """[c, N, D] capacity at the last step's forward, for c pairs (streams x [c, N, D], prompts t [c, d_embed])."""
    c, N, D = x.shape
    alpha = torch.full_like(x, INITIAL_ALPHA, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    gens = [torch.Generator(device=x.device).manual_seed(seed) for _ in range(c)]
    tail = tower.blocks[layer + 1:]
    cap = None
    for _ in range(steps):
        lam = torch.sigmoid(alpha)
        mu = x * lam
        var = (1 - lam) ** 2
        cap = -0.5 * (1 + torch.log(var) - mu ** 2 - var)
        eps = torch.stack([torch.randn((samples, N, D), generator=g, device=x.device, dtype=x.dtype) for g in gens])
        h = (mu[:, None] + var.sqrt()[:, None] * eps).reshape(c * samples, N, D)
        for block in tail:
            h = block.fast(h)
        e = tower.pool_stream(h).reshape(c, samples, -1)
        fit = F.cosine_similarity(t[:, None, :].expand_as(e), e, dim=-1, eps=1e-6)  # [c, samples]
        loss = (beta * cap.mean(dim=(1, 2)) - fit.mean(dim=1)).sum()  # pairs are independent: a sum
        alpha.grad, = torch.autograd.grad(loss, alpha)
        opt.step()
    return cap.detach()
