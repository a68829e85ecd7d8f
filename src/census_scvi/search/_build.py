"""Building a TileDB-Vector-Search IVF_FLAT index from the embedded cells, streamed in chunks.

The vectors are never handed to ``ingest`` as one array: ``input_vectors=`` writes them with one
``array[:, :] = transpose(vectors)``, which holds every vector (and its transpose) in memory. We
stream ``latent.npy`` (plain block reads, :mod:`census_scvi.knn._rows`) into an ``F32BIN`` file and the soma_joinids into a dense TileDB
array, chunk by chunk, and let ingest read both back in work items of ``build_memory_mib``
(``input_vectors_per_work_item``; ingest runs LOCAL work items one at a time) under TileDB read
budgets of the same order, so memory is bounded by that budget plus the k-means sample, not by
the number of cells (about 0.5 GiB over the imports at 64 MiB, at 1M and at 2M cells x 50). (Its ``U64BIN``
external-id reader is broken in 0.16: it reads ``n`` bytes for ``n`` ids, hence the TileDB array.)

k-means is trained on a uniform random sample of the cells (ingest's default takes the first
``N``, which for a census in dataset order means the first few datasets), of the size ingest
would choose: ``min(n, 100 * partitions)``, at most its complexity cap.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from census_scvi.errors import CensusScviError
from census_scvi.knn import iter_blocks, take_rows, vector_search
from census_scvi.progress import track

__all__ = ["default_partitions", "ingest_ivf_flat", "training_sample_size"]

logger = logging.getLogger(__name__)

#: ingest's own caps (tiledb.vector_search.ingestion, 0.16): at most 10,000 partitions, k-means
#: on at most 1M vectors and 1M x 1024 x 10k vector-dimension-centroid products.
_MAX_PARTITIONS = 10_000
_MAX_SAMPLE = 1_000_000
_MAX_KMEANS_COMPLEXITY = 1_000_000 * 1024 * 10_000
#: ingest's largest tile (ivf_flat_index.TILE_SIZE_BYTES = 64 MB), in MiB, rounded up
_TILE_MIB = 64
#: rows of latent.npy copied per step into the F32BIN file and the id array
_COPY_ROWS = 1 << 18


def default_partitions(n: int) -> int:
    """ingest's default: ``sqrt(n)`` partitions, at most 10,000 (100 training vectors each)."""
    return max(1, min(int(math.sqrt(n)), _MAX_PARTITIONS))


