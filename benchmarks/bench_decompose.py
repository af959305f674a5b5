"""Throughput and peak memory of the decomposition against a plain `encode_image`.

ViT-B-16 (random init; the cost does not depend on the weights), a batch of 8 images at 224 px, CPU by default.
Prints images/s of plain `encode_image`, `decompose(spatial=False)` and `decompose(spatial=True)`, their ratios
(measured in this one run, timings interleaved), and the peak resident memory of each mode, each measured in its own
fresh process: the peak resident set (torch + the loaded model + the work and its output) from the moment the model
is loaded (the transient peak of building the model is reset first).

Goals (issue: foundation): ratio >= 0.7 non-spatial, >= 0.5 spatial; spatial peak memory <= 1.5x plain.
EVA row: ``--model EVA02-B-16`` (timm Eva trunk: rotary embeddings, inner norm, SwiGLU); goal >= 0.9 non-spatially.
SigLIP row (issue: model families): ``--model ViT-B-16-SigLIP`` (open_clip's timm trunk with attention pooling):
non-spatial ratio >= 0.9, the spatial ratio printed.

    python benchmarks/bench_decompose.py [--model ViT-B-16] [--batch 8] [--repeats 5] [--device cpu]
    python benchmarks/bench_decompose.py --model ViT-B-16-SigLIP
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def build(model_name: str, device: str):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(model_name, device=device).eval()
    size = tuple(model.visual.image_size)
    images = torch.randn(BATCH, 3, *size, device=device)
    return model, images


def run_mode(model, images, mode: str):
    from textspan import decompose

    with torch.no_grad():
        if mode == "plain":
            out = model.encode_image(images)
        elif mode == "nonspatial":
            out = decompose(model, images, spatial=False).heads
        else:
            out = decompose(model, images, spatial=True).heads
    if images.is_cuda:
        torch.cuda.synchronize()
    return out


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(model_name: str, device: str, mode: str) -> None:
    """Peak RSS while running one mode: model creation's own transient peak is cleared first (Linux clear_refs)."""
    model, images = build(model_name, device)
    base = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set, to the current RSS
    out = run_mode(model, images, mode)
    peak = status_mb("VmHWM")
    print(json.dumps({"mode": mode, "peak_mb": peak, "after_load_mb": base,
                      "output_mb": out.numel() * out.element_size() / 2 ** 20}))


MODES = ("plain", "nonspatial", "spatial")
BATCH = 8


def main() -> None:
    global BATCH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--memory-child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    BATCH = args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.model, args.device, args.memory_child)
        return

    model, images = build(args.model, args.device)
    for mode in MODES:  # warm-up
        run_mode(model, images, mode)
    times = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so drifts in machine load hit every mode alike
            t0 = time.perf_counter()
            run_mode(model, images, mode)
            times[mode].append(time.perf_counter() - t0)
    ips = {m: args.batch / statistics.median(t) for m, t in times.items()}

    mem = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--device", args.device,
               "--memory-child", mode] + (["--threads", str(args.threads)] if args.threads else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        mem[mode] = json.loads(res.stdout.strip().splitlines()[-1])

    print(f"model {args.model}, batch {args.batch}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"{'mode':<22}{'images/s':>10}{'ratio':>8}{'peak RSS MB':>13}{'vs plain':>10}{'output MB':>11}")
    for mode, label in zip(MODES, ("encode_image", "decompose(spatial=F)", "decompose(spatial=T)")):
        print(f"{label:<22}{ips[mode]:>10.2f}{ips[mode] / ips['plain']:>8.3f}{mem[mode]['peak_mb']:>13.0f}"
              f"{mem[mode]['peak_mb'] / mem['plain']['peak_mb']:>10.3f}{mem[mode]['output_mb']:>11.1f}")
    from textspan import model_info

    info = model_info(model)
    # the SigLIP row's goal (model-families issue) and the EVA row's (EVA issue); 0.7 for CLIP ViTs (DESIGN.md)
    goal = 0.9 if info.pooling == "attention" or "EVA" in info.family else 0.7
    print(f"throughput ratio non-spatial: {ips['nonspatial'] / ips['plain']:.3f} (goal >= {goal})")
    print(f"throughput ratio spatial: {ips['spatial'] / ips['plain']:.3f} (goal >= 0.5)")
    print(f"peak memory ratio spatial/plain: {mem['spatial']['peak_mb'] / mem['plain']['peak_mb']:.3f} (goal <= 1.5)")
    print(f"(model loaded: {mem['plain']['after_load_mb']:.0f} MB RSS before any forward)")


if __name__ == "__main__":
    main()
