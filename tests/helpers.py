"""Tiny seeded open_clip models for tests: stock classes, every parameter randomised (biases, LN affine, layer
scale) so that no term of the decomposition is trivially zero."""
from __future__ import annotations

import torch
from open_clip.model import CLIP


def tiny_clip(seed: int = 0, *, image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 2,
              head_width: int = 16, embed_dim: int = 24, quick_gelu: bool = False, ls_init_value=None,
              dtype=torch.float32, **vision_kwargs) -> CLIP:
    torch.manual_seed(seed)
    vision = dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers, head_width=head_width,
                  mlp_ratio=2.0, ls_init_value=ls_init_value, **vision_kwargs)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_pre.weight" in name \
                    or "ln_post.weight" in name or name.endswith("ln_final.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


def random_images(n: int, size: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype)
