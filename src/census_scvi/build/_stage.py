"""Bring your own census: build a Census-schema SOMA experiment from h5ad files.

Each input h5ad becomes one ``dataset_id`` in ``census_data/<organism>`` of a SOMA collection laid
out like the CELLxGENE Census (``census_info/{summary, datasets, summary_cell_counts,
organisms}``), so ``cellxgene_census.open_soma(uri=OUT_URI)`` and every census-scvi stage
(``census.uri: OUT_URI``) work on it. Ingestion uses tiledbsoma's multi-file append workflow
(``tiledbsoma.io.register_anndatas`` + ``from_anndata``); see :mod:`census_scvi.build._staging` for
the staging that keeps an existing census intact when a build fails. The presence matrix and
census_info are written by the SOMA writer the mini census uses too (:mod:`census_scvi.soma._writer`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from census_scvi.build._digest import Digest, check_new, obs_digests, read_digests, write_digests
from census_scvi.build._existing import (
    dataset_ids_in,
    dataset_organisms,
    export_chunks,
    gene_nnz,
    has_obs_key,
    read_presence,
)
from census_scvi.build._genes import check_organism
from census_scvi.build._h5ad import check_declared_organism, load_columns_map, peek_dataset_id
from census_scvi.build._ingest import ingest, write_presence, write_var_stats
from census_scvi.build._input import PreparedDataset, prepare_h5ad
from census_scvi.build._report import BuildResult, DatasetReport
from census_scvi.build._staging import (
    clean_stale,
    clone_census,
    create_staging_root,
    lock_path,
    staging_path,
    swap_into_place,
)
from census_scvi.constants import CENSUS_DATA, CENSUS_INFO, MEASUREMENT
from census_scvi.errors import CensusScviError
from census_scvi.progress import track
from census_scvi.soma._census_info import write_census_info
from census_scvi.soma._frames import read_dataframe
from census_scvi.soma._open import experiment_name
from census_scvi.soma._schema import DATASET_COLUMNS, UNKNOWN
from census_scvi.soma._writer import drop_member

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["BuildResult", "DatasetReport", "build_census"]

logger = logging.getLogger(__name__)


def _check_out_uri(out_uri: str) -> Path:
    if "://" in out_uri and not out_uri.startswith("file://"):
        msg = f"build-census writes local folders only, got '{out_uri}'"
        raise CensusScviError(msg, hint="build locally, then copy the folder to object storage")
    return Path(out_uri.removeprefix("file://")).expanduser().absolute()


def build_census(
    out_uri: str | os.PathLike[str],
    h5ads: Sequence[str | os.PathLike[str]],
    *,
    organism: str = "homo_sapiens",
    gene_ids: str | None = None,
    counts_layer: str | None = None,
    columns: str | os.PathLike[str] | None = None,
    append: bool = False,
    replace: bool = False,
) -> BuildResult:
    """Build (or extend) a Census-schema SOMA census from h5ad files.

    Parameters
    ----------
    out_uri
        Census root folder to create, or (with ``append``) to add to.
    h5ads
        Input files, one dataset each. The ``dataset_id`` is taken from a ``--columns``
        ``dataset_id`` mapping, else ``uns['dataset_id']``, else a single-valued obs
        ``dataset_id``, else the file stem.
    organism
        Experiment to write: ``'homo_sapiens'`` or ``'Homo sapiens'`` style.
    gene_ids
        var column holding Ensembl ids (default: the var index). Genes without an id are dropped;
        genes sharing an id have their counts summed.
    counts_layer
        Layer holding the raw counts (default: ``X``, else ``.raw.X``). The counts must be
        non-negative integers (float storage is fine); they are stored as float32 ``X/raw``.
    columns
        YAML file mapping Census obs columns to the files' columns (``donor_id: patient``).
        Census columns neither matched by name nor mapped are filled with ``"unknown"``;
        ``is_primary_data`` defaults to True.
    append
        Add to an existing census (required when ``out_uri`` exists).
    replace
        With ``append``: replace datasets whose ``dataset_id`` is already present. SOMA cannot
        delete cells, so the organism's experiment is rebuilt without them (cells and genes keep
        their order; cells after a replaced dataset get new ``soma_joinid`` values). A census not
        built by build-census (no ``source_obs_id`` column) is rebuilt the same way, once, on its
        first append.

    Returns
    -------
    :class:`BuildResult` (``.summary()`` for a report).

    Writes obs (the Census columns, plus the computed ``raw_sum``, ``nnz``, ``raw_mean_nnz``,
    ``raw_variance_nnz``, ``n_measured_vars``, plus ``source_obs_id`` =
    ``"<dataset_id>:<obs name>"``, the unique key tiledbsoma's append registration matches cells
    on), ``ms/RNA/var`` (``feature_id``,
    ``feature_name``, ``feature_length``, ``nnz``, ``n_measured_obs``), ``ms/RNA/X/raw`` and
    ``ms/RNA/feature_dataset_presence_matrix``; the build happens in a staging folder renamed onto
    ``out_uri`` on success, so a failed build leaves an existing census unchanged.

    One build per census at a time: a second one fails at once naming the holder (PID, host,
    since), and the folders of builds killed with ``kill -9`` are removed (and counted in the
    summary) by the next (:mod:`census_scvi.build._staging`). Refused before any work: a file
    whose Ensembl ids are another organism's (``ENSMUSG`` into ``homo_sapiens``); at ingestion:
    primary cells already in the census under another dataset id (same counts, or the same
    ``observation_joinid`` values; :mod:`census_scvi.build._digest`). The file's obs columns that
    are not stored are listed in the summary.

    Examples
    --------
    >>> res = build_census("atlas.soma", ["a.h5ad", "b.h5ad"], gene_ids="gene_ids")  # doctest: +SKIP
    >>> import cellxgene_census
    >>> census = cellxgene_census.open_soma(uri="atlas.soma")  # doctest: +SKIP
    """
    from census_scvi.rundir import hold_lock, peak_rss_bytes

    t0 = time.perf_counter()
    out = _check_out_uri(os.fspath(out_uri))
    out.parent.mkdir(parents=True, exist_ok=True)
    with hold_lock(lock_path(out), what=f"census {out}"):
        cleaned = clean_stale(out)
        plan = _plan(
            out,
            [Path(p).expanduser() for p in h5ads],
            organism=organism,
            columns=load_columns_map(None if columns is None else Path(columns)),
            append=append,
            replace=replace,
            gene_ids=gene_ids,
        )
        result = _staged_build(plan, gene_ids=gene_ids, counts_layer=counts_layer)
    result.cleaned = cleaned
    result.seconds = time.perf_counter() - t0
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _staged_build(plan: _Plan, *, gene_ids: str | None, counts_layer: str | None) -> BuildResult:
    """Build in a staging copy and swap it into place; a failure leaves the census as it was."""
    staging = staging_path(plan.out, "staging")
    try:
        if plan.existed:
            clone_census(plan.out, staging)
        else:
            plan.out.parent.mkdir(parents=True, exist_ok=True)
            create_staging_root(staging)
        result = _build(staging, plan, gene_ids=gene_ids, counts_layer=counts_layer)
        swap_into_place(staging, plan.out)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.created = not plan.existed
    return result


# ------------------------------------------------------------------------------------------
# the plan: every check that needs no write, so a bad input fails before any work
# ------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What a build will do, decided from the inputs and the existing census."""

    out: Path
    org: str
    paths: list[Path]
    ids: list[str]
    """dataset_id per input."""
    conflicts: list[str]
    """Input dataset ids already in the census (replaced)."""
    existed: bool
    old_datasets: pd.DataFrame | None
    old_summary: dict[str, str]
    columns: dict[str, str]


