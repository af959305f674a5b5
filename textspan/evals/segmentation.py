"""Zero-shot segmentation with the ImageNet-segmentation protocol (DESIGN.md section 6), as an `Evaluation`.

The map of the chosen class (predicted, or the class folder's, or each object's own) is clipped at 0, min-max
normalised and thresholded at its mean; per-image rows (`textspan.metrics.segmentation_row`) are summed over the
dataset by `textspan.metrics.aggregate_segmentation`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..evaluation import Entry, Evaluation


class SegmentationEvaluation(Evaluation):
    command = "segment-eval"
    progress_name = "segment_progress.json"
    cursor = "next_entry"
    description = "segmentation"

    def __init__(self, loaded, W: np.ndarray, classnames: Sequence[str], *, method: str = "decomposition",
                 options: Optional[dict] = None, target: str = "predicted", samples: int = 0,
                 out: Optional[Path] = None, threshold="mean", clip: bool = True):
        import torch

        from .. import engine, segmentation as seg

        self.loaded, self.method, self.options, self.target = loaded, method, dict(options or {}), target
        self.classnames = list(classnames)
        self.T = torch.from_numpy(np.ascontiguousarray(W.T, dtype=np.float32))
        self.dev = engine.model_device(loaded.model)
        self.samples, self.out = samples, out
        self.threshold, self.clip = threshold, clip
        self.to_mask = seg.mask_transform(loaded.preprocess)
        self.drawn = 0

    def fresh(self) -> dict:
        return {"rows": [], "samples": 0}

    def merge(self, states) -> dict:
        rows: List[dict] = []
        for s in states:
            rows += [dict(r, index=len(rows) + k) for k, r in enumerate(s["rows"])]
        return {"rows": rows, "samples": sum(s["samples"] for s in states)}

    def resume_message(self, position, total, state) -> str:
        return f"resuming after {position} entries ({len(state['rows'])} images scored)"

    def empty_error(self, source, failures) -> str:
        return f"no usable entries in {getattr(source, 'data', source)} ({len(failures)} failed)"

    def _align(self, m):  # a mask through the preprocessing's geometric steps
        from PIL import Image

        from .. import segmentation as seg

        return seg.mask_array(self.to_mask(Image.fromarray(m.astype(np.uint8) * 255)))

    def score(self, entries: List[Entry]) -> dict:
        import torch

        from .. import metrics
        from ..visualize import sample_figure, upsample
        from ._maps import logits_and_maps

        pending = []
        for e in entries:
            im, mask = e.value
            aligned = {c: self._align(m) for c, m in mask.items()} if isinstance(mask, dict) else self._align(mask)
            pending.append((e.name, im, aligned))
        failures, rows = [], []
        x = torch.stack([self.loaded.preprocess(im) for _, im, _ in pending]).to(self.dev)
        names = self.classnames
        logits, maps_of = logits_and_maps(self.loaded, x, self.T, self.method, self.options)
        chosen = []  # (pending index, class index, mask, item name, objects in the image)
        for k, (name, im, mask) in enumerate(pending):
            if isinstance(mask, dict):  # one mask per object: each object's class is explained and scored
                unknown = sorted(set(mask) - set(names))
                if unknown:
                    failures.append({"item": name, "error": f"object masks {unknown} name no class of the "
                                                            f"classifier ({', '.join(names)})"})
                    continue
                chosen += [(k, names.index(c), m, f"{name}:{c}", len(mask)) for c, m in mask.items()]
            elif self.target == "true":
                cls = name.split("/")[0]
                if cls not in names:
                    failures.append({"item": name, "error": f"class folder {cls!r} is not in the classes"})
                    continue
                chosen.append((k, names.index(cls), mask, name, 1))
            else:
                chosen.append((k, int(logits[k].argmax()), mask, name, 1))
        if not chosen:
            return {"rows": [], "samples": 0, "failures": failures}
        class_maps = maps_of([(k, c) for k, c, *_ in chosen])
        drawn = 0
        for (k, c, mask, item, n_objects), m in zip(chosen, class_maps):
            im = pending[k][1]
            up = upsample(m.cpu(), x.shape[-2:]).numpy()
            shown_map = metrics.normalise_map(up, self.clip)
            rows.append({"item": item, "index": len(rows), "class": names[c], "objects": n_objects,
                         **metrics.segmentation_row(shown_map, mask, self.threshold)})
            if self.out is not None and self.drawn + drawn < self.samples:
                shown = im.resize((x.shape[-1], x.shape[-2]))
                how = "clipped at 0, min-max" if self.clip else "min-max"
                sample_figure(shown, shown_map, mask, f"{item}: {self.target} class {names[c]!r}, {self.method} "
                              f"(the protocol's map: {how})", self.out / f"sample_{self.drawn + drawn:02d}.png")
                drawn += 1
        self.drawn += drawn
        return {"rows": rows, "samples": drawn, "failures": failures}

    def without_side_outputs(self) -> None:
        self.out = None

    def begin(self, state) -> None:  # figures are numbered across batches and resumed runs
        self.drawn = state["samples"]

    def finish(self, state) -> Optional[dict]:
        from .. import metrics

        rows = state["rows"]
        if not rows:
            return None
        res = metrics.aggregate_segmentation(rows)
        if self.threshold != "mean" or not self.clip:
            res["protocol"] = {"threshold": self.threshold, "clip": self.clip}
        counts = sorted({r.get("objects", 1) for r in rows})
        if counts != [1]:  # per-object scores: rows of images with one object, and of images with several
            res["by_objects"] = {str(n): metrics.aggregate_segmentation([r for r in rows if r.get("objects", 1) == n])
                                 for n in counts}
        return res

    def write(self, out: Path, results: dict, state: dict) -> None:
        rows = state["rows"]
        with open(out / "per_image.csv", "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in rows for k in r))  # rows resumed from older runs lack some
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        (out / "segmentation.json").write_text(json.dumps(results, indent=1))
