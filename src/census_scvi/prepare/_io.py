"""A chunked CSR h5ad writer: X arrives in row blocks and is never held whole."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["write_cells", "write_csr_h5ad"]

#: Rows per row group of cells.parquet: the labels become strings one group at a time.
CELLS_ROW_GROUP = 1 << 20

logger = logging.getLogger(__name__)


def write_cells(
    path: Path,
    joinids: npt.NDArray[np.int64],
    codes: npt.NDArray[np.integer],
    labels: npt.NDArray[np.object_],
    *,
    columns: tuple[str, str],
    rows_per_group: int = CELLS_ROW_GROUP,
) -> None:
    """Write cells.parquet (``soma_joinid`` int64, the batch label as a string) in row groups.

    The label strings exist one row group at a time (``labels[codes]`` per group), never one
    string object per cell for all cells: that pandas frame was ~360 bytes per cell at the end of
    prepare (the 1M -> 2M growth of its peak RSS).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(columns[0], pa.int64()), (columns[1], pa.string())])
    names = np.asarray(labels, dtype=object)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, max(len(joinids), 1), rows_per_group):
            sl = slice(start, start + rows_per_group)
            group = pa.table(
                [pa.array(joinids[sl], pa.int64()), pa.array(names[codes[sl]], pa.string())],
                schema=schema,
            )
            writer.write_table(group)


def write_csr_h5ad(
    path: Path,
    obs: pd.DataFrame,
    var: pd.DataFrame,
    blocks: Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]]],
    *,
    compression: str | None = "gzip",
    compression_opts: int | None = None,
) -> int:
    """Write an h5ad whose X (float32 CSR) arrives in row blocks; never holds all of X.

    anndata writes obs, var and the empty slots; X is a resizable CSR group in anndata's
    on-disk format (``encoding-type: csr_matrix``), appended block by block (int64 ``indptr``,
    so it may exceed 2**31 values; rewritten as int32 at the end when the values fit).
    ``anndata.read_h5ad`` reads the result.

    Parameters
    ----------
    path
        Output file (the caller makes it atomic).
    obs, var
        Cell and gene tables (their lengths give the shape).
    blocks
        ``(indptr, indices, data)`` of consecutive row blocks (each ``indptr`` starts at 0).
    compression, compression_opts
        h5py compression of the X datasets (``"gzip"``, ``"lzf"`` or None).

    Returns
    -------
    The number of stored values written.

    Raises
    ------
    CensusScviError
        When the disk has no room for the next block ("need about N GiB free in DIR").
    """
    import anndata as ad
    import h5py

    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    n_obs, n_vars = len(obs), len(var)
    kw: dict[str, Any] = {"maxshape": (None,), "chunks": (1 << 16,)}
    if compression:
        kw["compression"] = compression
        if compression_opts is not None:
            kw["compression_opts"] = compression_opts
        kw["shuffle"] = True
    nnz = 0
    rows = 0
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        d_data = g.create_dataset("data", shape=(0,), dtype=np.float32, **kw)
        d_ind = g.create_dataset("indices", shape=(0,), dtype=np.int32, **kw)
        d_ptr = g.create_dataset("indptr", shape=(1,), dtype=np.int64, **kw)
        d_ptr[0] = 0
        for indptr, indices, data in blocks:
            k = len(data)
            _check_room(path, rows, n_obs, raw_bytes=8 * (k + len(indptr)))
            d_data.resize((nnz + k,))
            d_data[nnz:] = data
            d_ind.resize((nnz + k,))
            d_ind[nnz:] = indices
            m = len(indptr) - 1
            d_ptr.resize((rows + m + 1,))
            d_ptr[rows + 1 :] = np.asarray(indptr[1:], dtype=np.int64) + nnz
            nnz += k
            rows += m
        if rows != n_obs:
            msg = f"internal error: wrote {rows} rows of X for {n_obs} cells"
            raise AssertionError(msg)
        g.attrs["shape"] = (n_obs, n_vars)
        if nnz < _INT32_LIMIT:
            _narrow_indptr(g, kw)
    return nnz


#: Stored values below which scipy keeps a CSR's index arrays int32.
_INT32_LIMIT = 2**31


def _narrow_indptr(g: Any, kw: dict[str, Any]) -> None:
    """Rewrite ``indptr`` as int32, the dtype of ``indices``.

    scipy casts both index arrays to the wider dtype on every fancy row index
    (``_major_index_fancy``), so int64 ``indptr`` with int32 ``indices`` copied all of
    ``indices`` to int64 for each mini-batch of scvi-tools' ``AnnDataLoader``: 49.5M values
    (396 MB of fresh pages) a step, 46% of its CPU in a perf profile at 52k cells x 8000 genes
    (docs/benchmarks.md, "A fair baseline"). Small: one value per cell.
    """
    ptr = g["indptr"][:]
    del g["indptr"]
    g.create_dataset("indptr", data=ptr.astype(np.int32), **kw)


#: Free space kept beyond the next block's raw bytes (HDF5's metadata, the file system's).
_MARGIN_BYTES = 16 * 2**20


def _check_room(path: Path, rows: int, n_obs: int, *, raw_bytes: int) -> None:
    """Stop with one line before a block that might not fit on the disk.

    HDF5 must never meet a full disk: its failed write leaves the file's objects unclosable,
    and the process then crashed at exit (SIGSEGV, exit 139, seen on a 10 MiB tmpfs). A
    block's raw bytes bound what compression writes, so a full disk is found one block early;
    the need is extrapolated from the bytes per cell written so far.
    """
    import shutil

    from census_scvi.errors import disk_full

    free = shutil.disk_usage(path.parent).free
    if free >= raw_bytes + _MARGIN_BYTES:
        return
    written = path.stat().st_size
    need = int(written / rows * (n_obs - rows)) if rows else raw_bytes
    raise disk_full(path.parent, need + _MARGIN_BYTES, free, about=True)
