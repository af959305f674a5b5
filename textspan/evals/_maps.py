"""What the segmentation-like evaluations share: the maps of (image, class) pairs on the model's frame, and ground
truth carried through the preprocessing's geometric steps."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


def pair_maps(loaded, x, T, pairs: Sequence[Tuple[int, int]], method: str, options: dict):
    """[len(pairs), gh, gw] maps on the patch grid for (image row of x, class column of T) pairs: each method's map
    of the class as `textspan.explain_eval.target_maps` gives it (the decomposition's: its class map minus its mean
    over all classes)."""
    from .. import explain_eval
    from ..errors import BadInputError

    rows = [k for k, _ in pairs]
    try:
        maps = explain_eval.target_maps(loaded.model, x[rows], T, [c for _, c in pairs], method, **options)
    except TypeError as exc:
        raise BadInputError(f"method {method!r}: {exc}") from exc
    return maps.detach()


def logits_and_maps(loaded, x, T, method: str, options: dict):
    """(zero-shot logits [b, C] of the normalised embeddings, `maps(pairs)` -> [len(pairs), gh, gw] as `pair_maps`).
    The decomposition without options gets both from one projection of every class (the same maps as
    `pair_maps`, tested); every other method needs a forward for the logits and then its own maps."""
    import torch

    from .. import engine

    if method == "decomposition" and not options:
        from ..decomposition import project
        from ..heatmaps import patch_maps

        p = project(loaded.model, x, T)
        rel = patch_maps(p, engine.read_tower(loaded.model).grid_size, relative=False)  # [b, C, g, g]
        return p.total(), lambda pairs: torch.stack([rel[k, c] - rel[k].mean(dim=0) for k, c in pairs])
    with torch.no_grad():
        e = engine.library_image_embedding(loaded.model, x)
    logits = torch.nn.functional.normalize(e, dim=-1) @ T.t().to(x.dtype)
    return logits, lambda pairs: pair_maps(loaded, x, T, pairs, method, options)


def check_threshold(t):
    """A binarisation threshold as given by a user: "mean", or a number in [0, 1) (the map is min-max normalised);
    BadInputError otherwise."""
    from ..errors import BadInputError

    if t == "mean":
        return t
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise BadInputError(f"threshold must be a number in [0, 1) or 'mean'; got {t!r}") from None
    if not 0 <= t < 1:
        raise BadInputError(f"threshold must be in [0, 1) (the map is min-max normalised); got {t}")
    return t


def binarise(m: np.ndarray, threshold) -> np.ndarray:
    """The map min-max normalised to [0, 1] without clipping (`textspan.metrics.normalise_map`), then above
    `threshold` (`textspan.metrics.above`)."""
    from .. import metrics

    return metrics.above(metrics.normalise_map(m, clip=False), threshold)


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
