"""Cost of the second-order effects of one MLP layer's neurons against a plain `encode_image` of the same batch.

ViT-B-16 (random init), CPU, 224 px, batch 8, the last-but-three block's MLP (block 8 of 12: 3 later blocks, 36
heads). Prints the median time of `encode_image`, of `neuron_effects` with its image-independent directions
computed once and reused (what `textspan neurons` does for every batch), and of one call that also computes them;
and the ratios. Goal: at most 3x a plain forward. The published hook's time on the same inputs is printed by
experiments/second_order_reference.py (it needs a checkout of second_order_lens).

    python benchmarks/bench_neurons.py [--model ViT-B-16] [--batch 8] [--layer -4] [--repeats 3] [--threads 2]
"""
import argparse
import statistics
import time

import torch

import textspan
from textspan.neurons import neuron_directions, neuron_effect_parts, neuron_effects


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layer", type=int, default=-4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _, _ = textspan.load_model(args.model)
    size = textspan.engine.read_tower(model).image_size
    x = torch.randn(args.batch, 3, *size)
    dirs = neuron_directions(model, args.layer)
    with torch.no_grad():
        model.encode_image(x)  # warm-up
    with torch.no_grad():
        t_fwd = timed(lambda: model.encode_image(x), args.repeats)
    t_eff = timed(lambda: neuron_effects(model, x, args.layer, directions=dirs), args.repeats)
    t_all = timed(lambda: neuron_effects(model, x, args.layer), args.repeats)
    t_dirs = timed(lambda: neuron_directions(model, args.layer), args.repeats)
    eff = neuron_effect_parts(model, x, args.layer, directions=dirs)
    print(f"{args.model}, batch {args.batch}, block {eff.layer}'s MLP ({eff.second_order.shape[1]} neurons), "
          f"{args.threads} threads, CPU")
    print(f"encode_image                          {t_fwd:7.3f} s   1.00x")
    print(f"neuron_effects (directions reused)    {t_eff:7.3f} s   {t_eff / t_fwd:.2f}x   (goal <= 3x)")
    print(f"neuron_effects (directions computed)  {t_all:7.3f} s   {t_all / t_fwd:.2f}x")
    print(f"neuron_directions alone               {t_dirs:7.3f} s   (once per layer and model)")


if __name__ == "__main__":
    main()
