"""Compare `textspan deletion-eval` with Grad-ECLIP's published deletion / insertion scripts on identical weights,
images, maps and seeds.

The scripts are not part of this repository: pass a checkout of Cyang-Zhao/Grad-Eclip (--repo). This script reads
`imagenet_eval_deletion.py` and `imagenet_eval_insertion.py`, executes their own `make_grids`, `random_pixel`,
`delection_process`, `add_pixel`, `insertion_process` and `accuracy` (the module-level model loading is not run;
their `preprocess` and `device` are bound to the model under test), and runs their per-image loop on the images of
an ImageFolder with class sub-folders (--images, e.g. ImageNet val in wnid folders; `--limit N` images), with:

- the same map: textspan's map of the image's class (`--method`, default gradeclip) made on the preprocessed image,
  min-max normalised and resized to the image with torchvision's Resize, exactly what their `generate_hm` does after
  computing a map (their Grad-ECLIP maps are computed on the image at its own size with interpolated positional
  embeddings; textspan computes every method on the preprocessed input, so the maps themselves differ there);
- the same random colours: `torch.manual_seed(seed + index)` before each image's deletion (the scripts draw from the
  global generator without a seed; textspan seeds a generator per image so runs are reproducible);
- the same labels and zero-shot classifier (textspan's classifier from the class names and templates).

It prints both top-1/5/10 curves and their largest difference. Differences can only come from tied map values:
the scripts' `np.argsort` is not stable (numpy's sort decides the order of ties), textspan's is; the number of tied
pixels is printed, and so is the number of constant maps (all NaN after min-max, in both: numpy's sort orders an
all-NaN map its own way, textspan keeps pixel order). With --break-ties the published sort sees ties ordered by pixel index (textspan's order), and the
curves must then be equal.

    python experiments/deletion_insertion_reference.py --repo Grad-Eclip --images imagenet/val --model ViT-B-16 \\
        --pretrained openai --limit 50
"""
import argparse
import ast
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from textspan import benchmark, explain_eval, imagenet, image_jobs, jobs
from textspan.datasets import ImageList, read_image
from textspan.evals import deletion as dl

FUNCTIONS = {"imagenet_eval_deletion.py": ("accuracy", "make_grids", "random_pixel", "delection_process"),
             "imagenet_eval_insertion.py": ("make_grids", "add_pixel", "insertion_process")}


def published(repo: Path, preprocess, device):
    ns = {"torch": torch, "np": np, "Image": __import__("PIL.Image", fromlist=["Image"]), "preprocess": preprocess,
          "device": device}
    for name, wanted in FUNCTIONS.items():
        tree = ast.parse((repo / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in wanted:
                exec(compile(ast.Module([node], []), f"{name}:{node.name}", "exec"), ns)
    return ns


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--images", required=True)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--method", default="gradeclip")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--break-ties", action="store_true",
                    help="order tied map values by pixel index in the published sort too (a ramp of 1e-13 per "
                         "pixel), as textspan's stable sort does: then only the protocol is compared")
    args = ap.parse_args()

    loaded = jobs.resolve_model(args.model, args.pretrained, args.device)
    items = ImageList.from_path(args.images)
    if args.limit < len(items):
        items = image_jobs.sample_across_classes(items, args.limit, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ours = benchmark.evaluate_deletion_insertion(items, Path(tmp) / "ours", loaded, method=args.method,
                                                    seed=args.seed, batch_size=1, device=args.device)
    W, classnames = jobs.zero_shot_classifier(loaded, None, None,
                                                       default_classes=imagenet.class_names(items.classes))
    Wt = torch.from_numpy(W).to(args.device)
    labels = benchmark._class_labels(items, classnames)
    ns = published(args.repo, loaded.preprocess, args.device)
    top = {c: {k: torch.zeros(11) for k in (1, 5, 10)} for c in ("deletion", "insertion")}
    ties = flat = 0
    ks = tuple(k for k in (1, 5, 10) if k <= len(classnames))  # their topk needs k <= the number of classes
    for i, path in enumerate(items.paths):
        img = dl.cap_size(read_image(path))
        x = loaded.preprocess(img)[None].to(args.device)
        m = explain_eval.target_maps(loaded.model, x, Wt.t(), [labels[i]], args.method)[0]
        hm = dl.stretch_map(m.detach().cpu().numpy(), (img.size[1], img.size[0]))
        ties += hm.size - np.unique(hm).size
        flat += bool(np.isnan(hm).all())  # a constant map: min-max gives NaN everywhere, as published
        if args.break_ties:
            hm = np.nan_to_num(hm.astype(np.float64), nan=0.0) - 1e-13 * np.arange(hm.size).reshape(hm.shape)
        target = torch.tensor([labels[i]]).to(args.device)
        with torch.no_grad():
            clean = loaded.model.encode_image(x) @ Wt
        cs, _ = ns["accuracy"](clean, target, topk=ks)
        torch.manual_seed(args.seed + i)
        dels = ns["delection_process"](img, hm, 100, 10, "", "")
        ins = ns["insertion_process"](img, hm, 100, 10, "", "")
        for curve, batch in (("deletion", dels), ("insertion", ins)):
            with torch.no_grad():
                logits = loaded.model.encode_image(batch) @ Wt
            accs, _ = ns["accuracy"](logits, target.repeat(len(batch)), topk=ks)
            for k, a, c in zip(ks, accs, cs):
                if curve == "deletion":
                    top[curve][k][0] += c.sum()
                    top[curve][k][1:] += a
                else:
                    top[curve][k][-1] += c.sum()
                    top[curve][k][:-1] += a
    n = len(items)
    worst = 0.0
    for curve in ("deletion", "insertion"):
        for k in ks:
            ref = (100.0 * top[curve][k] / n).tolist()
            mine = ours[curve].get(f"top{k}")
            if mine is None:
                continue
            diff = max(abs(a - b) for a, b in zip(ref, mine))
            worst = max(worst, diff)
            print(f"{curve} top-{k}: published {np.round(ref, 2).tolist()}\n{'':>17}textspan  "
                  f"{np.round(mine, 2).tolist()}  (largest difference {diff:.3f} points)")
    print(json.dumps({"images": n, "largest_difference_points": worst, "tied_map_pixels": int(ties),
                      "constant_maps": int(flat)}))


if __name__ == "__main__":
    main()
