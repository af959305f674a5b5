"""Zero-shot segmentation on the shapes world, against the generator's true object masks, for every explainer.

For each fresh single-object image, the prompts describe the object with each of the 5 shapes ("a large red star", "a
large red circle", ...); every method explains the true description (`textspan.explain_eval.target_maps`: for the
decomposition, the true description's map minus the mean over the 5, DESIGN.md section 6; for the others, their map of
the true description). The decomposition's own map of the true description (no subtraction, like every other method's)
is reported too, as "decomposition (own map)". Baseline: a centred Gaussian. Maps are upsampled to the image, clipped
at 0 and min-max normalised (as `segment-eval`); reports pixel accuracy, mIoU, mAP and pointing-game accuracy (the
map's maximum falls on the object). "legrad (layers=all)" is LeGrad over every block instead of the last two.

With --objects 2 the images hold two objects (in two different quadrants): each object is a case of its own, the
prompts describe that object (its size and colour, each of the 5 shapes), and its map is scored against its own mask
(the other object counts as background): per-object mIoU and the multi-object pointing game (the maximum must fall on
the named object). Single-score explainers that merge the objects into one blob lose here.

It also prints, per block, the zero-shot shape accuracy of the image feature LeGrad differentiates (ln_post of the mean
over all tokens of the block's output, through proj) next to that of the CLS token (what the model's embedding is).

With --published-legrad (in an environment with legrad-torch 1.1 on open_clip 2.23, where textspan also runs), it
adds the published LeGrad (`LeWrapper(model).compute_legrad`, its own upsampling and min-max) on the same model and
images, as "legrad (published code)", and prints the largest difference from textspan's upsampled maps.

    python experiments/shapes_segmentation.py [--n 1000] [--objects 1] [--methods all] [--model shapes] [--output DIR]
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
from textspan.methods._vit import trace
from textspan.metrics import normalise_map, segmentation_scores
from textspan.text import encode_texts
from textspan.visualize import upsample


def prompts_for(labels):
    """The 5 descriptions of the object, one per shape, with its true size and colour."""
    article = "an" if labels["size"][0] in "aeiou" else "a"
    return [f"{article} {labels['size']} {labels['colour']} {shape}" for shape in world.SHAPES]


def block_features(model, tok, samples, chunk=250):
    """Per block: zero-shot shape accuracy (%) of LeGrad's image feature and of the CLS token's."""
    tower = textspan.engine.read_tower(model)
    L = tower.n_layers
    hits = {"mean over tokens": np.zeros(L), "CLS token": np.zeros(L)}
    for i in range(0, len(samples), chunk):
        part = samples[i:i + chunk]
        x = builtin.preprocess_batch(np.stack([s.image for s in part]))
        T = torch.stack([torch.from_numpy(encode_texts(model, tok, prompts_for(s.labels))) for s in part])
        true = torch.tensor([world.SHAPES.index(s.labels["shape"]) for s in part])
        with torch.no_grad():
            traces = trace(tower, x, list(range(L)))
            for l in range(L):
                for name, tokens in (("mean over tokens", traces[l].x_out.mean(dim=1)),
                                     ("CLS token", traces[l].x_out[:, 0])):
                    f = tower.pooled_embedding(tokens)
                    hits[name][l] += (torch.einsum("nd,npd->np", f, T).argmax(dim=1) == true).sum().item()
    return {name: (h / len(samples) * 100).round(1).tolist() for name, h in hits.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--objects", type=int, default=1, choices=[1, 2])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--methods", default="all", help="comma-separated explainers, or all")
    ap.add_argument("--output", default=None)
    ap.add_argument("--published-legrad", action="store_true",
                    help="also run legrad-torch 1.1 (needs it and open_clip 2.23 installed)")
    args = ap.parse_args()
    model, _, tok = textspan.load_model(args.model, args.pretrained)
    published, published_diff = None, 0.0
    if args.published_legrad:
        import legrad  # legrad-torch 1.1; it hooks the model it wraps, so it gets its own copy
        published = legrad.LeWrapper(textspan.load_model(args.model, args.pretrained)[0].eval(), layer_index=-2)
    samples = [world.sample(args.seed, i, n_objects=args.objects) for i in range(args.n)]
    # a case: (sample index, the described object's labels, its mask)
    cases = [(i, obj, m) for i, s in enumerate(samples) for obj, m in zip(s.objects, s.masks)]
    masks = [m for _, _, m in cases]
    size = world.SIZE
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    gauss = np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 4) ** 2))
    methods = textspan.list_methods() if args.methods == "all" else args.methods.split(",")
    results = {m: [] for m in methods}
    if "decomposition" in methods:
        results["decomposition (own map)"] = []
    if "legrad" in methods:
        results["legrad (layers=all)"] = []
    if "chefer" in methods:
        results["chefer (all blocks, cosine)"] = []
    if published is not None:
        results["legrad (published code)"] = []
    results["gaussian"] = [normalise_map(gauss)] * len(cases)
    seconds = {m: 0.0 for m in methods}
    for i in range(0, args.n, 100):
        chunk = samples[i:i + 100]
        x = builtin.preprocess_batch(np.stack([s.image for s in chunk]))
        for index, obj, _ in (c for c in cases if i <= c[0] < i + 100):
            k = index - i
            T = torch.from_numpy(encode_texts(model, tok, prompts_for(obj)))
            true = world.SHAPES.index(obj["shape"])
            for m in methods:
                t0 = time.perf_counter()
                rel = target_maps(model, x[k:k + 1], T, [true], m)[0]
                seconds[m] += time.perf_counter() - t0
                results[m].append(normalise_map(upsample(rel, size).numpy()))
                if m == "decomposition":
                    own = textspan.explain(model, x[k:k + 1], T[true:true + 1], method=m, relative=False)[0, 0]
                    results["decomposition (own map)"].append(normalise_map(upsample(own, size).numpy()))
                if m == "legrad":
                    every = textspan.explain(model, x[k:k + 1], T[true:true + 1], method=m, layers="all")[0, 0]
                    results["legrad (layers=all)"].append(normalise_map(upsample(every, size).numpy()))
                if m == "chefer":  # textspan's former default: every block, the cosine
                    allb = textspan.explain(model, x[k:k + 1], T[true:true + 1], method=m, start_layer=0,
                                            target="cosine")[0, 0]
                    results["chefer (all blocks, cosine)"].append(normalise_map(upsample(allb, size).numpy()))
            if published is not None:
                theirs = published.compute_legrad(T[true:true + 1], image=x[k:k + 1]).detach()[0, 0].numpy()
                ours = textspan.upsample_maps(
                    textspan.explain(model, x[k:k + 1], T[true:true + 1], method="legrad"), size)[0, 0].numpy()
                published_diff = max(published_diff, float(np.abs(theirs - ours).max()))
                results["legrad (published code)"].append(normalise_map(theirs))
    table = {}
    for name, maps in results.items():
        sc = segmentation_scores(maps, masks)
        table[name] = {"pixel_accuracy": round(sc["pixel_accuracy"], 2), "miou": round(sc["miou"], 2),
                       "map": round(sc["map"], 2), "pointing": round(sc["pointing"], 2)}
        table[name]["seconds"] = round(seconds.get(name, 0.0), 2)
    print(f"{'method':<24}{'pixel acc':>10}{'mIoU':>8}{'mAP':>8}{'pointing':>10}{'time (s)':>10}   ({args.n} images, "
          f"{args.objects} object(s) each: {len(cases)} objects scored)")
    for name, r in table.items():
        print(f"{name:<24}{r['pixel_accuracy']:>10.2f}{r['miou']:>8.2f}{r['map']:>8.2f}{r['pointing']:>10.2f}"
              f"{r['seconds']:>10.2f}")
    if published is not None:
        print(f"published LeGrad against textspan's upsampled min-max maps: largest difference {published_diff:.3g}")
    features = block_features(model, tok, samples) if args.objects == 1 else {}
    print("zero-shot shape accuracy (%) of the image feature at each block (ln_post, proj; 5 prompts, chance 20%):")
    for name, accs in features.items():
        print(f"  {name:<18}" + "".join(f"  block {l}: {a:5.1f}" for l, a in enumerate(accs)))
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / f"shapes_segmentation_{args.objects}.json").write_text(
            json.dumps({"maps": table, "block_feature_shape_accuracy": features,
                        "published_legrad_max_difference": published_diff if published is not None else None},
                       indent=1))


if __name__ == "__main__":
    main()
