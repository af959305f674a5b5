"""p-mIoU on OpenImages-V7 point labels, as an `Evaluation`.

For every class an image shows (at least one "yes" point), the class's map is made on the model's frame, min-max
normalised and binarised (default: above 0.5, the binarisation of the LeGrad paper's OpenImages-V7 evaluation, which
follows GEM's; ``threshold="mean"`` or another number are options). Each of that class's points in the frame is then
TP (marked present, inside the binarised map), FP (marked absent, inside) or FN (present, outside); a point the crop
leaves out is not counted. TP, FP and FN are summed per class over the dataset; a class's point IoU is
TP / (TP + FP + FN) and p-mIoU is their mean over the classes with any counted point (percent).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..evaluation import Entry, Evaluation


def point_iou(counts: dict) -> dict:
    """{"p_miou", "per_class": {class: IoU}} from {class: [TP, FP, FN(, TN)]} (percent; classes with no counted
    point left out; TN, absent points outside the map, do not enter the IoU)."""
    per = {c: 100.0 * tp / (tp + fp + fn) for c, (tp, fp, fn, *_) in counts.items() if tp + fp + fn > 0}
    return {"p_miou": float(np.mean(list(per.values()))) if per else 0.0, "per_class": per}


class PointsEvaluation(Evaluation):
    command = "points-eval"
    progress_name = "points_progress.json"
    cursor = "next_entry"
    description = "point labels"

    def __init__(self, loaded, W: np.ndarray, classnames: Sequence[str], *, method: str = "decomposition",
                 options: Optional[dict] = None, threshold=0.5, notes: Sequence[str] = ()):
        """`notes`: what the reader left out (points outside the image, unnamed MIDs, ...), kept in the results."""
        import torch

        from .. import engine, segmentation as seg

        self.loaded, self.method, self.options, self.threshold = loaded, method, dict(options or {}), threshold
        self.classnames = list(classnames)
        self.index = {c: k for k, c in enumerate(self.classnames)}
        self.T = torch.from_numpy(np.ascontiguousarray(W.T, dtype=np.float32))
        self.dev = engine.model_device(loaded.model)
        self.to_mask = seg.mask_transform(loaded.preprocess)
        self.notes = list(notes)

    def fresh(self) -> dict:
        return {"counts": {}, "images": 0, "points": 0, "cropped_out": 0}

    def merge(self, states) -> dict:
        counts: dict = {}
        for s in states:
            for c, v in s["counts"].items():
                counts[c] = [a + b for a, b in zip(counts.get(c, [0, 0, 0, 0]), v)]
        return {"counts": {c: counts[c] for c in sorted(counts)},
                **{k: sum(s[k] for s in states) for k in ("images", "points", "cropped_out")}}

    def resume_message(self, position, total, state) -> str:
        return f"resuming after {position} of {total} images ({state['points']} points scored)"

    def score(self, entries: List[Entry]) -> dict:
        import torch

        from ..visualize import upsample
        from ._maps import binarise, frame_axes, pair_maps, point_in_frame

        x = torch.stack([self.loaded.preprocess(e.value[0]) for e in entries]).to(self.dev)
        pairs, failures = [], []
        for k, e in enumerate(entries):
            unknown = sorted(c for c in e.value[1] if c not in self.index)
            if unknown:
                failures.append({"item": e.name, "error": f"classes {unknown[:3]} are not among the classifier's"})
            pairs += [(k, self.index[c]) for c in sorted(e.value[1]) if c in self.index]
        maps = upsample(pair_maps(self.loaded, x, self.T, pairs, self.method, self.options).float().cpu(),
                        x.shape[-2:]).numpy() if pairs else []
        counts: dict = {}
        points = cropped = 0
        axes = {}
        for (k, c), m in zip(pairs, maps):
            img, pts = entries[k].value
            if k not in axes:
                axes[k] = frame_axes(self.to_mask, img.size)
            inside = binarise(m, self.threshold)
            tp = fp = fn = tn = 0
            for px, py, present in pts[self.classnames[c]]:
                at = point_in_frame(px, py, *axes[k])
                if at is None:
                    cropped += 1
                    continue
                points += 1
                hit = bool(inside[at[1], at[0]])
                tp += present and hit
                fp += (not present) and hit
                fn += present and not hit
                tn += (not present) and not hit
            name = self.classnames[c]
            counts[name] = [a + b for a, b in zip(counts.get(name, [0, 0, 0, 0]), (tp, fp, fn, tn))]
        return {"counts": counts, "images": len(entries), "points": points, "cropped_out": cropped,
                "failures": failures}

    def finish(self, state) -> Optional[dict]:
        if state["images"] == 0:
            return None
        r = point_iou(state["counts"])
        return {"method": self.method, "options": self.options, "p_miou": r["p_miou"],
                "n_images": state["images"], "n_points": state["points"],
                "points_cropped_out": state["cropped_out"], "n_classes": len(r["per_class"]),
                "threshold": self.threshold, "per_class_iou": r["per_class"],
                "per_class_counts": {c: dict(zip(("tp", "fp", "fn", "tn"), v)) for c, v in state["counts"].items()},
                "notes": self.notes}

    def write(self, out: Path, results: dict, state: dict) -> None:
        (out / "points.json").write_text(json.dumps(results, indent=1))
