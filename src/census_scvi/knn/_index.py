"""Querying an index, exact k-NN as the oracle, recall, and the nprobe that reaches a recall.

Shared by ``census-scvi index`` (calibration), ``neighbors`` and ``map`` (:func:`search_index`).

Distances: the index stores squared Euclidean distances (TileDB-Vector-Search's default
``SUM_OF_SQUARES``); :func:`query_index` returns their square roots, the Euclidean distances
scikit-learn's ``NearestNeighbors`` gives ``map``, so the two weight neighbours alike.

Recall is counted by distance, not by id: an approximate neighbour counts when it is no farther
than the exact k-th neighbour, so cells with identical latents (ties) do not lower it. The
calibration queries are indexed cells; each one's own row is excluded from both lists (search
``k + 1``, drop the cell itself), so the figure is the recall a new cell would see.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from census_scvi.errors import CensusScviError
from census_scvi.knn._deps import vector_search
from census_scvi.knn._rows import iter_blocks, take_rows

__all__ = [
    "Calibration",
    "calibrate_nprobe",
    "exact_knn",
    "joinid_rows",
    "open_index",
    "query_index",
    "recall_at_k",
    "search_index",
]

logger = logging.getLogger(__name__)

_MISSING = np.iinfo(np.uint64).max  # the index's id for "fewer than k candidates probed"
#: nprobe values tried, smallest first, when calibrating (then every partition)
_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def open_index(uri: str, *, memory_gib: float | None = 4.0) -> Any:
    """Open an IVF_FLAT index; ``memory_gib`` bounds the partitions held at once (None: all).

    The bound is the Census's ``find_nearest_obs`` default (4 GiB): an index larger than it is
    read in rounds of partitions that fit, so querying a 100M-cell index needs no 20 GB of
    memory; a smaller one is loaded whole (faster queries).
    """
    vs = vector_search()
    if memory_gib is None:
        return vs.ivf_flat_index.IVFFlatIndex(uri=uri)
    # a budget opens only the centroids, enough to read the index's size
    head = vs.ivf_flat_index.IVFFlatIndex(uri=uri, memory_budget=1)
    budget = max(1, int(memory_gib * 2**30) // (4 * int(head.dimensions)))
    if int(head.size) <= budget:
        return vs.ivf_flat_index.IVFFlatIndex(uri=uri)
    return vs.ivf_flat_index.IVFFlatIndex(uri=uri, memory_budget=budget)


def query_index(
    index: Any,
    queries: npt.NDArray[np.floating],
    *,
    k: int,
    nprobe: int,
    chunk_size: int = 65_536,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The ``k`` nearest indexed cells of each query row.

    Returns
    -------
    ``(joinids, distances)``, both n x k, nearest first: int64 soma_joinids (-1 where the probed
    partitions held fewer than ``k`` cells) and float32 Euclidean distances (inf there).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.empty((q.shape[0], k), dtype=np.int64)
    dist = np.empty((q.shape[0], k), dtype=np.float32)
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        d2, found = index.query(q[start:stop], k=k, nprobe=int(nprobe))
        missing = found == _MISSING
        ids[start:stop] = np.where(missing, -1, found.astype(np.int64, copy=False))
        dist[start:stop] = np.where(missing, np.inf, np.sqrt(np.maximum(d2, 0.0)))
    return ids, dist


def joinid_rows(
    joinids: npt.NDArray[np.int64], found: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Rows of ``found`` soma_joinids (-1: none) in the embedding's ascending ``joinids``.

    Raises
    ------
    CensusScviError
        When ``joinids`` is not ascending or a found id is not among them (an index of another
        embedding).
    """
    if joinids.size > 1 and not bool((np.diff(joinids) > 0).all()):
        msg = "the embedding's soma_joinids (latent-idx.npy) are not strictly ascending"
        raise CensusScviError(msg, hint="re-run 'census-scvi embed --force'")
    valid = found >= 0
    rows = np.searchsorted(joinids, np.where(valid, found, 0))
    rows = np.minimum(rows, max(joinids.size - 1, 0))
    if joinids.size == 0 or not bool((joinids[rows] == found)[valid].all()):
        msg = "the index holds soma_joinids that are not in the run's embedding"
        raise CensusScviError(msg, hint="rebuild the index: 'census-scvi index --force'")
    return np.where(valid, rows, -1)


