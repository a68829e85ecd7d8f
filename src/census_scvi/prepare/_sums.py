"""An HVG pass's sums straight from the values TileDB returns, in one numba pass per chunk.

:func:`census_scvi.prepare._hvg.moment_sums` takes chunks of ``(batch, gene, value)`` arrays.
Making those from a read took six arrays per stored value (the cell-id offset, the row lookup,
the dropped cells' mask and its three compactions, the batch and gene lookups) and the sums
four more (the key, the float64 values, the clip values, two ``bincount`` outputs of the whole
accumulator). Each is fresh memory, faulted in page by page: at 250k default-shape cells
prepare spent more system than user CPU (perf: ~54% of its page faults in those numpy arrays,
the rest in TileDB's own buffers). Here one kernel looks each value's cell and gene up and adds
it to the sums in place, allocating only a lookup over the chunk's cell-id span.
Figures: docs/benchmarks.md, "Prepare's page faults".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numba
import numpy as np
import numpy.typing as npt

from census_scvi.soma import XValues

__all__ = ["value_sums"]

Sums = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _add_values(
    cell_ids: npt.NDArray[np.int64],
    gene_ids: npt.NDArray[np.int64],
    data: npt.NDArray[Any],
    ids: npt.NDArray[np.int64],
    dense: bool,
    cell_batch: npt.NDArray[Any],
    gene_index: npt.NDArray[np.int64],
    clip: npt.NDArray[np.float64],
    n_genes: int,
    s1: npt.NDArray[np.float64],
    s2: npt.NDArray[np.float64],
) -> None:
    """``s1[b, g] += min(v, clip[b, g])``, ``s2[b, g] += that**2`` per stored value ``v``.

    ``b`` is the batch of the value's cell (skipped when not in ``ids``), ``g`` the index of its
    gene (skipped when ``gene_index`` has -1 or no entry). An empty ``clip`` clips nothing.
    """
    lo = ids[0]
    lut = np.full(ids[-1] - lo + 1 if dense else 0, -1, np.int64)
    if dense:
        for i in range(ids.shape[0]):
            lut[ids[i] - lo] = cell_batch[i]
    clipped = clip.shape[0] > 0
    for p in range(data.shape[0]):
        if dense:
            b = lut[cell_ids[p] - lo]
        else:
            i = np.searchsorted(ids, cell_ids[p])
            b = cell_batch[i] if i < ids.shape[0] and ids[i] == cell_ids[p] else -1
        gene = gene_ids[p]
        g = gene_index[gene] if gene < gene_index.shape[0] else -1
        if b < 0 or g < 0:
            continue
        key = b * n_genes + g
        v = np.float64(data[p])
        if clipped:
            limit = clip[key]
            if limit < v or limit != limit:  # np.minimum's: a NaN limit gives NaN
                v = limit
        s1[key] += v
        s2[key] += v * v


def value_sums(
    chunks: Iterable[XValues],
    cell_batch: npt.NDArray[np.integer],
    gene_index: npt.NDArray[np.int64],
    n_batches: int,
    n_genes: int,
    clip_val: npt.NDArray[np.float64] | None,
) -> Sums:
    """Per batch and gene: sum and sum of squares of the (clipped) values of ``chunks``.

    Parameters
    ----------
    chunks
        Reads of the selected cells (:func:`census_scvi.soma.iter_x_values`); a chunk's
        ``row_start`` indexes ``cell_batch``.
    cell_batch
        HVG batch code of every selected cell.
    gene_index
        Gene index (``0..n_genes-1``) by var soma_joinid; -1 for genes left out.
    n_batches, n_genes
        The sums' shape.
    clip_val
        ``(n_batches, n_genes)`` clip values (HVG pass 2), or None.
    """
    s1 = np.zeros(n_batches * n_genes, dtype=np.float64)
    s2 = np.zeros(n_batches * n_genes, dtype=np.float64)
    clip = np.zeros(0) if clip_val is None else np.ascontiguousarray(clip_val, np.float64).ravel()
    codes = np.asarray(cell_batch)
    for c in chunks:
        if c.data.shape[0] == 0:
            continue
        batch = codes[c.row_start : c.row_start + c.n_rows]
        _add_values(
            c.cell_ids, c.gene_ids, c.data, c.ids, c.dense, batch, gene_index, clip,
            n_genes, s1, s2,
        )  # fmt: skip
    return s1.reshape(n_batches, n_genes), s2.reshape(n_batches, n_genes)
