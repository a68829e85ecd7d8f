"""Reading cells by ``soma_joinid``: obs columns, raw counts of a few cells, a stratified sample."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from census_scvi.constants import (
    FEATURE_ID,
    MEASUREMENT,
    SOMA_JOINID,
    X_RAW,
)
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import anndata as ad
    import tiledbsoma as soma

__all__ = [
    "read_counts",
    "read_obs",
    "stratified_indices",
]

logger = logging.getLogger(__name__)


def read_obs(
    experiment: soma.Experiment, joinids: npt.NDArray[np.int64], columns: Sequence[str]
) -> pd.DataFrame:
    """obs ``columns`` for ``joinids``, in the order given (index = position, not joinid).

    Parameters
    ----------
    experiment
        The census experiment (e.g. ``census["census_data"]["homo_sapiens"]``).
    joinids
        obs soma_joinids, any order.
    columns
        obs columns to read; each must exist.

    Returns
    -------
    One row per ``joinids`` entry, columns ``soma_joinid`` + ``columns`` (strings as categoricals).
    """
    present = list(experiment.obs.schema.names)
    missing = [c for c in columns if c not in present]
    if missing:
        msg = f"obs column(s) {missing} are not in the census obs; valid: {', '.join(sorted(present))}"
        raise CensusScviError(msg, hint="fix evaluate.label_key / --labels / batch keys")
    cols = [SOMA_JOINID, *[c for c in dict.fromkeys(columns) if c != SOMA_JOINID]]
    order = np.unique(joinids)  # sorted
    coords: Any = order
    if order.size and int(order[-1]) - int(order[0]) + 1 == order.size:
        coords = slice(int(order[0]), int(order[-1]))  # a contiguous range reads faster
    table = experiment.obs.read(coords=(coords,), column_names=cols).concat().to_pandas()
    table = table.set_index(SOMA_JOINID)
    if len(table) != len(order):
        msg = f"{len(order) - len(table)} embedded soma_joinids are not in the census obs"
        raise CensusScviError(msg, hint="the embedding belongs to another census; check census.uri")
    out = table.loc[joinids].reset_index()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = out[c].astype("category")
    return out


def read_counts(
    experiment: soma.Experiment, joinids: npt.NDArray[np.int64], feature_ids: Sequence[str]
) -> ad.AnnData:
    """Raw counts of ``joinids`` (rows, in that order) x ``feature_ids`` (columns, in that order)."""
    import tiledbsoma as soma

    var = (
        experiment.ms[MEASUREMENT]
        .var.read(column_names=[SOMA_JOINID, FEATURE_ID])
        .concat()
        .to_pandas()
        .set_index(FEATURE_ID)
    )
    missing = pd.Index(feature_ids).difference(var.index)
    if len(missing):
        msg = f"{len(missing)} model genes are not in the census var (e.g. {missing[0]})"
        raise CensusScviError(msg, hint="the model was trained on another census; check census.uri")
    var_ids = var.loc[list(feature_ids), SOMA_JOINID].to_numpy(np.int64)
    order = np.sort(np.unique(joinids))
    with experiment.axis_query(
        MEASUREMENT,
        obs_query=soma.AxisQuery(coords=(order,)),
        var_query=soma.AxisQuery(coords=(np.sort(var_ids),)),
    ) as query:
        adata = query.to_anndata(
            X_name=X_RAW, column_names={"obs": [SOMA_JOINID], "var": [SOMA_JOINID, FEATURE_ID]}
        )
    adata.obs_names = adata.obs[SOMA_JOINID].astype(str).to_numpy()
    adata.var_names = adata.var[FEATURE_ID].astype(str).to_numpy()
    return adata[joinids.astype(str), list(feature_ids)].copy()


def stratified_indices(strata: npt.ArrayLike, n: int, *, seed: int = 0) -> npt.NDArray[np.int64]:
    """Positions of a sample of about ``n`` rows drawn proportionally from every stratum.

    Each stratum keeps at least one row (rare cell types stay in the sample); all rows when
    ``n`` is at least their number. Returned sorted.

    Parameters
    ----------
    strata
        One stratum label per row (e.g. cell type).
    n
        Sample size.
    seed
        Random seed.

    Examples
    --------
    >>> stratified_indices(["a"] * 90 + ["b"] * 10, 10).size
    10
    """
    codes, _ = pd.factorize(np.asarray(strata), use_na_sentinel=False)
    total = codes.size
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    sizes = np.bincount(codes)
    want = np.maximum(1, np.floor(sizes * n / total)).astype(np.int64)
    want = np.minimum(want, sizes)
    # hand out the rows left over by flooring to the strata with the largest remainders
    short = n - int(want.sum())
    if short > 0:
        room = sizes - want
        frac = sizes * n / total - want
        for s in np.argsort(-frac, kind="stable"):
            if short == 0:
                break
            if room[s] > 0:
                want[s] += 1
                short -= 1
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picked = [
        rng.choice(order[starts[s] : starts[s] + sizes[s]], size=int(want[s]), replace=False)
        for s in range(sizes.size)
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)
