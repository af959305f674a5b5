"""Time, size and peak memory of `textspan.build_atlas` on a ViT-B/16-shaped cache.

A synthetic cache of 2000 images (small PNGs on disk, so thumbnails are real work) with 12 x 12 heads and d' = 512,
TextSpan labels with 20 texts per head (random unit directions), single-head ablation results, and a randomly
initialised ViT-B-16 for the maps (4 sample images at 224 px). Prints the atlas's wall time, the site's size on disk
and the process's peak resident memory.

Goals (the atlas issue): under 60 s and under 50 MB (the site on disk).

    python benchmarks/bench_atlas.py [--images 2000] [--texts 20] [--dir /tmp/atlas-bench]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_cache(folder: Path, n: int, L: int, H: int, d: int, fingerprint: str, rng) -> None:
    from textspan.cache import FORMAT

    (folder / "imgs").mkdir(parents=True)
    paths = []
    for i in range(n):
        p = folder / "imgs" / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    c = folder / "cache"
    c.mkdir()
    heads = np.lib.format.open_memmap(c / "heads.npy", mode="w+", dtype=np.float32, shape=(n, L, H, d))
    for a in range(0, n, 250):
        heads[a:a + 250] = rng.standard_normal((min(250, n - a), L, H, d), dtype=np.float32) * 0.01
    del heads
    np.save(c / "cls_to_cls.npy", np.zeros((n, L, H, d), np.float16).astype(np.float32)[:0])
    np.save(c / "mlps.npy", rng.standard_normal((n, L + 1, d), dtype=np.float32) * 0.01)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    np.save(c / "embeddings.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    with open(c / "images.csv", "w") as f:
        f.write("row,path,label,class_name\n")
        for i, p in enumerate(paths):
            f.write(f"{i},{p},-1,\n")
    manifest = dict(format=FORMAT, model="ViT-B-16", pretrained=None, fingerprint=fingerprint, image_size=[224, 224],
                    dtype="float32", n_layers=L, n_heads=H, d_embed=d, n_tokens=197, images_source=str(folder),
                    n_images=n, rows_done=n, next_index=n, failures=[], complete=True, classes=[])
    (c / "manifest.json").write_text(json.dumps(manifest))


def make_labels(folder: Path, L: int, H: int, d: int, m: int, rng):
    import textspan
    from textspan.span import TextSpanResult

    results = {}
    for l in range(L):
        for h in range(H):
            var = np.sort(rng.random(m))[::-1] / (2 * m)
            dirs = rng.standard_normal((m, d))
            results[(l, h)] = TextSpanResult([f"text {l}-{h}-{k} water" if k == 0 else f"text {l}-{h}-{k}"
                                              for k in range(m)], list(range(m)), var, np.cumsum(var), dirs,
                                             np.zeros(d), 1.0)
    labels = textspan.HeadLabels(results, "synthetic", 80, m, "ViT-B-16", 0, "")
    labels.save(folder)
    return labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--texts", type=int, default=20)
    ap.add_argument("--dir", default="/tmp/textspan-atlas-bench")
    args = ap.parse_args()
    import open_clip

    import textspan
    from textspan.jobs import Loaded

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16")
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    fp = textspan.fingerprint(model)
    L, H, d = 12, 12, 512
    rng = np.random.default_rng(0)
    t = time.time()
    make_cache(root, args.images, L, H, d, fp, rng)
    make_labels(root / "labels", L, H, d, args.texts, rng)
    (root / "abl").mkdir()
    (root / "abl" / "ablations.json").write_text(json.dumps({"baseline": 70.0, "protocol": "synthetic",
                                                            "single_heads": (70 + rng.normal(0, 1, (L, H))).tolist()}))
    print(f"synthetic inputs made in {time.time() - t:.1f} s")
    start = time.perf_counter()
    res = textspan.build_atlas(root / "cache", root / "labels", root / "site", ablations=root / "abl",
                               model=Loaded(model, preprocess, tokenizer, "ViT-B-16"), notify=print)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"atlas of {res.n_heads} heads, {args.images} images, {args.texts} texts per head: {seconds:.1f} s "
          f"(goal < 60 s), site {res.bytes / 1e6:.1f} MB on disk (goal < 50 MB), {res.n_thumbnails} thumbnails, "
          f"{res.n_maps} map figures; process peak RSS {peak:.0f} MB (torch and the model included)")


if __name__ == "__main__":
    main()
