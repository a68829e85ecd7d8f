"""Rows of an in-memory CSR matrix, for memory-mode training: the in-memory twin of the SOMA reader.

``train.mode: memory`` (with ``train.memory_loader: census-scvi``) holds the prepared h5ad's X as
one float32 CSR and feeds scVI through the same data module design as stream mode
(:class:`~._datamodule.StreamDataset`: shuffled chunks, I/O batches, shuffled mini-batches).
:class:`CsrRowReader` is the reader it plugs in where stream mode plugs
:class:`~._soma_reader.IOBatchReader`. Its I/O batches cost nothing: each is the whole matrix,
not a gathered copy (gathering 16,384 rows of 8000 genes at 15% density into a CSR of their
own took ~80 ms, ~5 ms per 1024-cell mini-batch, for no gain once the rows are in memory).
What costs is writing a mini-batch dense, which :func:`dense_rows` does in one numba pass
(``nogil``) straight from the matrix's rows, in a background thread the next mini-batch while
the current one trains (:func:`~._read_ahead.built_ahead`).

Why not scvi-tools' ``AnnDataLoader``: it indexes the AnnData per mini-batch on the training
thread, ``X[rows].toarray()``. Until prepare wrote ``indptr`` as int32 (:mod:`..prepare._io`),
the h5ad held int64 ``indptr`` with int32 ``indices`` and scipy's CSR row indexing cast the
*whole* matrix's ``indices`` to int64 on every mini-batch (~5,100 cells/s at the census-like
shape for the loader alone). ``X[rows].toarray()`` of 1024 x 8000 at 15% density takes ~4.2 ms
on the training thread against ~2.6 ms for :func:`dense_rows`, off it; the numba kernels take
the index arrays in either dtype.
:func:`gather_rows` copies a few rows when a mini-batch straddles two of stream mode's I/O
batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

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
    """The in-memory matrix as a reader of :class:`~._datamodule.StreamDataset`.

    Each I/O batch is the whole matrix itself (``whole_matrix``): its rows are in memory
    already, so nothing is read or copied, and mini-batches are written dense straight from it.

    Parameters
    ----------
    x
        The cells x model genes matrix, float32 CSR (:func:`as_float32_csr`).
    """

    whole_matrix = True

    def __init__(self, x: sp.csr_matrix) -> None:
        self.x = x

    def prefetched(
        self, batches: Iterable[npt.NDArray[np.int64]]
    ) -> Iterator[tuple[npt.NDArray[np.int64], sp.csr_matrix]]:
        """``(rows, the whole matrix)`` per I/O batch."""
        for rows in batches:
            yield rows, self.x

    def close(self) -> None:
        """Nothing to release (the matrix belongs to the data module)."""
