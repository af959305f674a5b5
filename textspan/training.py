"""Contrastive training of the built-in shapes-world CLIP (resumable, deterministic, logged).

The recipe follows what trial runs showed to work (../shared/SHAPES_TRAINING.md): batch 256, AdamW (lr 1e-3, betas
0.9/0.98), 300 warm-up steps then cosine decay, weight decay 0.1 on weight matrices only (not on embeddings, norms,
biases or the logit scale), a learnable logit scale starting at 10 and clamped at 100, a 2-D sin-cos start for the
positional embedding, and soft targets: identical captions within a batch are positives of each other.

Images are generated on the fly: step s uses samples s*batch .. (s+1)*batch-1 of the training seed, so a resumed run
sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import builtin, engine, world
from .errors import BadInputError

log = logging.getLogger(__name__)

ATTRIBUTE_TEMPLATES = {
    "shape": ["{a} {v}", "a photo of {a} {v}", "an image of {a} {v}", "a picture of {a} {v}"],
    "colour": ["{a} {v} object", "a photo of {a} {v} object", "an image of {a} {v} object"],
    "size": ["{a} {v} object", "a photo of {a} {v} object", "an image of {a} {v} object"],
    "horizontal": ["an object in the {v}", "a photo of an object in the {v}", "an image of an object in the {v}"],
    "vertical": ["an object in the {v}", "a photo of an object in the {v}", "an image of an object in the {v}"],
    "background": ["an object on {v}", "a photo of an object on {v}", "an image of an object on {v}"],
}


def attribute_prompts(attribute: str, value: str):
    return [t.format(a="an" if value[0] in "aeiou" else "a", v=value) for t in ATTRIBUTE_TEMPLATES[attribute]]


def text_classifier(model, tokenizer, attribute: str, values=None) -> torch.Tensor:
    """[d_embed, n_values]: per value, the mean of its normalised prompt embeddings, renormalised."""
    values = values or world.ATTRIBUTES[attribute]
    cols = []
    with torch.no_grad():
        for v in values:
            e = F.normalize(engine.library_text_embedding(model, tokenizer(attribute_prompts(attribute, v))), dim=-1)
            cols.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(cols, dim=1)


def image_features(model, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = builtin.preprocess_batch(images[i:i + batch_size])
            out.append(F.normalize(engine.library_image_embedding(model, x), dim=-1))
    return torch.cat(out)


def zero_shot_accuracy(model, tokenizer, n: int = 2000, seed: int = 12345) -> Dict[str, float]:
    """Per-attribute zero-shot accuracy on n fresh single-object images of `seed`."""
    images, _, labels = world.batch(seed, 0, n)
    feats = image_features(model, images)
    acc = {}
    for attr, values in world.ATTRIBUTES.items():
        pred = (feats @ text_classifier(model, tokenizer, attr)).argmax(1).numpy()
        truth = np.array([values.index(l[attr]) for l in labels])
        acc[attr] = float((pred == truth).mean())
    return acc


def spurious_report(model, tokenizer, n: int = 2000, seed: int = world.SPLIT_SEEDS["test"],
                    probe_train: int = 2000) -> Dict:
    """Zero-shot label accuracy per (label, background) group on a balanced test split, average and worst group, and
    the accuracy of a logistic-regression probe of the label on the image embeddings (trained on other balanced
    images, so that it measures whether the shape information is in the embedding, not the background shortcut)."""
    from sklearn.linear_model import LogisticRegression

    spec = world.Spurious(balanced=True)
    images, _, labels = world.batch(seed, 0, n, spurious=spec)
    feats = image_features(model, images)
    y = np.array([int(l["label"]) for l in labels])
    groups = np.array([l["group"] for l in labels])
    W = text_classifier(model, tokenizer, "shape", list(world.SPURIOUS_CLASSES))
    pred = (feats @ W).argmax(1).numpy()
    per_group = {str(g): float((pred[groups == g] == y[groups == g]).mean()) for g in sorted(set(groups))}
    tr_images, _, tr_labels = world.batch(world.SPLIT_SEEDS["val"] + 7, 0, probe_train, spurious=spec)
    tr_feats = image_features(model, tr_images).numpy()
    tr_y = np.array([int(l["label"]) for l in tr_labels])
    probe = LogisticRegression(max_iter=2000, C=10.0).fit(tr_feats, tr_y)
    return {"per_group": per_group, "average": float((pred == y).mean()), "worst_group": min(per_group.values()),
            "linear_probe": float(probe.score(feats.numpy(), y))}


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "embedding" in name
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


def soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, captions) -> torch.Tensor:
    logits = scale * img @ txt.t()
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([ids[c] for c in captions])
    same = (cid[:, None] == cid[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())


def train(output, *, variant: str = "default", steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
          warmup: int = 300, weight_decay: float = 0.1, seed: int = 0, checkpoint_every: int = 50,
          eval_every: int = 250, threads: Optional[int] = None, config: Optional[dict] = None,
          stop_after: Optional[int] = None, init: Optional[str] = None,
          spurious_spec: Optional[dict] = None, snapshot_every: int = 0) -> Path:
    """Train (or resume) the shapes CLIP into `output`; returns the path of the last checkpoint.

    Args:
        config: open_clip CLIP config dict (embed_dim, vision_cfg, text_cfg); default `builtin.default_config`.
            The text vocabulary size is set from the world's tokenizer.
        stop_after: stop (with a checkpoint) after this many steps in this call; rerun to continue. The schedule
            always follows `steps`, so a resumed run equals an uninterrupted one.
        init: start from these weights instead of a random initialisation: a built-in variant name
            ("default", "spurious") or a checkpoint path (fine-tuning; the architecture comes from it).
        spurious_spec: fields of `world.Spurious` (correlation, background_named) for the spurious variant, and
            optionally "mix": the fraction of every batch drawn from the default world instead (all five shapes,
            backgrounds independent of the shape and named as often as the other attributes).
        snapshot_every: also keep the model weights of every this-many steps as ``step{N}.pt``.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    spec = dict(spurious_spec or {})
    mix = float(spec.pop("mix", 0.0))
    if not 0.0 <= mix < 1.0:
        raise BadInputError(f"mix must be in [0, 1); got {mix}")
    spurious = world.Spurious(**spec) if variant == "spurious" else None
    if init is not None:
        is_variant = init in ("default", "spurious")
        model, _, tok = builtin.load_shapes_model(init if is_variant else "default",
                                                  checkpoint=None if is_variant else init)
        meta_file = builtin.checkpoint_paths(init)[1] if is_variant else Path(init).parent / "config.json"
        config = json.loads(meta_file.read_text())["config"]
    else:
        vocab_size = builtin.WordTokenizer(world.vocabulary()).vocab_size
        config = json.loads(json.dumps(config)) if config else builtin.default_config(vocab_size)
        config["text_cfg"]["vocab_size"] = vocab_size
        model, tok = builtin.build_model(config, seed=seed)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    ckpt = out / "last.pt"
    step = 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        log.info("resumed %s at step %d", out, step)
    (out / "config.json").write_text(json.dumps(dict(
        config=config, vocab=tok.words, variant=variant, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
        seed=seed, init=init, spurious=dict(dataclasses.asdict(spurious), mix=mix) if spurious is not None else None)))
    logf = open(out / "train.log", "a")
    model.train()
    t_start = time.time()
    train_seed = world.SPLIT_SEEDS["train"] + seed
    last = steps if stop_after is None else min(steps, step + stop_after)
    n_default = int(round(mix * batch_size)) if spurious is not None else 0  # images per batch from the default world
    while step < last:
        t0 = time.time()
        images, captions, _ = world.batch(train_seed, step * batch_size, batch_size - n_default, spurious=spurious)
        if n_default:
            more, more_captions, _ = world.batch(train_seed + 7919, step * batch_size, n_default)
            images, captions = np.concatenate([images, more]), list(captions) + list(more_captions)
        x = builtin.preprocess_batch(images)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup)
        img = F.normalize(engine.library_image_embedding(model, x), dim=-1)
        txt = F.normalize(engine.library_text_embedding(model, tok(captions)), dim=-1)
        loss = soft_clip_loss(img, txt, engine.learned_logit_scale(model).exp(), captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            engine.learned_logit_scale(model).clamp_(max=math.log(100.0))
        step += 1
        line = {"step": step, "loss": round(float(loss.detach()), 4),
                "logit_scale": round(float(engine.learned_logit_scale(model).detach().exp()), 2),
                "lr": round(opt.param_groups[0]["lr"], 6), "sec": round(time.time() - t0, 2)}
        if step % eval_every == 0 or step == steps:
            model.eval()
            line["zero_shot"] = {k: round(v, 4) for k, v in zero_shot_accuracy(model, tok, n=500).items()}
            if spurious is not None:
                rep = spurious_report(model, tok, n=400, probe_train=800)
                line["spurious"] = {"average": rep["average"], "worst_group": rep["worst_group"],
                                    "linear_probe": rep["linear_probe"]}
            model.train()
        logf.write(json.dumps(line) + "\n")
        logf.flush()
        if step % checkpoint_every == 0 or step == last:
            tmp = out / "last.pt.tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "elapsed": time.time() - t_start}, tmp)
            os.replace(tmp, ckpt)
        if snapshot_every and step % snapshot_every == 0:
            torch.save({"model": model.state_dict(), "step": step}, out / f"step{step}.pt")
    logf.close()
    return ckpt
