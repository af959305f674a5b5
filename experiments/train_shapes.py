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
    ap.add_argument("--init", default=None, help="fine-tune from a built-in variant or a checkpoint")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--correlation", type=float, default=None, help="spurious: label-background agreement")
    ap.add_argument("--background-named", type=float, default=None, help="spurious: how often captions name it")
    ap.add_argument("--mix", type=float, default=None, help="spurious: fraction of each batch from the default world")
    ap.add_argument("--snapshot-every", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()
    spec = {k: v for k, v in dict(correlation=args.correlation, background_named=args.background_named,
                                  mix=args.mix).items()
            if v is not None}
    config = json.load(open(args.config)) if args.config else None
    logging.basicConfig(level=logging.INFO)
    train(args.output, variant=args.variant, steps=args.steps, batch_size=args.batch_size, threads=args.threads,
          seed=args.seed, config=config, stop_after=args.stop_after, init=args.init, lr=args.lr,
          warmup=args.warmup, spurious_spec=spec, snapshot_every=args.snapshot_every, eval_every=args.eval_every)
