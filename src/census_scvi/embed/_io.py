"""The embed stage's SOMA side: select cells, map the model's genes, read count chunks, write the
embedding as a Census contributed-embedding SparseNDArray.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import EMBEDDING_INFO_KEY, FEATURE_ID, MEASUREMENT, SOMA_JOINID
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp
    import tiledbsoma as soma

__all__ = [
    "GeneMap",
    "embedding_info",
    "map_genes",
    "iter_blocks",
    "round_bfloat16",
    "select_cells",
    "write_embedding_soma",
]

logger = logging.getLogger(__name__)


def select_cells(
    experiment: soma.Experiment, obs_query: str | None, columns: Sequence[str] = ()
) -> pd.DataFrame:
    """The cells ``obs_query`` selects (every cell when None), sorted by soma_joinid.

    Only ``soma_joinid`` and ``columns`` are read: per-cell metadata is the one thing held in
    memory for every cell.
    """
    import tiledbsoma as soma

    from census_scvi.batches import check_columns

    names = list(experiment.obs.keys())
    check_columns(list(columns), names, what="anndata.batch_key")
    wanted = [SOMA_JOINID, *[c for c in columns if c != SOMA_JOINID]]
    try:
        obs = experiment.obs.read(value_filter=obs_query, column_names=wanted).concat().to_pandas()
    except (soma.SOMAError, ValueError, TypeError) as e:
        msg = f"census.obs_query {obs_query!r} is not a valid obs filter: {str(e).splitlines()[0]}"
        raise CensusScviError(msg, hint="e.g. \"tissue_general == 'blood'\"") from None
    if obs.empty:
        msg = f"census.obs_query {obs_query!r} selects no cells"
        raise CensusScviError(msg, hint="loosen census.obs_query (null selects every cell)")
    return obs.sort_values(SOMA_JOINID, kind="stable").reset_index(drop=True)


class GeneMap:
    """Where each model gene is in the census (var soma_joinid), zero-filling absent ones."""

    def __init__(self, var_joinids: npt.NDArray[np.int64], present: npt.NDArray[np.bool_]) -> None:
        self.n_genes = len(present)
        self.present = present
        self.read_joinids = var_joinids[present]  # in model order
        self.columns = np.flatnonzero(present)  # model column of each read gene


def map_genes(experiment: soma.Experiment, var_names: Sequence[str]) -> GeneMap:
    """Locate the model's genes (``feature_id``) in the census ``var``.

    Missing genes are zero-filled, as ``SCVI.prepare_query_anndata`` pads them; a warning names
    how many. None found is an error.
    """
    import pandas as pd

    var = (
        experiment.ms[MEASUREMENT]
        .var.read(column_names=[SOMA_JOINID, FEATURE_ID])
        .concat()
        .to_pandas()
    )
    lookup = pd.Series(var[SOMA_JOINID].to_numpy(), index=var[FEATURE_ID].astype(str).to_numpy())
    lookup = lookup[~lookup.index.duplicated()]
    pos = lookup.index.get_indexer(pd.Index(np.asarray(var_names).astype(str)))
    present = pos >= 0
    if not present.any():
        msg = (
            f"none of the model's {len(var_names)} genes (e.g. {var_names[0]!r}) is a feature_id "
            "of this census"
        )
        raise CensusScviError(msg, hint="embed with the census the model was trained on")
    if not present.all():
        logger.warning(
            "%d of the model's %d genes are not in this census; they are read as zeros",
            int((~present).sum()),
            len(present),
        )
    joinids = np.full(len(present), -1, dtype=np.int64)
    joinids[present] = lookup.to_numpy()[pos[present]]
    return GeneMap(joinids, present)


def iter_blocks(
    x: soma.SparseNDArray,
    obs_joinids: npt.NDArray[np.int64],
    genes: GeneMap,
    *,
    block_rows: int = 8192,
) -> Iterator[sp.csr_matrix]:
    """Counts of ``obs_joinids`` x the model's genes, in row blocks of ``block_rows`` cells.

    Rows come in the order of ``obs_joinids`` (every cell, empty rows included), columns in
    model order. tiledbsoma's blockwise reader does the reading (one block read ahead, in a
    thread) and reindexes both axes to the positions of the coordinates we pass. Reading a whole
    chunk at once costs several times its CSR size in TileDB buffers and Arrow tables, so memory
    is bounded by ``block_rows``, not by the chunk size.
    """
    import scipy.sparse as sp

    read = x.read(coords=(obs_joinids, genes.read_joinids))
    for block, (rows, _cols) in read.blockwise(axis=0, size=block_rows, eager=True).scipy():
        m = sp.csr_matrix(block, dtype=np.float32)
        if len(rows) != m.shape[0]:  # pragma: no cover - a tiledbsoma contract
            msg = "blockwise read returned an unexpected block"
            raise RuntimeError(msg)
        if genes.present.all():
            yield m
            continue
        # scatter the read genes into the model's columns; absent genes stay zero
        coo = m.tocoo()
        yield sp.csr_matrix(
            (coo.data, (coo.row, genes.columns[coo.col])),
            shape=(m.shape[0], genes.n_genes),
            dtype=np.float32,
        )


def round_bfloat16(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Round float32 values to bfloat16 precision (7 mantissa bits), half to even, in place.

    The Census stores contributed embeddings this way (its ``census_contrib`` tool's
    ``roundHalfToEven``); done on the integer view because numpy has no bfloat16 type.
    """
    if a.dtype != np.float32:
        msg = f"expected float32, got {a.dtype}"
        raise TypeError(msg)
    maskbits = 23 - 7
    b = a.view(np.int32)
    b += ((b >> maskbits) & 1) + ((1 << (maskbits - 1)) - 1)
    b &= np.int32(~((1 << maskbits) - 1))
    return a


