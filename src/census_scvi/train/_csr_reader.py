"""Rows of an in-memory CSR matrix, for memory-mode training: the in-memory twin of the SOMA reader.

``train.mode: memory`` (with ``train.memory_loader: census-scvi``) holds the prepared h5ad's X as
one float32 CSR and feeds scVI through the same data module design as stream mode
(:class:`~._datamodule.StreamDataset`: shuffled chunks, I/O batches, read-ahead thread, shuffled
mini-batches). :class:`CsrRowReader` is the reader it plugs in where stream mode plugs
:class:`~._soma_reader.IOBatchReader`: ``read(rows)`` gathers the (sorted) rows of one I/O batch
into a CSR of their own with a numba kernel (``nogil``, so the read-ahead thread runs beside
torch), and :func:`dense_rows` writes chosen rows of a CSR into a dense mini-batch in one pass.

Why not scvi-tools' ``AnnDataLoader``: it indexes the AnnData per mini-batch on the training
thread (AnnData view, CSR fancy index, ``toarray``), ~5,100 cells/s at the census-like shape
(8000 genes, batch 1024; ``benchmarks/bench_train.py --loaders-only``), below what scVI trains at.
Here the per-mini-batch work is :func:`dense_rows` (1024 x 8000 at 15% density: ~3.5 ms, against
~6.5 ms for scipy's ``x[rows].toarray()``, same values).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from census_scvi.train._read_ahead import prefetched

__all__ = ["CsrRowReader", "as_float32_csr", "dense_rows", "gather_rows"]


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _copy_rows(
    indptr: npt.NDArray[Any],
    indices: npt.NDArray[Any],
    data: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    out_indptr: npt.NDArray[np.int64],
    out_indices: npt.NDArray[np.int32],
    out_data: npt.NDArray[np.float32],
) -> None:
    for i in range(rows.shape[0]):
        src = indptr[rows[i]]
        dst = out_indptr[i]
        for k in range(out_indptr[i + 1] - dst):
            out_indices[dst + k] = indices[src + k]
            out_data[dst + k] = data[src + k]


def gather_rows(x: sp.csr_matrix, rows: npt.NDArray[np.int64]) -> sp.csr_matrix:
    """``x[rows]`` as a new float32 CSR (rows in the order given), without the GIL held."""
    indptr = x.indptr
    lengths = indptr[rows + 1] - indptr[rows]
    out_indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=out_indptr[1:])
    nnz = int(out_indptr[-1])
    out_indices = np.empty(nnz, np.int32)
    out_data = np.empty(nnz, np.float32)
    _copy_rows(indptr, x.indices, x.data, rows, out_indptr, out_indices, out_data)
    return sp.csr_matrix((out_data, out_indices, out_indptr), shape=(len(rows), x.shape[1]))


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _scatter_dense(
    indptr: npt.NDArray[Any],
    indices: npt.NDArray[Any],
    data: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int64],
    out: npt.NDArray[np.float32],
    start: int,
) -> None:
    for i in range(rows.shape[0]):
        r = rows[i]
        for k in range(indptr[r], indptr[r + 1]):
            out[start + i, indices[k]] = data[k]


def dense_rows(
    parts: list[tuple[sp.csr_matrix, npt.NDArray[np.int64]]], n_cols: int
) -> npt.NDArray[np.float32]:
    """Dense float32 ``vstack([x[rows] for x, rows in parts])``; CSR without duplicate entries."""
    n = sum(len(rows) for _, rows in parts)
    out = np.zeros((n, n_cols), np.float32)
    start = 0
    for x, rows in parts:
        _scatter_dense(x.indptr, x.indices, x.data, rows.astype(np.int64, copy=False), out, start)
        start += len(rows)
    return out


def as_float32_csr(x: Any) -> sp.csr_matrix:
    """``x`` as a float32 ``csr_matrix`` without duplicate entries, sharing its arrays if it can.

    The prepared h5ad's X already is one (float32 values, no duplicates): nothing is copied, so
    the AnnData the model is set up on and the data module hold the same arrays (unsorted
    column indices are sorted in place: the same matrix). Other input is converted (the kernels
    here write values, they do not add duplicates up).
    """
    x = sp.csr_matrix(x)  # CSC / COO / csr_array / dense -> csr_matrix; shared if one already
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if not x.has_canonical_format:
        x.sum_duplicates()
    return x


class CsrRowReader:
    """Reads rows of an in-memory CSR matrix, one I/O batch at a time, like ``IOBatchReader``.

    Parameters
    ----------
    x
        The cells x model genes matrix, float32 CSR (:func:`as_float32_csr`).
    """

    def __init__(self, x: sp.csr_matrix) -> None:
        self.x = x

    def read(self, rows: npt.NDArray[np.int64]) -> sp.csr_matrix:
        """``x[rows]`` as float32 CSR, rows in the order given (sorted reads faster)."""
        return gather_rows(self.x, rows)

    def prefetched(
        self, batches: Iterable[npt.NDArray[np.int64]]
    ) -> Iterator[tuple[npt.NDArray[np.int64], sp.csr_matrix]]:
        """``(rows, X)`` per I/O batch, gathering the next batch in a thread meanwhile."""
        return prefetched(self.read, batches)

    def close(self) -> None:
        """Nothing to release (the matrix belongs to the data module)."""
