"""Reading cells by ``soma_joinid``: obs columns, raw counts of a few cells, a stratified sample.

Two scales. :func:`read_obs` and :func:`read_counts` are for a few cells (a sample, a query): they
build a pandas frame, with Python objects per cell. For every embedded cell (up to the whole
Census, ~100M) only :func:`read_obs_codes` and :func:`stratified_indices_codes` are used: they read
one column in chunks of joinids as integer codes and draw the sample from the codes, so what is
held per cell is the caller's 8-byte joinid plus a 4-byte code; everything else is per chunk
(``_CHUNK`` cells, ~50 MB of temporaries) or per stratum.
"""

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
    import pyarrow as pa
    import tiledbsoma as soma

__all__ = [
    "check_obs_columns",
    "read_counts",
    "read_obs",
    "read_obs_codes",
    "stratified_indices",
    "stratified_indices_codes",
]

logger = logging.getLogger(__name__)

#: Cells per obs read and per pass of the sampler: 8 MB of joinids per read; the sampler's
#: temporaries (a few int64 arrays of this length) stay near 50 MB whatever the cell count.
_CHUNK = 1 << 20


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
    check_obs_columns(experiment, columns)
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


def check_obs_columns(experiment: soma.Experiment, columns: Sequence[str]) -> None:
    """Raise :class:`CensusScviError` naming the valid columns when one of ``columns`` is not in obs."""
    present = list(experiment.obs.schema.names)
    missing = [c for c in columns if c not in present]
    if missing:
        msg = f"obs column(s) {missing} are not in the census obs; valid: {', '.join(sorted(present))}"
        raise CensusScviError(msg, hint="fix evaluate.label_key / --labels / batch keys")


# ---- one column of many cells, as codes --------------------------------------------------------
def read_obs_codes(
    experiment: soma.Experiment,
    joinids: npt.NDArray[np.int64],
    column: str,
    *,
    chunk_size: int = _CHUNK,
) -> tuple[npt.NDArray[np.int32], list[Any]]:
    """One obs ``column`` for ``joinids`` as integer codes, read ``chunk_size`` joinids at a time.

    For every embedded cell (up to the whole Census): no per-cell Python object is made. A
    dictionary (categorical) column's codes are taken as stored; any other column is
    dictionary-encoded chunk by chunk. Memory: the 4-byte codes plus one chunk's read.

    Parameters
    ----------
    experiment
        The census experiment.
    joinids
        obs soma_joinids, any order (ascending reads fastest: each chunk is one range).
    column
        The obs column (must exist).
    chunk_size
        Joinids per read.

    Returns
    -------
    ``codes`` (int32, one per ``joinids`` entry, in that order) and ``values``: ``values[c]`` is
    the column's value of code ``c`` (``None`` for a missing value). ``values`` may hold values
    no listed cell has (a dictionary's unused entries).

    Examples
    --------
    >>> codes, values = read_obs_codes(experiment, joinids, "cell_type")  # doctest: +SKIP
    >>> values[codes[0]]  # doctest: +SKIP
    'B cell'
    """
    check_obs_columns(experiment, [column])
    if chunk_size <= 0:
        msg = f"{chunk_size=} must be > 0"
        raise CensusScviError(msg, hint="pass a positive number of joinids per read")
    joinids = np.asarray(joinids)
    codes = np.empty(joinids.size, np.int32)
    lookup: dict[Any, int] = {}  # value -> code, shared by every chunk
    for start in range(0, joinids.size, chunk_size):
        part = joinids[start : start + chunk_size].astype(np.int64, copy=False)
        codes[start : start + part.size] = _chunk_codes(experiment, part, column, lookup)
    return codes, list(lookup)


def _chunk_codes(
    experiment: soma.Experiment,
    joinids: npt.NDArray[np.int64],
    column: str,
    lookup: dict[Any, int],
) -> npt.NDArray[np.int32]:
    """Codes of ``column`` for one chunk of ``joinids``, in their order."""
    ids = np.unique(joinids)  # sorted
    lo, hi = experiment.obs.domain[0]
    outside = int(np.searchsorted(ids, lo) + ids.size - np.searchsorted(ids, hi, side="right"))
    if outside:
        msg = f"{outside} embedded soma_joinids are not in the census obs (rows {lo}..{hi})"
        raise CensusScviError(msg, hint="the embedding belongs to another census; check census.uri")
    span = int(ids[-1]) - int(ids[0]) + 1
    # one range read when the chunk is dense (its extra rows are dropped below); a point list
    # otherwise, so a sparse selection never reads the cells between
    coords: Any = slice(int(ids[0]), int(ids[-1])) if span <= 2 * ids.size else ids
    table = experiment.obs.read(coords=(coords,), column_names=[SOMA_JOINID, column]).concat()
    got = table.column(SOMA_JOINID).to_numpy()
    at = np.minimum(np.searchsorted(ids, got), ids.size - 1)
    keep = ids[at] == got
    if int(keep.sum()) != ids.size:
        msg = f"{ids.size - int(keep.sum())} embedded soma_joinids are not in the census obs"
        raise CensusScviError(msg, hint="the embedding belongs to another census; check census.uri")
    by_id = np.empty(ids.size, np.int32)
    by_id[at[keep]] = _encode(table.column(column), lookup)[keep]
    return by_id[np.searchsorted(ids, joinids)]


