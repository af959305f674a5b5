"""ImageNet-S zero-shot segmentation mIoU, as an `Evaluation`.

Per image, the map of its class (the class folder's; or the zero-shot prediction among the subset's classes) is
made on the model's frame, min-max normalised and binarised (default above 0.5; ``threshold="mean"`` is the
ImageNet-segmentation rule); the prediction is that class id where the map is on, 0 ("other category") elsewhere.
The ground-truth ids (R + 256 * G) go through the preprocessing's geometric steps (nearest); pixels labelled 1000 are
ignored. Intersections, predicted and true areas are summed per class id (0 .. n) over the dataset; IoU = TP / (T + P
- TP + 1e-10) and **miou** is their mean over all n + 1 ids, background included, as the ImageNet-S evaluator
(`evaluation/evaluator.py`) computes it (a class no image shows then counts 0); **miou_present** is the mean over
the ids present in the ground truth.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..evaluation import Entry, Evaluation
from ..imagenet import IGNORE


def area_counts(gt: np.ndarray, pred: np.ndarray, n: int):
    """Per class id 0 .. n: (intersection, predicted area, true area) of one image's ids, pixels whose ground truth
    is the ignore label (1000) left out."""
    keep = gt != IGNORE
    g, q = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    return (np.bincount(g[g == q], minlength=n + 1)[:n + 1], np.bincount(q, minlength=n + 1)[:n + 1],
            np.bincount(g, minlength=n + 1)[:n + 1])


def imagenet_s_iou(tp, pred, true) -> dict:
    tp, pred, true = (np.asarray(v, dtype=np.float64) for v in (tp, pred, true))
    iou = tp / (pred + true - tp + 1e-10) * 100
    present = true > 0
    return {"miou": float(iou.mean()), "miou_present": float(iou[present].mean()) if present.any() else 0.0,
            "iou": iou.tolist()}


class ImageNetSEvaluation(Evaluation):
    command = "imagenet-s-eval"
    progress_name = "imagenet_s_progress.json"
    cursor = "next_entry"
    description = "ImageNet-S"

    def __init__(self, loaded, W: np.ndarray, classnames: Sequence[str], *, method: str = "decomposition",
                 options: Optional[dict] = None, target: str = "true", threshold=0.5):
        import torch

        from .. import engine, segmentation as seg

        self.loaded, self.method, self.options = loaded, method, dict(options or {})
        self.target, self.threshold = target, threshold
        self.classnames = list(classnames)
        self.n = len(self.classnames)
        self.T = torch.from_numpy(np.ascontiguousarray(W.T, dtype=np.float32))
        self.dev = engine.model_device(loaded.model)
        self.to_mask = seg.mask_transform(loaded.preprocess)

    def fresh(self) -> dict:
        return {"tp": [0] * (self.n + 1), "pred": [0] * (self.n + 1), "true": [0] * (self.n + 1), "images": 0,
                "correct": 0}

    def merge(self, states) -> dict:
        out = {k: [int(v) for v in np.sum([s[k] for s in states], axis=0)] for k in ("tp", "pred", "true")}
        return dict(out, images=sum(s["images"] for s in states), correct=sum(s["correct"] for s in states))

    def resume_message(self, position, total, state) -> str:
        return f"resuming after {position} of {total} images"

    def score(self, entries: List[Entry]) -> dict:
        import torch

        from ..visualize import upsample
        from ._maps import binarise, ids_in_frame, logits_and_maps

        x = torch.stack([self.loaded.preprocess(e.value[0]) for e in entries]).to(self.dev)
        true = [e.value[2] - 1 for e in entries]  # class columns (id - 1)
        logits, maps_of = logits_and_maps(self.loaded, x, self.T, self.method, self.options)
        pred = logits.argmax(1)
        cols = true if self.target == "true" else pred.tolist()
        maps = upsample(maps_of(list(enumerate(cols))).float().cpu(), x.shape[-2:]).numpy()
        acc = {k: np.zeros(self.n + 1, np.int64) for k in ("tp", "pred", "true")}
        for e, c, m in zip(entries, cols, maps):
            gt = ids_in_frame(self.to_mask, e.value[1])
            tp, pred_area, true_area = area_counts(gt, np.where(binarise(m, self.threshold), c + 1, 0), self.n)
            acc["tp"] += tp
            acc["pred"] += pred_area
            acc["true"] += true_area
        return {**{k: v.tolist() for k, v in acc.items()}, "images": len(entries),
                "correct": int(sum(int(a) == b for a, b in zip(pred.tolist(), true)))}

    def finish(self, state) -> Optional[dict]:
        if state["images"] == 0:
            return None
        r = imagenet_s_iou(state["tp"], state["pred"], state["true"])
        return {"method": self.method, "options": self.options, "miou": r["miou"], "miou_present": r["miou_present"],
                "n_images": state["images"], "zero_shot_accuracy": 100.0 * state["correct"] / state["images"],
                "target": self.target, "threshold": self.threshold,
                "iou": dict(zip(["background"] + self.classnames, r["iou"]))}

    def write(self, out: Path, results: dict, state: dict) -> None:
        (out / "imagenet_s.json").write_text(json.dumps(results, indent=1))
