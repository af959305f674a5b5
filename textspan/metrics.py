"""Small metrics shared by the analyses."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def correlation_ratio(X, labels: Sequence) -> float:
    """Between-class variance over total variance of X [n, d], summed over dimensions (eta squared, in [0, 1]).

    1 means the classes alone determine X; 0 means the class means coincide.
    """
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels)
    centred = X - X.mean(axis=0)
    total = float((centred ** 2).sum())
    if total == 0:
        return 0.0
    between = 0.0
    for value in np.unique(labels):
        rows = centred[labels == value]
        between += len(rows) * float((rows.mean(axis=0) ** 2).sum())
    return between / total


def normalise_map(relative_map) -> np.ndarray:
    """The segmentation protocol's map: clip at 0, then min-max normalise to [0, 1] (all zeros if flat)."""
    m = np.clip(np.asarray(relative_map, dtype=np.float64), 0, None)
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of a ranking (the step-wise area under the precision-recall curve, ties grouped)."""
    y = np.asarray(y_true, dtype=bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not y.any():
        return 0.0
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    tp = np.cumsum(y)
    # evaluate only at the last index of each group of tied scores
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    precision = tp[last] / (last + 1)
    recall = tp[last] / y.sum()
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


def segmentation_scores(maps, masks) -> dict:
    """DESIGN.md section 6: maps [n, h, w] already normalised to [0, 1] (see `normalise_map`), masks [n, h, w]
    (foreground true). Prediction = map > its own mean. Returns pixel accuracy, IoU per class (background,
    foreground; intersections and unions summed over the dataset), mIoU, mAP (per-image AP of the pooled
    [1 - map, map] scores against one-hot [background, foreground] labels) in percent, and per-image rows."""
    inter = np.zeros(2)
    union = np.zeros(2)
    correct = total = 0
    rows = []
    for k, (m, gt) in enumerate(zip(maps, masks)):
        m = np.asarray(m, dtype=np.float64)
        gt = np.asarray(gt, dtype=bool)
        pred = m > m.mean()
        correct += int((pred == gt).sum())
        total += gt.size
        i_img, u_img = [], []
        for c, (p, g) in enumerate(((~pred, ~gt), (pred, gt))):
            i, u = int((p & g).sum()), int((p | g).sum())
            inter[c] += i
            union[c] += u
            i_img.append(i)
            u_img.append(u)
        ap = average_precision(np.concatenate([~gt.ravel(), gt.ravel()]), np.concatenate([1 - m.ravel(), m.ravel()]))
        rows.append({"index": k, "pixel_accuracy": float((pred == gt).mean() * 100), "ap": ap * 100,
                     "iou_background": i_img[0] / u_img[0] * 100 if u_img[0] else 100.0,
                     "iou_foreground": i_img[1] / u_img[1] * 100 if u_img[1] else 100.0})
    iou = inter / np.maximum(union, 1) * 100
    return {"pixel_accuracy": correct / max(total, 1) * 100, "iou_background": float(iou[0]),
            "iou_foreground": float(iou[1]), "miou": float(iou.mean()),
            "map": float(np.mean([r["ap"] for r in rows])) if rows else 0.0, "n_images": len(rows), "rows": rows}
