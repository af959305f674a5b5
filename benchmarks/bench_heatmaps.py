"""Cost of per-prompt heatmaps against one plain `encode_image` of the same batch.

ViT-B-16 (random init), a batch of 8 at 224 px, 8 prompts, CPU: `textspan.heatmaps` (all layers and heads) and
plain `encode_image`, timings interleaved, median of repeats; the ratio is printed. Goal: <= 1.3x.

    python benchmarks/bench_heatmaps.py [--batch 8] [--prompts 8] [--repeats 5]
"""
import argparse
import statistics
import time

import open_clip
import torch

from textspan import heatmaps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval()
    size = model.visual.image_size
    x = torch.randn(args.batch, 3, *size)
    T = torch.nn.functional.normalize(torch.randn(args.prompts, model.visual.output_dim), dim=-1)
    runs = {"encode_image": lambda: model.encode_image(x), "heatmaps": lambda: heatmaps(model, x, T)}
    with torch.no_grad():
        for f in runs.values():
            f()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.model}, batch {args.batch}, {args.prompts} prompts, torch threads {torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:<13} {v:.3f} s")
    print(f"ratio heatmaps / encode_image: {med['heatmaps'] / med['encode_image']:.3f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
