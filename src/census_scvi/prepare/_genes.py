"""Prepare's gene side: Seurat v3 HVGs streamed from ``X['raw']``, in one or several processes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import FEATURE_ID, FEATURE_NAME, MEASUREMENT, SOMA_JOINID, X_RAW
from census_scvi.errors import CensusScviError
from census_scvi.prepare._parallel import ExperimentOpener, parallel_pass_sums
from census_scvi.progress import track

if TYPE_CHECKING:
    import pandas as pd
    import tiledbsoma as soma

__all__ = ["highly_variable_genes"]

logger = logging.getLogger(__name__)


def _x_layer(experiment: soma.Experiment) -> soma.SparseNDArray:
    import tiledbsoma as soma

    ms = experiment.ms
    if MEASUREMENT not in ms:
        msg = f"the experiment has no measurement '{MEASUREMENT}'; present: {', '.join(ms.keys())}"
        raise CensusScviError(msg)
    X = ms[MEASUREMENT].X
    if X_RAW not in X:
        msg = f"the experiment has no X layer '{X_RAW}'; present: {', '.join(X.keys())}"
        raise CensusScviError(msg, hint="prepare needs raw counts in X['raw']")
    layer = X[X_RAW]
    if not isinstance(layer, soma.SparseNDArray):
        msg = f"X['{X_RAW}'] is a {type(layer).__name__}; prepare needs a SparseNDArray"
        raise CensusScviError(msg)
    return layer


def _chunks_for(
    X: soma.SparseNDArray, obs: pd.DataFrame, chunk_nnz: int, n_vars: int
) -> list[slice]:
    from census_scvi.soma import plan_chunks

    nnz = obs["nnz"].to_numpy() if "nnz" in obs.columns else None
    mean_nnz = 0.1 * n_vars
    if nnz is None:
        try:
            mean_nnz = float(X.nnz) / max(int(X.shape[0]), 1)
        except Exception:  # noqa: BLE001 - an estimate only; fall back to 10% density
            pass
    return plan_chunks(nnz, len(obs), chunk_nnz=chunk_nnz, mean_nnz=mean_nnz)


def highly_variable_genes(
    experiment: soma.Experiment,
    *,
    obs_joinids: npt.NDArray[np.int64],
    batch: npt.NDArray[np.integer],
    batch_names: Sequence[str],
    n_top_genes: int,
    span: float = 0.3,
    max_loess_jitter: float = 1e-6,
    chunks: Sequence[slice] | None = None,
    chunk_nnz: int = 4_000_000,
    processes: int = 1,
    opener: ExperimentOpener | None = None,
) -> pd.DataFrame:
    """Seurat v3 highly variable genes over the selected cells, streamed from ``X['raw']``.

    Agrees with ``scanpy.pp.highly_variable_genes(flavor="seurat_v3", batch_key=...)`` on the
    same cells (same statistics; see :mod:`census_scvi.prepare._hvg`).

    Parameters
    ----------
    experiment
        The census experiment.
    obs_joinids
        Selected cells, ascending ``soma_joinid``.
    batch
        HVG batch code of each selected cell (``0..len(batch_names)-1``).
    batch_names
        Name of each HVG batch.
    n_top_genes
        Number of genes flagged ``highly_variable`` (all genes when there are fewer).
    span, max_loess_jitter
        LOESS settings.
    chunks
        Slices of ``obs_joinids`` to read at a time (default: about ``chunk_nnz`` values each).
    chunk_nnz
        Stored values per chunk when ``chunks`` is None.
    processes
        Split each pass across this many processes (each opens the census with ``opener``);
        partial sums merged in order (:mod:`census_scvi.prepare._parallel`).
    opener
        How a worker process opens the experiment (required when ``processes > 1``).

    Returns
    -------
    Every gene (rows in var ``soma_joinid`` order) with columns ``soma_joinid``, ``feature_id``,
    ``feature_name``, ``means``, ``variances``, ``variances_norm``, ``highly_variable_rank``,
    ``highly_variable_nbatches``, ``highly_variable``, ``rank``.
    """
    from census_scvi.prepare._hvg import seurat_v3_from_chunks
    from census_scvi.prepare._sums import value_sums
    from census_scvi.soma import iter_x_values

    X = _x_layer(experiment)
    var = _read_var(experiment)
    n_genes = len(var)
    if n_top_genes > n_genes:
        logger.warning(
            "hvg.top_n_hvg=%d is more than the %d genes in the census; all genes are used",
            n_top_genes,
            n_genes,
        )
    var_ids = var[SOMA_JOINID].to_numpy()
    var_lut = np.full(int(var_ids.max()) + 1, -1, dtype=np.int64)
    var_lut[var_ids] = np.arange(n_genes)
    batch = np.asarray(batch)
    if chunks is None:
        tmp = _obs_frame(obs_joinids)
        chunks = _chunks_for(X, tmp, chunk_nnz, n_genes)

    n_batches = len(batch_names)
    if processes > 1 and len(chunks) > 1:
        pass_sums = _parallel_sums(
            opener, obs_joinids, batch, var_lut, chunks, n_batches, n_genes, processes
        )
    else:

        def pass_sums(p: int, clip: Any) -> Any:
            it = iter_x_values(X, obs_joinids, chunks)
            progress = track(
                it, description=f"HVG pass {p}/2", total=len(obs_joinids), weight=_n_rows,
                unit="cells",
            )  # fmt: skip
            return value_sums(progress, batch, var_lut, n_batches, n_genes, clip)

    stats = seurat_v3_from_chunks(
        None,
        pass_sums=pass_sums,
        n_cells=np.bincount(batch, minlength=n_batches),
        n_genes=n_genes,
        n_top_genes=n_top_genes,
        batch_names=list(batch_names),
        span=span,
        max_loess_jitter=max_loess_jitter,
    )
    out = var[[SOMA_JOINID, FEATURE_ID, FEATURE_NAME]].reset_index(drop=True)
    for c in stats.columns:
        out[c] = stats[c].to_numpy()
    return out


def _obs_frame(joinids: npt.NDArray[np.int64]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({SOMA_JOINID: joinids})


def _read_var(experiment: soma.Experiment) -> pd.DataFrame:
    var = experiment.ms[MEASUREMENT].var
    valid = list(var.schema.names)
    cols = [SOMA_JOINID, FEATURE_ID, FEATURE_NAME]
    missing = [c for c in cols if c not in valid]
    if missing:
        msg = f"ms['{MEASUREMENT}'].var lacks column(s) {missing}; present: {', '.join(valid)}"
        raise CensusScviError(msg, hint="the census must follow the Census schema")
    df = var.read(column_names=cols).concat().to_pandas()
    for c in (FEATURE_ID, FEATURE_NAME):
        df[c] = df[c].astype(str)
    return df.sort_values(SOMA_JOINID, kind="stable").reset_index(drop=True)


def _n_rows(chunk: Any) -> int:
    return int(chunk.n_rows)


def _parallel_sums(
    opener: ExperimentOpener | None,
    obs_joinids: npt.NDArray[np.int64],
    batch: npt.NDArray[np.integer],
    var_lut: npt.NDArray[np.int64],
    chunks: Sequence[slice],
    n_batches: int,
    n_genes: int,
    processes: int,
) -> Any:
    """The ``pass_sums`` of :func:`seurat_v3_from_chunks`, split across ``processes``."""
    if opener is None:
        msg = "highly_variable_genes(processes > 1) needs an opener for the worker processes"
        raise CensusScviError(msg)

    def pass_sums(p: int, clip: Any) -> Any:
        return parallel_pass_sums(
            opener, obs_joinids=obs_joinids, batch=batch, var_lut=var_lut, chunks=chunks,
            n_batches=n_batches, n_genes=n_genes, processes=processes, clip=clip,
            description=f"HVG pass {p}/2",
        )  # fmt: skip

    return pass_sums