def search_index(
    path: str | Path,
    queries: npt.NDArray[np.floating],
    *,
    k: int,
    nprobe: int,
    memory_gib: float | None = 4.0,
    who: str = "search",
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Open the index at ``path`` and return each query's ``k`` nearest cells (:func:`query_index`).

    ``who`` names the command in the log lines (time taken; cells left with fewer than ``k``
    neighbours at this nprobe).

    Raises
    ------
    CensusScviError
        When the index's dimensions are not the queries', or ``k`` exceeds the indexed cells.
    """
    index = open_index(str(path), memory_gib=memory_gib)
    if int(index.dimensions) != queries.shape[1]:
        msg = (
            f"the index at {path} has {index.dimensions} dimensions, the latent {queries.shape[1]}"
        )
        raise CensusScviError(msg, hint="rebuild the index: 'census-scvi index --force'")
    if k > int(index.size):
        msg = f"k={k} neighbours is more than the {int(index.size):,} indexed cells"
        raise CensusScviError(msg, hint=f"ask for {int(index.size)} or fewer")
    t = time.perf_counter()
    ids, dist = query_index(index, queries, k=k, nprobe=nprobe)
    logger.info(
        "%s: searched the index for %d cells in %.1f s (nprobe %d)",
        who,
        queries.shape[0],
        time.perf_counter() - t,
        nprobe,
    )
    short = int((ids < 0).any(axis=1).sum())
    if short:
        logger.warning(
            "%s: %d cells have fewer than %d neighbours at nprobe %d; raise the nprobe "
            "(search.nprobe)",
            who,
            short,
            k,
            nprobe,
        )
    return ids, dist


def exact_knn(
    queries: npt.NDArray[np.floating],
    reference: npt.NDArray[np.floating],
    *,
    k: int,
    block_bytes: int = 64 * 2**20,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact k nearest reference rows of each query, streamed over ``reference`` (e.g. a memmap).

    Returns
    -------
    ``(squared distances, reference row positions)``, n_query x k, nearest first. Memory is one
    block of ``block_bytes`` distances, whatever the reference's size.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    m, n = q.shape[0], reference.shape[0]
    k = min(k, n)
    rows_per_block = max(k, block_bytes // (4 * max(m, 1)))
    qn = np.einsum("ij,ij->i", q, q)[:, None]
    best_d = np.full((m, 0), np.inf, dtype=np.float32)
    best_i = np.zeros((m, 0), dtype=np.int64)
    for start, x in iter_blocks(reference, rows_per_block):
        d2 = qn - 2.0 * (q @ x.T) + np.einsum("ij,ij->i", x, x)[None, :]
        np.maximum(d2, 0.0, out=d2)
        # the block's own k best first, then a small merge with the best so far
        if d2.shape[1] > k:
            part = np.argpartition(d2, k - 1, axis=1)[:, :k]
            block_d, block_i = np.take_along_axis(d2, part, axis=1), part + start
        else:
            block_d = d2
            block_i = np.broadcast_to(np.arange(start, start + x.shape[0]), d2.shape)
        cand_d = np.concatenate([best_d, block_d], axis=1)
        cand_i = np.concatenate([best_i, block_i], axis=1)
        if cand_d.shape[1] > k:
            keep = np.argpartition(cand_d, k - 1, axis=1)[:, :k]
            cand_d = np.take_along_axis(cand_d, keep, axis=1)
            cand_i = np.take_along_axis(cand_i, keep, axis=1)
        best_d, best_i = cand_d, cand_i
    order = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_d, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def recall_at_k(
    approx_dist: npt.NDArray[np.floating],
    exact_kth: npt.NDArray[np.floating],
    *,
    k: int,
    drop_self: bool = False,
) -> float:
    """Mean fraction of the exact k nearest found: approximate neighbours within the exact k-th.

    ``approx_dist`` and ``exact_kth`` are Euclidean; with ``drop_self`` the approximate list holds
    ``k + 1`` entries, the first being the query cell itself.
    """
    kth = np.asarray(exact_kth, dtype=np.float64)[:, None]
    found = np.asarray(approx_dist, dtype=np.float64) <= kth * (1 + 1e-5) + 1e-6
    hits = found.sum(axis=1) - (1 if drop_self else 0)
    return float(np.clip(hits / k, 0.0, 1.0).mean())


@dataclass
class Calibration:
    """The nprobe chosen for an index and the recall measured at it."""

    nprobe: int
    recall: float
    k: int
    n_queries: int
    tried: dict[int, float]


def calibrate_nprobe(
    index: Any,
    latent: npt.NDArray[np.floating],
    *,
    partitions: int,
    k: int = 30,
    target: float = 0.95,
    n_queries: int = 1000,
    seed: int = 0,
) -> Calibration:
    """The smallest nprobe (of 1, 2, 3, 4, 6, 8, 12, ...) whose recall@k reaches ``target``.

    Recall is measured on ``n_queries`` indexed cells drawn at random, against exact k-NN over
    every row of ``latent`` (streamed), each cell's own row excluded.
    """
    n = latent.shape[0]
    if n < 2:  # one cell: nothing to search but itself
        return Calibration(nprobe=1, recall=1.0, k=0, n_queries=n, tried={1: 1.0})
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n, n_queries), replace=False))
    queries = take_rows(latent, rows.astype(np.int64))
    exact_d2, _ = exact_knn(queries, latent, k=k + 1)
    kth = np.sqrt(exact_d2[:, -1])
    ladder = [p for p in _LADDER if p < partitions] + [partitions]
    tried: dict[int, float] = {}
    for nprobe in ladder:
        _, dist = query_index(index, queries, k=k + 1, nprobe=nprobe)
        tried[nprobe] = round(recall_at_k(dist, kth, k=k, drop_self=True), 4)
        logger.info("index: nprobe %d -> recall@%d %.4f", nprobe, k, tried[nprobe])
        if tried[nprobe] >= target:
            break
    return Calibration(
        nprobe=nprobe, recall=tried[nprobe], k=k, n_queries=int(rows.size), tried=tried
    )
