"""Check `textspan.explain(..., method="gradeclip", single_head=True)` against the published Grad-ECLIP notebook
(Cyang-Zhao/Grad-Eclip, grad_eclip_image.ipynb) on identical weights and inputs.

The notebook is not part of this repository: download it and pass its path. This script runs the notebook's own code
cells that define `attention_layer`, `clip_encode_dense`, `sim_qk` and `grad_eclip` (with its `x = x.half()` cast
removed, so that the comparison is in float32), with `clipmodel` bound to an open_clip ViT (--model, default
ViT-B-16). The notebook's forward is written for the sequence-first layout of OpenAI CLIP / open_clip 2.x, so run it
where open_clip < 3 is installed (the environment of experiments/legrad_reference.py):

    python experiments/gradeclip_reference.py --notebook grad_eclip_image.ipynb [--pretrained TAG]

It prints the largest difference of the raw maps (relative to the map's maximum) per input size. Models with layer
scale are refused: the notebook's block has none.
"""
import argparse
import json

import torch
import torch.nn.functional as F

import textspan

NEEDED = ("def attention_layer", "def clip_encode_dense", "def sim_qk", "def grad_eclip")


def notebook_functions(path, clipmodel, image_size, patch):
    cells = json.load(open(path))["cells"]
    namespace = {"torch": torch, "F": F, "math": __import__("math"), "clipmodel": clipmodel,
                 "clip_inres": image_size, "clip_ksize": (patch, patch)}
    found = set()
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        src = "".join(cell["source"])
        if not any(k in src for k in NEEDED) or "clip.load" in src:
            continue
        src = src.replace("x = x.half()", "x = x")
        exec(compile(src, f"{path}:cell", "exec"), namespace)
        found |= {k for k in NEEDED if k in src}
    missing = set(NEEDED) - found
    if missing:
        raise SystemExit(f"{path}: no code cell defines {sorted(missing)}")
    return namespace


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--notebook", required=True)
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--model", default="ViT-B-16", help="an open_clip ViT name")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import open_clip

    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.model, pretrained=args.pretrained).eval()
    if any(not isinstance(b.ls_1, torch.nn.Identity) for b in model.visual.transformer.resblocks):
        raise SystemExit(f"{args.model} has layer scale, which the notebook's hand-written block leaves out (it would "
                         "compare another model); textspan keeps the model's layer scale. Choose a model without it.")
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    patch = model.visual.patch_size[0]
    nb = notebook_functions(args.notebook, model, size, patch)
    g = torch.Generator().manual_seed(args.seed + 1)
    text = F.normalize(torch.randn(args.prompts, model.visual.proj.shape[1], generator=g), dim=-1)
    worst = 0.0
    for h, w in ((size, size), (size + 6 * patch, size + patch)):  # 224 x 224 and 320 x 240 for ViT-B-16
        img = torch.randn(1, 3, h, w, generator=g)
        outputs, _, vs, qs, ks, _, outs, map_size = nb["clip_encode_dense"](img, n=1)
        cosine = (F.normalize(outputs[:, 0], dim=-1) @ text.T)[0]
        ref = torch.stack([nb["grad_eclip"](c, qs, ks, vs, outs, map_size) for c in cosine]).detach()
        ours = textspan.explain(model, img, text, method="gradeclip", single_head=True)[0]
        rel = float((ours - ref).abs().max() / ref.abs().max())
        worst = max(worst, rel)
        print(f"{h} x {w}: max |difference| {float((ours - ref).abs().max()):.3g}, relative {rel:.3g}")
    print("MATCH (float32 precision)" if worst < 1e-5 else "MISMATCH")


if __name__ == "__main__":
    main()
