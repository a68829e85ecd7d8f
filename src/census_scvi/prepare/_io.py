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

__all__ = ["write_csr_h5ad"]

logger = logging.getLogger(__name__)


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
    so it may exceed 2**31 values). ``anndata.read_h5ad`` reads the result.

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
    return nnz
