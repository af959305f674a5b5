"""textspan's `lrp` and `partial_lrp` against the published transformer LRP code (hila-chefer/Transformer-Explainability:
`modules/layers_lrp.py` and the `Block`, `Attention`, `Mlp`, `PatchEmbed` classes of `baselines/ViT/ViT_orig_LRP.py`)
on the same weights and inputs.

The published `VisionTransformer` class is an ImageNet ViT (no ln_pre, a class head) and cannot hold a CLIP tower,
so this script composes CLIP's image tower from the published layer classes, in the order of that class's
`forward` and `relprop`: patch embedding (its Conv2d, the CLIP weights, no bias), the published `Add` of the
positions, ln_pre (the published `LayerNorm`), the published `Block`s with the CLIP block's weights, ln_post
(`LayerNorm`), the published `IndexSelect` of the CLS token, `proj` and the prompts as bias-free published `Linear`
heads (the embedding normalised between them). Relevance: the published one-hot at the prompt, `relprop` through all
of it with alpha 1; `method="full"`: the position `Add`, the patch tokens, the patch embedding's z^B rule, summed over
channels (a pixel map, summed here over each patch to compare with textspan's patch-grid map); `method="last_layer"`:
the last block's `attn_cam`, clamped at 0, head-averaged, CLS row. The composed model's embedding is checked against
open_clip's `encode_image` first.

    git clone https://github.com/hila-chefer/Transformer-Explainability /path/TE
    pip install einops opencv-python-headless                 # what the published file imports
    python experiments/lrp_reference.py --te /path/TE [--model ViT-B-16] [--images 2] [--prompts 3] [--double]

Measured (ViT-B-16, random init, 2 images x 3 prompts): in float64 textspan and the published layers agree to 5.1e-9
(lrp) and 2.8e-9 (partial_lrp), relative to the map's largest value (the composed forward's image-text cosines differ
from open_clip's by 1.2e-9); in float32 to 6.8e-5 and 2.5e-3. The float32
gap is the rules' own conditioning (relevance divided by pre-activations + 1e-9, some near 0): the published code in
float32 differs from itself in float64 by 1.3 (lrp, relative to the map's largest value) and 8.9e-4 (partial_lrp).
Time, 2 images x 3 prompts, float32, 2 CPU threads: published layers 15.1 s, textspan's lrp 4.4 s.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def composed(visual, T, published):
    """The CLIP image tower built from the published LRP layer classes, with the prompts as the head."""
    L = published.layers
    V = published.vit
    D = visual.conv1.out_channels
    blocks = visual.transformer.resblocks
    H = blocks[0].attn.num_heads
    ratio = blocks[0].mlp.c_fc.out_features / D

    class Clip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = V.PatchEmbed(visual.image_size[0], visual.patch_size[0], 3, D)
            self.add = L.Add()
            self.ln_pre = L.LayerNorm(D, eps=visual.ln_pre.eps)
            self.blocks = torch.nn.ModuleList([V.Block(D, H, ratio, qkv_bias=True) for _ in blocks])
            self.norm = L.LayerNorm(D, eps=visual.ln_post.eps)
            self.pool = L.IndexSelect()
            self.proj = L.Linear(D, visual.proj.shape[1], bias=False)
            self.head = L.Linear(T.shape[1], T.shape[0], bias=False)
            with torch.no_grad():
                self.patch_embed.proj.weight.copy_(visual.conv1.weight)
                self.patch_embed.proj.bias.zero_()
                self.ln_pre.load_state_dict(visual.ln_pre.state_dict())
                self.norm.load_state_dict(visual.ln_post.state_dict())
                self.proj.weight.copy_(visual.proj.t())
                self.head.weight.copy_(T)
                for ours, theirs in zip(self.blocks, blocks):
                    ours.norm1.load_state_dict(theirs.ln_1.state_dict())
                    ours.norm2.load_state_dict(theirs.ln_2.state_dict())
                    ours.norm1.eps, ours.norm2.eps = theirs.ln_1.eps, theirs.ln_2.eps
                    ours.attn.qkv.weight.copy_(theirs.attn.in_proj_weight)
                    ours.attn.qkv.bias.copy_(theirs.attn.in_proj_bias)
                    ours.attn.proj.load_state_dict(theirs.attn.out_proj.state_dict())
                    ours.mlp.fc1.load_state_dict(theirs.mlp.c_fc.state_dict())
                    ours.mlp.fc2.load_state_dict(theirs.mlp.c_proj.state_dict())
            self.cls = visual.class_embedding.detach()
            self.pos = visual.positional_embedding.detach()

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)
            x = self.ln_pre(self.add([x, self.pos[None]]))
            for blk in self.blocks:
                x = blk(x)
            x = self.norm(x)
            x = self.pool(x, dim=1, indices=torch.tensor(0, device=x.device)).squeeze(1)
            return self.head(F.normalize(self.proj(x), dim=-1))

        def relprop(self, cam, method, **kwargs):
            cam = self.head.relprop(cam, **kwargs)
            cam = self.proj.relprop(cam, **kwargs).unsqueeze(1)
            cam = self.norm.relprop(self.pool.relprop(cam, **kwargs), **kwargs)
            for blk in reversed(self.blocks):
                cam = blk.relprop(cam, **kwargs)
            if method == "last_layer":
                a = self.blocks[-1].attn.get_attn_cam()[0]
                return a.clamp(min=0).mean(dim=0)[0, 1:]
            cam = self.ln_pre.relprop(cam, **kwargs)
            cam, _ = self.add.relprop(cam, **kwargs)
            return self.patch_embed.relprop(cam[:, 1:], **kwargs).sum(dim=1)

    return Clip().eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--te", required=True, help="a checkout of hila-chefer/Transformer-Explainability")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--double", action="store_true", help="float64 everywhere (the rules' divisions by near-zero "
                    "pre-activations make float32 results differ in the last digits of such entries)")
    args = ap.parse_args()
    dtype = torch.float64 if args.double else torch.float32
    sys.path.insert(0, args.te)
    import importlib

    published = argparse.Namespace(layers=importlib.import_module("modules.layers_lrp"),
                                   vit=importlib.import_module("baselines.ViT.ViT_orig_LRP"))
    import open_clip

    import textspan

    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval().to(dtype)
    visual = model.visual
    size, patch = visual.image_size[0], visual.patch_size[0]
    x = torch.randn(args.images, 3, size, size, dtype=dtype)
    T = F.normalize(torch.randn(args.prompts, visual.output_dim, dtype=dtype), dim=-1)
    theirs = composed(visual, T, published).to(dtype)
    with torch.no_grad():
        want = F.normalize(model.encode_image(x), dim=-1) @ T.t()
    start = time.perf_counter()
    full = textspan.explain(model, x, T, method="lrp")
    t_ours = time.perf_counter() - start
    part = textspan.explain(model, x, T, method="partial_lrp")
    t_theirs = 0.0
    g = size // patch
    worst_fwd = worst_full = worst_part = 0.0
    for b in range(args.images):
        for p in range(args.prompts):
            start = time.perf_counter()
            out = theirs(x[b:b + 1])
            one_hot = torch.zeros(1, args.prompts, dtype=dtype)
            one_hot[0, p] = 1
            pixels = theirs.relprop(one_hot, "full", alpha=1)[0].detach()
            t_theirs += time.perf_counter() - start
            worst_fwd = max(worst_fwd, float((out[0].detach() - want[b]).abs().max()))
            per_patch = pixels.reshape(g, patch, g, patch).sum(dim=(1, 3))
            worst_full = max(worst_full, float((per_patch - full[b, p]).abs().max() / per_patch.abs().max()))
            theirs(x[b:b + 1])
            last = theirs.relprop(one_hot, "last_layer", alpha=1).detach().reshape(g, g)
            worst_part = max(worst_part, float((last - part[b, p]).abs().max() / last.abs().max()))
    print(f"{args.model}, {args.images} images x {args.prompts} prompts, {dtype}, published LRP layers composed as "
          f"CLIP's tower:")
    print(f"  composed forward vs open_clip (image-text cosines): {worst_fwd:.1e}")
    print(f"  lrp (method='full', pixel map summed per patch): largest difference relative to the map's largest "
          f"value {worst_full:.1e}")
    print(f"  partial_lrp (method='last_layer'): {worst_part:.1e}")
    print(f"  lrp time for all images and prompts: published layers {t_theirs:.2f} s (one forward and relprop per "
          f"image and prompt), textspan {t_ours:.2f} s ({t_theirs / t_ours:.1f}x faster)")


if __name__ == "__main__":
    main()
