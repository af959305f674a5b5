"""Spurious-feature removal (Waterbirds-style) and the reusable debiased classifier (DESIGN.md section 5).

Heads that encode a spurious attribute (the background of a bird, say) are mean-ablated: their direct
contribution is replaced by its mean over a reference set, which removes what varies with the attribute while
keeping the average. Heads are chosen explicitly (L3H1,...), by concept (the fraction of a head's variance that lies
in the span of a set of concept texts), or automatically (the correlation ratio of the head's outputs with the
spurious attribute on the reference set). The result, a `DebiasedClassifier`, holds the classifier, the heads, their
means and the model fingerprint; it applies to new images (through the decomposition) or to any cache of that model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._repr import concise
from .errors import InputNotFoundError, ModelMismatchError
from .metrics import correlation_ratio


def group_metrics(pred: np.ndarray, labels: np.ndarray, groups: Sequence[str]) -> Dict:
    """Per-group accuracy, the average over images, the unweighted mean over groups and the worst group (%)."""
    pred, labels, groups = np.asarray(pred), np.asarray(labels), np.asarray(groups)
    correct = pred == labels
    per = {str(g): float(correct[groups == g].mean() * 100) for g in sorted(set(groups.tolist()))}
    return {"per_group": per, "average": float(correct.mean() * 100), "mean_group": float(np.mean(list(per.values()))),
            "worst_group": min(per.values())}


def head_scores_auto(heads, attribute: Sequence, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """[L, H]: correlation ratio of each head's outputs with the (spurious) attribute on the given rows."""
    attribute = np.asarray(attribute)
    L, H = heads.shape[1:3]
    out = np.empty((L, H))
    for l in range(L):
        block = np.asarray(heads[:, l] if rows is None else heads[:, l][rows])
        for h in range(H):
            out[l, h] = correlation_ratio(block[:, h], attribute)
    return out


