"""TextSpan: label a head's output space with texts (Gandelsman et al., ICLR 2024; DESIGN.md section 4).

Given one head's token-summed contributions C [n, d'] over an image set and unit-norm text embeddings T [M, d']:

1. V_r = the top-r right singular vectors of the *uncentred* C; every text is projected onto their span,
   T <- T V_r^T V_r (not renormalised).
2. C is centred (its mean kept aside). Then, m times: score_j = std over images of C T_j (unbiased); the text
   j* = argmax (first on ties) is picked, tau = T_j*, and tau is removed from C and from every text
   (X <- X - (X tau / |tau|^2) tau^T). The variance of C along tau is the variance that text explains.
3. Reconstruction = mean + the projection of the centred C on the picked directions (mutually orthogonal, since
   every text is deflated by every earlier pick).

Everything after step 1 lives in the r-dimensional span of V_r: with coordinates c = C V_r^T and t = T V_r^T, the
scores are t_j^T S t_j with S the r x r covariance of c, and a deflation by tau is S <- P S P, t <- t P with
P = I - tau tau^T / |tau|^2. So each pick costs O(M r + r^2) instead of the plain loop's O(n d' M), and V_r comes
from the eigenvectors of the d' x d' Gram matrix C^T C instead of an SVD of C. The picks are the plain algorithm's
(tested against a plain loop on small inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ._repr import concise
from .errors import BadInputError
from .names import parse_heads, parse_layers  # noqa: F401  (re-exported: they used to live here)


@concise
@dataclass
class TextSpanResult:
    """One head's TextSpan labels.

    Attributes:
        texts: the picked texts, in order.
        indices: their rows in the text bank.
        variance_explained: [m] fraction of the head's total variance (trace of the covariance of C) removed by
            each pick.
        cumulative: [m] running sum of `variance_explained`.
        directions: [m, d'] the picked (deflated, projected) text directions tau.
        mean: [d'] the mean of C over images.
        total_variance: trace of the (unbiased) covariance of C.
    """

    texts: List[str]
    indices: List[int]
    variance_explained: np.ndarray
    cumulative: np.ndarray
    directions: np.ndarray
    mean: np.ndarray
    total_variance: float

    def reconstruct(self, head_outputs: np.ndarray, n_texts: Optional[int] = None) -> np.ndarray:
        """[n, d']: mean + projection of the centred outputs on the first `n_texts` picked directions."""
        C = np.asarray(head_outputs, dtype=np.float64)
        k = len(self.texts) if n_texts is None else n_texts
        Q = self.directions[:k] / np.linalg.norm(self.directions[:k], axis=1, keepdims=True)
        centred = C - self.mean
        return self.mean + (centred @ Q.T) @ Q


def top_right_singular_vectors(C: np.ndarray, rank: int) -> np.ndarray:
    """[r, d']: the top-r right singular vectors of C (from the eigenvectors of C^T C; sign is irrelevant here)."""
    gram = C.T @ C
    w, v = np.linalg.eigh(gram)
    order = np.argsort(w)[::-1][:rank]
    return v[:, order].T


def text_span(head_outputs, text_embeddings, texts: Sequence[str], n_texts: int = 20, rank: int = 80,
              reconstruct: bool = False):
    """Greedily pick the texts whose directions explain the most variance of one head's outputs.

    Args:
        head_outputs: [n, d'] one head's token-summed contributions over n images (numpy or torch).
        text_embeddings: [M, d'] unit-norm text embeddings of the same model.
        texts: the M texts.
        n_texts: how many texts to pick (m).
        rank: r, the dimension of the head's principal subspace the texts are projected onto.
        reconstruct: also return the [n, d'] reconstruction.

    Returns:
        A `TextSpanResult` (and the reconstruction when asked).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> T = rng.normal(size=(6, 8)); T /= np.linalg.norm(T, axis=1, keepdims=True)
        >>> C = rng.normal(size=(50, 1)) * 3 * T[2] + 0.1 * rng.normal(size=(50, 8))
        >>> text_span(C, T, list("abcdef"), n_texts=2, rank=8).texts[0]
        'c'
    """
    C = _as_float64(head_outputs)
    T = _as_float64(text_embeddings)
    n, d = C.shape
    if T.ndim != 2 or T.shape[1] != d:
        raise BadInputError(f"text embeddings {T.shape} do not match the head outputs' width {d} (another model?)")
    if len(texts) != T.shape[0]:
        raise BadInputError(f"{len(texts)} texts for {T.shape[0]} text embeddings")
    if n_texts > T.shape[0]:
        raise BadInputError(f"n_texts={n_texts} is more than the {T.shape[0]} texts in the bank")
    if n < 2:
        raise BadInputError("TextSpan needs at least 2 images")
    rank = min(rank, d)

    V = top_right_singular_vectors(C, rank)  # [r, d']
    t = T @ V.T  # [M, r]: texts in V_r coordinates (the projection T V^T V, expressed in the basis V)
    mean = C.mean(axis=0)
    centred = C - mean
    c = centred @ V.T  # [n, r]
    S = (c.T @ c) / (n - 1)  # [r, r]
    total_variance = float((centred * centred).sum() / (n - 1))

    picked, var_explained, dirs = [], [], []
    for _ in range(n_texts):
        # std over images of C t_j, from the covariance: sqrt(t_j^T S t_j)
        scores = np.einsum("mr,rs,ms->m", t, S, t, optimize=True)
        j = int(np.argmax(scores))  # ties: the first
        tau = t[j].copy()
        tau_sq = float(tau @ tau)
        if tau_sq <= 1e-30:
            raise BadInputError("every remaining text direction is zero: fewer independent texts than n_texts "
                             f"within rank {rank}")
        picked.append(j)
        var_explained.append(float(tau @ S @ tau) / tau_sq / total_variance)
        dirs.append(tau @ V)
        # deflate the covariance and every text by tau
        u = tau / np.sqrt(tau_sq)
        Su = S @ u
        S = S - np.outer(u, Su) - np.outer(Su, u) + np.outer(u, u) * float(u @ Su)
        t = t - np.outer(t @ u, u)

    result = TextSpanResult(texts=[texts[j] for j in picked], indices=picked,
                            variance_explained=np.array(var_explained), cumulative=np.cumsum(var_explained),
                            directions=np.stack(dirs) if dirs else np.zeros((0, d)), mean=mean,
                            total_variance=total_variance)
    if reconstruct:
        return result, result.reconstruct(C)
    return result


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def label_heads(heads, text_embeddings, texts: Sequence[str], layers: Sequence[int], n_texts: int = 20,
                rank: int = 80, progress: bool = True) -> dict:
    """TextSpan for every head of the given layers of a cache's heads array [n, L, H, d'].

    Returns {(layer, head): TextSpanResult}.
    """
    from tqdm.auto import tqdm

    n_heads = heads.shape[2]
    if max(layers) >= heads.shape[1]:
        raise BadInputError(f"the cache has {heads.shape[1]} layers; asked for layer {max(layers)}")
    todo = [(l, h) for l in layers for h in range(n_heads)]
    results = {}
    for l, h in tqdm(todo, disable=not progress, desc="TextSpan", unit="head"):
        results[(l, h)] = text_span(np.asarray(heads[:, l, h]), text_embeddings, texts, n_texts=n_texts, rank=rank)
    return results


def completeness(heads, mlps, embeddings, classifier: np.ndarray, labels: np.ndarray, results: dict,
                 n_texts_list: Sequence[int], ref_heads=None, ref_mlps=None, *, rows=None, ref_rows=None,
                 same_set: bool = False, seed: int = 0) -> dict:
    """Zero-shot accuracy when the analysed heads are replaced by their TextSpan reconstructions with m texts and
    every other head and all MLP-type terms (embedding term included) are mean-ablated.

    Logits are linear in the terms, so each head is read once: its reconstruction's logits are
    mean @ W + (centred @ Q_m^T)(Q_m W). Means of ablated terms come from `ref_heads`/`ref_mlps` (rows `ref_rows`);
    without them, by default (DESIGN.md section 5) from a seeded half of the rows, the other half evaluated, or with
    ``same_set=True`` from the evaluated rows themselves (the published protocol). `rows` selects the evaluated
    rows (`labels` and `embeddings` are indexed by the full row numbers).

    Returns {"baseline": %, "ablated_rest": % (analysed heads kept intact, the rest mean-ablated),
    "by_n_texts": {m: %}}.
    """
    from .ablation import split_rows

    if ref_heads is None and ref_mlps is None and rows is None and ref_rows is None and not same_set:
        ref_rows, rows = split_rows(heads.shape[0], 0.5, seed)
    from .zeroshot import accuracy, accuracy_from_logits

    ref_heads = heads if ref_heads is None else ref_heads
    ref_mlps = mlps if ref_mlps is None else ref_mlps
    pick = (lambda a: a) if rows is None else (lambda a: a[rows])
    ref_pick = (lambda a: a) if ref_rows is None else (lambda a: a[ref_rows])
    L, H = heads.shape[1:3]
    n = heads.shape[0] if rows is None else len(rows)
    W = np.asarray(classifier, dtype=np.float64)
    const = np.asarray(ref_pick(ref_mlps), dtype=np.float64).mean(axis=0).sum(axis=0) @ W  # [C]
    intact = np.zeros((n, W.shape[1]))
    by_m = {m: np.zeros((n, W.shape[1])) for m in n_texts_list}
    for l in range(L):
        for h in range(H):
            if (l, h) in results:
                C = np.asarray(pick(heads[:, l, h]), dtype=np.float64)
                r = results[(l, h)]
                intact += C @ W
                Q = r.directions / np.linalg.norm(r.directions, axis=1, keepdims=True)
                P = (C - r.mean) @ Q.T  # [n, m_max]
                QW = Q @ W  # [m_max, C]
                base = r.mean @ W
                for m in n_texts_list:
                    if m > len(Q):
                        raise BadInputError(f"{m} texts asked, but TextSpan picked only {len(Q)} for L{l}H{h}")
                    by_m[m] += base + P[:, :m] @ QW[:m]
            else:
                const = const + np.asarray(ref_pick(ref_heads[:, l, h]), dtype=np.float64).mean(axis=0) @ W
    labels = np.asarray(pick(np.asarray(labels)))
    return {
        "baseline": accuracy(np.asarray(pick(embeddings), dtype=np.float64), W, labels),
        "ablated_rest": accuracy_from_logits(intact + const, labels),
        "by_n_texts": {m: accuracy_from_logits(v + const, labels) for m, v in by_m.items()},
    }
