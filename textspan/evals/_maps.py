"""What the segmentation-like evaluations share: the maps of (image, class) pairs on the model's frame, and ground
truth carried through the preprocessing's geometric steps."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def pair_maps(loaded, x, T, pairs: Sequence[Tuple[int, int]], method: str, options: dict):
    """[len(pairs), H, W] maps upsampled to the preprocessed frame for (image row of x, class column of T) pairs:
    the decomposition's class map minus its mean over all classes, every other method's map as
    `textspan.explain_eval.target_maps` gives it."""
    import torch

    from .. import explain_eval
    from ..errors import BadInputError
    from ..visualize import upsample

    if not pairs:
        return torch.zeros(0, *x.shape[-2:])
    rows = [k for k, _ in pairs]
    try:
        maps = explain_eval.target_maps(loaded.model, x[rows], T, [c for _, c in pairs], method, **options)
    except TypeError as exc:
        raise BadInputError(f"method {method!r}: {exc}") from exc
    return upsample(maps.detach().float().cpu(), x.shape[-2:])


def binarise(m: np.ndarray, threshold) -> np.ndarray:
    """The map min-max normalised to [0, 1] (all zeros when flat), then > `threshold` (a number, or "mean": above
    the normalised map's mean, the ImageNet-segmentation protocol's rule)."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = m.min(), m.max()
    n = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    t = n.mean() if threshold == "mean" else float(threshold)
    return n > t


def frame_axes(to_mask, size) -> Tuple[np.ndarray, np.ndarray]:
    """(source x of each output column, source y of each output row): where the preprocessing's geometric steps
    (resize, crop; nearest) take each pixel of the model's frame from, for an image of `size` = (w, h)."""
    from PIL import Image

    w, h = size
    cols = Image.fromarray(np.tile(np.arange(w, dtype=np.int32), (h, 1)), "I")
    rows = Image.fromarray(np.tile(np.arange(h, dtype=np.int32)[:, None], (1, w)), "I")
    sx = np.asarray(to_mask(cols)).astype(np.int64)[0]
    sy = np.asarray(to_mask(rows)).astype(np.int64)[:, 0]
    return sx, sy


def point_in_frame(px: float, py: float, sx: np.ndarray, sy: np.ndarray):
    """(column, row) of the model's frame showing the image pixel at (px, py), or None when the crop leaves it out."""
    def one(v, src):
        step = max(float(np.median(np.diff(src))) if len(src) > 1 else 1.0, 1.0)
        if v < src[0] - step / 2 or v > src[-1] + step / 2 + 1:
            return None
        return int(np.argmin(np.abs(src + 0.5 - v)))

    j, i = one(px, sx), one(py, sy)
    return None if j is None or i is None else (j, i)


def ids_in_frame(to_mask, ids: np.ndarray) -> np.ndarray:
    """[H, W] class ids through the preprocessing's geometric steps (nearest)."""
    from PIL import Image

    return np.asarray(to_mask(Image.fromarray(ids.astype(np.int32), "I"))).astype(np.int64)
