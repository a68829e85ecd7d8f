"""What the train stage reads from ``prepare/``, checked against the config before any training.

``train.mode: memory`` reads ``prepare/anndata_model.h5ad`` (its genes, batch labels and cells
must be what ``hvg.parquet`` / ``cells.parquet`` and the config say); ``train.mode: stream``
reads ``prepare/cells.parquet`` + ``prepare/hvg.parquet`` and checks them against the census it
will stream from. A mismatch is an error naming ``census-scvi prepare --force``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from census_scvi.batches import batch_codes, batch_labels
from census_scvi.constants import BATCH_KEY, FEATURE_ID, HVG_FILE, MEASUREMENT, SOMA_JOINID, X_RAW
from census_scvi.errors import CensusScviError
from census_scvi.rundir import file_hash, read_table

if TYPE_CHECKING:
    import pandas as pd

    from census_scvi.config import Config

__all__ = [
    "CELLS_FILE",
    "TrainInputs",
    "memory_inputs",
    "read_hvgs",
    "read_inputs",
    "stream_inputs",
]

logger = logging.getLogger(__name__)

CELLS_FILE = "cells.parquet"


@dataclass
class TrainInputs:
    """The prepared data a run trains on, and the hashes that identify it in the manifest."""

    mode: str
    gene_ids: list[str]
    var_joinids: np.ndarray
    categories: list[str]
    hashes: dict[str, str]
    adata_path: Path | None = None
    cell_joinids: np.ndarray | None = None
    cell_codes: np.ndarray | None = None
    experiment_uri: str | None = None
    # the census context's TileDB settings (S3 region, unsigned requests for the public
    # census): the stream reader opens the experiment again, in each DataLoader worker
    tiledb_config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)


def read_inputs(config: Config, prepare_dir: Path) -> TrainInputs:
    """The inputs of ``config.train.mode``, checked (see the module docstring)."""
    if config.train.mode == "memory":
        return memory_inputs(config, prepare_dir)
    return stream_inputs(config, prepare_dir)


def _rerun_prepare(what: str) -> NoReturn:
    raise CensusScviError(what, hint="rerun 'census-scvi prepare --force' with this config")


def _check_batch(obs: pd.DataFrame, batch: np.ndarray, config: Config, where: str) -> None:
    """The prepared batch labels are ``anndata.batch_key`` joined by its separator."""
    keys = list(config.anndata.batch_key)
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        logger.debug("%s lacks batch_key columns %s; batch labels not re-derived", where, missing)
        return
    expected = np.asarray(batch_labels(obs, keys, config.anndata.batch_key_separator), dtype=object)
    bad = np.flatnonzero(expected != np.asarray(batch, dtype=object))
    if len(bad):
        i = int(bad[0])
        msg = (
            f"{where}: batch label {batch[i]!r} of cell {i} is not anndata.batch_key {keys} joined "
            f"by {config.anndata.batch_key_separator!r} ({expected[i]!r}); {len(bad)} cells differ"
        )
        _rerun_prepare(msg)


def read_hvgs(config: Config, prepare_dir: Path) -> tuple[list[str], np.ndarray]:
    """The model's genes: feature ids and var soma_joinids of the HVGs, in soma_joinid order."""

    path = prepare_dir / HVG_FILE
    if not path.is_file():
        msg = f"prepared gene table not found: {path}"
        raise CensusScviError(msg, hint="run 'census-scvi prepare' first")
    hvg = read_table(path, stage="prepare")
    need = {SOMA_JOINID, FEATURE_ID, "highly_variable"}
    if not need <= set(hvg.columns):
        _rerun_prepare(f"{path} lacks columns {sorted(need - set(hvg.columns))}")
    sel = hvg[hvg["highly_variable"].astype(bool)].sort_values(SOMA_JOINID)
    n, top = len(sel), config.hvg.top_n_hvg
    if n != top and n != len(hvg):
        _rerun_prepare(f"{path} marks {n} genes highly variable but hvg.top_n_hvg is {top}")
    if n == 0:
        _rerun_prepare(f"{path} marks no gene highly variable")
    return sel[FEATURE_ID].astype(str).tolist(), sel[SOMA_JOINID].to_numpy(dtype=np.int64)


def _sorted_categories(values: np.ndarray) -> list[str]:
    return sorted({str(v) for v in values})


