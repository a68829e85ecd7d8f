"""One writer's share of the mini census: a contiguous range of blocks of one organism.

Each block is generated (:mod:`census_scvi.demo._model`, :mod:`census_scvi.demo._sample`), its X
non-zeros submitted to the writer's one X fragment (:class:`CountsWriter`, already in global
order) and its obs rows buffered and written every :data:`_OBS_BLOCKS` blocks; the per-gene and
per-dataset counts are summed for var, the presence matrix and census_info. Memory is bounded by
one block plus the obs buffer, whatever the cell count. Several writers (processes) run at once on
disjoint ranges of the same arrays (:mod:`census_scvi.demo._parallel`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Generator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from census_scvi.demo._model import BLOCK_CELLS, SHAPES, Design, block_cells, block_rng, design
from census_scvi.demo._sample import block_counts
from census_scvi.demo._tables import BlockStats, OrganismCounts, obs_block, obs_categories
from census_scvi.soma._schema import OBS_COLUMNS
from census_scvi.soma._writer import CountsWriter, schema_table

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Task", "TaskResult", "organism_design", "run_task", "split_blocks"]

_OBS_BLOCKS = 16  # blocks of obs rows per obs write (one fragment each, consolidated at the end)


@dataclass(frozen=True)
class Task:
    """Blocks ``[first, stop)`` of one organism, into the arrays at ``x_uri`` and ``obs_uri``."""

    organism: str
    n_cells: int
    n_genes: int
    seed: int
    shape: str
    first: int
    stop: int
    x_uri: str
    obs_uri: str

    @property
    def n_cells_here(self) -> int:
        return min(self.stop * BLOCK_CELLS, self.n_cells) - self.first * BLOCK_CELLS


@dataclass
class TaskResult:
    """What one task counted, and what it cost."""

    counts: OrganismCounts
    seconds: float
    peak_rss_bytes: int


@lru_cache(maxsize=2)
def organism_design(organism: str, n_cells: int, n_genes: int, seed: int, shape: str) -> Design:
    """The design (a function of these arguments only: every writer draws the same one)."""
    return design(organism, n_cells, n_genes, seed, SHAPES[shape])


def split_blocks(n_blocks: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, near-equal block ranges covering ``[0, n_blocks)`` (none empty)."""
    parts = max(1, min(parts, n_blocks))
    edges = [round(i * n_blocks / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def run_task(task: Task) -> Generator[int, None, TaskResult]:
    """Write the task's blocks; yields the cells of each block written, returns the counts."""
    t0 = time.perf_counter()
    d = organism_design(task.organism, task.n_cells, task.n_genes, task.seed, task.shape)
    cats = obs_categories(d)
    counts = OrganismCounts.zeros(d)
    with CountsWriter(task.x_uri, checked=False) as x, _ObsWriter(task.obs_uri) as obs:
        for b in range(task.first, task.stop):
            cells = block_cells(d, b, task.seed)
            bx = block_counts(d, cells, block_rng(d, b, task.seed, 1))
            stats = BlockStats.of(bx, cells)
            counts.count(d, cells, bx, stats)
            x.append_ordered(bx.rows, bx.cols, bx.values)
            obs.append(
                schema_table(
                    obs_block(d, cells, stats, cats), OBS_COLUMNS, first_joinid=cells.start
                )
            )
            n_cells = cells.n
            del cells, bx, stats  # not held while the caller has the generator suspended
            yield n_cells
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return TaskResult(counts, time.perf_counter() - t0, peak)


class _ObsWriter:
    """obs rows of consecutive blocks, written :data:`_OBS_BLOCKS` blocks at a time."""

    def __init__(self, uri: str) -> None:
        import tiledbsoma as soma

        self._frame: Any = soma.DataFrame.open(uri, "w")
        self._tables: list[pa.Table] = []

    def append(self, table: pa.Table) -> None:
        self._tables.append(table)
        if len(self._tables) >= _OBS_BLOCKS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self._tables:
            self._frame.write(pa.concat_tables(self._tables))
            self._tables.clear()

    def __enter__(self) -> _ObsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self._frame.close()
