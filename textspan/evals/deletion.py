"""Deletion and insertion curves as Grad-ECLIP publishes them (Zhao et al., ICML 2024; `imagenet_eval_deletion.py`
and `imagenet_eval_insertion.py` of Cyang-Zhao/Grad-Eclip), as an `Evaluation`.

Per image, at its own size (an image whose shorter side is over `max_side` = 640 px is first resized, bicubic, so
that side is 640, as published):

1. the map of the target class (the class folder's, as the published ``*_gt`` runs; or the prediction's) is min-max
   normalised and resized to the image's size (torchvision ``Resize`` on the map, bilinear): the map of the model's
   preprocessed input stretched over the whole image, as the published scripts do for every method that runs on the
   preprocessed input;
2. its pixels are ranked by the map, highest first (a stable sort: ties in pixel order; the published ``np.argsort``
   leaves ties to numpy's sort), and in `steps` = 100 steps of ``max(1, int(h * w / (2 * steps)))`` pixels half of
   the image is changed: **deletion** replaces each step's pixels by uniform random colours (``floor(255 * U[0, 1))``
   per channel, drawn step by step from a generator seeded with ``seed + the image's index``, so a run is
   reproducible and independent of batching); **insertion** copies them from the image onto an empty (black) start
   (published) or, with ``start="blur"``, onto a blurred copy of the image (textspan's option);
3. every `every` = 10 steps the changed image goes through the model's preprocessing and is classified zero-shot:
   top-1/5/10 correct against the image's label.

The curves have 11 points: deletion ``[clean, 5%, 10%, ..., 50% removed]``, insertion ``[5%, ..., 50% revealed,
clean]`` (the published order: the clean image's accuracy is the last entry). Each curve's AUC (textspan's summary:
the scripts print the curves) is the trapezoidal area under the accuracy (percent) with the 11 points evenly spaced on
[0, 1]. Deletion: lower is better; insertion: higher is better.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..evaluation import Entry, Evaluation

TOPK = (1, 5, 10)


def cap_size(image, max_side: int = 640):
    """The image resized (bicubic) so that its shorter side is `max_side` when it is longer, as published."""
    from PIL import Image

    w, h = image.size
    if min(w, h) <= max_side:
        return image
    scale = min(w, h) / max_side
    return image.resize((int(w / scale), int(h / scale)), Image.BICUBIC)


def stretch_map(m, size):
    """[h, w] float map: `m` [gh, gw] min-max normalised, then resized to `size` = (h, w) with torchvision's
    ``Resize`` (bilinear), as the published scripts do."""
    import torch
    from torchvision.transforms import Resize

    t = torch.as_tensor(np.asarray(m, dtype=np.float32)).clone()
    t -= t.min()
    t /= t.max()  # a flat map gives NaN here, as published; `pixel_order` ranks NaN last
    return Resize(tuple(size))(t.unsqueeze(0))[0].numpy()


def pixel_order(heatmap: np.ndarray) -> np.ndarray:
    """Flat pixel indices (row-major) from the highest map value to the lowest; ties in pixel order."""
    flat = np.nan_to_num(np.asarray(heatmap, dtype=np.float64).reshape(-1), nan=-np.inf)
    return np.argsort(-flat, kind="stable")


def pixels_per_step(h: int, w: int, steps: int) -> int:
    return max(1, int(h * w / (2 * steps)))


def deletion_images(image: np.ndarray, order: np.ndarray, *, steps: int = 100, every: int = 10,
                    seed: int = 0) -> List[np.ndarray]:
    """uint8 [h, w, 3] images after steps every, 2 every, ..., steps of deletion (see the module doc)."""
    import torch

    img = np.array(image, dtype=np.uint8, copy=True)
    h, w, _ = img.shape
    flat = img.reshape(-1, 3)
    k = pixels_per_step(h, w, steps)
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for step in range(1, steps + 1):
        idx = order[(step - 1) * k:step * k]
        colours = torch.rand(len(idx), 3, generator=g) * 255.0
        flat[idx] = colours.numpy().astype(np.uint8)  # truncation, as numpy's assignment into uint8 does
        if step % every == 0:
            out.append(img.copy())
    return out


def insertion_images(image: np.ndarray, order: np.ndarray, *, steps: int = 100, every: int = 10,
                     start: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """uint8 [h, w, 3] images after steps every, ..., steps of insertion onto `start` (default black)."""
    src = np.asarray(image, dtype=np.uint8).reshape(-1, 3)
    h, w, _ = np.asarray(image).shape
    canvas = np.zeros((h * w, 3), np.uint8) if start is None else np.array(start, np.uint8).reshape(-1, 3).copy()
    k = pixels_per_step(h, w, steps)
    out = []
    for step in range(1, steps + 1):
        idx = order[(step - 1) * k:step * k]
        canvas[idx] = src[idx]
        if step % every == 0:
            out.append(canvas.reshape(h, w, 3).copy())
    return out


def topk_correct(logits, labels, ks: Sequence[int] = TOPK) -> dict:
    """{k: [n] bool}: the label among the k largest logits (k at most the number of classes)."""
    import torch

    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == torch.as_tensor(labels, device=top.device).view(-1, 1)
    return {k: hit[:, :k].any(dim=1).cpu().numpy() for k in ks}


def curve_auc(acc: Sequence[float]) -> float:
    """Trapezoidal area under accuracy (percent) with the points evenly spaced on [0, 1]."""
    y = np.asarray(acc, dtype=np.float64)
    return float(np.sum((y[1:] + y[:-1]) / 2) / (len(y) - 1))


class DeletionInsertionEvaluation(Evaluation):
    command = "deletion-eval"
    progress_name = "deletion_progress.json"
    cursor = "next_index"

    def __init__(self, loaded, W: np.ndarray, classnames: Sequence[str], *, method: str = "decomposition",
                 options: Optional[dict] = None, labels: Optional[Sequence[int]] = None, target: str = "true",
                 steps: int = 100, every: int = 10, max_side: int = 640, start: str = "black", seed: int = 0,
                 chunk: int = 64):
        import torch

        from .. import engine
        from ..errors import BadInputError

        if start not in ("black", "blur"):
            raise BadInputError(f"insertion start must be 'black' (published) or 'blur'; got {start!r}")
        if target not in ("true", "predicted"):
            raise BadInputError(f"target must be 'true' (published *_gt) or 'predicted'; got {target!r}")
        if target == "true" and labels is None:
            raise BadInputError("target 'true' needs class sub-folders (labels); use target='predicted'")
        if steps < 1 or every < 1 or steps % every:
            raise BadInputError(f"steps ({steps}) must be a positive multiple of every ({every})")
        self.loaded, self.method, self.options = loaded, method, dict(options or {})
        self.classnames = list(classnames)
        self.dev = engine.model_device(loaded.model)
        self.W = torch.from_numpy(W).to(self.dev)
        self.labels, self.target = labels, target
        self.steps, self.every, self.max_side, self.start, self.seed = steps, every, max_side, start, seed
        self.chunk = chunk
        self.points = steps // every + 1
        self.description = f"deletion/insertion ({method})"

    def fresh(self) -> dict:
        return {"n": 0, "counts": {c: {f"top{k}": [0] * self.points for k in TOPK}
                                   for c in ("deletion", "insertion")}}

    def merge(self, states) -> dict:
        return {"n": sum(s["n"] for s in states),
                "counts": {c: {t: [int(v) for v in np.sum([s["counts"][c][t] for s in states], axis=0)]
                               for t in states[0]["counts"][c]} for c in ("deletion", "insertion")}}

    def resume_message(self, position, total, state) -> str:
        return f"resuming at image {position} of {total} ({state['n']} done)"

    def empty_error(self, source, failures) -> str:
        return f"no readable images ({len(failures)} failed)"

    def _logits(self, x):
        import torch

        from .. import engine

        with torch.no_grad():
            parts = [engine.library_image_embedding(self.loaded.model, x[i:i + self.chunk].to(self.dev)).float()
                     for i in range(0, len(x), self.chunk)]
        return torch.cat(parts) @ self.W.float()

    def score(self, entries: List[Entry]) -> dict:
        import torch
        from PIL import Image, ImageFilter

        from .. import explain_eval
        from ..errors import BadInputError

        pre = self.loaded.preprocess
        images = [cap_size(e.value[1], self.max_side) for e in entries]
        x = torch.stack([pre(im) for im in images]).to(self.dev)
        clean = self._logits(x)
        pred = clean.argmax(dim=1).tolist()
        labels = [self.labels[e.value[0]] for e in entries] if self.labels is not None else pred
        targets = labels if self.target == "true" else pred
        try:
            maps = explain_eval.target_maps(self.loaded.model, x, self.W.t(), targets, self.method, **self.options)
        except TypeError as exc:
            raise BadInputError(f"method {self.method!r}: {exc}") from exc
        maps = maps.detach().float().cpu().numpy()
        perturbed = []
        for e, im, m in zip(entries, images, maps):
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            order = pixel_order(stretch_map(m, arr.shape[:2]))
            dele = deletion_images(arr, order, steps=self.steps, every=self.every, seed=self.seed + e.value[0])
            base = None if self.start == "black" else np.asarray(im.convert("RGB").filter(
                ImageFilter.GaussianBlur(radius=5)), dtype=np.uint8)
            ins = insertion_images(arr, order, steps=self.steps, every=self.every, start=base)
            perturbed += [pre(Image.fromarray(a)) for a in dele + ins]
        logits = self._logits(torch.stack(perturbed))  # [b * 2 * (points - 1), C]
        per = 2 * (self.points - 1)
        lab = torch.tensor(labels)
        clean_hit = topk_correct(clean, lab)
        hit = topk_correct(logits, lab.repeat_interleave(per))
        counts = {c: {f"top{k}": [0] * self.points for k in TOPK} for c in ("deletion", "insertion")}
        q = self.points - 1
        for k in TOPK:
            h = hit[k].reshape(len(entries), 2, q).sum(axis=0)  # [2, steps / every]
            c0 = int(clean_hit[k].sum())
            counts["deletion"][f"top{k}"] = [c0] + [int(v) for v in h[0]]
            counts["insertion"][f"top{k}"] = [int(v) for v in h[1]] + [c0]
        return {"n": len(entries), "counts": counts}

    def finish(self, state) -> Optional[dict]:
        n = state["n"]
        if n == 0:
            return None
        q = self.points - 1
        share = [round((s + 1) * self.every / (2 * self.steps), 6) for s in range(q)]
        fractions = {"deletion": [0.0] + share, "insertion": share + [1.0]}
        n_classes = len(self.classnames)
        curves = {}
        for c in ("deletion", "insertion"):
            acc = {t: [100.0 * v / n for v in vals] for t, vals in state["counts"][c].items()
                   if int(t[3:]) < n_classes or t == "top1"}
            curves[c] = {"fraction": fractions[c], **acc, "auc": {t: curve_auc(v) for t, v in acc.items()}}
        return {"method": self.method, "options": self.options, "n_images": n,
                "target": "class folder" if self.target == "true" else "prediction",
                "label": "class folder" if self.labels is not None else "unperturbed prediction",
                "deletion_auc": curves["deletion"]["auc"]["top1"],
                "insertion_auc": curves["insertion"]["auc"]["top1"], "deletion": curves["deletion"],
                "insertion": curves["insertion"],
                "protocol": {"steps": self.steps, "every": self.every, "max_side": self.max_side,
                             "insertion_start": self.start, "seed": self.seed, "map": "stretched to the image"}}

    def write(self, out: Path, results: dict, state: dict) -> None:
        (out / "deletion_insertion.json").write_text(json.dumps(results, indent=1))
        with open(out / "deletion_insertion.csv", "w", newline="") as f:
            w = csv.writer(f)
            tops = [t for t in ("top1", "top5", "top10") if t in results["deletion"]]
            w.writerow(["curve", "point", "fraction"] + tops)
            for c in ("deletion", "insertion"):
                for i, fr in enumerate(results[c]["fraction"]):
                    w.writerow([c, i, fr] + [round(results[c][t][i], 6) for t in tops])
        _plot(out / "deletion_insertion.png", results)


def _plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, c, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        r = results[c]
        xs = range(len(r["fraction"]))
        for t in ("top1", "top5", "top10"):
            if t in r:
                ax.plot(xs, r[t], marker="o", label=f"{t} (AUC {r['auc'][t]:.1f})")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{f:.0%}" if f < 1 else "clean" for f in r["fraction"]], rotation=60, fontsize=7)
        ax.set_xlabel("pixels removed" if c == "deletion" else "pixels revealed")
        ax.set_ylabel("zero-shot accuracy (%)")
        ax.set_title(f"{c} ({better} is better): {results['method']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
