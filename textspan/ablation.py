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

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import BadInputError
from .zeroshot import accuracy_from_logits


def split_rows(n: int, reference_fraction: float = 0.5, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(reference rows, evaluation rows): a seeded random split of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * reference_fraction))
    return np.sort(perm[:k]), np.sort(perm[k:])


def _rows(a, rows: Optional[np.ndarray]) -> np.ndarray:
    return np.asarray(a if rows is None else a[rows])


def _tensor(a, copy: bool = True):
    """A float32 torch tensor over (a copy of) a numpy array or memmap slice. Without `copy`, a read-only memmap
    view is wrapped as it is (torch warns that it is not writable; nothing writes to it)."""
    import warnings

    import torch

    a = np.asarray(a)
    if a.dtype != np.float32 or copy:
        return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


_ROW_BLOCK = 256  # rows per sequential read of all layers ([256, L, H, d'] is 300 MB for ViT-L/14)


def _means(arr, rows: Optional[np.ndarray], block: int = _ROW_BLOCK) -> np.ndarray:
    """[L, ...] float64 mean over rows of arr ([n, L, ...]), read in row blocks (float32 sums per block)."""
    idx = np.arange(arr.shape[0]) if rows is None else np.asarray(rows)
    total = np.zeros(arr.shape[1:], np.float64)
    for a in range(0, len(idx), block):
        sel = idx[a:a + block]
        part = arr[int(sel[0]):int(sel[-1]) + 1] if rows is None else arr[sel]
        total += _tensor(part, copy=False).sum(dim=0).double().numpy()
    return total / len(idx)


def _touched(shape) -> np.ndarray:
    """A float32 array whose pages are already mapped (zero-filled)."""
    a = np.empty(shape, np.float32)
    a.fill(0)
    return a