def head_scores_concept(heads, concept_embeddings: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """[L, H]: fraction of each head's variance (centred outputs) in the span of the concept text embeddings."""
    Q, _ = np.linalg.qr(np.asarray(concept_embeddings, dtype=np.float64).T)  # [d', k] orthonormal basis
    L, H = heads.shape[1:3]
    out = np.empty((L, H))
    for l in range(L):
        block = np.asarray(heads[:, l] if rows is None else heads[:, l][rows], dtype=np.float64)
        for h in range(H):
            C = block[:, h] - block[:, h].mean(axis=0)
            total = float((C ** 2).sum())
            out[l, h] = float(((C @ Q) ** 2).sum()) / total if total > 0 else 0.0
    return out


def top_heads(scores: np.ndarray, k: Optional[int] = None, threshold: Optional[float] = None) -> List[Tuple[int, int]]:
    """Heads by descending score: the top k, and/or those at or above the threshold."""
    order = np.dstack(np.unravel_index(np.argsort(-scores, axis=None, kind="stable"), scores.shape))[0]
    chosen = [(int(l), int(h)) for l, h in order]
    if threshold is not None:
        chosen = [(l, h) for l, h in chosen if scores[l, h] >= threshold]
    return chosen[:k] if k is not None else chosen


@concise
@dataclass
class DebiasedClassifier:
    """A zero-shot classifier with some direct terms replaced by reference means.

    Attributes:
        classifier: [d', C]; classes: the C class names.
        heads: the (layer, head) pairs whose token-summed terms are replaced by `head_means` [k, d'].
        layers: whole layers whose heads are all replaced (generic ablation), with `layer_means` [len, H, d'].
        mlps: whether the MLP-type terms are replaced by `mlp_means` [L+1, d'].
        fingerprint / model / pretrained: the model the means belong to (others are refused).
    """

    classifier: np.ndarray
    classes: List[str]
    heads: List[Tuple[int, int]]
    head_means: np.ndarray
    fingerprint: str
    model: str = ""
    pretrained: Optional[str] = None
    layers: List[int] = field(default_factory=list)
    layer_means: Optional[np.ndarray] = None
    mlps: bool = False
    mlp_means: Optional[np.ndarray] = None
    info: Dict = field(default_factory=dict)

    @classmethod
    def from_reference(cls, heads_ref, mlps_ref, classifier, classes, chosen, fingerprint, *, layers=(),
                       mlps=False, model="", pretrained=None, info=None, rows=None) -> "DebiasedClassifier":
        """Means of the chosen terms over a reference set (arrays [n, L, H, d'] and [n, L+1, d'], e.g. a cache's
        memory maps; `rows` selects reference rows). Read one head (or layer) at a time, never the whole array."""
        def mean(view):  # view: a slice of a memory map; only the chosen rows of it are read
            return np.asarray(view if rows is None else view[rows], dtype=np.float64).mean(axis=0)

        head_means = np.stack([mean(heads_ref[:, l, h]) for l, h in chosen]) if chosen \
            else np.zeros((0, np.asarray(classifier).shape[0]))
        layer_means = np.stack([mean(heads_ref[:, l]) for l in layers]) if layers else None
        mlp_means = mean(mlps_ref) if mlps else None
        return cls(np.asarray(classifier, dtype=np.float32), list(classes), [tuple(map(int, x)) for x in chosen],
                   head_means, fingerprint, model, pretrained, [int(l) for l in layers], layer_means, mlps,
                   mlp_means, dict(info or {}))

    # applying -----------------------------------------------------------------------------------------------------

    def embeddings_from_terms(self, heads: np.ndarray, mlps: np.ndarray) -> np.ndarray:
        """[n, d']: the sum of the terms with the ablated ones replaced (heads [n, L, H, d'], mlps [n, L+1, d'])."""
        H = np.array(heads, dtype=np.float64, copy=True)
        M = np.array(mlps, dtype=np.float64, copy=True)
        for k, l in enumerate(self.layers):
            H[:, l] = self.layer_means[k]
        for (l, h), mean in zip(self.heads, self.head_means):
            H[:, l, h] = mean
        if self.mlps:
            M[:] = self.mlp_means
        return H.sum(axis=(1, 2)) + M.sum(axis=1)

    def logits_from_terms(self, heads: np.ndarray, mlps: np.ndarray) -> np.ndarray:
        return self.embeddings_from_terms(heads, mlps) @ self.classifier

    def predict_cache(self, cache, batch: int = 4096) -> np.ndarray:
        """Logits [n, C] for every row of a cache (a `HeadCache` or its folder) of the same model, streamed in row
        blocks; refuses another model's cache."""
        from .cache import HeadCache

        cache = cache if isinstance(cache, HeadCache) else HeadCache(cache)
        if cache.manifest["fingerprint"] != self.fingerprint:
            raise ModelMismatchError(f"{cache.folder} was made with another model (fingerprint "
                                     f"{cache.manifest['fingerprint']}; this classifier needs {self.fingerprint})")
        heads, mlps = cache.heads, cache.mlps
        out = [self.logits_from_terms(heads[i:i + batch], mlps[i:i + batch]) for i in range(0, len(cache), batch)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)))

    def predict(self, model, images) -> np.ndarray:
        """Logits [b, C] for a preprocessed image batch, through the decomposition; refuses another model."""
        from .decomposition import decompose
        from .models import fingerprint

        fp = fingerprint(model)
        if fp != self.fingerprint:
            raise ModelMismatchError(f"this debiased classifier belongs to model {self.model!r} (fingerprint "
                                     f"{self.fingerprint}); the given model's fingerprint is {fp}")
        d = decompose(model, images, spatial=False)
        return self.logits_from_terms(d.heads.double().cpu().numpy(), d.mlps.double().cpu().numpy())

    def predict_labels(self, source, images=None) -> np.ndarray:
        """Predicted class indices: ``predict_labels(cache)`` for a cache (or its folder), ``predict_labels(model,
        images)`` for a preprocessed image batch (the argmax of `predict_cache` / `predict`)."""
        logits = self.predict_cache(source) if images is None else self.predict(source, images)
        return logits.argmax(axis=1)

    # files ------------------------------------------------------------------------------------------------------

    def save(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"classifier": self.classifier, "head_means": self.head_means}
        if self.layer_means is not None:
            arrays["layer_means"] = self.layer_means
        if self.mlp_means is not None:
            arrays["mlp_means"] = self.mlp_means
        np.savez(folder / "debiased_classifier.npz", **arrays)
        meta = {"format": "textspan-debiased/1", "model": self.model, "pretrained": self.pretrained,
                "fingerprint": self.fingerprint, "classes": self.classes,
                "heads": [f"L{l}H{h}" for l, h in self.heads], "layers": self.layers, "mlps": self.mlps,
                "info": self.info}
        (folder / "debiased_classifier.json").write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder) -> "DebiasedClassifier":
        folder = Path(folder)
        meta_path = folder / "debiased_classifier.json"
        if not meta_path.is_file():
            raise InputNotFoundError(f"{meta_path} not found (output of `textspan debias`)")
        meta = json.loads(meta_path.read_text())
        arrays = np.load(folder / "debiased_classifier.npz")
        heads = [tuple(int(x) for x in name[1:].split("H")) for name in meta["heads"]]
        return cls(arrays["classifier"], meta["classes"], heads, arrays["head_means"], meta["fingerprint"],
                   meta.get("model", ""), meta.get("pretrained"), meta.get("layers", []),
                   arrays["layer_means"] if "layer_means" in arrays else None, meta.get("mlps", False),
                   arrays["mlp_means"] if "mlp_means" in arrays else None, meta.get("info", {}))
