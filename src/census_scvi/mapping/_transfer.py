"""Label transfer by weighted k-nearest neighbours in the latent space, with a confidence.

Written by hand because no installed library does it with a per-cell confidence: scanpy's
``tl.ingest`` takes a plain majority vote, and scArches (its ``weighted_knn_transfer``) is not a
dependency. The neighbour search is scikit-learn's exact search (k-d tree in the low-dimensional
latent, fast up to millions of reference cells).

For query cell ``i`` with reference neighbours ``j`` at distances ``d_ij``, the weights are a
Gaussian kernel whose width is the cell's mean neighbour distance, ``w_ij = exp(-d_ij^2 /
(2 s_i^2))``, normalised to sum to 1. The probability of label ``c`` is the summed weight of the
neighbours labelled ``c``; the prediction is the most probable label and the confidence its
probability (1: every neighbour agrees).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["KnnLabelTransfer", "TransferResult"]


@dataclass
class TransferResult:
    """Predicted label and confidence per query cell."""

    labels: npt.NDArray[np.object_]
    """Most probable label, or the unknown label under the threshold."""
    best: npt.NDArray[np.object_]
    """Most probable label, whatever its confidence."""
    confidence: npt.NDArray[np.float32]
    """Probability of the most probable label, in [0, 1]."""


class KnnLabelTransfer:
    """A k-NN index over reference embeddings and their labels.

    Parameters
    ----------
    reference
        n_ref x d embedding.
    labels
        One label per reference cell.
    n_neighbors
        Neighbours per query cell.
    """

    def __init__(
        self, reference: npt.NDArray[np.floating], labels: npt.ArrayLike, *, n_neighbors: int = 15
    ) -> None:
        from sklearn.neighbors import NearestNeighbors

        y = np.asarray(labels).astype(str)
        self.classes, self._codes = np.unique(y, return_inverse=True)
        self.n_neighbors = int(min(n_neighbors, y.size))
        self._nn: Any = NearestNeighbors(n_neighbors=self.n_neighbors).fit(
            np.asarray(reference, dtype=np.float32)
        )

    def predict_proba(self, query: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """Label probabilities (n_query x n_classes, rows sum to 1), columns in ``classes`` order."""
        dist, ind = self._nn.kneighbors(np.asarray(query, dtype=np.float32))
        scale = dist.mean(axis=1, keepdims=True)
        scale = np.where(scale > 0, scale, 1.0)
        w = np.exp(-(dist**2) / (2.0 * scale**2))
        w /= w.sum(axis=1, keepdims=True)
        proba = np.zeros((dist.shape[0], self.classes.size), dtype=np.float64)
        rows = np.repeat(np.arange(dist.shape[0]), dist.shape[1])
        np.add.at(proba, (rows, self._codes[ind].ravel()), w.ravel())
        return proba.astype(np.float32)

    def predict(
        self,
        query: npt.NDArray[np.floating],
        *,
        unknown_threshold: float = 0.5,
        unknown_label: str = "unknown",
    ) -> TransferResult:
        """Most probable label with its probability; the unknown label under ``unknown_threshold``."""
        proba = self.predict_proba(query)
        top = proba.argmax(axis=1)
        conf = np.clip(proba[np.arange(top.size), top], 0.0, 1.0).astype(np.float32)
        best = self.classes[top].astype(object)
        labels = np.where(conf >= unknown_threshold, best, unknown_label).astype(object)
        return TransferResult(labels=labels, best=best, confidence=conf)