def _plan(
    out: Path,
    paths: list[Path],
    *,
    organism: str,
    columns: dict[str, str],
    append: bool,
    replace: bool,
    gene_ids: str | None = None,
) -> _Plan:
    """Check the inputs, the organism and the dataset ids against the existing census."""
    if not paths:
        msg = "build-census needs at least one input h5ad"
        raise CensusScviError(msg)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        msg = f"input h5ad file(s) not found: {', '.join(missing)}"
        raise CensusScviError(msg)
    org = experiment_name(organism)
    if not org.replace("_", "").isalnum():
        msg = f"organism '{organism}' is not a valid experiment name"
        raise CensusScviError(msg, hint="e.g. homo_sapiens or 'Mus musculus'")
    existed = out.exists()
    if existed and not append:
        msg = f"{out} already exists"
        raise CensusScviError(msg, hint="pass --append to add datasets to it, or choose a new path")
    # which datasets: ids first (cheap), so conflicts fail before any work
    ids = []
    for p in paths:  # the organism before any work (ingestion checks the final ids too)
        peek = peek_dataset_id(p, columns, gene_ids)
        check_declared_organism(peek.organism_term, p, org)
        check_organism(peek.gene_ids, p, org)
        ids.append(peek.dataset_id)
    dups = sorted({d for d in ids if ids.count(d) > 1})
    if dups:
        msg = f"several inputs have the same dataset_id: {', '.join(dups)}"
        raise CensusScviError(msg, hint="rename the files or set uns['dataset_id'] in each")
    old_datasets, old_summary, holders = _existing(out) if existed else (None, {}, {})
    conflicts = [d for d in ids if d in holders]
    if conflicts and not replace:
        msg = f"dataset_id(s) already in the census: {', '.join(conflicts)}"
        raise CensusScviError(msg, hint="pass --replace to replace them")
    elsewhere = [d for d in conflicts if holders[d] != org]
    if elsewhere:
        msg = f"dataset_id(s) {', '.join(elsewhere)} belong to another organism in this census"
        raise CensusScviError(msg, hint="give the new files other dataset ids")
    return _Plan(out, org, paths, ids, conflicts, existed, old_datasets, old_summary, columns)


