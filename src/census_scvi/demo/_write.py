"""Writing one organism of the mini census through the shared SOMA writer.

X is generated and written block by block (two blocks sampled in flight on a thread pool, results
taken in order), counting the computed obs/var columns and the presence matrix on the way; obs and
var follow once every count is known. Memory is bounded by the block and write-buffer sizes, not
by the cell count (obs metadata, a few arrays per cell, is held in memory).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from census_scvi.constants import CENSUS_DATA, MEASUREMENT
from census_scvi.demo._model import BLOCK_CELLS, Design, block_counts
from census_scvi.demo._tables import CellStats, obs_frame, var_frame
from census_scvi.progress import track
from census_scvi.soma._schema import OBS_COLUMNS, VAR_COLUMNS
from census_scvi.soma._writer import (
    CountsWriter,
    create_dataframe,
    create_experiment,
    schema_table,
    write_presence_matrix,
)

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["write_organism"]

_Block = tuple[int, int, "npt.NDArray[np.intp]", "npt.NDArray[np.intp]", "npt.NDArray[np.float32]"]


def write_organism(
    root: Path, d: Design, seed: int, *, ds_offset: int, n_datasets: int
) -> CellStats:
    """Write ``census_data/<organism>`` (X, obs, var, presence matrix); returns the counted stats.

    Presence-matrix rows are census_info/datasets soma_joinids: this organism's datasets start at
    row ``ds_offset`` of the ``n_datasets`` shared by every organism.
    """
    exp_uri = create_experiment(f"{root}/{CENSUS_DATA}", d.organism)
    ms_uri = f"{exp_uri}/ms/{MEASUREMENT}"
    stats = CellStats.zeros(d)
    obs_dataset = d.obs_dataset
    with CountsWriter(ms_uri, (d.n_cells, d.n_genes)) as x:
        for block in _blocks(d, seed):
            _count(stats, obs_dataset, block)
            start, _, r, c, v = block
            x.append(r.astype(np.int64) + start, c, v)
    create_dataframe(exp_uri, "obs", schema_table(obs_frame(d, stats), OBS_COLUMNS), root=root)
    create_dataframe(
        ms_uri, "var", schema_table(var_frame(d, stats.var_nnz), VAR_COLUMNS), root=root
    )
    pr, pc = np.nonzero(stats.presence)
    write_presence_matrix(
        ms_uri,
        root,
        shape=(n_datasets, d.n_genes),
        rows=(pr + ds_offset).astype(np.int64),
        cols=pc.astype(np.int64),
        values=np.ones(len(pr), dtype=bool),
    )
    return stats


def _block(d: Design, start: int, seed: int) -> _Block:
    stop = min(start + BLOCK_CELLS, d.n_cells)
    counts = block_counts(d, start, stop, seed)
    r, c = np.nonzero(counts)  # row-major, as CountsWriter needs
    return start, stop, r, c, counts[r, c]


def _blocks(d: Design, seed: int) -> Iterator[_Block]:
    """Every block's non-zeros, in block order, with a progress bar.

    numpy's samplers release the GIL: two blocks in flight use both cores; results are taken in
    order, so the output does not depend on the thread timing.
    """
    starts = range(0, d.n_cells, BLOCK_CELLS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[Future[_Block]] = deque()
        it = iter(starts)
        for _ in track(starts, description=f"{d.organism} X", total=len(starts)):
            while len(pending) < 3 and (nxt := next(it, None)) is not None:
                pending.append(pool.submit(_block, d, nxt, seed))
            yield pending.popleft().result()


def _count(stats: CellStats, obs_dataset: npt.NDArray[np.intp], block: _Block) -> None:
    """Add one block's non-zeros to the per-cell and per-gene counts and the presence matrix."""
    start, stop, r, c, v = block
    n = stop - start
    stats.nnz[start:stop] = np.bincount(r, minlength=n)
    stats.raw_sum[start:stop] = np.bincount(r, weights=v, minlength=n)
    stats.sq_sum[start:stop] = np.bincount(r, weights=v.astype(np.float64) ** 2, minlength=n)
    stats.var_nnz += np.bincount(c, minlength=len(stats.var_nnz))
    stats.presence[obs_dataset[start:stop][r], c] = True
