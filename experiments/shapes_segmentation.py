"""Zero-shot segmentation on the shapes world, against the generator's true object masks, for every explainer.

For each fresh single-object image, the prompts describe the object with each of the 5 shapes ("a large red star",
"a large red circle", ...); every method explains the true description (`textspan.explain_eval.target_maps`: for
the decomposition, the true description's map minus the mean over the 5, DESIGN.md section 6; for the others, their
map of the true description). The decomposition's own map of the true description (no subtraction, like every other
method's) is reported too, as "decomposition (own map)". Baseline: a centred Gaussian. Maps are upsampled to the image, clipped at 0 and
min-max normalised (as `segment-eval`); reports pixel accuracy, mIoU, mAP and pointing-game accuracy (the map's
maximum falls on the object).

    python experiments/shapes_segmentation.py [--n 1000] [--methods all] [--model shapes] [--output DIR]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import textspan
from textspan import builtin, world
from textspan.explain_eval import target_maps
from textspan.metrics import normalise_map, segmentation_scores
from textspan.text import encode_texts
from textspan.visualize import upsample


def pointing(maps, masks):
    hits = [mask.ravel()[np.argmax(m)] for m, mask in zip(maps, masks)]
    return float(np.mean(hits) * 100)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--methods", default="all", help="comma-separated explainers, or all")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    model, _, tok = textspan.load_model(args.model, args.pretrained)
    samples = [world.sample(args.seed, i) for i in range(args.n)]
    masks = [s.mask for s in samples]
    size = world.SIZE
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    gauss = np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 4) ** 2))
    methods = textspan.list_methods() if args.methods == "all" else args.methods.split(",")
    results = {m: [] for m in methods}
    if "decomposition" in methods:
        results["decomposition (own map)"] = []
    results["gaussian"] = [normalise_map(gauss)] * args.n
    seconds = {m: 0.0 for m in methods}
    for i in range(0, args.n, 100):
        chunk = samples[i:i + 100]
        x = builtin.preprocess_batch(np.stack([s.image for s in chunk]))
        for k, s in enumerate(chunk):
            lab = s.labels
            prompts = [f"{'an' if lab['size'][0] in 'aeiou' else 'a'} {lab['size']} {lab['colour']} {shape}"
                       for shape in world.SHAPES]
            T = torch.from_numpy(encode_texts(model, tok, prompts))
            true = world.SHAPES.index(lab["shape"])
            for m in methods:
                t0 = time.perf_counter()
                rel = target_maps(model, x[k:k + 1], T, [true], m)[0]
                seconds[m] += time.perf_counter() - t0
                results[m].append(normalise_map(upsample(rel, size).numpy()))
                if m == "decomposition":
                    own = textspan.explain(model, x[k:k + 1], T[true:true + 1], method=m, relative=False)[0, 0]
                    results["decomposition (own map)"].append(normalise_map(upsample(own, size).numpy()))
    table = {}
    for name, maps in results.items():
        sc = segmentation_scores(maps, masks)
        table[name] = {"pixel_accuracy": round(sc["pixel_accuracy"], 2), "miou": round(sc["miou"], 2),
                       "map": round(sc["map"], 2), "pointing": round(pointing(maps, masks), 2)}
        table[name]["seconds"] = round(seconds.get(name, 0.0), 2)
    print(f"{'method':<24}{'pixel acc':>10}{'mIoU':>8}{'mAP':>8}{'pointing':>10}{'time (s)':>10}   ({args.n} images)")
    for name, r in table.items():
        print(f"{name:<24}{r['pixel_accuracy']:>10.2f}{r['miou']:>8.2f}{r['map']:>8.2f}{r['pointing']:>10.2f}"
              f"{r['seconds']:>10.2f}")
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "shapes_segmentation.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
