"""Small metrics shared by the analyses."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def correlation_ratio(X, labels: Sequence) -> float:
    """Between-class variance over total variance of X [n, d], summed over dimensions (eta squared, in [0, 1]).

    1 means the classes alone determine X; 0 means the class means coincide.
    """
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels)
    centred = X - X.mean(axis=0)
    total = float((centred ** 2).sum())
    if total == 0:
        return 0.0
    between = 0.0
    for value in np.unique(labels):
        rows = centred[labels == value]
        between += len(rows) * float((rows.mean(axis=0) ** 2).sum())
    return between / total
