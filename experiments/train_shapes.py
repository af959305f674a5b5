"""Train the built-in shapes-world CLIP (resumable: rerun the same command to continue).

    python experiments/train_shapes.py --variant default --steps 1800 --output runs/shapes-default --threads 1
"""
import argparse
import json
import logging

from textspan.training import train

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["default", "spurious"], default="default")
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--output", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=None, help="JSON file with an open_clip CLIP config (default: built-in)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps in this call")
    args = ap.parse_args()
    config = json.load(open(args.config)) if args.config else None
    logging.basicConfig(level=logging.INFO)
    train(args.output, variant=args.variant, steps=args.steps, batch_size=args.batch_size, threads=args.threads,
          seed=args.seed, config=config, stop_after=args.stop_after)
