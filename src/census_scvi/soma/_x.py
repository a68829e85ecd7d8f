"""Chunked reads of a SOMA ``X`` layer for selected cells, and the TileDB read settings.

Memory is bounded by the chunk size: cells are grouped so that each chunk holds about
``chunk_nnz`` stored values (from the obs ``nnz`` column when present), read with a TileDB
context whose buffers are capped, and the next chunk is prefetched on one thread while the
current one is processed (at most two chunks in memory). Cell ids are mapped to rows with a plain
array lookup over the chunk's id span (no hash index over all cells).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import tiledbsoma as soma

__all__ = [
    "XChunk",
    "XValues",
    "iter_x_chunks",
    "iter_x_values",
    "plan_chunks",
    "tiledb_read_config",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def tiledb_read_config(buffer_bytes: int) -> dict[str, Any]:
    """TileDB settings that cap read buffers (the default 1 GiB buffers dominate peak memory)."""
    return {
        "soma.init_buffer_bytes": int(buffer_bytes),
        "sm.mem.total_budget": int(max(buffer_bytes * 4, 256 * 1024**2)),
        "sm.memory_budget": int(buffer_bytes),
        "sm.memory_budget_var": int(buffer_bytes),
    }


def plan_chunks(
    nnz_per_cell: npt.NDArray[np.integer] | None,
    n_cells: int,
    *,
    chunk_nnz: int,
    mean_nnz: float,
    max_cells: int = 1 << 17,
) -> list[slice]:
    """Split ``n_cells`` selected cells (in order) into slices of about ``chunk_nnz`` values.

    Parameters
    ----------
    nnz_per_cell
        Stored values per cell (obs ``nnz``), or None to assume ``mean_nnz`` for every cell.
    n_cells
        Number of selected cells.
    chunk_nnz
        Target stored values per chunk.
    mean_nnz
        Fallback values per cell.
    max_cells
        Upper bound on cells per chunk.
    """
    if n_cells == 0:
        return []
    if nnz_per_cell is None:
        per = max(1, min(max_cells, int(chunk_nnz // max(mean_nnz, 1.0))))
        return [slice(s, min(s + per, n_cells)) for s in range(0, n_cells, per)]
    csum = np.cumsum(np.asarray(nnz_per_cell, dtype=np.int64))
    out = []
    start = 0
    while start < n_cells:
        base = csum[start - 1] if start else 0
        stop = int(np.searchsorted(csum, base + chunk_nnz, side="right"))
        stop = min(max(stop, start + 1), start + max_cells, n_cells)
        out.append(slice(start, stop))
        start = stop
    return out


@dataclass
class XChunk:
    """Stored values of one chunk of selected cells.

    ``rows`` index the full selection (0..n_selected-1), ``cols`` are var soma_joinids.
    """

    index: int
    rows: npt.NDArray[np.int64]
    cols: npt.NDArray[np.int64]
    data: npt.NDArray[np.float32]
    n_rows: int
    row_start: int


def _row_lookup(
    dim0: npt.NDArray[np.int64], ids: npt.NDArray[np.int64], row_start: int, *, dense: bool
) -> npt.NDArray[np.int64]:
    """Row (in the whole selection) of each value's cell id; -1 for cells not selected."""
    lo = int(ids[0])
    if dense:
        lut = np.full(int(ids[-1]) - lo + 1, -1, dtype=np.int64)
        lut[ids - lo] = np.arange(row_start, row_start + len(ids), dtype=np.int64)
        return lut[dim0 - lo]
    pos = np.searchsorted(ids, dim0)
    return pos.astype(np.int64) + row_start


@dataclass
class XValues:
    """One chunk's stored values as TileDB returns them: no lookup, no copy where one table.

    ``cell_ids`` / ``gene_ids`` are soma_joinids. A chunk read as an id range (``dense``) also
    holds values of cells between the selected ones (``ids``), which the caller skips.
    """

    index: int
    cell_ids: npt.NDArray[np.int64]
    gene_ids: npt.NDArray[np.int64]
    data: npt.NDArray[Any]
    ids: npt.NDArray[np.int64]
    row_start: int
    dense: bool

    @property
    def n_rows(self) -> int:
        """Selected cells in the chunk."""
        return len(self.ids)