def training_sample_size(n: int, d: int, partitions: int) -> int:
    """ingest's default k-means sample: ``min(n, 100 * partitions)``, within its caps."""
    cap = int(_MAX_KMEANS_COMPLEXITY // d // partitions)
    return max(partitions, min(n, 100 * partitions, cap, _MAX_SAMPLE))


def _write_f32bin(path: Path, latent: npt.NDArray[np.float32]) -> None:
    """``latent`` as F32BIN (uint32 rows, uint32 dims, then row-major float32), chunk by chunk."""
    n, d = latent.shape
    if n >= 2**32:  # pragma: no cover - 4 billion cells
        msg = f"{n:,} cells do not fit the F32BIN header (at most {2**32 - 1:,})"
        raise CensusScviError(msg, hint="split the embedding")
    with path.open("wb") as f:
        f.write(np.uint32(n).tobytes())
        f.write(np.uint32(d).tobytes())
        blocks = iter_blocks(latent, _COPY_ROWS)
        total = -(-n // _COPY_ROWS)
        for _, block in track(blocks, description="index: staging vectors", total=total):
            block.tofile(f)


def _write_ids(uri: str, joinids: npt.NDArray[np.int64]) -> None:
    """The soma_joinids as a dense TileDB array (dim ``rows``, attribute ``values``, uint64)."""
    import tiledb

    n = int(joinids.size)
    dim = tiledb.Dim(name="rows", domain=(0, n - 1), tile=min(n, _COPY_ROWS), dtype=np.int64)
    attr = tiledb.Attr(name="values", dtype=np.uint64)
    tiledb.Array.create(uri, tiledb.ArraySchema(domain=tiledb.Domain(dim), attrs=[attr]))
    with tiledb.open(uri, "w") as arr:
        for start in range(0, n, _COPY_ROWS):
            stop = min(start + _COPY_ROWS, n)
            arr[start:stop] = {"values": joinids[start:stop].astype(np.uint64)}


def _tiledb_config(build_memory_mib: int) -> dict[str, str]:
    """TileDB read budgets for ingestion's partition consolidation.

    Its multi-range reads over every work item's partial arrays otherwise size their buffers
    by TileDB's defaults (10 GiB total, 1 GiB of tiles): measured at 2M x 50 cells with 64 MiB
    work items, 0.94 GiB over the baseline without these budgets, 0.48 GiB with them (and
    0.46 GiB at 1M cells). A budget below one of ingest's tiles (up to 64 MB: its
    ``TILE_SIZE_BYTES``) fails the read, hence the floor.
    """
    tile = max(build_memory_mib, _TILE_MIB) * 2**20  # at least one of ingest's tiles
    return {"sm.mem.total_budget": str(4 * tile), "sm.mem.tile_upper_memory_limit": str(tile)}


def _training_rows(n: int, size: int, seed: int) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(seed)
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def ingest_ivf_flat(
    index_uri: Path,
    latent: npt.NDArray[np.float32],
    joinids: npt.NDArray[np.int64],
    *,
    scratch: Path,
    partitions: int | None = None,
    build_memory_mib: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Build an IVF_FLAT index at ``index_uri`` over ``latent`` rows, external ids ``joinids``.

    Parameters
    ----------
    index_uri
        The index group to create (must not exist).
    latent
        n x d float32 (a memmap is read chunk by chunk).
    joinids
        The soma_joinid of each row.
    scratch
        A folder for the staged inputs (removed by the caller).
    partitions
        k-means partitions; default ingest's ``sqrt(n)`` (at most 10,000).
    build_memory_mib
        Vectors ingest reads per work item, in MiB; the build holds about six times this
        (plus the k-means sample), whatever the number of cells.
    seed
        Seeds the k-means training sample.

    Returns
    -------
    ``{"partitions", "training_sample_size", "vectors_per_work_item"}``.
    """
    vs = vector_search()
    n, d = latent.shape
    parts = default_partitions(n) if partitions is None else int(partitions)
    if not 1 <= parts <= n:
        msg = f"partitions={parts} must be between 1 and the number of cells ({n:,})"
        raise CensusScviError(msg, hint="omit partitions for the default sqrt(n)")
    sample = training_sample_size(n, d, parts)
    per_item = max(1024, int(build_memory_mib) * 2**20 // (4 * d))
    scratch.mkdir(parents=True, exist_ok=True)
    vectors, ids = scratch / "vectors.f32bin", scratch / "ids"
    _write_f32bin(vectors, latent)
    _write_ids(str(ids), joinids)
    training = take_rows(latent, _training_rows(n, sample, seed))
    logger.info(
        "index: IVF_FLAT over %d cells x %d dims, %d partitions (k-means on %d cells)",
        n,
        d,
        parts,
        training.shape[0],
    )
    vs.ingest(
        index_type="IVF_FLAT",
        index_uri=str(index_uri),
        source_uri=str(vectors),
        source_type="F32BIN",
        external_ids_uri=str(ids),
        external_ids_type="TILEDB_ARRAY",
        partitions=parts,
        training_input_vectors=training,
        input_vectors_per_work_item=per_item,
        config=_tiledb_config(build_memory_mib),
    )
    return {
        "partitions": parts,
        "training_sample_size": int(training.shape[0]),
        "vectors_per_work_item": per_item,
    }