def _existing(out: Path) -> tuple[pd.DataFrame | None, dict[str, str], dict[str, str]]:
    """The existing census's datasets table, summary labels and ``dataset_id -> organism``."""
    from census_scvi.soma._open import open_census_uri

    census = open_census_uri(str(out))
    try:
        datasets = None
        summary: dict[str, str] = {}
        if CENSUS_INFO in census:
            info = census[CENSUS_INFO]
            if "datasets" in info:
                datasets = read_dataframe(info["datasets"])
            if "summary" in info:
                frame = read_dataframe(info["summary"])
                if {"label", "value"} <= set(frame.columns):
                    labels, values = frame["label"].astype(str), frame["value"].astype(str)
                    summary = dict(zip(labels, values, strict=True))
        holders = dataset_organisms(census)
    finally:
        census.close()
    return datasets, summary, holders


# ------------------------------------------------------------------------------------------
# the build, in the staging census
# ------------------------------------------------------------------------------------------
class _DatasetsTable:
    """census_info/datasets being rebuilt: the old rows, in place, then the new ones."""

    def __init__(self, old: pd.DataFrame | None) -> None:
        import pandas as pd

        names = [c for c, _ in DATASET_COLUMNS]
        if old is None or len(old) == 0:
            self.frame = pd.DataFrame({c: pd.Series(dtype=object) for c in names})
        else:
            frame = old.drop(columns=[c for c in ("soma_joinid",) if c in old.columns])
            for c, kind in DATASET_COLUMNS:
                if c not in frame.columns:
                    frame[c] = 0 if kind == "int64" else ""
            self.frame = frame[names].reset_index(drop=True)
        self.row_of = {str(d): i for i, d in enumerate(self.frame["dataset_id"])}

    def set(self, dsid: str, values: dict[str, Any] | None = None) -> int:
        """Write the row of ``dsid`` (appended when new; blank columns when ``values`` is None)."""
        if values is None:
            values = {"dataset_id": dsid}
        row = [values.get(c, 0 if kind == "int64" else "") for c, kind in DATASET_COLUMNS]
        if dsid not in self.row_of:
            self.row_of[dsid] = len(self.frame)
            self.frame.loc[len(self.frame)] = row
        else:
            self.frame.loc[self.row_of[dsid]] = row
        return self.row_of[dsid]

    def set_cell_counts(self, obs_dataset_ids: pd.Series) -> None:
        """``dataset_total_cell_count`` from the experiment's obs ``dataset_id`` column."""
        import pandas as pd

        counts = pd.to_numeric(self.frame["dataset_total_cell_count"]).astype("int64")
        self.frame["dataset_total_cell_count"] = counts
        for d, n in obs_dataset_ids.value_counts().items():
            self.frame.at[self.row_of[str(d)], "dataset_total_cell_count"] = int(n)


