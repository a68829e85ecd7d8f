"""Read ``X[cells, genes]`` from a SOMA sparse array into CSR, fast, for stream-mode training.

Written by hand because the libraries' readers were measured too slow to keep up with scVI on a
CPU (``docs/benchmarks.md``, train section; same 43k-cell x 2000-HVG census, 2 cores):

* tiledbsoma-ml 0.1 ``ExperimentDataset`` asks TileDB for the HVG columns as 2000 point ranges,
  which made TileDB's read ~2x slower than reading every gene of the same cells (9.6k vs 18k
  cells per CPU-second at 64-cell shuffle chunks), and turns each result into CSR with several
  numpy passes (column gather, masks, ``searchsorted``, COO -> CSR with duplicate summing).
* Here one read per I/O batch takes all genes of the cells; numba kernels drop the non-model
  genes, map joinids to rows (one binary search per cell) and build CSR by a counting sort,
  without the GIL, in a background thread (:mod:`._read_ahead`) that reads the next I/O batch
  while the current one trains. Memory per I/O batch: the CSR (8 bytes per kept value) plus,
  while reading, the kept values as COO (12 bytes) and one TileDB result table
  (``READ_BUFFER_BYTES`` per column).

``IOBatchReader.read`` returns a ``scipy.sparse.csr_matrix`` whose rows follow the (sorted) cell
joinids asked for and whose columns follow ``var_joinids``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numba
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from census_scvi.train._read_ahead import prefetched, release_free_memory

__all__ = ["IOBatchReader", "coo_to_csr", "filter_coo", "release_free_memory"]

logger = logging.getLogger(__name__)

# TileDB result buffers per column: a read returns tables of at most ~this/8 values, so the raw
# (all genes) side of an I/O batch stays bounded whatever io_batch_size is
READ_BUFFER_BYTES = 32 * 1024**2


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def filter_coo(
    dim0: npt.NDArray[np.int64],
    dim1: npt.NDArray[np.int64],
    data: npt.NDArray[Any],
    row_joinids: npt.NDArray[np.int64],
    col_of_var: npt.NDArray[np.int32],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Keep values of the asked cells in model genes, as (row, column) positions.

    ``row_joinids`` is sorted; ``col_of_var[var_joinid]`` is the model column or -1.
    """
    n = dim0.shape[0]
    # pass 1 marks the kept values (row position, or -1), pass 2 fills exactly-sized outputs:
    # no table-sized temporaries beyond the int32 marks
    mark = np.empty(n, np.int32)
    k = 0
    prev = -1
    row = -1
    for i in range(n):
        mark[i] = -1
        v = dim1[i]
        if v >= col_of_var.shape[0] or col_of_var[v] < 0:
            continue
        j = dim0[i]
        if j != prev:  # values arrive grouped by cell: one binary search per cell
            row = np.searchsorted(row_joinids, j)
            if row >= row_joinids.shape[0] or row_joinids[row] != j:
                row = -1  # a cell not asked for
            prev = j
        if row >= 0:
            mark[i] = row
            k += 1
    rows = np.empty(k, np.int32)
    cols = np.empty(k, np.int32)
    vals = np.empty(k, np.float32)
    k = 0
    for i in range(n):
        if mark[i] >= 0:
            rows[k] = mark[i]
            cols[k] = col_of_var[dim1[i]]
            vals[k] = data[i]
            k += 1
    return rows, cols, vals


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def scatter_rows(
    rows: npt.NDArray[np.int32],
    cols: npt.NDArray[np.int32],
    vals: npt.NDArray[np.float32],
    fill: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    values: npt.NDArray[np.float32],
) -> None:
    """Place COO values into preallocated CSR arrays; ``fill[r]`` is row r's next free slot."""
    for i in range(rows.shape[0]):
        r = rows[i]
        indices[fill[r]] = cols[i]
        values[fill[r]] = vals[i]
        fill[r] += 1


def coo_to_csr(
    parts: list[tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]]],
    n_rows: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """CSR ``(indptr, indices, values)`` from COO pieces, emptying ``parts`` as it goes.

    A counting sort straight from the pieces (SOMA has no duplicate coordinates, so nothing is
    summed): no concatenated copy of the COO, and each piece is freed once placed.
    """
    indptr = np.zeros(n_rows + 1, np.int64)
    for rows, _, _ in parts:
        indptr[1:] += np.bincount(rows, minlength=n_rows)
    np.cumsum(indptr, out=indptr)
    indices = np.empty(int(indptr[-1]), np.int32)
    values = np.empty(int(indptr[-1]), np.float32)
    fill = indptr[:-1].copy()
    while parts:
        rows, cols, vals = parts.pop(0)
        scatter_rows(rows, cols, vals, fill, indices, values)
    return indptr, indices, values


class IOBatchReader:
    """Reads cells x model genes of one SOMA ``X`` layer as CSR, one I/O batch at a time.

    Parameters
    ----------
    x_locator
        A ``tiledbsoma_ml.x_locator.XLocator`` (URI, measurement, layer, timestamp, TileDB
        config): picklable, so each DataLoader worker opens its own handle.
    var_joinids
        ``soma_joinid`` of the model genes, in model column order.
    """

    # each I/O batch is a CSR of its own cells (RowReader protocol of ._datamodule)
    whole_matrix = False

    def __init__(self, x_locator: Any, var_joinids: npt.NDArray[np.int64]) -> None:
        import tiledbsoma as soma

        from census_scvi.soma import tiledb_read_config

        self.var_joinids = np.asarray(var_joinids, dtype=np.int64)
        # the census context's settings (S3 region, ...) plus read buffers and TileDB memory
        # budget capped as prepare caps them
        cfg = {**dict(x_locator.tiledb_config), **tiledb_read_config(READ_BUFFER_BYTES)}
        self._exp = soma.Experiment.open(
            x_locator.uri,
            tiledb_timestamp=x_locator.tiledb_timestamp_ms,
            context=soma.SOMATileDBContext(tiledb_config=cfg),
        )
        self._x: Any = self._exp.ms[x_locator.measurement_name].X[x_locator.layer_name]
        self.col_of_var = np.full(int(self.var_joinids.max(initial=-1)) + 1, -1, dtype=np.int32)
        self.col_of_var[self.var_joinids] = np.arange(len(self.var_joinids), dtype=np.int32)

    def read(self, joinids: npt.NDArray[np.int64]) -> sp.csr_matrix:
        """``X[joinids, var_joinids]`` as float32 CSR; ``joinids`` must be sorted and unique."""
        parts = []
        # every gene of the cells: a read by cell alone is much cheaper in TileDB than one
        # with thousands of gene point ranges; the kernel drops the other genes
        for tbl in self._x.read(coords=(joinids,)).tables():
            parts.append(
                filter_coo(
                    tbl["soma_dim_0"].to_numpy(),
                    tbl["soma_dim_1"].to_numpy(),
                    tbl["soma_data"].to_numpy(),
                    joinids,
                    self.col_of_var,
                )
            )
            del tbl
        indptr, indices, values = coo_to_csr(parts, len(joinids))
        return sp.csr_matrix((values, indices, indptr), shape=(len(joinids), len(self.var_joinids)))

    def prefetched(
        self, batches: Iterable[npt.NDArray[np.int64]]
    ) -> Iterator[tuple[npt.NDArray[np.int64], sp.csr_matrix]]:
        """``(joinids, X)`` per I/O batch, reading the next batch in a thread meanwhile."""
        return prefetched(self.read, batches)

    def close(self) -> None:
        self._exp.close()
