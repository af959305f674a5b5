"""Zero-shot classifiers and accuracy on decomposed embeddings.

A classifier is W [d', C]: per class, the mean of the normalised text embeddings of its prompts (class name x
templates), renormalised. Because every image embedding is a sum of direct terms, logits = (sum of terms) @ W are
linear in the terms: replacing or ablating terms only changes a sum, never a forward pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np

from .errors import BadInputError, InputNotFoundError
from . import textio
from .text import encode_texts


def read_lines(path, what: str) -> List[str]:
    """The non-blank lines of a class-name or template file (`textspan.textio`: UTF-8 with or without BOM, CRLF, a
    Windows-1252 fallback with a warning). A name given twice is refused with both line numbers: it would make two
    classes of one."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{what} file not found: {path}")
    lines = textio.read_lines(p, what)
    if not lines:
        raise BadInputError(f"{path}: no {what} (empty or blank lines only)")
    seen = {}
    for line, text in lines:
        if text in seen:
            raise BadInputError(f"{path}, lines {seen[text]} and {line}: {text!r} twice; every {what} line must be "
                                f"distinct")
        seen[text] = line
    return [t for _, t in lines]


def read_templates(path) -> List[str]:
    templates = read_lines(path, "templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise BadInputError(f"{path}: every template needs exactly one '{{}}' for the class name; not: {bad[:3]}")
    return templates


def build_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256) -> np.ndarray:
    """[d', C] float32 zero-shot classifier."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, batch_size=batch_size)  # [C * T, d']
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.T.astype(np.float32)


def accuracy_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of the logits' argmax against integer labels (rows with label < 0 skipped)."""
    labels = np.asarray(labels)
    keep = labels >= 0
    if not keep.any():
        raise BadInputError("no labelled images (every label is -1)")
    return float((np.asarray(logits)[keep].argmax(axis=1) == labels[keep]).mean() * 100)


def accuracy(embeddings: np.ndarray, classifier: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent of (embeddings @ classifier) against integer labels (rows with label < 0 skipped)."""
    return accuracy_from_logits(np.asarray(embeddings) @ classifier, labels)


def pair_probabilities(model, cosines) -> np.ndarray:
    """The model's own probabilities from image-text cosines [n, C]: SigLIP (a model with a logit bias) scores each
    pair on its own, sigmoid(exp(logit_scale) * cos + logit_bias); CLIP takes a softmax over the C texts of
    exp(logit_scale) * cos. (Accuracies are the argmax of the cosines either way: invariant to both.)"""
    from .engine import logit_scale_and_bias

    scale, bias = logit_scale_and_bias(model)
    z = scale * np.asarray(cosines, dtype=np.float64)
    if bias is not None:
        return 1.0 / (1.0 + np.exp(-(z + bias)))
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)