def census_version_of(census: soma.Collection, configured: str | None) -> str:
    """The census version for metadata: the configured release, else the build date."""
    if configured:
        return configured
    try:
        summary = census["census_info"]["summary"].read().concat().to_pandas()
        row = summary.loc[summary["label"] == "census_build_date", "value"]
        if len(row):
            return str(row.iloc[0])
    except (KeyError, ValueError):
        pass
    return "unknown"


def embedding_info(
    *,
    embedding_id: str,
    title: str,
    description: str,
    contact: tuple[str, str, str],
    doi: str,
    additional_information: str,
    model_link: str,
    census_version: str,
    experiment_name: str,
    n_embeddings: int,
    n_features: int,
    submission_date: str | None = None,
) -> dict[str, Any]:
    """The ``CxG_embedding_info`` record of the Census contributed-embedding format.

    Fields as the Census ``census_contrib`` tool defines them (``EmbeddingMetadata``): id,
    title, description, primary_contact {name, email, affiliation}, additional_contacts, DOI,
    additional_information, model_link, data_type, census_version, experiment_name,
    measurement_name, n_embeddings, n_features, submission_date (ISO date).
    """
    name, email, affiliation = contact
    return {
        "id": embedding_id,
        "title": title,
        "description": description,
        "primary_contact": {"name": name, "email": email, "affiliation": affiliation},
        "additional_contacts": [],
        "DOI": doi,
        "additional_information": additional_information,
        "model_link": model_link,
        "data_type": "obs_embedding",
        "census_version": census_version,
        "experiment_name": experiment_name,
        "measurement_name": MEASUREMENT,
        "n_embeddings": int(n_embeddings),
        "n_features": int(n_features),
        "submission_date": submission_date or _dt.date.today().isoformat(),
    }


def _platform_config(n_features: int) -> dict[str, Any]:
    # the Census contrib arrays' layout: 2048-row tiles, one tile across the features, zstd
    return {
        "tiledb": {
            "create": {
                "capacity": 2**17,
                "dims": {
                    "soma_dim_0": {
                        "tile": 2048,
                        "filters": [
                            {"_type": "PositiveDeltaFilter", "window": 2048},
                            {"_type": "ZstdFilter", "level": 9},
                        ],
                    },
                    "soma_dim_1": {
                        "tile": max(1, n_features),
                        "filters": ["DeltaFilter", {"_type": "ZstdFilter", "level": 9}],
                    },
                },
                "attrs": {
                    "soma_data": {
                        "filters": ["ByteShuffleFilter", {"_type": "ZstdFilter", "level": 9}]
                    }
                },
                "cell_order": "row-major",
                "tile_order": "row-major",
            }
        }
    }


def write_embedding_soma(
    uri: str | Path,
    *,
    latent: npt.NDArray[np.float32],
    joinids: npt.NDArray[np.int64],
    n_obs: int,
    info: dict[str, Any],
    bfloat16: bool = False,
    rows_per_write: int = 262_144,
) -> None:
    """Write ``latent`` (rows = ``joinids``) as a SOMA SparseNDArray of shape (n_obs, n_features).

    Written block by block from (memory-mapped) arrays, so memory stays bounded. Every embedded
    cell is stored explicitly, zeros included, as the format requires.
    """
    import pyarrow as pa
    import tiledbsoma as soma

    n, k = latent.shape
    with soma.SparseNDArray.create(
        str(uri), type=pa.float32(), shape=(n_obs, k), platform_config=_platform_config(k)
    ) as arr:
        arr.metadata[EMBEDDING_INFO_KEY] = json.dumps(info)
        cols = np.arange(k, dtype=np.int64)
        for start in range(0, n, rows_per_write):
            stop = min(start + rows_per_write, n)
            values = np.array(latent[start:stop], dtype=np.float32).reshape(-1)
            if bfloat16:
                round_bfloat16(values)
            ids = np.asarray(joinids[start:stop], dtype=np.int64)
            arr.write(
                pa.Table.from_pydict(
                    {
                        "soma_dim_0": np.repeat(ids, k),
                        "soma_dim_1": np.tile(cols, stop - start),
                        "soma_data": values,
                    }
                )
            )