def _read_values(
    X: soma.SparseNDArray, ids: npt.NDArray[np.int64], index: int, row_start: int
) -> XValues:
    import pyarrow as pa

    # TileDB reads a range of cell ids about twice as fast as a list of points, so when the
    # selected cells fill at least a quarter of their id range we read the range and drop the
    # others later. Likewise every gene is read and the wanted ones kept with a mask: a list of
    # thousands of gene points reads several times slower than all genes.
    span = int(ids[-1]) - int(ids[0]) + 1
    dense = len(ids) * 4 >= span
    obs_coords: Any = slice(int(ids[0]), int(ids[-1])) if dense else pa.array(ids)
    tables = list(X.read(coords=(obs_coords,)).tables())
    if not tables:
        empty = np.zeros(0, dtype=np.int64)
        return XValues(index, empty, empty, np.zeros(0, np.float32), ids, row_start, dense)

    # concatenated by numpy, not pa.concat_tables + to_numpy: pyarrow's pool (mimalloc) spent
    # ~7 s of system CPU per 16k-cell read there (census_scvi._allocators). One table (the usual
    # case: 128 MiB read buffers per column) is used as it is, without a copy: copying every
    # chunk's 20 bytes per value into fresh pages cost prepare ~15 s of its 116 s at 1M
    # default-shape cells (docs/benchmarks.md, "No regression?").
    def column(name: str) -> npt.NDArray[Any]:
        if len(tables) == 1:
            return tables[0].column(name).to_numpy()
        return np.concatenate([t.column(name).to_numpy() for t in tables])

    cells, genes, data = column("soma_dim_0"), column("soma_dim_1"), column("soma_data")
    return XValues(index, cells, genes, data, ids, row_start, dense)


def _to_chunk(values: XValues, var_mask: npt.NDArray[np.bool_] | None) -> XChunk:
    """Rows in the whole selection, unselected cells and genes dropped."""
    ids, row_start = values.ids, values.row_start
    span = int(ids[-1]) - int(ids[0]) + 1
    rows = _row_lookup(values.cell_ids, ids, row_start, dense=values.dense)
    cols, data = values.gene_ids, values.data.astype(np.float32, copy=False)
    keep = None
    if values.dense and span != len(ids):
        keep = rows >= 0
    if var_mask is not None:
        in_var = var_mask[np.minimum(cols, len(var_mask) - 1)]
        keep = in_var if keep is None else keep & in_var
    if keep is not None:
        rows, cols, data = rows[keep], cols[keep], data[keep]
    return XChunk(values.index, rows, cols, data, len(ids), row_start)


def _ahead(read: Callable[[int], T], n: int, prefetch: bool) -> Iterator[T]:
    """``read(i)`` for ``i`` in ``range(n)``, the next one read on a thread meanwhile."""
    if not prefetch or n < 2:
        for i in range(n):
            yield read(i)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="census-scvi-read") as pool:
        future = pool.submit(read, 0)
        for i in range(n):
            item = future.result()
            if i + 1 < n:
                future = pool.submit(read, i + 1)
            yield item
            del item


def iter_x_values(
    X: soma.SparseNDArray,
    obs_joinids: npt.NDArray[np.int64],
    chunks: Sequence[slice],
    *,
    prefetch: bool = True,
) -> Iterator[XValues]:
    """The stored values of the selected cells chunk by chunk, as read (:class:`XValues`).

    For consumers that look cells and genes up themselves in one pass (prepare's HVG sums):
    no per-value arrays are made here. Arguments as :func:`iter_x_chunks`.
    """

    def read(i: int) -> XValues:
        sl = chunks[i]
        return _read_values(X, obs_joinids[sl], i, int(sl.start))

    yield from _ahead(read, len(chunks), prefetch)


def iter_x_chunks(
    X: soma.SparseNDArray,
    obs_joinids: npt.NDArray[np.int64],
    chunks: Sequence[slice],
    *,
    var_joinids: npt.NDArray[np.int64] | None = None,
    prefetch: bool = True,
) -> Iterator[XChunk]:
    """Read the stored values of the selected cells, chunk by chunk, in selection order.

    Parameters
    ----------
    X
        The SOMA sparse X layer (e.g. ``ms["RNA"].X["raw"]``).
    obs_joinids
        Selected cell ids, ascending.
    chunks
        Slices of ``obs_joinids`` (from :func:`plan_chunks`).
    var_joinids
        Genes to read (ascending); None reads every gene.
    prefetch
        Read the next chunk on a background thread while the caller works on this one.
    """
    var_mask = None
    if var_joinids is not None:
        # one slot past the largest wanted id stays False and catches every larger id
        var_mask = np.zeros(int(np.max(var_joinids, initial=-1)) + 2, dtype=bool)
        var_mask[var_joinids] = True

    def read(i: int) -> XChunk:
        sl = chunks[i]
        return _to_chunk(_read_values(X, obs_joinids[sl], i, int(sl.start)), var_mask)

    yield from _ahead(read, len(chunks), prefetch)
