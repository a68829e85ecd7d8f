"""Ingestion with tiledbsoma.io, and the census-wide var columns and presence matrix after it.

X goes in through tiledbsoma's multi-file append workflow (its registration matches cells and genes
against the existing experiment); the presence matrix and census_info go through the shared writer
(:mod:`census_scvi.soma._writer`) that the mini census uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.build._input import PreparedDataset
from census_scvi.constants import MEASUREMENT, X_RAW
from census_scvi.errors import CensusScviError
from census_scvi.soma._frames import read_dataframe
from census_scvi.soma._schema import OBS_KEY, UNKNOWN, VAR_ID
from census_scvi.soma._writer import open_collection, write_presence_matrix

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import pyarrow as pa

__all__ = ["WRITE_CHUNK_NNZ", "ingest", "write_presence", "write_var_stats"]

logger = logging.getLogger(__name__)

# non-zeros per X write. tiledbsoma's default (100M) holds the whole of a typical h5ad as one
# Arrow COO table plus TileDB's sorted copy: ~10x the CSR size in RSS. Smaller chunks bound that
# (see docs/benchmarks.md, "Build census").
WRITE_CHUNK_NNZ = 16_000_000


def _conform(df: pd.DataFrame, schema: pa.Schema, *, what: str, index_col: str) -> pd.DataFrame:
    """Give ``df`` exactly the columns and types of an existing SOMA dataframe's schema."""
    import pandas as pd
    import pyarrow as pa

    out: dict[str, Any] = {}
    n = len(df)
    for f in schema:
        name = f.name
        if name in ("soma_joinid", index_col):
            continue
        t = f.type
        if name in df.columns:
            col = df[name]
        elif pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
            col = pd.Series([UNKNOWN] * n, index=df.index)
        elif pa.types.is_floating(t):
            col = pd.Series(np.full(n, np.nan), index=df.index)
        else:
            msg = (
                f"the existing census has {what} column '{name}' ({t}) that this input cannot fill"
            )
            raise CensusScviError(msg, hint="add the column to your file or map it with --columns")
        if pa.types.is_dictionary(t):
            col = pd.Categorical(col.astype(str).to_numpy())
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            col = col.astype(str).astype(object)
        else:
            col = col.astype(t.to_pandas_dtype())
        out[name] = col
    dropped = [c for c in df.columns if c not in out and c != index_col]
    if dropped:
        logger.info("the existing census has no %s column(s) %s; not stored", what, dropped)
    return pd.DataFrame(out, index=df.index)


def ingest(census_data_uri: str, organism: str, adata: ad.AnnData, *, label: str) -> None:
    """Append Census-shaped ``adata`` to ``census_data/<organism>`` with tiledbsoma.io.

    tiledbsoma's multi-file append workflow: ``register_anndatas`` (cells keyed by ``obs_id``,
    genes by ``feature_id``; new genes extend the var axis), ``prepare_experiment`` (resize,
    extend categories), then ``from_anndata`` with the registration. obs/var are first given the
    existing experiment's exact columns and types.
    """
    import tiledbsoma as soma
    import tiledbsoma.io as tio

    exp_uri = f"{census_data_uri}/{organism}"
    exists = soma.Experiment.exists(exp_uri)
    if exists:
        with soma.Experiment.open(exp_uri) as exp:
            obs_schema = exp.obs.schema
            var_schema = exp.ms[MEASUREMENT].var.schema
        adata.obs = _conform(adata.obs, obs_schema, what="obs", index_col="")
        adata.var = _conform(adata.var, var_schema, what="var", index_col=VAR_ID)
    try:
        registration = tio.register_anndatas(
            exp_uri if exists else None,
            [adata],
            measurement_name=MEASUREMENT,
            obs_field_name=OBS_KEY,
            var_field_name=VAR_ID,
        )
    except soma.SOMAError as e:
        first = str(e).splitlines()[0]
        msg = f"{label} cannot be appended: {first}"
        raise CensusScviError(msg) from None
    if exists:
        registration.prepare_experiment(exp_uri)
    tio.from_anndata(
        exp_uri,
        adata,
        MEASUREMENT,
        platform_config={"tiledb": {"create": {"goal_chunk_nnz": WRITE_CHUNK_NNZ}}},
        registration_mapping=registration,
        obs_id_name=OBS_KEY,
        var_id_name=VAR_ID,
        X_layer_name=X_RAW,
        uns_keys=[],
    )
    if not exists:
        with open_collection(census_data_uri, "w") as data:
            if organism not in data:
                with soma.Experiment.open(exp_uri) as exp:
                    data.set(organism, exp, use_relative_uri=True)


