"""Mean-ablation experiments on a cache (DESIGN.md section 5).

Mean-ablating a term replaces it, for every image, by its mean over a *reference* image set. Since the zero-shot
logits are linear in the terms (logits = (sum of terms) @ W), every ablation is a correction of the baseline logits:

    logits' = logits - term @ W + mean(term) @ W,

so single-head importance for all L*H heads costs one [n*H, d'] x [d', C] product per layer, not L*H forward passes.

Protocols: all MLP-type terms (the embedding term included); CLS -> CLS attention terms (all layers, and per layer);
both; accumulated layer ablation (the attention of layers 0..l replaced by means, l = 0..L-1); every single head;
chosen head sets against random head sets of the same size.

By default the means come from a reference split disjoint from the evaluation rows (`split_rows`); the published
protocol takes them from the evaluation set itself (`same_set=True`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np


def split_rows(n: int, reference_fraction: float = 0.5, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(reference rows, evaluation rows): a seeded random split of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * reference_fraction))
    return np.sort(perm[:k]), np.sort(perm[k:])


def _rows(a, rows: Optional[np.ndarray]) -> np.ndarray:
    return np.asarray(a if rows is None else a[rows])


@dataclass
class TermLogits:
    """Per-term logits of an evaluation set and per-term mean logits of a reference set.

    head [n, L, H, C], cls [n, L, H, C], mlp [n, L+1, C] and their reference means (mean_head [L, H, C], ...).
    Built layer by layer from memory-mapped caches, so only one layer's terms are in memory at a time.
    """

    head: np.ndarray
    cls: np.ndarray
    mlp: np.ndarray
    mean_head: np.ndarray
    mean_cls: np.ndarray
    mean_mlp: np.ndarray

    @property
    def base(self) -> np.ndarray:
        return self.head.sum(axis=(1, 2)) + self.mlp.sum(axis=1)


def term_logits(heads, cls_to_cls, mlps, classifier: np.ndarray, rows: Optional[np.ndarray] = None,
                ref_heads=None, ref_cls=None, ref_mlps=None, ref_rows: Optional[np.ndarray] = None) -> TermLogits:
    """Project every term on the classifier. `rows`/`ref_rows` select evaluation/reference rows of the arrays;
    `ref_*` default to the evaluation arrays (same cache, possibly other rows)."""
    W = np.asarray(classifier, dtype=np.float32)
    ref_heads = heads if ref_heads is None else ref_heads
    ref_cls = cls_to_cls if ref_cls is None else ref_cls
    ref_mlps = mlps if ref_mlps is None else ref_mlps
    L, H = heads.shape[1], heads.shape[2]
    n = heads.shape[0] if rows is None else len(rows)
    C = W.shape[1]
    head = np.empty((n, L, H, C), np.float32)
    cls = np.empty((n, L, H, C), np.float32)
    mean_head = np.empty((L, H, C), np.float64)
    mean_cls = np.empty((L, H, C), np.float64)
    for l in range(L):
        for src, out, ref, mean in ((heads, head, ref_heads, mean_head), (cls_to_cls, cls, ref_cls, mean_cls)):
            x = _rows(src[:, l], rows).astype(np.float32)  # [n, H, d']
            out[:, l] = (x.reshape(-1, x.shape[-1]) @ W).reshape(n, H, C)
            r = _rows(ref[:, l], ref_rows).astype(np.float64)
            mean[l] = r.mean(axis=0) @ W
    m = _rows(mlps, rows).astype(np.float32)
    mlp = (m.reshape(-1, m.shape[-1]) @ W).reshape(n, -1, C)
    mean_mlp = _rows(ref_mlps, ref_rows).astype(np.float64).mean(axis=0) @ W
    return TermLogits(head, cls, mlp, mean_head, mean_cls, mean_mlp)


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    keep = labels >= 0
    return float((np.asarray(logits)[keep].argmax(axis=1) == labels[keep]).mean() * 100)


def ablate_heads(t: TermLogits, heads: Iterable[Tuple[int, int]], *, layers: Sequence[int] = (), mlps: bool = False,
                 cls_layers: Sequence[int] = ()) -> np.ndarray:
    """Logits with the given heads, all heads of `layers`, the MLP-type terms (`mlps`) and the CLS->CLS terms of
    `cls_layers` mean-ablated. A head listed twice (or inside an ablated layer) is ablated once."""
    logits = t.base.astype(np.float64)
    chosen = {(l, h) for l, h in heads} | {(l, h) for l in layers for h in range(t.head.shape[2])}
    for l, h in sorted(chosen):
        logits += t.mean_head[l, h] - t.head[:, l, h]
    for l in cls_layers:
        for h in range(t.head.shape[2]):
            if (l, h) not in chosen:  # the CLS->CLS term is part of an already-ablated head term
                logits += t.mean_cls[l, h] - t.cls[:, l, h]
    if mlps:
        logits += t.mean_mlp.sum(axis=0) - t.mlp.sum(axis=1)
    return logits


def single_head_importance(t: TermLogits, labels: np.ndarray) -> np.ndarray:
    """[L, H]: accuracy (%) with each head alone mean-ablated (vectorised over images and classes)."""
    labels = np.asarray(labels)
    keep = labels >= 0
    base = t.base[keep].astype(np.float32)
    y = labels[keep]
    L, H = t.head.shape[1:3]
    acc = np.empty((L, H))
    for l in range(L):
        # [n, H, C]: base logits corrected by each head of the layer at once
        corrected = base[:, None, :] - t.head[keep, l] + t.mean_head[l][None].astype(np.float32)
        acc[l] = (corrected.argmax(axis=2) == y[:, None]).mean(axis=0) * 100
    return acc


def standard_ablations(t: TermLogits, labels: np.ndarray) -> Dict:
    """baseline, mlps, cls_to_cls, mlps_and_cls_to_cls, per-layer cls_to_cls and the accumulated curve (%)."""
    L = t.head.shape[1]
    acc = lambda logits: accuracy_from_logits(logits, labels)  # noqa: E731
    out = {
        "baseline": acc(t.base),
        "mlps": acc(ablate_heads(t, [], mlps=True)),
        "cls_to_cls": acc(ablate_heads(t, [], cls_layers=range(L))),
        "mlps_and_cls_to_cls": acc(ablate_heads(t, [], mlps=True, cls_layers=range(L))),
        "cls_to_cls_per_layer": [acc(ablate_heads(t, [], cls_layers=[l])) for l in range(L)],
    }
    out["accumulated"] = [out["baseline"]] + [acc(ablate_heads(t, [], layers=range(l + 1))) for l in range(L)]
    return out


def random_head_sets(n_layers: int, n_heads: int, size: int, draws: int, seed: int = 0,
                     layers: Optional[Sequence[int]] = None) -> List[List[Tuple[int, int]]]:
    """`draws` seeded random sets of `size` distinct heads (from `layers`, default all)."""
    pool = [(l, h) for l in (layers if layers is not None else range(n_layers)) for h in range(n_heads)]
    rng = np.random.default_rng(seed)
    return [[pool[i] for i in sorted(rng.choice(len(pool), size, replace=False))] for _ in range(draws)]


def head_set_comparison(t: TermLogits, labels: np.ndarray, chosen: Sequence[Tuple[int, int]], draws: int = 5,
                        seed: int = 0, **generic) -> Dict:
    """Accuracy with the chosen heads ablated against `draws` random sets of the same size (best and mean)."""
    L, H = t.head.shape[1:3]
    chosen_acc = accuracy_from_logits(ablate_heads(t, chosen, **generic), labels)
    rand = [accuracy_from_logits(ablate_heads(t, s, **generic), labels)
            for s in random_head_sets(L, H, len(chosen), draws, seed)]
    return {"chosen": chosen_acc, "random": rand, "random_best": max(rand), "random_mean": float(np.mean(rand))}