# ------------------------------------------------------------------------------------------
# memory mode
# ------------------------------------------------------------------------------------------
def memory_inputs(config: Config, prepare_dir: Path) -> TrainInputs:
    """``prepare/anndata_model.h5ad``: HVG columns in order, batch labels, cells of cells.parquet."""
    gene_ids, var_joinids = read_hvgs(config, prepare_dir)
    path = prepare_dir / config.anndata.model_filename
    if not path.is_file():
        msg = f"prepared training data not found: {path}"
        raise CensusScviError(
            msg, hint="run 'census-scvi prepare' first (or set train.mode: stream)"
        )
    var_names, obs = _h5ad_var_names_and_obs(path)
    _check_genes(var_names, gene_ids, path)
    if BATCH_KEY not in obs.columns:
        _rerun_prepare(f"{path} has no obs column '{BATCH_KEY}'")
    batch = obs[BATCH_KEY].astype(str).to_numpy(dtype=object)
    if obs[BATCH_KEY].isna().any():
        _rerun_prepare(f"{path}: obs '{BATCH_KEY}' has missing values")
    _check_batch(obs, batch, config, str(path))
    _check_cells(obs, path, prepare_dir / CELLS_FILE)
    return TrainInputs(
        mode="memory",
        gene_ids=gene_ids,
        var_joinids=var_joinids,
        categories=_sorted_categories(batch),
        hashes={
            "anndata": file_hash(path, max_bytes=1 << 28),
            "hvg": file_hash(prepare_dir / HVG_FILE),
        },
        adata_path=path,
    )


def _h5ad_var_names_and_obs(path: Path) -> tuple[list[str], pd.DataFrame]:
    """var_names and obs of an h5ad, without reading X."""
    import anndata

    backed = anndata.read_h5ad(path, backed="r")
    try:
        return backed.var_names.astype(str).tolist(), backed.obs.copy()
    finally:
        backed.file.close()


def _check_genes(var_names: list[str], gene_ids: list[str], path: Path) -> None:
    if var_names == gene_ids:
        return
    extra = len(set(var_names) - set(gene_ids))
    lack = len(set(gene_ids) - set(var_names))
    order = " in another order" if not extra and not lack else ""
    msg = (
        f"{path} has {len(var_names)} genes{order} but prepare/hvg.parquet selects "
        f"{len(gene_ids)} ({extra} extra, {lack} missing); the model's genes are the HVGs "
        "in soma_joinid order"
    )
    _rerun_prepare(msg)


def _check_cells(obs: pd.DataFrame, path: Path, cells_path: Path) -> None:
    """The h5ad's cells are cells.parquet's, in its order (when both say)."""

    if not cells_path.is_file() or SOMA_JOINID not in obs.columns:
        return
    cells = read_table(cells_path, stage="prepare", columns=[SOMA_JOINID])
    if not np.array_equal(
        cells[SOMA_JOINID].to_numpy(np.int64), obs[SOMA_JOINID].to_numpy(np.int64)
    ):
        _rerun_prepare(f"{path} cells differ from {cells_path}")


# ------------------------------------------------------------------------------------------
# stream mode
# ------------------------------------------------------------------------------------------
def stream_inputs(config: Config, prepare_dir: Path) -> TrainInputs:
    """``prepare/cells.parquet`` + ``hvg.parquet``, checked against the census streamed from.

    Memory: ~30 bytes per cell at the peak (int64 joinids, int32 batch codes and their
    joinid-sorted copies); the batch labels stay dictionary-encoded, and the census obs is
    checked one Arrow batch at a time. Reading the labels and the obs as strings held
    ~370 bytes per cell (0.31 GiB at 873k cells, ~35 GiB at the Census's 99.6M).
    """
    from census_scvi.soma import census_fingerprint, get_experiment, open_census

    gene_ids, var_joinids = read_hvgs(config, prepare_dir)
    cells_path = prepare_dir / CELLS_FILE
    if not cells_path.is_file():
        msg = f"prepared cell table not found: {cells_path}"
        raise CensusScviError(msg, hint="run 'census-scvi prepare' first")
    joinids, codes, categories = _prepared_cells(cells_path)
    if len(joinids) == 0:
        _rerun_prepare(f"{cells_path} lists no cells")
    with open_census(config) as census:
        exp = get_experiment(census, config.census.organism)
        uri = exp.uri
        tiledb_config = dict(exp.context.tiledb_config)
        _check_census_genes(exp, var_joinids, gene_ids)
        _check_census_batches(exp, joinids, codes, categories, config, str(cells_path))
    return TrainInputs(
        mode="stream",
        gene_ids=gene_ids,
        var_joinids=var_joinids,
        categories=categories,
        hashes={
            "cells": file_hash(cells_path),
            "hvg": file_hash(prepare_dir / HVG_FILE),
            "census": census_fingerprint(config),
        },
        cell_joinids=joinids,
        cell_codes=codes,
        experiment_uri=uri,
        tiledb_config=tiledb_config,
    )