def write_var_stats(
    exp_uri: str,
    added: Iterable[PreparedDataset],
    removed: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Update var ``nnz`` and ``n_measured_obs``: stored values - ``removed`` + ``added``.

    ``removed`` holds ``(nnz, n_measured_obs)`` per var soma_joinid of replaced datasets. Genes
    new to this build start from 0. Written with ``tiledbsoma.io.update_var``.
    """
    import pandas as pd
    import tiledbsoma as soma
    import tiledbsoma.io as tio

    with soma.Experiment.open(exp_uri) as exp:
        var = read_dataframe(exp.ms[MEASUREMENT].var)
    index = pd.Index(var[VAR_ID].astype(str))
    nnz = var["nnz"].to_numpy().astype(np.int64)
    measured = var["n_measured_obs"].to_numpy().astype(np.int64)
    if removed is not None:
        n = min(len(removed[0]), len(nnz))
        nnz[:n] -= removed[0][:n]
        measured[:n] -= removed[1][:n]
    for ds in added:
        cols = index.get_indexer(ds.adata.var_names)
        assert (cols >= 0).all(), "ingested genes missing from var"
        nnz[cols] += ds.gene_nnz
        measured[cols] += ds.n_cells
    assert (nnz >= 0).all() and (measured >= 0).all(), "negative var statistics"
    var["nnz"] = nnz
    var["n_measured_obs"] = measured
    new = var.drop(columns=["soma_joinid"]).set_index(VAR_ID).rename_axis(None)
    with soma.Experiment.open(exp_uri, "w") as exp:
        tio.update_var(exp, new, MEASUREMENT, default_index_name=VAR_ID)
    return var


def write_presence(
    exp_uri: str,
    root: Path,
    *,
    shape: tuple[int, int],
    old: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    keep_rows: Sequence[int],
    new: Iterable[tuple[int, PreparedDataset]],
    var: pd.DataFrame,
) -> None:
    """(Re)write ``ms/RNA/feature_dataset_presence_matrix`` (datasets x var, bool).

    Stored coordinates are the genes each dataset measured (its var); the value is True when the
    gene has a non-zero count in the dataset (the Census definition), False otherwise. Rows of the
    kept datasets come from the ``old`` matrix (var keeps its soma_joinids).
    """
    import pandas as pd

    rows: list[np.ndarray] = [np.zeros(0, np.int64)]
    cols: list[np.ndarray] = [np.zeros(0, np.int64)]
    vals: list[np.ndarray] = [np.zeros(0, bool)]
    if old is not None:
        sel = np.isin(old[0], np.asarray(list(keep_rows), dtype=np.int64))
        rows.append(old[0][sel])
        cols.append(old[1][sel])
        vals.append(old[2][sel])
    index = pd.Index(var[VAR_ID].astype(str))
    joinids = var["soma_joinid"].to_numpy()
    for row, ds in new:
        c = joinids[index.get_indexer(ds.adata.var_names)]
        rows.append(np.full(len(c), row, dtype=np.int64))
        cols.append(c.astype(np.int64))
        vals.append(ds.gene_nnz > 0)
    write_presence_matrix(
        f"{exp_uri}/ms/{MEASUREMENT}",
        root,
        shape=shape,
        rows=np.concatenate(rows).astype(np.int64),
        cols=np.concatenate(cols).astype(np.int64),
        values=np.concatenate(vals).astype(bool),
    )
