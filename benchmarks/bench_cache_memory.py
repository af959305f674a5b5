"""Streaming check: caching 10x more images must not cost more memory.

Generates N random images (ImageFolder layout) and caches them through a small randomly initialised ViT whose rows
are large enough (6 layers x 8 heads x d_embed 256: ~100 KB per image over heads + cls_to_cls) that keeping results in
memory would show: 4000 images would hold ~390 MB. Each run happens in its own process, and its peak resident memory
(VmHWM) is printed for 400 and for 4000 images, with the difference.

Goal (issue: foundation): peak RSS for 4000 images within 100 MB of 400 images.

    python benchmarks/bench_cache_memory.py [--small 400] [--large 4000] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL_CFG = dict(embed_dim=256,
                 vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=6, head_width=8, mlp_ratio=2.0),
                 text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


def make_model_dir(folder: Path) -> str:
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = CLIP(**MODEL_CFG)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def make_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(sub / f"{i:06d}.png")


def child(model: str, images: str, out: str, batch_size: int) -> None:
    import textspan
    from textspan.datasets import ImageList

    m, preprocess, _ = textspan.load_model(model)
    res = textspan.build_cache(m, preprocess, ImageList.from_folder(images), out, model_name=model,
                               batch_size=batch_size, quiet=True)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"rows": res.rows, "peak_mb": peak}))


def measure(model: str, tmp: Path, n: int, batch_size: int) -> dict:
    images = tmp / f"images{n}"
    make_images(images, n)
    cmd = [sys.executable, __file__, "--child", model, str(images), str(tmp / f"cache{n}"), str(batch_size)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=400)
    ap.add_argument("--large", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = make_model_dir(tmp / "model")
        small = measure(model, tmp, args.small, args.batch_size)
        large = measure(model, tmp, args.large, args.batch_size)
    row_kb = (2 * 6 * 8 * 256 + 7 * 256 + 256) * 4 / 1024
    result = {"small_images": small["rows"], "small_peak_mb": round(small["peak_mb"], 1),
              "large_images": large["rows"], "large_peak_mb": round(large["peak_mb"], 1),
              "difference_mb": round(large["peak_mb"] - small["peak_mb"], 1),
              "large_results_mb": round(large["rows"] * row_kb / 1024, 1)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"cache of {result['small_images']} images: peak RSS {result['small_peak_mb']:.0f} MB")
    print(f"cache of {result['large_images']} images: peak RSS {result['large_peak_mb']:.0f} MB "
          f"(its arrays hold {result['large_results_mb']:.0f} MB)")
    print(f"difference: {result['difference_mb']:+.1f} MB (goal: within 100 MB)")


if __name__ == "__main__":
    main()
