"""Images per second of each method through the evaluation frame, beside a plain forward over the same images.

Writes a shapes world in the ImageNet-S layout (--n images), then for each method runs `textspan.evaluate_imagenet_s`
(reading, preprocessing, the zero-shot prediction, the map of the image's class, scoring; the classifier is built
once outside the timing; no output folder) and, interleaved, a plain pass
over the same entries (read, preprocess, `encode_image`). Prints images per second and the ratio to the plain pass.
The model is the built-in shapes model by default; `--model ViT-B-16` runs a randomly initialised ViT-B/16 at 224 px
(the images are upsampled by its preprocessing).

    python benchmarks/bench_evaluations.py [--n 64] [--methods decomposition,legrad] [--model ViT-B-16] [--threads 2]
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

import textspan
from textspan import engine
from textspan.imagenet import ImageNetS
from textspan.jobs import resolve_model, zero_shot_classifier


def plain_pass(loaded, ds, batch_size):
    """Seconds to read, preprocess and encode every image of `ds` in batches."""
    t0 = time.perf_counter()
    batch = []
    for e in ds.entries(0, len(ds)):
        batch.append(loaded.preprocess(e.value[0]))
        if len(batch) == batch_size:
            with torch.no_grad():
                engine.library_image_embedding(loaded.model, torch.stack(batch))
            batch = []
    if batch:
        with torch.no_grad():
            engine.library_image_embedding(loaded.model, torch.stack(batch))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method of the tower)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    loaded = resolve_model(args.model, None, "cpu")
    methods = args.methods.split(",") if args.methods else textspan.list_methods(engine.read_tower(loaded.model))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ins"
        textspan.write_shapes_world(data, args.n, seed=1, layout="imagenet-s")
        ds = ImageNetS(data)
        W, _ = zero_shot_classifier(loaded, ds.names)  # built once: the text encoder is not what is timed
        plain_pass(loaded, ds, args.batch_size)  # warm-up
        print(f"{args.model}, {args.n} images, batch {args.batch_size}, {args.threads} threads, CPU")
        print(f"{'method':<16}{'img/s':>10}{'plain img/s':>14}{'cost (x plain)':>16}")
        for m in methods:
            base = plain_pass(loaded, ds, args.batch_size)
            t0 = time.perf_counter()
            textspan.evaluate_imagenet_s(data, None, loaded, classifier=W, method=m, batch_size=args.batch_size,
                                         device="cpu")
            sec = time.perf_counter() - t0
            base = (base + plain_pass(loaded, ds, args.batch_size)) / 2
            print(f"{m:<16}{args.n / sec:>10.1f}{args.n / base:>14.1f}{sec / base:>16.2f}")


if __name__ == "__main__":
    main()