def _prepared_cells(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(joinids, codes, categories)`` of cells.parquet: int64, int32 into the sorted labels."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[SOMA_JOINID, BATCH_KEY], read_dictionary=[BATCH_KEY])
    except (OSError, ValueError, KeyError, pa.ArrowException):
        read_table(path, stage="prepare", columns=[SOMA_JOINID, BATCH_KEY])  # its one-line error
        raise
    joinids = table.column(SOMA_JOINID).to_numpy().astype(np.int64, copy=False)
    lookup: dict[str, int] = {}
    parts = []
    for chunk in table.column(BATCH_KEY).chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(chunk)
        names = [str(v) for v in chunk.dictionary.to_pylist()]
        lut = np.array([lookup.setdefault(n, len(lookup)) for n in names], dtype=np.int32)
        parts.append(lut[chunk.indices.to_numpy(zero_copy_only=False)])
    del table
    raw = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    categories = sorted(lookup)
    rank = {name: i for i, name in enumerate(categories)}
    remap = np.array([rank[name] for name in lookup], dtype=np.int32)
    return joinids, remap[raw] if raw.size else raw, categories


def _check_census_batches(
    exp: Any,
    joinids: np.ndarray,
    codes: np.ndarray,
    categories: list[str],
    config: Config,
    where: str,
) -> None:
    """Every cell is in the census obs with the prepared label (``anndata.batch_key`` joined).

    One Arrow batch of obs at a time, compared as codes: the labels of a batch's distinct
    key combinations are looked up among the prepared ones.
    """
    import tiledbsoma as soma

    keys = list(config.anndata.batch_key)
    missing = [k for k in keys if k not in exp.obs.keys()]
    if missing:
        logger.debug("%s: census obs lacks batch_key columns %s; not re-derived", where, missing)
        return
    order = np.argsort(joinids, kind="stable")
    sorted_ids, sorted_codes = joinids[order], codes[order]
    cats = np.asarray(categories, dtype=object)
    found, n_bad, first = 0, 0, None
    try:
        inside = sorted_ids[sorted_ids <= _obs_domain_max(exp)]  # others: "not in obs" below
        for table in exp.obs.read(coords=(inside,), column_names=[SOMA_JOINID, *keys]):
            ids = table.column(SOMA_JOINID).to_numpy().astype(np.int64, copy=False)
            pos = np.searchsorted(sorted_ids, ids)
            got, labels = batch_codes(table.to_pandas(), keys, config.anndata.batch_key_separator)
            at = np.minimum(np.searchsorted(cats, labels), max(len(cats) - 1, 0))
            known = np.where(cats[at] == labels, at, -1)
            bad = np.flatnonzero(known[got] != sorted_codes[pos])
            if bad.size and first is None:
                b = int(bad[0])
                first = (int(order[pos[b]]), cats[sorted_codes[pos[b]]], labels[got[b]])
            n_bad += int(bad.size)
            found += len(ids)
    except (soma.SOMAError, ValueError, KeyError) as e:
        msg = f"cannot read obs columns {keys} of the training cells from {exp.uri}: {e}"
        raise CensusScviError(msg) from None
    if found < len(joinids):
        _rerun_prepare(f"{where} lists cells that are not in the census obs")
    if first is not None:
        i, prepared, census_label = first
        msg = (
            f"{where}: batch label {prepared!r} of cell {i} is not anndata.batch_key {keys} "
            f"joined by {config.anndata.batch_key_separator!r} ({census_label!r}); "
            f"{n_bad} cells differ"
        )
        _rerun_prepare(msg)


def _obs_domain_max(exp: Any) -> int:
    """The largest soma_joinid the census obs domain allows (reading past it is a TileDB error)."""
    try:
        return int(exp.obs.domain[0][1])
    except (AttributeError, IndexError, TypeError):  # pragma: no cover - older tiledbsoma
        return int(np.iinfo(np.int64).max)


def _check_census_genes(exp: Any, var_joinids: np.ndarray, gene_ids: list[str]) -> None:
    """The census has the raw-count layer and the HVGs at their prepared soma_joinids."""
    ms = exp.ms[MEASUREMENT]
    if X_RAW not in ms.X:
        msg = f"census experiment {exp.uri} has no X layer '{X_RAW}'"
        raise CensusScviError(msg, hint="train.mode: stream reads raw counts from the census")
    var = (
        ms.var.read(coords=(var_joinids,), column_names=[SOMA_JOINID, FEATURE_ID])
        .concat()
        .to_pandas()
        .set_index(SOMA_JOINID)
        .reindex(var_joinids)
    )
    if var[FEATURE_ID].astype(str).tolist() != gene_ids:
        msg = f"prepare/hvg.parquet genes do not match the census var table of {exp.uri}"
        raise CensusScviError(msg, hint="check census.uri, then rerun prepare --force")
