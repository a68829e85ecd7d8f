"""Reading the census being appended to: its datasets, presence rows, and cells to re-ingest."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.constants import CENSUS_DATA, MEASUREMENT, X_RAW
from census_scvi.soma._frames import read_dataframe
from census_scvi.soma._schema import OBS_KEY, PRESENCE_MATRIX, VAR_ID

if TYPE_CHECKING:
    import anndata as ad
    import tiledbsoma as soma

__all__ = [
    "CHUNK_CELLS",
    "dataset_ids_in",
    "dataset_organisms",
    "export_chunks",
    "gene_nnz",
    "has_obs_key",
    "read_presence",
]

CHUNK_CELLS = 65_536  # cells per chunk when re-ingesting an existing experiment


def dataset_organisms(census: soma.Collection) -> dict[str, str]:
    """``dataset_id -> organism`` for every experiment of ``census_data`` (reads obs dataset_id)."""
    out: dict[str, str] = {}
    data = census[CENSUS_DATA]
    for org in data:
        exp = data[org]
        if "obs" not in exp or "dataset_id" not in exp.obs.schema.names:
            continue
        ids = read_dataframe(exp.obs, ["dataset_id"])["dataset_id"].astype(str).unique()
        for d in ids:
            out.setdefault(str(d), str(org))
    return out


def dataset_ids_in(exp: Any) -> list[str]:
    """The experiment's dataset ids in obs order of first appearance."""
    if "obs" not in exp:
        return []
    ids = read_dataframe(exp.obs, ["soma_joinid", "dataset_id"])["dataset_id"].astype(str)
    return list(dict.fromkeys(ids))


def read_presence(exp: soma.Experiment) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(dataset row, var soma_joinid, value)`` of an experiment's presence matrix, or None."""
    ms: Any = exp.ms[MEASUREMENT]
    if PRESENCE_MATRIX not in ms:
        return None
    t = ms[PRESENCE_MATRIX].read().tables().concat()
    return (
        t["soma_dim_0"].to_numpy(),
        t["soma_dim_1"].to_numpy(),
        t["soma_data"].to_numpy(zero_copy_only=False).astype(bool),
    )


def has_obs_key(exp: soma.Experiment) -> bool:
    """Whether the experiment's obs has the registration key column (built by build-census)."""
    return OBS_KEY in exp.obs.schema.names


def gene_nnz(exp: soma.Experiment, rows: np.ndarray, n_var: int) -> np.ndarray:
    """Per var soma_joinid: how many of the cells ``rows`` have a non-zero count (streamed)."""
    out = np.zeros(n_var, dtype=np.int64)
    x: Any = exp.ms[MEASUREMENT].X[X_RAW]
    for t in x.read(coords=(rows,)).tables():
        out += np.bincount(t["soma_dim_1"].to_numpy(), minlength=n_var)[:n_var]
    return out


def export_chunks(
    exp: soma.Experiment, rows: np.ndarray, *, chunk_cells: int = CHUNK_CELLS
) -> Iterator[ad.AnnData]:
    """The cells ``rows`` (sorted soma_joinids) of an existing experiment, in chunks, as stored.

    Every chunk carries the whole var (so var soma_joinids stay as they were) and obs as stored,
    with the registration key added (``<dataset_id>:#<soma_joinid>``) when the census lacks it.
    """
    import anndata as ad
    import pandas as pd
    import tiledbsoma as soma

    var = read_dataframe(exp.ms[MEASUREMENT].var)
    var = var.set_index(pd.Index(var[VAR_ID].astype(str).to_numpy()))  # unnamed
    var = var.drop(columns=["soma_joinid", VAR_ID])
    for start in range(0, len(rows), chunk_cells):
        chunk = rows[start : start + chunk_cells]
        with exp.axis_query(MEASUREMENT, obs_query=soma.AxisQuery(coords=(chunk,))) as q:
            a = q.to_anndata(X_RAW)
        obs = a.obs
        if obs.index.name is not None and obs.index.name not in obs.columns:
            obs = obs.reset_index()
        joinids = obs["soma_joinid"].to_numpy()
        if OBS_KEY not in obs.columns:
            ds = obs["dataset_id"].astype(str).to_numpy()
            obs[OBS_KEY] = np.asarray([f"{d}:#{j}" for d, j in zip(ds, joinids, strict=True)])
        obs = obs.drop(columns=["soma_joinid"])
        obs.index = pd.Index([str(j) for j in joinids])
        x = a.X.tocsr().astype(np.float32) if a.X is not None else None
        yield ad.AnnData(X=x, obs=obs, var=var.copy())
