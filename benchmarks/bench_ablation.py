"""Single-head mean-ablation of every head of a ViT-L/14-sized cache.

A cache-like heads.npy [n = 10000, 24 layers, 16 heads, d' = 768] float32 (11.8 GB on disk, memory-mapped) and a
1000-class classifier (ImageNet-sized): the time of `term_logits` (layer sums, reference means) plus
`single_head_importance` (the accuracy with each of the 384 heads mean-ablated), and the arithmetic rate reached;
then the same sweep with the correct-class margins (`margins=True`, what `textspan ablate` runs).
Goal (issue: ablations): under 30 s on 2 CPU cores.

    python benchmarks/bench_ablation.py [--n 10000] [--classes 1000] [--dir DIR]
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

from textspan.ablation import single_head_importance, term_logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="where to write the synthetic cache (default: a temp folder)")
    args = ap.parse_args()
    n, L, H, d, C = args.n, args.layers, args.heads, args.d, args.classes
    rng = np.random.default_rng(0)
    W = rng.normal(size=(d, C)).astype(np.float32)
    W /= np.linalg.norm(W, axis=0, keepdims=True)
    labels = rng.integers(0, C, n)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "heads.npy")
        heads = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, L, H, d))
        for i in range(0, n, 500):  # class-dependent signal in a few heads, noise elsewhere
            block = rng.normal(scale=0.02, size=(min(500, n - i), L, H, d)).astype(np.float32)
            block[:, -1, :4] += 0.05 * W[:, labels[i:i + 500]].T[:, None, :]
            heads[i:i + 500] = block
        heads.flush()
        del heads
        heads = np.load(path, mmap_mode="r")
        mlps = rng.normal(scale=0.02, size=(n, L + 1, d)).astype(np.float32)
        t0 = time.perf_counter()
        t = term_logits(heads, None, mlps, W, same_set=True)
        t1 = time.perf_counter()
        acc = single_head_importance(t, labels)
        t2 = time.perf_counter()
        _, margin = single_head_importance(t, labels, margins=True)  # what `ablate` runs: accuracy and margins
        t3 = time.perf_counter()
        del heads, t
    flops = 2 * n * L * H * d * C
    print(f"cache [n={n}, L={L}, H={H}, d'={d}] float32 on disk, {C} classes, torch threads {torch.get_num_threads()}")
    print(f"  term_logits (layer sums, reference means): {t1 - t0:.1f} s")
    print(f"  single_head_importance, all {L * H} heads: {t2 - t1:.1f} s ({flops / (t2 - t1) / 1e9:.0f} GFLOP/s)")
    print(f"  total: {t2 - t0:.1f} s (goal < 30 s); accuracy range over heads {acc.min():.2f}..{acc.max():.2f}%")
    print(f"  with the correct-class margins too (what `textspan ablate` computes): sweep {t3 - t2:.1f} s, "
          f"{(t3 - t2) / (t2 - t1):.2f}x the accuracy-only sweep; total {t1 - t0 + t3 - t2:.1f} s")


if __name__ == "__main__":
    main()
