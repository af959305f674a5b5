"""TextSpan speed: our rank-r implementation against the plain per-step loop, and all heads of a ViT-L/14 cache.

1. n = 5000 images, d' = 512, M = 3500 texts, 20 picks, rank 80: time of `textspan.span.text_span` and of the plain
   loop of DESIGN.md section 4 (the one the tests check against), measured in this run on the same data; the picks
   must be identical; the ratio is printed (goal >= 20x).
2. All 64 heads of a ViT-L/14-shaped cache (4 layers x 16 heads, n = 10000, d' = 768, M = 3500, 20 picks, rank 80)
   through `label_heads`-style looping: total wall time (goal < 2 minutes on 2 CPU cores).

Data are synthetic (heads with a few planted text directions plus noise); the cost does not depend on the values.

    python benchmarks/bench_textspan.py [--skip-large]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_span import plain_text_span  # noqa: E402

from textspan.span import text_span  # noqa: E402


def synthetic(n, d, M, seed=0, planted=8):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(M, d)).astype(np.float32)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    C = (0.05 * rng.normal(size=(n, d)) + 0.1 * rng.normal(size=d)).astype(np.float32)
    for k, j in enumerate(rng.choice(M, planted, replace=False)):
        C += (rng.normal(size=(n, 1)) * (1.0 / (k + 1))).astype(np.float32) * T[j]
    return C, T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    n, d, M, m, r = 5000, 512, 3500, 20, 80
    C, T = synthetic(n, d, M)
    texts = [f"t{i}" for i in range(M)]
    fast = text_span(C, T, texts, n_texts=m, rank=r)  # warm-up (BLAS threads, first-call allocations)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        fast = text_span(C, T, texts, n_texts=m, rank=r)
        runs.append(time.perf_counter() - t0)
    t_fast = sorted(runs)[1]  # median of 3
    t0 = time.perf_counter()
    picks, _, _ = plain_text_span(C, T, m, r)
    t_plain = time.perf_counter() - t0
    same = fast.indices == picks
    print(f"n={n} d'={d} M={M} picks={m} rank={r}")
    print(f"  textspan.text_span: {t_fast:.3f} s (median of 3, after a warm-up call)")
    print(f"  plain loop:         {t_plain:.3f} s")
    print(f"  identical picks: {same}")
    print(f"  speed-up: {t_plain / t_fast:.1f}x (goal >= 20x)")
    if not args.skip_large:
        import tempfile

        L, H, n2, d2 = 4, 16, 10000, 768
        T2 = synthetic(2, d2, M, seed=1)[1]
        with tempfile.TemporaryDirectory() as tmp:
            # a cache-like heads.npy [n, L, H, d'] on disk, read head by head as label-heads does
            heads = np.lib.format.open_memmap(os.path.join(tmp, "heads.npy"), mode="w+", dtype=np.float32,
                                              shape=(n2, L, H, d2))
            for h in range(L * H):
                heads[:, h // H, h % H] = synthetic(n2, d2, 16, seed=100 + h)[0]
            heads.flush()
            del heads
            heads = np.load(os.path.join(tmp, "heads.npy"), mmap_mode="r")
            t0 = time.perf_counter()
            for h in range(L * H):
                text_span(np.asarray(heads[:, h // H, h % H]), T2, texts, n_texts=m, rank=r)
            total = time.perf_counter() - t0
            del heads
        print(f"all {L * H} heads of a ViT-L/14-shaped cache (n={n2}, d'={d2}, M={M}, {m} picks, rank {r}): "
              f"{total:.1f} s (goal < 120 s)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