def _encode(column: pa.ChunkedArray, lookup: dict[Any, int]) -> npt.NDArray[np.int32]:
    """Codes of an Arrow column in ``lookup``'s numbering (extended with its new values)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = [np.empty(0, np.int32)]
    for arr in column.chunks:
        enc = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)
        values = enc.dictionary.to_pylist()
        if enc.null_count:
            values.append(None)  # the missing value gets a code of its own, as 'nan' did
        lut = np.array([lookup.setdefault(v, len(lookup)) for v in values], np.int32)
        index = enc.indices.fill_null(len(enc.dictionary)) if enc.null_count else enc.indices
        parts.append(lut[index.to_numpy(zero_copy_only=False)])
    return np.concatenate(parts)


def read_counts(
    experiment: soma.Experiment, joinids: npt.NDArray[np.int64], feature_ids: Sequence[str]
) -> ad.AnnData:
    """Raw counts of ``joinids`` (rows, in that order) x ``feature_ids`` (columns, in that order).

    Cells scattered over the census (a random sample) touch nearly every X tile: open the census
    with capped buffers (:func:`census_scvi.soma.tiledb_read_config`), or TileDB's defaults let the
    reader hold what it decompressed (5 GB for 10k of 200k cells, growing with the census).
    """
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
    ``n`` is at least their number. Returned sorted. The strata are numbered in the order they
    first appear; for many rows pass integer codes to :func:`stratified_indices_codes` (the same
    sample, without a Python object per row).

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
    return _stratified(codes, n, seed=seed)


def stratified_indices_codes(
    codes: npt.NDArray[np.integer[Any]], n: int, *, seed: int = 0
) -> npt.NDArray[np.int64]:
    """:func:`stratified_indices` of integer stratum codes, in memory independent of the rows.

    The same sample as ``stratified_indices(codes, n, seed=seed)`` (and as on the labels the
    codes stand for, whatever their numbering), drawn in passes of ``_CHUNK`` rows: beyond
    ``codes`` it holds only per-stratum counts, the ``n`` picked positions and one chunk's
    temporaries (the earlier implementation held 16 more bytes per row: int64 codes from
    ``pd.factorize`` and their argsort).

    Parameters
    ----------
    codes
        One non-negative integer per row (e.g. from :func:`read_obs_codes`).
    n
        Sample size.
    seed
        Random seed.

    Examples
    --------
    >>> stratified_indices_codes(np.array([0] * 90 + [1] * 10), 10).size
    10
    """
    codes = np.asarray(codes)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        msg = f"codes must be a 1-d integer array, got dtype {codes.dtype} with shape {codes.shape}"
        raise CensusScviError(msg, hint="pass one integer code per row (read_obs_codes)")
    if codes.size and int(codes.min()) < 0:
        msg = f"codes must be >= 0, got {int(codes.min())}"
        raise CensusScviError(msg, hint="use codes that index the values, e.g. read_obs_codes")
    return _stratified(codes, n, seed=seed)


def _stratified(codes: npt.NDArray[np.integer[Any]], n: int, *, seed: int) -> npt.NDArray[np.int64]:
    """Draw ``want[s]`` rows of each stratum ``s``, as ranks in the stratum, then find their rows.

    Equal to drawing from the positions of each stratum sorted stably by stratum (the earlier
    implementation, kept as the test oracle): ``rng.choice(rows, k, replace=False)`` is
    ``rows[rng.choice(len(rows), k, replace=False)]``.
    """
    total = codes.size
    if n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    stratum, sizes = _strata(codes)
    want = _allocation(sizes, n, total)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picked = [
        starts[s] + rng.choice(int(sizes[s]), size=int(want[s]), replace=False)
        for s in range(sizes.size)
    ]
    return _rows_at_ranks(codes, stratum, sizes, np.sort(np.concatenate(picked)))


def _strata(
    codes: npt.NDArray[np.integer[Any]],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``stratum[code]`` (strata numbered by first appearance, -1: absent) and each one's size."""
    k = int(codes.max()) + 1
    first = np.full(k, codes.size, np.int64)
    count = np.zeros(k, np.int64)
    for start in range(0, codes.size, _CHUNK):
        part = codes[start : start + _CHUNK]
        here = np.bincount(part, minlength=k)
        if ((here > 0) & (count == 0)).any():  # a stratum first seen here: find where
            u, at = np.unique(part, return_index=True)
            first[u] = np.minimum(first[u], start + at)
        count += here
    present = np.flatnonzero(count)
    by_first = present[np.argsort(first[present])]
    stratum = np.full(k, -1, np.int64)
    stratum[by_first] = np.arange(by_first.size)
    return stratum, count[by_first]


def _allocation(sizes: npt.NDArray[np.int64], n: int, total: int) -> npt.NDArray[np.int64]:
    """Rows per stratum: proportional, at least one each, the flooring's leftovers handed out."""
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
    return want


def _rows_at_ranks(
    codes: npt.NDArray[np.integer[Any]],
    stratum: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    ranks: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Positions of the rows whose rank in the stratum-sorted order is in ``ranks`` (sorted).

    A row's rank is its stratum's start plus the number of earlier rows of its stratum; one pass
    over the rows in chunks, counting each stratum's rows seen so far.
    """
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    seen = np.zeros(sizes.size, np.int64)
    found = [np.empty(0, np.int64)]
    # a 16-bit stratum number sorts by radix (numpy's stable sort), several times faster
    small = stratum.astype(np.uint16) if sizes.size <= 1 << 16 else stratum
    for start in range(0, codes.size, _CHUNK):
        s = small[codes[start : start + _CHUNK]]
        order = np.argsort(s, kind="stable")
        by_s = s[order]
        count = np.bincount(s, minlength=sizes.size)
        first_here = np.cumsum(count) - count
        rank = np.empty(s.size, np.int64)
        rank[order] = starts[by_s] + seen[by_s] + np.arange(s.size) - first_here[by_s]
        at = np.minimum(np.searchsorted(ranks, rank), ranks.size - 1)
        found.append(start + np.flatnonzero(ranks[at] == rank))
        seen += count
    return np.concatenate(found)
