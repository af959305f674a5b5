"""Evaluations shared by every explainer: the map of each image's target class, and the positive / negative
perturbation test (Chefer et al. 2021).

Patch removal (the same for every method): a removed patch has all its pixels set to 0 in the *preprocessed*
(normalised) image, i.e. to the preprocessing mean colour; positions and the CLS token are untouched, so the model
sees the same number of tokens at every step.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .decomposition import forward_image
from .methods import explain

FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))  # 0 (unperturbed), 0.1, ..., 0.9


def target_maps(model, x: torch.Tensor, T_classes: torch.Tensor, targets: Sequence[int], method: str,
                **options) -> torch.Tensor:
    """[b, gh, gw]: each image's map for its target class.

    decomposition: the class's map minus the mean map over all classes (the heatmaps issue's segmentation map);
    clip_surgery: its map of the class computed against every class prompt (the texts whose shared feature it
    removes, as in its published use); every other method: its raw map for the class prompt, where only the
    distinct target classes of the batch are explained, not all classes."""
    targets = [int(t) for t in targets]
    if method == "decomposition":
        options = {**options, "relative": False}
        maps = explain(model, x, T_classes, method="decomposition", **options)  # [b, C, g, g]
        idx = torch.tensor(targets, device=maps.device)
        return maps[torch.arange(len(targets)), idx] - maps.mean(dim=1)
    if method == "clip_surgery":
        maps = explain(model, x, T_classes, method=method, **options)  # [b, C, g, g]
        return maps[torch.arange(len(targets)), torch.tensor(targets, device=maps.device)]
    distinct = sorted(set(targets))
    maps = explain(model, x, T_classes[distinct], method=method, **options)  # [b, u, g, g]
    col = torch.tensor([distinct.index(t) for t in targets], device=maps.device)
    return maps[torch.arange(len(targets)), col]


def remove_patches(x: torch.Tensor, order: torch.Tensor, k: int, patch) -> torch.Tensor:
    """Copy of x [b, 3, H, W] with the first k patches of each row of `order` ([b, gh * gw] patch indices,
    row-major over the grid) set to 0."""
    b, _, H, W = x.shape
    gh, gw = H // patch[0], W // patch[1]
    keep = torch.ones(b, gh * gw, dtype=x.dtype, device=x.device)
    if k > 0:
        keep.scatter_(1, order[:, :k], 0.0)
    mask = keep.reshape(b, 1, gh, gw)
    mask = mask.repeat_interleave(patch[0], dim=2).repeat_interleave(patch[1], dim=3)
    out = x.clone()
    out[:, :, :gh * patch[0], :gw * patch[1]] *= mask
    return out


def perturbation_counts(model, x: torch.Tensor, maps: torch.Tensor, W: torch.Tensor, labels: torch.Tensor,
                        fractions: Sequence[float] = FRACTIONS) -> Dict[str, np.ndarray]:
    """Correct zero-shot predictions of a batch at each fraction of removed patches.

    Args:
        maps: [b, gh, gw] relevance of each patch for the explained class.
        W: [d_embed, C] zero-shot classifier; labels: [b] the class counted as correct.
    Returns:
        {"positive": [len(fractions)], "negative": [...]}: counts of correct predictions when the most (positive)
        or least (negative) relevant patches are removed first (ties: lower patch index first).
    """
    from .engine import read_tower

    patch = read_tower(model).patch_size
    flat = maps.reshape(maps.shape[0], -1).float()
    n_patches = flat.shape[1]
    most = torch.argsort(-flat, dim=1, stable=True)
    least = torch.argsort(flat, dim=1, stable=True)
    out = {"positive": np.zeros(len(fractions), dtype=np.int64), "negative": np.zeros(len(fractions), dtype=np.int64)}
    for i, f in enumerate(fractions):
        k = int(round(f * n_patches))
        for name, order in (("positive", most), ("negative", least)):
            if k == 0 and name == "negative":
                out["negative"][i] = out["positive"][i]
                continue
            e = F.normalize(forward_image(model, remove_patches(x, order, k, patch)), dim=-1)
            pred = (e @ W.to(e.dtype)).argmax(dim=1).cpu()
            out[name][i] = int((pred == labels.cpu()).sum())
    return out


def area_under(fractions: Sequence[float], accuracies: Sequence[float]) -> float:
    """Trapezoidal area under accuracy (%) over the removed fraction (0 .. 0.9)."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(accuracies, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
