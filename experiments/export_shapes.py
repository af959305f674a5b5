"""Evaluate a trained shapes CLIP and ship it as package data (textspan/data/shapes_clip*.{safetensors,json}).

The accuracies recorded are those of the shipped (fp16-stored) weights, reloaded the way users load them:
- `accuracy`: zero-shot per attribute on 2000 held-out single-object images (seed 12345);
- `check_set`: the same on a small fixed set (200 images, seed 999) that tests reproduce;
- spurious variant: the balanced-test group report (2000 images) and its check-set version (400 images).

    python experiments/export_shapes.py --variant default --checkpoint runs/shapes-default/last.pt
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from textspan import builtin, training, world

CHECK_SET = {"n": 200, "seed": 999}
SPURIOUS_CHECK_SET = {"n": 400, "seed": 4242}


def _world_flags(run_cfg) -> str:
    """The train_shapes.py flags of a run's spurious-world options that differ from the defaults."""
    spec = run_cfg.get("spurious") or {}
    defaults = {"correlation": world.Spurious.correlation, "background_named": world.Spurious.background_named,
                "mix": 0.0}
    return "".join(f" --{k.replace('_', '-')} {spec[k]}" for k, d in defaults.items() if k in spec and spec[k] != d)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["default", "spurious"], default="default")
    ap.add_argument("--checkpoint", required=True)
    args = ap.parse_args()
    ckpt = Path(args.checkpoint)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    run_cfg = json.loads((ckpt.parent / "config.json").read_text())
    model, _, tok = builtin.load_shapes_model(checkpoint=ckpt)
    meta = {
        "variant": args.variant,
        "training": {"steps": state["step"], "batch_size": run_cfg["batch_size"], "lr": run_cfg["lr"],
                     "warmup": run_cfg["warmup"], "seed": run_cfg["seed"],
                     "wall_minutes": round(state.get("elapsed", 0) / 60, 1),
                     "command": f"python experiments/train_shapes.py --variant {args.variant} --steps "
                                f"{run_cfg['steps']} --output {ckpt.parent}" + _world_flags(run_cfg),
                     "world": run_cfg.get("spurious"),
                     "hardware": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                                 f"torch {torch.__version__}"},
        "check_set": CHECK_SET,
    }
    builtin.save_checkpoint(model, tok, run_cfg["config"], args.variant, meta)
    shipped, _, tok = builtin.load_shapes_model(args.variant)
    meta["accuracy"] = training.zero_shot_accuracy(shipped, tok, n=2000, seed=12345)
    meta["check_set_accuracy"] = training.zero_shot_accuracy(shipped, tok, **CHECK_SET)
    if args.variant == "spurious":
        meta["spurious"] = training.spurious_report(shipped, tok, n=2000)
        meta["spurious_check_set"] = SPURIOUS_CHECK_SET
        meta["spurious_check_set_report"] = training.spurious_report(shipped, tok, **SPURIOUS_CHECK_SET)
    builtin.save_checkpoint(model, tok, run_cfg["config"], args.variant, meta)
    weights, info = builtin.checkpoint_paths(args.variant)
    print(json.dumps({k: v for k, v in meta.items() if k != "training"}, indent=1))
    print(f"{weights}: {weights.stat().st_size / 2**20:.2f} MB")
