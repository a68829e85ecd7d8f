"""Label transfer from nearest neighbours, with a per-cell confidence (``map``'s).

Written by hand because no installed library does it with a per-cell confidence: scanpy's
``tl.ingest`` takes a plain majority vote, and scArches (its ``weighted_knn_transfer``) is not a
dependency. The weights and the vote are :mod:`census_scvi.knn._vote`'s: the probability of label
``c`` is the summed Gaussian-kernel weight of the neighbours labelled ``c``; the prediction is the
most probable label (ties: the first in sorted order) and the confidence its probability (1: every
neighbour agrees).

Two ways to the neighbours, one vote:

- :class:`KnnLabelTransfer`: exact search over a reference held in memory (scikit-learn's
  ``NearestNeighbors``, a k-d tree in the low-dimensional latent; ``map`` without an index, over
  at most ``map.knn_reference_cells`` cells);
- :func:`transfer_from_neighbors`: neighbours found elsewhere (``map`` with the run's IVF_FLAT
  index, over every embedded cell), given as label codes into sorted classes
  (:func:`sorted_codes` turns first-seen codes into those).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from census_scvi.knn._vote import kernel_weights, predict

__all__ = ["KnnLabelTransfer", "TransferResult", "sorted_codes", "transfer_from_neighbors"]


@dataclass
class TransferResult:
    """Predicted label and confidence per query cell."""

    labels: npt.NDArray[np.object_]
    """Most probable label, or the unknown label under the threshold."""
    best: npt.NDArray[np.object_]
    """Most probable label, whatever its confidence (the unknown label without neighbours)."""
    confidence: npt.NDArray[np.float32]
    """Probability of the most probable label, in [0, 1] (0 without neighbours)."""


def sorted_codes(
    codes: npt.NDArray[np.integer], classes: npt.ArrayLike
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.object_]]:
    """``codes`` into ``classes`` re-coded into the sorted classes (ties then break as ``map``'s)."""
    names = np.asarray(classes).astype(str)
    order = np.argsort(names, kind="stable")
    rank = np.empty(order.size, dtype=np.int32)
    rank[order] = np.arange(order.size, dtype=np.int32)
    return rank[np.asarray(codes)], names[order].astype(object)


def transfer_from_neighbors(
    neighbor_codes: npt.NDArray[np.integer],
    distances: npt.NDArray[np.floating],
    classes: npt.NDArray[np.object_],
    *,
    unknown_threshold: float = 0.5,
    unknown_label: str = "unknown",
) -> TransferResult:
    """Labels from each cell's neighbours: codes into sorted ``classes`` (n x k, -1 = missing).

    Parameters
    ----------
    neighbor_codes
        The neighbours' label codes, nearest first; -1 where a search found no neighbour.
    distances
        Their Euclidean distances (inf where missing).
    classes
        The labels, sorted (``classes[code]``).
    unknown_threshold, unknown_label
        Cells whose confidence is below the threshold get ``unknown_label``.
    """
    pred = predict(neighbor_codes, kernel_weights(distances), n_classes=len(classes))
    found = pred.codes >= 0
    best = np.full(pred.codes.size, unknown_label, dtype=object)
    best[found] = np.asarray(classes, dtype=object)[pred.codes[found]]
    keep = found & (pred.confidence >= unknown_threshold)
    labels = np.where(keep, best, unknown_label).astype(object)
    return TransferResult(labels=labels, best=best, confidence=pred.confidence)


class KnnLabelTransfer:
    """Exact k-NN over reference embeddings held in memory, and their labels.

    Parameters
    ----------
    reference
        n_ref x d embedding.
    labels
        One label per reference cell.
    n_neighbors
        Neighbours per query cell (at most the reference's size).
    """

    def __init__(
        self, reference: npt.NDArray[np.floating], labels: npt.ArrayLike, *, n_neighbors: int = 15
    ) -> None:
        from sklearn.neighbors import NearestNeighbors

        y = np.asarray(labels).astype(str)
        classes, self._codes = np.unique(y, return_inverse=True)
        self.classes = classes.astype(object)
        self.n_neighbors = int(min(n_neighbors, y.size))
        self._nn: Any = NearestNeighbors(n_neighbors=self.n_neighbors).fit(
            np.asarray(reference, dtype=np.float32)
        )

    def kneighbors(
        self, query: npt.NDArray[np.floating]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """``(distances, reference rows)`` of each query cell's neighbours, nearest first."""
        return self._nn.kneighbors(np.asarray(query, dtype=np.float32))

    def predict(
        self,
        query: npt.NDArray[np.floating],
        *,
        unknown_threshold: float = 0.5,
        unknown_label: str = "unknown",
    ) -> TransferResult:
        """Most probable label with its probability; the unknown label under ``unknown_threshold``."""
        dist, rows = self.kneighbors(query)
        return transfer_from_neighbors(
            self._codes[rows],
            dist,
            self.classes,
            unknown_threshold=unknown_threshold,
            unknown_label=unknown_label,
        )
