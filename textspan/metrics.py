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


def normalise_map(relative_map, clip: bool = True) -> np.ndarray:
    """The segmentation protocol's map: clip at 0 (unless ``clip=False``), then min-max normalise to [0, 1] (all
    zeros if flat)."""
    m = np.asarray(relative_map, dtype=np.float64)
    m = np.clip(m, 0, None) if clip else m
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


def above(m, threshold="mean") -> np.ndarray:
    """The prediction of a normalised map: above its own mean ("mean", the ImageNet-segmentation protocol) or above a
    fixed value."""
    m = np.asarray(m, dtype=np.float64)
    return m > (m.mean() if threshold == "mean" else float(threshold))


def segmentation_row(m, gt, threshold="mean") -> dict:
    """One image's part of `segmentation_scores`: its scores (percent) and the pixel counts the dataset-level
    scores sum (correct_pixels, pixels, intersection_/union_ background and foreground). The prediction is the map
    above its mean (`threshold="mean"`, the protocol) or above a fixed value in [0, 1)."""
    m = np.asarray(m, dtype=np.float64)
    gt = np.asarray(gt, dtype=bool)
    pred = above(m, threshold)
    row = {"correct_pixels": int((pred == gt).sum()), "pixels": int(gt.size)}
    for name, p, g in (("background", ~pred, ~gt), ("foreground", pred, gt)):
        row[f"intersection_{name}"] = int((p & g).sum())
        row[f"union_{name}"] = int((p | g).sum())
    ap = average_precision(np.concatenate([~gt.ravel(), gt.ravel()]), np.concatenate([1 - m.ravel(), m.ravel()]))
    hit = bool(gt.ravel()[int(np.argmax(m))])  # pointing game: the map's maximum falls on the object
    scores = {"pixel_accuracy": row["correct_pixels"] / max(row["pixels"], 1) * 100, "ap": ap * 100,
              "pointing": 100.0 if hit else 0.0}
    for name in ("background", "foreground"):
        u = row[f"union_{name}"]
        scores[f"iou_{name}"] = row[f"intersection_{name}"] / u * 100 if u else 100.0
    return {**scores, **row}


def aggregate_segmentation(rows) -> dict:
    """Dataset-level scores from per-image rows of `segmentation_row`: pixel accuracy and IoU per class from the
    summed counts, mIoU their mean, mAP the mean of the per-image APs, pointing the share of maps whose maximum falls
    on the object (percent; rows saved before textspan scored pointing are left out of it)."""
    total = lambda key: sum(r[key] for r in rows)  # noqa: E731
    pointed = [r["pointing"] for r in rows if "pointing" in r]
    iou = {c: total(f"intersection_{c}") / max(total(f"union_{c}"), 1) * 100 for c in ("background", "foreground")}
    return {"pixel_accuracy": total("correct_pixels") / max(total("pixels"), 1) * 100,
            "iou_background": float(iou["background"]), "iou_foreground": float(iou["foreground"]),
            "miou": float((iou["background"] + iou["foreground"]) / 2),
            "map": float(np.mean([r["ap"] for r in rows])) if rows else 0.0,
            "pointing": float(np.mean(pointed)) if pointed else None, "n_images": len(rows)}


def segmentation_scores(maps, masks) -> dict:
    """DESIGN.md section 6: maps [n, h, w] already normalised to [0, 1] (see `normalise_map`), masks [n, h, w]
    (foreground true). Prediction = map > its own mean. Returns pixel accuracy, IoU per class (background,
    foreground; intersections and unions summed over the dataset), mIoU, mAP (per-image AP of the pooled
    [1 - map, map] scores against one-hot [background, foreground] labels) in percent, and per-image rows."""
    rows = [{"index": k, **segmentation_row(m, gt)} for k, (m, gt) in enumerate(zip(maps, masks))]
    return {**aggregate_segmentation(rows), "rows": rows}
