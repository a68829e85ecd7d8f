"""The embed stage's read side: select cells, map the model's genes, read count chunks."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from census_scvi.constants import FEATURE_ID, MEASUREMENT, SOMA_JOINID
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse as sp
    import tiledbsoma as soma

__all__ = ["GeneMap", "iter_blocks", "map_genes", "select_cells"]

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
    if not obs[SOMA_JOINID].is_monotonic_increasing:  # TileDB reads in joinid order: no copy
        obs = obs.sort_values(SOMA_JOINID, kind="stable")
    return obs.reset_index(drop=True)


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
    model order. The shared chunk reader (:func:`census_scvi.soma.iter_x_chunks`: a range of
    cell ids, every gene, the next block read ahead on a thread) does the reading, and the
    model's genes are kept here with a lookup array.

    Why not tiledbsoma's blockwise reader with the genes as coordinates (what this did before):
    a list of 8,000 gene points makes TileDB's cost per query grow with the array, not the
    block. Measured on census-shape mini censuses (20,000 genes, ~2,080 values per cell),
    8,192 cells x 8,000 genes per read (``benchmarks/bench_embed_read.py``, user + sys CPU
    seconds): 2.95 + 2.60 at 250k cells, 5.65 + 2.91 at 2M; this reader, with the stages'
    allocator setting, 1.17 + 0.97 and 1.18 + 0.99. That was embed's CPU per cell growing
    490 -> 646 -> 1,164 s per million cells between 250k and 2M (docs/benchmarks.md).
    """
    import scipy.sparse as sp

    from census_scvi.soma import iter_x_chunks

    n = len(obs_joinids)
    blocks = [slice(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]
    column = np.full(int(genes.read_joinids.max()) + 1, -1, dtype=np.int64)
    column[genes.read_joinids] = genes.columns
    for chunk in iter_x_chunks(x, obs_joinids, blocks, var_joinids=genes.read_joinids):
        yield sp.csr_matrix(
            (chunk.data, (chunk.rows - chunk.row_start, column[chunk.cols])),
            shape=(chunk.n_rows, genes.n_genes),
            dtype=np.float32,
        )