class TermLogits:
    """The classifier's view of a cache: per-layer sums of head / CLS->CLS logits and the MLP logits of the
    evaluation rows, and per-term mean logits of the reference rows.

    Memory is O(n L C): single heads' logits are computed when needed, layer by layer and in chunks of images,
    from the (memory-mapped) arrays, never all at once ([n, L, H, C] would be 15 GB for ImageNet on ViT-L).
    """

    def __init__(self, heads, cls_to_cls, mlps, classifier, rows=None, ref_heads=None, ref_cls=None, ref_mlps=None,
                 ref_rows=None, chunk: int = 2048):
        import torch

        self._torch = torch
        self.W = torch.from_numpy(np.ascontiguousarray(classifier, dtype=np.float32))
        self.heads, self.cls_to_cls, self.rows, self.chunk = heads, cls_to_cls, rows, chunk
        ref_heads = heads if ref_heads is None else ref_heads
        ref_cls = cls_to_cls if ref_cls is None else ref_cls
        ref_mlps = mlps if ref_mlps is None else ref_mlps
        self.n_layers, self.n_heads = heads.shape[1], heads.shape[2]
        self.n = heads.shape[0] if rows is None else len(rows)
        L, H, C = self.n_layers, self.n_heads, self.W.shape[1]
        # sum over heads of head logits, per layer; touched once up front (measured: page faults on first write,
        # interleaved with the reads of the memory-mapped terms, cost up to 3 s more for ImageNet on ViT-L)
        self.layer_head = _touched((self.n, L, C))
        # without CLS->CLS terms there is nothing to ablate: no arrays, and asking for it is an error
        self.layer_cls = _touched((self.n, L, C)) if cls_to_cls is not None else None
        self.mean_head = np.empty((L, H, C), np.float64)
        self.mean_cls = np.empty((L, H, C), np.float64) if cls_to_cls is not None else None
        self.mean_term = np.empty((L, H, self.W.shape[0]), np.float64)  # the heads' mean terms (reference rows)
        W64 = np.asarray(classifier, dtype=np.float64)
        # Row-major passes: each block of rows is read once, sequentially, for all layers. In the same-set protocol
        # over the same rows the reference means come from that pass too.
        same = ref_rows is None and rows is None
        for src, ref, out, mean in ((heads, ref_heads, self.layer_head, self.mean_head),
                                    (cls_to_cls, ref_cls, self.layer_cls, self.mean_cls)):
            if src is None:  # no CLS->CLS terms given: CLS ablations are unavailable
                continue
            fused = same and ref is src
            total = np.zeros(src.shape[1:], np.float64)  # [L, H, d']
            for a, b in self._chunks(_ROW_BLOCK):
                x = _tensor(_rows(src, self._sel(a, b)), copy=False)  # [block, L, H, d'], read in place
                out[a:b] = (x.sum(dim=2) @ self.W).numpy()  # [block, L, C]
                if fused:  # float32 (pairwise) sums per block, float64 across blocks
                    total += x.sum(dim=0).double().numpy()
            terms = total / self.n if fused else _means(ref, ref_rows)  # [L, H, d'] float64
            mean[:] = terms @ W64
            if mean is self.mean_head:
                self.mean_term[:] = terms
        self.mlp = np.empty((self.n, self.W.shape[1]), np.float32)  # [n, C]
        for a, b in self._chunks():
            self.mlp[a:b] = (_tensor(_rows(mlps, self._sel(a, b)), copy=False).sum(dim=1) @ self.W).numpy()
        self.mean_mlp = _means(ref_mlps, ref_rows) @ W64  # [L+1, C]
        self.base = self.layer_head.sum(axis=1, dtype=np.float64) + self.mlp

    def _chunks(self, size: Optional[int] = None):
        size = size or self.chunk
        return [(a, min(a + size, self.n)) for a in range(0, self.n, size)]

    def _sel(self, a, b):
        return slice(a, b) if self.rows is None else self.rows[a:b]

    def head_logits(self, l: int, h: int, cls: bool = False) -> np.ndarray:
        """[n, C]: the logits of one head's term (or of its CLS->CLS term)."""
        src = self.cls_to_cls if cls else self.heads
        out = np.empty((self.n, self.W.shape[1]), np.float32)
        for a, b in self._chunks():
            x = _rows(src[:, l, h], self._sel(a, b)).astype(np.float32)
            out[a:b] = (self._torch.from_numpy(x) @ self.W).numpy()
        return out


def term_logits(heads, cls_to_cls, mlps, classifier: np.ndarray, rows: Optional[np.ndarray] = None,
                ref_heads=None, ref_cls=None, ref_mlps=None, ref_rows: Optional[np.ndarray] = None, *,
                same_set: bool = False, seed: int = 0) -> TermLogits:
    """Project the terms on the classifier. `rows`/`ref_rows` select evaluation/reference rows of the arrays;
    `ref_*` default to the evaluation arrays (same cache, possibly other rows).

    The default protocol (DESIGN.md section 5): when no reference arrays and no rows are given, the means come from
    a seeded half of the rows (`split_rows(n, 0.5, seed)`) and the other half is evaluated; ``same_set=True`` takes
    the means over the evaluated rows themselves (the published protocol)."""
    if ref_heads is None and ref_mlps is None and rows is None and ref_rows is None and not same_set:
        ref_rows, rows = split_rows(heads.shape[0], 0.5, seed)
    return TermLogits(heads, cls_to_cls, mlps, classifier, rows, ref_heads, ref_cls, ref_mlps, ref_rows)


