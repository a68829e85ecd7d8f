"""Prepare stage: training cells, highly variable genes, batch label, training data.

``run_prepare(config, run_dir=...)`` writes into ``RUN_DIR/prepare/``:

- ``hvg.parquet``: every gene with its Seurat v3 statistics, ``highly_variable`` and ``rank``;
- ``cells.parquet``: the training cells (``soma_joinid``, ``batch``) in training row order;
- ``anndata_model.h5ad`` (``train.mode: memory`` only): cells x HVGs raw counts (float32 CSR),
  written chunk by chunk so X is never held whole;
- ``hv_genes.pkl`` when ``anndata.write_hv_genes_pkl`` (the original pipeline's file);
- ``manifest.json``, last.

Memory is bounded by ``hvg.chunk_nnz`` (plus the per-cell obs columns), not by the number of
cells: X is streamed three times (two HVG passes, one write pass).

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.prepare._stage import run_prepare
>>> result = run_prepare(load_config(None), run_dir=Path("runs/demo"))  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.batches import batch_codes, check_columns
from census_scvi.constants import (
    BATCH_KEY,
    CELL_TYPE,
    FEATURE_ID,
    FEATURE_NAME,
    HV_GENES_PKL,
    HVG_FILE,
    MEASUREMENT,
    PREPARE_DIR,
    SOMA_JOINID,
    STAGE_LOCK,
)
from census_scvi.errors import CensusScviError
from census_scvi.prepare._genes import _chunks_for, _n_rows, _x_layer, highly_variable_genes
from census_scvi.prepare._io import write_cells
from census_scvi.prepare._parallel import ExperimentOpener
from census_scvi.progress import track
from census_scvi.rundir import atomic_path, peak_rss_bytes, run_stage
from census_scvi.soma import census_fingerprint

if TYPE_CHECKING:
    import pandas as pd
    import tiledbsoma as soma

    from census_scvi.config import Config

__all__ = [
    "CELLS_FILE",
    "PrepareResult",
    "cell_filters",
    "highly_variable_genes",
    "run_prepare",
    "select_cells",
    "write_model_anndata",
]

logger = logging.getLogger(__name__)

CELLS_FILE = "cells.parquet"
# config sections whose change invalidates prepare's artifacts (train.mode goes into the inputs)
_SECTIONS = ("census", "hvg", "anndata")


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    """What ``run_prepare`` did (or found already done)."""

    run_dir: Path
    skipped: bool
    n_cells_total: int
    n_cells: int
    removed: list[tuple[str, str, int]]
    n_genes: int
    n_hvg: int
    n_batches: int
    n_hvg_batches: int
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def prepare_dir(self) -> Path:
        return Path(self.run_dir) / PREPARE_DIR

    def figures(self) -> dict[str, Any]:
        """The figures recorded in the manifest."""
        return {
            "n_cells_total": self.n_cells_total,
            "n_cells": self.n_cells,
            "removed": [list(r) for r in self.removed],
            "n_genes": self.n_genes,
            "n_hvg": self.n_hvg,
            "n_batches": self.n_batches,
            "n_hvg_batches": self.n_hvg_batches,
            "seconds": round(self.seconds, 2),
            "peak_rss_bytes": self.peak_rss_bytes,
        }

    @classmethod
    def from_manifest(cls, run_dir: Path, manifest: dict[str, Any]) -> PrepareResult:
        f = manifest.get("figures", {})
        return cls(
            run_dir=Path(run_dir),
            skipped=True,
            n_cells_total=int(f.get("n_cells_total", 0)),
            n_cells=int(f.get("n_cells", 0)),
            removed=[(str(a), str(b), int(c)) for a, b, c in f.get("removed", [])],
            n_genes=int(f.get("n_genes", 0)),
            n_hvg=int(f.get("n_hvg", 0)),
            n_batches=int(f.get("n_batches", 0)),
            n_hvg_batches=int(f.get("n_hvg_batches", 0)),
            outputs=dict(manifest.get("outputs", {})),
            seconds=float(f.get("seconds", 0.0)),
            peak_rss_bytes=int(f.get("peak_rss_bytes", 0)),
        )

    def summary(self) -> str:
        """One paragraph: cells kept and removed by each condition, genes, batches, outputs."""
        if self.skipped:
            head = (
                f"prepare: already done in {self.prepare_dir} (config and census unchanged; "
                "--force redoes it). "
            )
        else:
            head = (
                f"prepare: done in {self.seconds:.1f} s (peak RSS {_size(self.peak_rss_bytes)}). "
            )
        removed = "; ".join(f"{n:,} by {key} ({cond})" for key, cond, n in self.removed)
        cells = (
            f"Kept {self.n_cells:,} of {self.n_cells_total:,} cells"
            + (f", removed {removed}" if removed else "")
            + ". "
        )
        genes = (
            f"Selected {self.n_hvg:,} highly variable genes of {self.n_genes:,} (Seurat v3 on raw "
            f"counts over {self.n_hvg_batches} HVG batches); {self.n_batches:,} batch labels. "
        )
        files = []
        for name, path in self.outputs.items():
            p = Path(path)
            size = _size(_path_size(p)) if p.exists() else "missing"
            files.append(f"{name} {p} ({size})")
        return head + cells + genes + "Wrote " + ", ".join(files) + "."


def _path_size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------
def cell_filters(config: Config) -> list[tuple[str, str]]:
    """The training-cell conditions as ``(config key, SOMA value filter)``, in order.

    Their conjunction is ``config.model_obs_filter()``.
    """
    out: list[tuple[str, str]] = []
    if config.census.obs_query_model:
        out.append(("census.obs_query_model", config.census.obs_query_model))
    if config.census.obs_query:
        out.append(("census.obs_query", config.census.obs_query))
    if config.hvg.min_genes is not None:
        out.append(("hvg.min_genes", f"nnz >= {config.hvg.min_genes}"))
    return out


def _join(filters: Sequence[str]) -> str | None:
    filters = [f for f in filters if f]
    return " and ".join(f"({f})" for f in filters) if filters else None


def _read_obs(
    obs: soma.DataFrame, value_filter: str | None, columns: Sequence[str], *, key: str
) -> pd.DataFrame:
    import tiledbsoma as soma

    valid = list(obs.schema.names)
    try:
        tbl = obs.read(value_filter=value_filter, column_names=list(columns)).concat()
    except (soma.SOMAError, ValueError) as e:
        text = str(e)
        m = re.search(r"[Cc]olumn '?([^' ]+)'? does not exist", text)
        if m:
            msg = (
                f"{key} '{value_filter}' names obs column '{m.group(1)}' that does not exist; "
                f"valid columns: {', '.join(valid)}"
            )
            raise CensusScviError(msg, hint=f"fix {key} in the config") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        msg = f"{key} '{value_filter}' is not a valid SOMA value filter: {first}"
        raise CensusScviError(
            msg, hint='e.g. "is_primary_data == True and nnz >= 300" (== != < > in [...])'
        ) from None
    return tbl.to_pandas()


def select_cells(
    experiment: soma.Experiment,
    *,
    filters: Sequence[tuple[str, str]],
    columns: Sequence[str],
) -> tuple[pd.DataFrame, int, list[tuple[str, str, int]]]:
    """Read the obs columns of the cells matching every filter, sorted by ``soma_joinid``.

    Parameters
    ----------
    experiment
        The census experiment (e.g. ``census["census_data"]["homo_sapiens"]``).
    filters
        ``(config key, SOMA value filter)`` pairs, combined with ``and`` (see
        :func:`cell_filters`). Each is counted separately for the summary.
    columns
        obs columns to return (``soma_joinid`` is always included).

    Returns
    -------
    ``(obs, n_total, removed)``: the selected cells' columns, the number of cells in the
    experiment, and ``(key, filter, cells removed)`` for each filter in turn.

    Raises
    ------
    CensusScviError
        When a filter names a column that does not exist (the valid columns are listed), does
        not parse, or when no cell matches.
    """
    obs_df = experiment.obs
    valid = list(obs_df.schema.names)
    cols = list(dict.fromkeys([SOMA_JOINID, *columns]))
    check_columns(cols, valid, what="prepare's obs columns")
    n_total = int(obs_df.count)
    removed: list[tuple[str, str, int]] = []
    n_prev = n_total
    for i in range(len(filters) - 1):
        key, cond = filters[i]
        so_far = _join([f for _, f in filters[: i + 1]])
        n_i = len(_read_obs(obs_df, so_far, [SOMA_JOINID], key=key))
        removed.append((key, cond, n_prev - n_i))
        n_prev = n_i
    last_key = filters[-1][0] if filters else "census.obs_query_model"
    full = _join([f for _, f in filters])
    obs = _read_obs(obs_df, full, cols, key=last_key)
    if filters:
        removed.append((filters[-1][0], filters[-1][1], n_prev - len(obs)))
    if len(obs) == 0:
        msg = f"the training cell filter '{full}' matches none of the {n_total:,} cells"
        raise CensusScviError(
            msg, hint="relax census.obs_query_model / census.obs_query / hvg.min_genes"
        )
    obs = obs.sort_values(SOMA_JOINID, kind="stable").reset_index(drop=True)
    return obs, n_total, removed


# ----------------------------------------------------------------------------------------------
# highly variable genes
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# training h5ad
# ----------------------------------------------------------------------------------------------
def write_model_anndata(
    experiment: soma.Experiment,
    path: Path,
    *,
    obs: pd.DataFrame,
    hvg: pd.DataFrame,
    chunks: Sequence[slice] | None = None,
    chunk_nnz: int = 4_000_000,
    compression: str | None = "gzip",
    compression_level: int | None = None,
) -> int:
    """Write cells x HVGs raw counts to an h5ad, chunk by chunk (X never held whole).

    Parameters
    ----------
    experiment
        The census experiment.
    path
        Output ``.h5ad`` (write to a temporary name; the caller renames it).
    obs
        Selected cells, ascending ``soma_joinid``, with the obs columns to store (``batch``, ...).
        Rows keep this order; the obs index is ``str(soma_joinid)``.
    hvg
        The :func:`highly_variable_genes` table; columns are the ``highly_variable`` genes in
        ascending var ``soma_joinid`` order (the model gene order), var indexed by
        ``feature_id`` with column ``feature_name``.
    chunks, chunk_nnz
        Cell slices to read at a time, or the stored-value budget to plan them.
    compression, compression_level
        h5py compression for X (``"gzip"``, ``"lzf"`` or None) and the gzip level.

    Returns
    -------
    Stored values written.
    """
    import pandas as pd
    import scipy.sparse as sp

    from census_scvi.prepare._io import write_csr_h5ad
    from census_scvi.soma import iter_x_chunks

    X = _x_layer(experiment)
    genes = hvg[hvg["highly_variable"]].sort_values(SOMA_JOINID)
    gene_ids = genes[SOMA_JOINID].to_numpy().astype(np.int64)
    n_hvg = len(gene_ids)
    lut = np.full(int(gene_ids.max()) + 1, -1, dtype=np.int64)
    lut[gene_ids] = np.arange(n_hvg)
    obs_joinids = obs[SOMA_JOINID].to_numpy().astype(np.int64)
    if chunks is None:
        chunks = _chunks_for(X, obs, chunk_nnz, len(hvg))

    def blocks() -> Iterator[tuple[Any, Any, Any]]:
        it = iter_x_chunks(X, obs_joinids, chunks, var_joinids=gene_ids)
        cells = len(obs_joinids)
        progress = track(
            it, description="writing anndata", total=cells, weight=_n_rows, unit="cells"
        )
        for c in progress:
            m = sp.csr_matrix(
                (c.data, (c.rows - c.row_start, lut[c.cols])), shape=(c.n_rows, n_hvg)
            )
            m.sum_duplicates()
            m.sort_indices()
            yield (
                m.indptr.astype(np.int64),
                m.indices.astype(np.int32),
                m.data.astype(np.float32, copy=False),
            )

    obs_out = obs.copy()
    obs_out.index = pd.Index(obs_out[SOMA_JOINID].astype(str).to_numpy(), dtype=object)
    var_out = pd.DataFrame(
        {FEATURE_NAME: genes[FEATURE_NAME].astype(str).to_numpy()},
        index=pd.Index(genes[FEATURE_ID].astype(str).to_numpy(), name=None, dtype=object),
    )
    return write_csr_h5ad(
        path,
        obs_out,
        var_out,
        blocks(),
        compression=compression,
        compression_opts=compression_level if compression == "gzip" else None,
    )


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------


def _expected_outputs(config: Config, pdir: Path) -> dict[str, Path]:
    out = {"hvg": pdir / HVG_FILE, "cells": pdir / CELLS_FILE}
    if config.train.mode == "memory":
        out["anndata"] = pdir / config.anndata.model_filename
    if config.anndata.write_hv_genes_pkl:
        out["hv_genes_pkl"] = pdir / HV_GENES_PKL
    return out


def run_prepare(config: Config, *, run_dir: Path, force: bool = False) -> PrepareResult:
    """Run the prepare stage (skipped when its manifest matches, unless ``force``).

    Parameters
    ----------
    config
        The resolved config (``census``, ``hvg``, ``anndata`` and ``train.mode`` are used).
    run_dir
        The run directory; artifacts go to ``run_dir/prepare/``.
    force
        Redo the stage even when a matching manifest exists.

    Returns
    -------
    A :class:`PrepareResult`; ``print(result.summary())`` describes it.
    """
    run_dir = Path(run_dir)
    outputs = _expected_outputs(config, run_dir / PREPARE_DIR)
    inputs = {"census": census_fingerprint(config), "train.mode": config.train.mode}
    with run_stage(
        run_dir,
        PREPARE_DIR,
        config=config,
        sections=_SECTIONS,
        inputs=inputs,
        force=force,
        lock=STAGE_LOCK,
    ) as stage:
        if stage.skipped:
            assert stage.previous is not None
            return PrepareResult.from_manifest(run_dir, stage.previous)
        result = _prepare(config, run_dir=run_dir, outputs=outputs)
        result.seconds = stage.timer.seconds
        result.peak_rss_bytes = peak_rss_bytes()
        census = {
            "uri": config.census_uri(),
            "version": config.census.version,
            "organism": config.census.organism,
        }
        stage.record(
            figures=result.figures(),
            outputs=outputs,
            listed={k: str(v) for k, v in outputs.items()},
            census=census,
        )
    return result


def _prepare(config: Config, *, run_dir: Path, outputs: dict[str, Path]) -> PrepareResult:
    import pandas as pd

    from census_scvi.soma import tiledb_read_config
    from census_scvi.soma._open import get_experiment, open_census

    hv = config.hvg
    ac = config.anndata
    sep = ac.batch_key_separator
    with open_census(config, tiledb_config=tiledb_read_config(hv.read_buffer_bytes)) as census:
        exp = get_experiment(census, config.census.organism)
        valid = list(exp.obs.schema.names)
        check_columns(hv.hvg_batch, valid, what="hvg.hvg_batch")
        check_columns(ac.batch_key, valid, what="anndata.batch_key")
        if hv.min_genes is not None:
            check_columns(["nnz"], valid, what="hvg.min_genes (needs obs 'nnz')")
        extra = [c for c in (CELL_TYPE, "nnz") if c in valid]
        columns = list(dict.fromkeys([*ac.batch_key, *hv.hvg_batch, *extra]))
        obs, n_total, removed = select_cells(exp, filters=cell_filters(config), columns=columns)
        logger.info("prepare: %d of %d cells selected", len(obs), n_total)

        hvg_codes, hvg_names = batch_codes(obs, hv.hvg_batch, sep)
        codes, labels = batch_codes(obs, ac.batch_key, sep)
        obs[BATCH_KEY] = pd.Categorical.from_codes(codes, categories=pd.Index(labels, dtype=str))
        X = _x_layer(exp)
        n_vars = int(exp.ms[MEASUREMENT].var.count)
        chunks = _chunks_for(X, obs, hv.chunk_nnz, n_vars)
        joinids = obs[SOMA_JOINID].to_numpy().astype(np.int64)
        hvg = highly_variable_genes(
            exp,
            obs_joinids=joinids,
            batch=hvg_codes,
            batch_names=[str(x) for x in hvg_names],
            n_top_genes=hv.top_n_hvg,
            span=hv.span,
            max_loess_jitter=hv.max_loess_jitter,
            chunks=chunks,
            processes=hv.processes,
            opener=ExperimentOpener(config, tiledb_read_config(hv.read_buffer_bytes)),
        )
        with atomic_path(outputs["hvg"]) as tmp:
            hvg.to_parquet(tmp, index=False)
        with atomic_path(outputs["cells"]) as tmp:
            write_cells(tmp, joinids, codes, labels, columns=(SOMA_JOINID, BATCH_KEY))
        if "hv_genes_pkl" in outputs:
            # the original pipeline's artifact (a pickled pandas Index of var soma_joinids);
            # written for old tools only, never read back by census-scvi
            hv_idx = pd.Index(
                np.sort(hvg.loc[hvg["highly_variable"], SOMA_JOINID].to_numpy()), name=SOMA_JOINID
            )
            with atomic_path(outputs["hv_genes_pkl"]) as tmp, tmp.open("wb") as f:
                pickle.dump(hv_idx, f)
        if "anndata" in outputs:
            obs_cols = list(dict.fromkeys([SOMA_JOINID, BATCH_KEY, *ac.batch_key, *hv.hvg_batch]))
            if CELL_TYPE in obs.columns:
                obs_cols.append(CELL_TYPE)
            with atomic_path(outputs["anndata"]) as tmp:
                write_model_anndata(
                    exp,
                    tmp,
                    obs=obs[obs_cols],
                    hvg=hvg,
                    chunks=chunks,
                    compression=None if ac.compression == "none" else ac.compression,
                    compression_level=ac.compression_level,
                )
    return PrepareResult(
        run_dir=run_dir,
        skipped=False,
        n_cells_total=n_total,
        n_cells=len(obs),
        removed=removed,
        n_genes=len(hvg),
        n_hvg=int(hvg["highly_variable"].sum()),
        n_batches=len(labels),
        n_hvg_batches=len(hvg_names),
        outputs={k: str(v) for k, v in outputs.items()},
    )
