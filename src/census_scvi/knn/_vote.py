"""Predicted values from a cell's nearest neighbours: kernel-weighted (``map``'s), and a plain vote.

One implementation for ``map`` (label transfer, :mod:`census_scvi.knn._transfer`) and
``neighbors`` (obs predictions). Weights: a Gaussian kernel whose width is the cell's mean
neighbour distance, ``w_ij = exp(-d_ij^2 / (2 s_i^2))``, normalised to sum to 1, computed in the
distances' precision (float64 from scikit-learn's exact search, float32 from the index), so the
exact path gives the very figures ``map`` gave before this layer existed. The prediction is the
value of largest summed weight (sums in float64, compared in float32; ties: the smallest code,
i.e. the first of sorted classes, as an argmax), ``confidence`` its summed weight, and
``vote_share`` the plain fraction of the neighbours holding it: where the plurality value equals
the prediction (nearly always) it is the ``<col>_confidence`` that
``cellxgene_census.experimental.predict_obs_metadata`` reports.

Neighbours missing from a search (-1 codes, infinite distances) carry no weight and no vote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Prediction", "kernel_weights", "predict"]

_ROWS_PER_STEP = 1 << 17


@dataclass
class Prediction:
    """One predicted obs column for every query cell."""

    codes: npt.NDArray[np.int64]
    """Index into the classes of the predicted value; -1 for a cell without neighbours."""
    confidence: npt.NDArray[np.float32]
    """Summed kernel weight of the predicted value, in [0, 1]."""
    vote_share: npt.NDArray[np.float32]
    """Fraction of the cell's neighbours with the predicted value, in [0, 1]."""


def kernel_weights(distances: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """``map``'s neighbour weights (rows sum to 1; 0 for missing neighbours).

    float64 distances give float64 weights, anything else float32.
    """
    dist = np.asarray(distances)
    dtype = np.float64 if dist.dtype == np.float64 else np.float32
    dist = dist.astype(dtype, copy=False)
    valid = np.isfinite(dist)
    zero, one = dtype(0.0), dtype(1.0)
    d = np.where(valid, dist, zero)
    count = np.maximum(valid.sum(axis=1, keepdims=True), 1).astype(dtype)
    scale = d.sum(axis=1, keepdims=True) / count
    scale = np.where(scale > 0, scale, one)
    w = np.where(valid, np.exp(-(d**2) / (dtype(2.0) * scale**2)), zero)
    total = w.sum(axis=1, keepdims=True)
    return (w / np.where(total > 0, total, one)).astype(dtype, copy=False)


def predict(
    neighbor_codes: npt.NDArray[np.integer],
    weights: npt.NDArray[np.floating],
    *,
    n_classes: int,
) -> Prediction:
    """Predict from each cell's neighbours' class codes (n x k, -1 = missing) and weights."""
    n = neighbor_codes.shape[0]
    codes = np.full(n, -1, dtype=np.int64)
    conf = np.zeros(n, dtype=np.float32)
    share = np.zeros(n, dtype=np.float32)
    for start in range(0, n, _ROWS_PER_STEP):
        stop = min(start + _ROWS_PER_STEP, n)
        _predict_rows(
            np.asarray(neighbor_codes[start:stop], dtype=np.int64),
            np.asarray(weights[start:stop]),
            n_classes,
            codes[start:stop],
            conf[start:stop],
            share[start:stop],
        )
    return Prediction(codes=codes, confidence=conf, vote_share=share)


def _predict_rows(
    nc: npt.NDArray[np.int64],
    w: npt.NDArray[np.floating],
    n_classes: int,
    codes: npt.NDArray[np.int64],
    conf: npt.NDArray[np.float32],
    share: npt.NDArray[np.float32],
) -> None:
    """Fill ``codes``, ``conf``, ``share`` for one block of rows (per-row sums via one sort)."""
    m, k = nc.shape
    valid = nc >= 0
    rows = np.broadcast_to(np.arange(m)[:, None], (m, k))[valid]
    key = rows.astype(np.int64) * max(n_classes, 1) + nc[valid]
    uniq, inv = np.unique(key, return_inverse=True)
    # summed in float64 (in neighbour order) and compared in float32, as map always did
    wsum = np.bincount(inv, weights=w[valid].astype(np.float64)).astype(np.float32)
    votes = np.bincount(inv)
    urow, ucode = uniq // max(n_classes, 1), uniq % max(n_classes, 1)
    order = np.lexsort((ucode, -wsum, urow))  # per row: largest weight, then first class
    first = order[np.r_[True, urow[order][1:] != urow[order][:-1]]] if order.size else order
    n_valid = valid.sum(axis=1)
    codes[urow[first]] = ucode[first]
    conf[urow[first]] = np.clip(wsum[first], 0.0, 1.0)
    share[urow[first]] = votes[first] / n_valid[urow[first]]