def ablate_heads(t: TermLogits, heads: Iterable[Tuple[int, int]], *, layers: Sequence[int] = (), mlps: bool = False,
                 cls_layers: Sequence[int] = ()) -> np.ndarray:
    """Logits with the given heads, all heads of `layers`, the MLP-type terms (`mlps`) and the CLS->CLS terms of
    `cls_layers` mean-ablated. A head listed twice (or inside an ablated layer) is ablated once."""
    logits = t.base.copy()
    layers = sorted(set(int(l) for l in layers))
    singles = sorted({(int(l), int(h)) for l, h in heads} - {(l, h) for l in layers for h in range(t.n_heads)})
    for l in layers:
        logits += t.mean_head[l].sum(axis=0) - t.layer_head[:, l]
    for l, h in singles:
        logits += t.mean_head[l, h] - t.head_logits(l, h)
    chosen = set(singles) | {(l, h) for l in layers for h in range(t.n_heads)}
    if list(cls_layers) and t.layer_cls is None:
        raise BadInputError("CLS->CLS ablations need the CLS->CLS terms (cls_to_cls), which were not given")
    for l in cls_layers:
        logits += t.mean_cls[l].sum(axis=0) - t.layer_cls[:, l]
        for h in range(t.n_heads):
            if (l, h) in chosen:  # the CLS->CLS term is part of an already-ablated head term: undo its swap
                logits -= t.mean_cls[l, h] - t.head_logits(l, h, cls=True)
    if mlps:
        logits += t.mean_mlp.sum(axis=0) - t.mlp
    return logits


def single_head_importance(t: TermLogits, labels: np.ndarray, chunk: int = 256, margins: bool = False,
                           progress: bool = False):
    """[L, H]: accuracy (%) with each head alone mean-ablated (and, with ``margins=True``, also [L, H]: the mean over
    the labelled images of the correct class's margin, its logit minus the largest other logit, with the head
    mean-ablated: a measure that does not saturate when accuracy is 100%). Vectorised over the heads of a layer, in
    chunks of images; each head's logits are made once and never kept.

    Mean-ablating head h turns the logits into base - (x_h - mu_h) @ W, with mu_h the head's mean term over the
    reference rows (mean_h @ W is mu_h @ W). Each block of rows is read once, sequentially, for all layers; per
    layer the centred terms are written heads-first in one pass (the copy the product needs anyway) and one batched
    product with the base logits as its (broadcast) input gives every head's logits."""
    torch = t._torch
    labels = np.asarray(labels)
    keep = torch.from_numpy(labels >= 0)
    y = torch.from_numpy(np.clip(labels, 0, None).astype(np.int64))  # unlabelled rows (-1) are masked by `keep`
    L, H = t.n_layers, t.n_heads
    correct = np.zeros((L, H))
    margin = np.zeros((L, H))
    base = torch.from_numpy(t.base.astype(np.float32))
    neg_w = (-t.W).expand(H, -1, -1)  # [H, d', C]
    later_twins = _later_twins(t.W)
    mu = torch.from_numpy(t.mean_term.astype(np.float32))  # [L, H, d']
    centred = torch.empty(H, chunk, mu.shape[-1])  # buffers made once: fresh ones fault in their pages every time
    scores = torch.empty(H, chunk, t.W.shape[1])
    from tqdm.auto import tqdm

    for a in tqdm(range(0, t.n, chunk), disable=not progress, desc="single heads", unit="chunk"):
        b = min(a + chunk, t.n)
        rows = _tensor(_rows(t.heads, t._sel(a, b)), copy=False)  # [chunk, L, H, d'], one sequential read
        xc, logits = centred[:, :b - a], scores[:, :b - a]  # [H, chunk, d'] heads first; [H, chunk, C]
        for l in range(L):
            torch.sub(rows[:, l].transpose(0, 1), mu[l][:, None, :], out=xc)  # one pass (sub alone keeps the strides)
            torch.baddbmm(base[a:b].expand(H, -1, -1), xc, neg_w, out=logits)
            if margins:
                hit, m = _hits_and_margins(logits, y[a:b], later_twins)
                margin[l] += (m * keep[a:b]).sum(dim=1).double().numpy()
            else:
                hit = _hits(logits, y[a:b], later_twins)
            correct[l] += (hit & keep[a:b]).sum(dim=1).numpy()
    acc = correct / max(1, int(keep.sum())) * 100
    if margins:
        return acc, margin / max(1, int(keep.sum()))
    return acc