@dataclass
class _Current:
    """The organism's experiment in the staging census before this build."""

    presence: tuple[Any, Any, Any] | None = None
    dataset_ids: list[str] = field(default_factory=list)
    rebuild: bool = False
    """SOMA cannot delete cells, and a census built elsewhere lacks the registration key: both
    rebuild the organism's experiment (cells and genes keep their order)."""


def _current(exp_uri: str, conflicts: list[str]) -> _Current:
    import tiledbsoma as soma

    if not soma.Experiment.exists(exp_uri):
        return _Current()
    with soma.Experiment.open(exp_uri) as exp:
        return _Current(
            presence=read_presence(exp),
            dataset_ids=dataset_ids_in(exp),
            rebuild=bool(conflicts) or not has_obs_key(exp),
        )


@dataclass
class _Ingested:
    added: list[tuple[int, PreparedDataset]] = field(default_factory=list)
    """(datasets-table row, dataset) per input."""
    reports: list[DatasetReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    schema_versions: set[str] = field(default_factory=set)


def _build(
    staging: Path, plan: _Plan, *, gene_ids: str | None, counts_layer: str | None
) -> BuildResult:
    """Ingest the inputs into ``staging``, then the census-wide columns and census_info."""
    import tiledbsoma as soma

    exp_uri = f"{staging}/{CENSUS_DATA}/{plan.org}"
    table = _DatasetsTable(plan.old_datasets)
    current = _current(exp_uri, plan.conflicts)
    for d in current.dataset_ids:  # a census built elsewhere may lack datasets-table rows
        if d not in table.row_of:
            table.set(d)
    kept = [d for d in current.dataset_ids if d not in plan.conflicts]
    removed = None
    if current.rebuild:
        # (the old presence rows of kept datasets stay valid: var keeps its soma_joinids)
        removed = _rebuild(staging, plan, table.row_of, current.presence)
    known = _known_digests(staging, plan, kept)
    done = _ingest_inputs(staging, plan, table, known, gene_ids=gene_ids, counts_layer=counts_layer)
    write_digests(staging, known)

    # census-wide columns and tables; cell counts of this organism's datasets from obs
    with soma.Experiment.open(exp_uri) as exp:
        obs_ids = read_dataframe(exp.obs, ["dataset_id"])["dataset_id"].astype(str)
    table.set_cell_counts(obs_ids)
    var = write_var_stats(exp_uri, (ds for _, ds in done.added), removed)
    write_presence(
        exp_uri,
        staging,
        shape=(max(len(table.frame), 1), max(len(var), 1)),
        old=current.presence,
        keep_rows=[table.row_of[d] for d in kept],
        new=done.added,
        var=var,
    )
    total, _ = write_census_info(
        staging,
        datasets=table.frame,
        summary=plan.old_summary,
        dataset_schema_version=_schema_version(done.schema_versions, plan.old_summary),
    )
    return BuildResult(
        uri=str(plan.out),
        organism=plan.org,
        created=False,
        datasets=done.reports,
        kept_datasets=len(kept),
        n_cells=len(obs_ids),
        n_genes=len(var),
        total_cells=total,
        seconds=0.0,
        peak_rss_bytes=0,
        warnings=done.warnings,
    )


def _schema_version(found: set[str], old_summary: dict[str, str]) -> str:
    """The one dataset schema version of the inputs and the existing census, else unknown."""
    old = old_summary.get("dataset_schema_version")
    versions = found | ({old} if old and old != UNKNOWN else set())
    return versions.pop() if len(versions) == 1 else UNKNOWN


def _known_digests(staging: Path, plan: _Plan, kept: list[str]) -> dict[str, Digest]:
    """Digests of the kept datasets: recorded ones, else (a census built elsewhere or before
    digests) the joinid digests from the original census's obs."""
    recorded = read_digests(staging)
    known = {d: recorded[d] for d in kept if d in recorded}
    missing = [d for d in kept if d not in recorded]
    if missing and plan.existed:
        import tiledbsoma as soma

        with soma.Experiment.open(f"{plan.out}/{CENSUS_DATA}/{plan.org}") as exp:
            known.update(obs_digests(exp, missing))
    # other organisms' datasets keep their recorded digests
    known.update({d: v for d, v in recorded.items() if d not in known and d not in plan.conflicts})
    return known


def _ingest_inputs(
    staging: Path,
    plan: _Plan,
    table: _DatasetsTable,
    known: dict[str, Digest],
    *,
    gene_ids: str | None,
    counts_layer: str | None,
) -> _Ingested:
    """Prepare and ingest every input, one at a time (each released after ingestion); one whose
    cells are already in the census (``known``, updated as inputs go in) is refused."""
    data_uri = f"{staging}/{CENSUS_DATA}"
    done = _Ingested()
    for path, dsid in track(list(zip(plan.paths, plan.ids, strict=True)), description="ingesting"):
        logger.info("ingesting %s as dataset %s", path.name, dsid)
        ds = prepare_h5ad(
            path,
            organism=plan.org,
            gene_ids=gene_ids,
            counts_layer=counts_layer,
            columns=plan.columns,
        )
        if ds.digest is not None:
            check_new(ds.digest, known, label=path.name, dataset_id=dsid)
            known[dsid] = ds.digest
        ingest(data_uri, plan.org, ds.adata, label=f"{path.name} (dataset {dsid})")
        row = table.set(
            dsid, {**ds.info, "dataset_id": dsid, "dataset_total_cell_count": ds.n_cells}
        )
        if ds.schema_version:
            done.schema_versions.add(ds.schema_version)
        if ds.symbol_keyed:
            done.warnings.append(
                f"{path.name}: genes look like symbols, not Ensembl ids (use --gene-ids COLUMN)"
            )
        done.reports.append(_report(ds, path, dsid, replaced=dsid in plan.conflicts))
        ds.release()
        done.added.append((row, ds))
    return done


def _report(ds: PreparedDataset, path: Path, dsid: str, *, replaced: bool) -> DatasetReport:
    return DatasetReport(
        dataset_id=dsid,
        path=str(path),
        n_cells=ds.n_cells,
        n_genes=ds.n_genes,
        counts_source=ds.source,
        n_genes_in=ds.n_genes_in,
        n_missing_ids=ds.n_missing_ids,
        n_merged_ids=ds.n_merged_ids,
        symbol_keyed=ds.symbol_keyed,
        placeholders=ds.placeholders,
        mapped=ds.mapped,
        replaced=replaced,
        dropped_obs=ds.dropped_obs,
    )


def _rebuild(
    staging: Path,
    plan: _Plan,
    row_of: dict[str, int],
    presence: tuple[Any, Any, Any] | None,
) -> tuple[Any, Any] | None:
    """Re-ingest the organism's cells minus the replaced datasets, in order, into staging.

    Reads the untouched original census. Returns the replaced datasets' ``(nnz, n_measured_obs)``
    per var soma_joinid (to subtract from var), or None when no cell is kept (var starts anew).
    """
    import numpy as np
    import tiledbsoma as soma

    data_uri = f"{staging}/{CENSUS_DATA}"
    drop_member(data_uri, plan.org, staging)
    with soma.Experiment.open(f"{plan.out}/{CENSUS_DATA}/{plan.org}") as exp:
        obs = read_dataframe(exp.obs, ["soma_joinid", "dataset_id"])
        joinids = obs["soma_joinid"].to_numpy()
        obs_ds = obs["dataset_id"].astype(str).to_numpy()
        keep = joinids[~np.isin(obs_ds, plan.conflicts)]
        if len(keep) == 0:
            return None
        n_var = int(exp.ms[MEASUREMENT].var.count)
        nnz = np.zeros(n_var, dtype=np.int64)
        measured = np.zeros(n_var, dtype=np.int64)
        for d in plan.conflicts:
            rows = joinids[obs_ds == d]
            d_nnz = gene_nnz(exp, rows, n_var)
            nnz += d_nnz
            if presence is not None and (presence[0] == row_of[d]).any():
                cols = presence[1][presence[0] == row_of[d]]
            else:
                cols = np.flatnonzero(d_nnz)
            measured[cols] += len(rows)
        chunks = export_chunks(exp, keep)
        for i, chunk in enumerate(track(chunks, description="re-ingesting kept cells")):
            ingest(data_uri, plan.org, chunk, label=f"existing cells (chunk {i})")
    return nnz, measured
