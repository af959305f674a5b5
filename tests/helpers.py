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
    randomise(model.named_parameters(), seed + 1,
              lambda name: name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_pre.weight" in name
              or "ln_post.weight" in name or name.endswith("ln_final.weight"))
    return model.to(dtype).eval()


def randomise(named_parameters, seed: int, is_norm_weight) -> None:
    """Every parameter drawn from a seeded generator, in order: norm weights (`is_norm_weight(name)`) 1 + 0.3 N(0, 1),
    matrices N(0, 1 / fan_in), vectors 0.2 N(0, 1): no term of the decomposition is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if is_norm_weight(name):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def random_images(n: int, size: int = 32, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(dtype)


TINY_CFG = dict(embed_dim=24,
                vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16, mlp_ratio=2.0),
                text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


def save_local_dir(folder, seed: int = 0):
    """Write a tiny model as an open_clip 'local-dir:' folder (config + safetensors), the way users ship models."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_clip(seed=seed)
    cfg = {"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                                     "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}", model


def write_images(folder, n: int, size: int = 40, seed: int = 0, classes=("cat", "dog")):
    """n small random RGB PNG/JPEG images in ImageFolder layout (class sub-folders); returns their paths."""
    import numpy as np
    from pathlib import Path
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    paths = []
    for i in range(n):
        cls = classes[i % len(classes)]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(size, size + 8 * (i % 3), 3), dtype=np.uint8)
        p = folder / cls / f"img{i:05d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def save_shapes_checkpoint(folder, seed: int = 1):
    """A freshly built (untrained) shapes-world CLIP saved like a training run: FOLDER/last.pt + config.json."""
    import json
    from pathlib import Path

    from textspan import builtin

    model, tok = builtin.build_model(seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "step": 0}, folder / "last.pt")
    (folder / "config.json").write_text(json.dumps({"config": builtin.default_config(tok.vocab_size),
                                                    "vocab": tok.words}))
    return folder / "last.pt", model.eval()


def encode_with_hooks(model, x, handles):
    """open_clip's own `encode_image(x)` (no grad) with the hook `handles` already registered on its modules; the
    hooks are removed afterwards, also when the forward raises. Returns the embedding."""
    try:
        with torch.no_grad():
            return model.encode_image(x)
    finally:
        for h in handles:
            h.remove()