def _hits_and_margins(logits, y, later_twins):
    """`_hits`, and [H, b] the label's logit minus the largest other logit, from one top-2 pass (no copy of the
    logits): the largest other is the second largest when the label holds the maximum, else the maximum."""
    import torch

    top2 = logits.topk(2, dim=2).values  # [H, b, 2]
    mine = logits.gather(2, y.clamp(min=0).view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
    hit = mine >= top2[..., 0]
    margin = mine - torch.where(hit, top2[..., 1], top2[..., 0])
    twins = later_twins[y.clamp(min=0)]
    if bool(twins.any()):
        rows = twins.nonzero().flatten()
        hit[:, rows] = logits[:, rows].argmax(dim=2) == y[rows]
    return hit, margin


def _margins(logits, y) -> "torch.Tensor":
    """[H, b]: the label's logit minus the largest other logit (labels < 0 give 0 rows' worth of garbage: the caller
    masks them)."""
    import torch

    idx = y.clamp(min=0).view(1, -1, 1).expand(logits.shape[0], -1, 1)
    mine = logits.gather(2, idx).squeeze(2)
    others = logits.scatter(2, idx, float("-inf")).amax(dim=2)
    return mine - others


def mean_margin(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the labelled rows of the label's logit minus the largest other logit."""
    import torch

    labels = np.asarray(labels)
    keep = labels >= 0
    m = _margins(torch.from_numpy(np.asarray(logits, np.float32))[None], torch.from_numpy(labels.astype(np.int64)))[0]
    return float(m.numpy()[keep].mean()) if keep.any() else float("nan")


def _later_twins(W) -> "torch.Tensor":
    """[C] bool: classes whose classifier column equals an earlier one's (duplicate class names)."""
    import torch

    _, first = np.unique(np.asarray(W).T, axis=0, return_index=True)
    twin = np.ones(W.shape[1], dtype=bool)
    twin[first] = False
    return torch.from_numpy(twin)


def _hits(logits, y, later_twins) -> "torch.Tensor":
    """[H, b] bool: argmax(logits[h, i]) == y[i], computed as "the label's logit is the maximum" (a max is ~10x
    cheaper than an argmax here). The two differ only when another class ties the maximum exactly: for labels whose
    classifier column repeats an earlier one (the only systematic ties) the rows are settled by argmax itself."""
    import torch

    top = logits.amax(dim=2)  # [H, b]
    mine = logits.gather(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
    hit = mine >= top
    twins = later_twins[y]
    if bool(twins.any()):
        rows = twins.nonzero().flatten()
        hit[:, rows] = logits[:, rows].argmax(dim=2) == y[rows]
    return hit


def standard_ablations(t: TermLogits, labels: np.ndarray) -> Dict:
    """baseline, mlps, cls_to_cls, mlps_and_cls_to_cls, per-layer cls_to_cls and the accumulated curve (%)."""
    L = t.n_layers
    acc = lambda logits: accuracy_from_logits(logits, labels)  # noqa: E731
    out = {"baseline": acc(t.base), "mlps": acc(ablate_heads(t, [], mlps=True))}
    if t.layer_cls is not None:  # (None: no CLS->CLS terms were given)
        out.update({
            "cls_to_cls": acc(ablate_heads(t, [], cls_layers=range(L))),
            "mlps_and_cls_to_cls": acc(ablate_heads(t, [], mlps=True, cls_layers=range(L))),
            "cls_to_cls_per_layer": [acc(ablate_heads(t, [], cls_layers=[l])) for l in range(L)],
        })
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
    L, H = t.n_layers, t.n_heads
    chosen_acc = accuracy_from_logits(ablate_heads(t, chosen, **generic), labels)
    rand = [accuracy_from_logits(ablate_heads(t, s, **generic), labels)
            for s in random_head_sets(L, H, len(chosen), draws, seed)]
    return {"chosen": chosen_acc, "random": rand, "random_best": max(rand), "random_mean": float(np.mean(rand))}
