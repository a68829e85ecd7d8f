"""Seurat v3 HVG passes split across processes: per-shard partial sums, merged in order.

Each pass of :func:`census_scvi.prepare._hvg.seurat_v3_from_chunks` needs only, per HVG batch
and gene, the sum and the sum of squares of the (clipped) counts. Those are additive, so the
chunks of the selected cells are cut into ``processes`` contiguous groups, each process opens the
census itself and sums its group, and the parent adds the partial sums in group order. Pass 1
sums integer counts in float64, which is exact below 2**53, so its statistics equal the
single-process ones bit for bit; pass 2 sums clipped (non-integer) values, equal to within
float64 rounding (the HVG selection is the same). The same partial-sum function is what a
multi-machine prepare would run per shard.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import tiledbsoma as soma

    from census_scvi.config import Config

__all__ = ["ExperimentOpener", "parallel_pass_sums", "split_chunks"]

logger = logging.getLogger(__name__)

Sums = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


@dataclass(frozen=True)
class ExperimentOpener:
    """How a worker process opens the census experiment again (picklable)."""

    config: Config
    tiledb_config: dict[str, Any]

    @contextlib.contextmanager
    def __call__(self) -> Iterator[soma.Experiment]:
        from census_scvi.soma import get_experiment, open_census

        with open_census(self.config, tiledb_config=self.tiledb_config) as census:
            yield get_experiment(census, self.config.census.organism)


def split_chunks(chunks: Sequence[slice], parts: int) -> list[list[slice]]:
    """Contiguous groups of chunks, about equal in cells; empty groups dropped.

    Examples
    --------
    >>> [len(g) for g in split_chunks([slice(i, i + 1) for i in range(5)], 2)]
    [3, 2]
    """
    if not chunks:
        return []
    stops = np.array([c.stop for c in chunks])
    total = int(stops[-1]) - int(chunks[0].start)
    bounds = [int(np.searchsorted(stops, chunks[0].start + total * k / parts, side="left")) + 1
              for k in range(1, parts)]  # fmt: skip
    edges = [0, *sorted({min(b, len(chunks)) for b in bounds}), len(chunks)]
    return [list(chunks[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _group_sums(
    opener: ExperimentOpener,
    joinids: npt.NDArray[np.int64],
    batch: npt.NDArray[np.integer],
    var_lut: npt.NDArray[np.int64],
    chunks: list[slice],
    n_batches: int,
    n_genes: int,
    clip: npt.NDArray[np.float64] | None,
) -> Sums:
    """One worker: sums over its own group of chunks (rows relative to its joinid slice)."""
    from census_scvi._allocators import use_lean_allocators
    from census_scvi.prepare._genes import _x_layer
    from census_scvi.prepare._sums import value_sums
    from census_scvi.soma import iter_x_values

    use_lean_allocators()  # a spawned process starts with numpy's defaults
    with opener() as experiment:
        X = _x_layer(experiment)
        values = iter_x_values(X, joinids, chunks)
        return value_sums(values, batch, var_lut, n_batches, n_genes, clip)


def parallel_pass_sums(
    opener: ExperimentOpener,
    *,
    obs_joinids: npt.NDArray[np.int64],
    batch: npt.NDArray[np.integer],
    var_lut: npt.NDArray[np.int64],
    chunks: Sequence[slice],
    n_batches: int,
    n_genes: int,
    processes: int,
    clip: npt.NDArray[np.float64] | None,
    description: str,
) -> Sums:
    """Sums of one HVG pass, computed by ``processes`` spawned workers, merged in group order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    groups = split_chunks(chunks, processes)
    ctx = multiprocessing.get_context("spawn")  # TileDB's threads do not survive fork
    with ProcessPoolExecutor(len(groups), mp_context=ctx) as pool:
        futures = []
        for group in groups:
            a, b = group[0].start, group[-1].stop
            local = [slice(c.start - a, c.stop - a) for c in group]
            futures.append(
                pool.submit(
                    _group_sums,
                    opener,
                    obs_joinids[a:b],
                    batch[a:b],
                    var_lut,
                    local,
                    n_batches,
                    n_genes,
                    clip,
                )  # fmt: skip
            )
        s1 = np.zeros((n_batches, n_genes), dtype=np.float64)
        s2 = np.zeros((n_batches, n_genes), dtype=np.float64)
        for i, future in enumerate(futures):
            g1, g2 = future.result()
            s1 += g1
            s2 += g2
            logger.info("%s: %d of %d process groups done", description, i + 1, len(groups))
    return s1, s2
