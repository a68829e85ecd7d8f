"""``build-census`` input side: one h5ad -> one Census-shaped AnnData (one ``dataset_id``).

Census-shaped means: ``X`` float32 CSR raw counts without stored zeros; ``obs`` with the Census
obs columns (:data:`~census_scvi.soma._schema.OBS_COLUMNS`) plus the registration key
(:data:`~census_scvi.soma._schema.OBS_KEY`) and a plain string index; ``var`` indexed (unnamed
index) by ``feature_id`` with ``feature_name``, ``feature_length`` and the ``nnz`` /
``n_measured_obs`` columns set to 0 (the census-wide values are computed after ingestion).
Unnamed indexes matter: tiledbsoma records a named index and restores it as the index on export,
whereas the Census (and every stage) reads ``feature_id`` as a var column.

The steps live by role: the file and its dataset id in :mod:`~census_scvi.build._h5ad`, gene ids in
:mod:`~census_scvi.build._genes`, obs in :mod:`~census_scvi.build._obs`; the raw-count rules are
:mod:`census_scvi.counts`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.build._digest import Digest, counts_digest, joinid_digest
from census_scvi.build._genes import (
    Genes,
    as_csr32,
    check_organism,
    merge_duplicates,
    read_gene_ids,
)
from census_scvi.build._h5ad import (
    check_declared_organism,
    dataset_id,
    declared_organism,
    read_h5ad,
    uns_str,
)
from census_scvi.build._obs import census_obs
from census_scvi.counts import CountProblem, count_problem, nonzero_moments
from census_scvi.errors import CensusScviError
from census_scvi.soma._schema import OBS_COLUMNS

if TYPE_CHECKING:
    from collections.abc import Mapping

    import anndata as ad
    import numpy.typing as npt
    import pandas as pd
    import scipy.sparse as sp

__all__ = ["PreparedDataset", "census_shaped", "dataset_stats", "prepare_h5ad"]

logger = logging.getLogger(__name__)

_UNS_INFO = {
    "citation": "citation",
    "collection_id": "collection_id",
    "collection_name": "collection_name",
    "collection_doi": "collection_doi",
    "collection_doi_label": "collection_doi_label",
    "dataset_version_id": "dataset_version_id",
    "dataset_title": "title",
}


@dataclass
class PreparedDataset:
    """One dataset, Census-shaped and ready for ingestion, with what was done to it."""

    dataset_id: str
    adata: ad.AnnData
    info: dict[str, str]
    """census_info/datasets metadata (citation, dataset_title, dataset_h5ad_path, ...)."""
    source: str
    """Where the counts came from: ``X``, ``.raw.X``, ``layers['NAME']`` or ``census``."""
    gene_nnz: npt.NDArray[np.int64] = field(repr=False)
    """Per var row: cells with a non-zero count."""
    path: Path | None = None
    n_genes_in: int = 0
    n_missing_ids: int = 0
    n_merged_ids: int = 0
    n_unversioned: int = 0
    symbol_keyed: bool = False
    placeholders: list[str] = field(default_factory=list)
    mapped: dict[str, str] = field(default_factory=dict)
    dropped_obs: list[str] = field(default_factory=list)
    """The file's obs columns not stored (neither a Census column nor mapped to one)."""
    digest: Digest | None = None
    """What identifies its cells (refuses the same cells twice)."""
    schema_version: str | None = None
    n_cells: int = field(init=False)
    n_genes: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_cells = int(self.adata.n_obs)
        self.n_genes = int(self.adata.n_vars)

    def release(self) -> None:
        """Drop the counts and obs (after ingestion); var names stay for the census-wide stats."""
        import anndata as ad

        self.adata = ad.AnnData(var=self.adata.var)


# ------------------------------------------------------------------------------------------
# counts
# ------------------------------------------------------------------------------------------
def _counts_hint(p: CountProblem) -> str | None:
    """How to pass raw counts instead, for what :func:`~census_scvi.counts.count_problem` found."""
    if p.kind == "negative":
        if p.integer_dtype:
            return "raw counts are never negative"
        return "it looks scaled/centred; point --counts-layer at the raw counts"
    if p.kind == "non-integer":
        if p.looks_log_normalised:
            return (
                "it looks log-normalised; keep the raw counts in .raw or a layer "
                "(--counts-layer NAME)"
            )
        return "it looks normalised; pass the raw counts with --counts-layer NAME"
    return None


def _pick_counts(
    adata: ad.AnnData, path: Path, counts_layer: str | None
) -> tuple[Any, pd.DataFrame, str]:
    """The raw-count matrix, the var frame that goes with it, and where it came from."""
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            have = ", ".join(adata.layers.keys()) or "none"
            msg = f"{path.name}: no layer '{counts_layer}' (--counts-layer); layers: {have}"
            raise CensusScviError(msg)
        matrix, source = adata.layers[counts_layer], f"layers['{counts_layer}']"
        problem = count_problem(matrix)
        if problem:
            msg = f"{path.name}: {source} does not hold raw counts: {problem.describe()}"
            raise CensusScviError(msg, hint=_counts_hint(problem))
        return matrix, adata.var, source
    if adata.X is None:
        msg = f"{path.name}: X is empty"
        raise CensusScviError(msg, hint="pass the raw counts with --counts-layer NAME")
    problem = count_problem(adata.X)
    if problem is None:
        return adata.X, adata.var, "X"
    if adata.raw is not None:
        raw_problem = count_problem(adata.raw.X)
        if raw_problem is None:
            logger.info("%s: X is not raw counts (%s); using .raw.X", path.name, problem.describe())
            return adata.raw.X, adata.raw.var, ".raw.X"
        msg = (
            f"{path.name}: neither X nor .raw.X holds raw counts: X has {problem.describe()}, "
            f".raw.X has {raw_problem.describe()}"
        )
        raise CensusScviError(msg, hint=_counts_hint(problem) or _counts_hint(raw_problem))
    layers = f" (layers: {', '.join(adata.layers.keys())})" if len(adata.layers) else ""
    msg = f"{path.name}: X does not hold raw counts: {problem.describe()}; .raw is absent{layers}"
    raise CensusScviError(msg, hint=_counts_hint(problem))


def dataset_stats(
    x: sp.csr_matrix,
) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[np.int64]]:
    """Per-cell computed columns and per-gene non-zero counts of CSR counts ``x``.

    ``raw_variance_nnz`` is the sample variance (``ddof=1``) of the non-zero values, 0 when a cell
    has fewer than two (:func:`census_scvi.counts.nonzero_moments`, as the mini census).
    """
    nnz = np.diff(x.indptr).astype(np.int64)
    data = x.data.astype(np.float64)
    rows = np.repeat(np.arange(x.shape[0]), nnz)
    raw_sum = np.bincount(rows, weights=data, minlength=x.shape[0])
    sq_sum = np.bincount(rows, weights=data**2, minlength=x.shape[0])
    mean, var = nonzero_moments(nnz, raw_sum, sq_sum)
    cells = {
        "nnz": nnz,
        "raw_sum": raw_sum.astype(np.float32),
        "raw_mean_nnz": mean.astype(np.float32),
        "raw_variance_nnz": var.astype(np.float32),
    }
    gene_nnz = np.bincount(x.indices, minlength=x.shape[1]).astype(np.int64)
    return cells, gene_nnz


# ------------------------------------------------------------------------------------------
# the whole file
# ------------------------------------------------------------------------------------------
def _check_file(adata: ad.AnnData, path: Path, organism: str) -> None:
    """Not empty, and not another organism's (when the file says which)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"{path.name}: empty ({adata.n_obs} cells x {adata.n_vars} genes)"
        raise CensusScviError(msg)
    check_declared_organism(declared_organism(adata.uns, adata.obs), path, organism)


def _census_genes(
    matrix: Any, var: pd.DataFrame, genes: Genes, path: Path, *, by_column: bool
) -> tuple[sp.csr_matrix, pd.DataFrame, int]:
    """CSR counts of the kept genes (duplicated ids summed) and the Census-shaped var."""
    import pandas as pd

    if len(genes.keep) == 0:
        msg = f"{path.name}: no gene has an id ({genes.n_missing} missing)"
        raise CensusScviError(msg, hint="check --gene-ids")
    x = as_csr32(matrix)
    if len(genes.keep) < x.shape[1]:
        x = x[:, genes.keep]
    x, ids, first, n_merged = merge_duplicates(x, genes.ids)
    kept_var = var.iloc[genes.keep[first]]
    if "feature_name" in kept_var.columns:
        names = kept_var["feature_name"].astype(str).to_numpy()
    elif by_column:
        names = kept_var.index.astype(str).to_numpy()
    else:
        names = ids.astype(str)
    lengths = np.zeros(len(ids), dtype=np.int64)
    if "feature_length" in kept_var.columns:
        fl = pd.to_numeric(kept_var["feature_length"], errors="coerce")
        lengths = fl.fillna(0).astype(np.int64).to_numpy()
    if n_merged:
        logger.warning(
            "%s: %d genes share an id with another; their counts were summed", path.name, n_merged
        )
    if genes.n_missing:
        logger.warning("%s: dropped %d genes without an id", path.name, genes.n_missing)
    new_var = pd.DataFrame(
        {
            "feature_name": names.astype(object),
            "feature_length": lengths,
            "nnz": np.zeros(len(ids), dtype=np.int64),
            "n_measured_obs": np.zeros(len(ids), dtype=np.int64),
        },
        index=pd.Index(ids.astype(str)),  # unnamed: stored as the feature_id column
    )
    return x, new_var, n_merged


def _dataset_info(uns: Mapping[str, Any], path: Path) -> dict[str, str]:
    """census_info/datasets metadata from ``uns`` (title defaults to the file stem)."""
    info = {"dataset_h5ad_path": path.name}
    for col, key in _UNS_INFO.items():
        info[col] = uns_str(uns, key) or ""
    if not info["dataset_title"]:
        info["dataset_title"] = path.stem
    return info


def prepare_h5ad(
    path: Path,
    *,
    organism: str,
    gene_ids: str | None,
    counts_layer: str | None,
    columns: Mapping[str, str],
) -> PreparedDataset:
    """Read one h5ad and return it Census-shaped (see the module docstring).

    Raises
    ------
    CensusScviError
        Not raw counts, a missing ``--gene-ids``/``--counts-layer``/mapped column, no genes or
        no cells left, repeated cell ids, another organism.
    """
    adata = read_h5ad(path, backed=False)
    _check_file(adata, path, organism)
    dsid = dataset_id(path, adata.obs, adata.uns, columns)
    matrix, var, source = _pick_counts(adata, path, counts_layer)
    genes = read_gene_ids(var, path, gene_ids, adata.var)
    check_organism(genes.ids, path, organism)
    x, new_var, n_merged = _census_genes(matrix, var, genes, path, by_column=gene_ids is not None)
    obs, placeholders, mapped, dropped = census_obs(adata.obs, path, dsid, columns)
    joinids_given = "observation_joinid" in columns or "observation_joinid" in adata.obs.columns
    info = _dataset_info(adata.uns, path)
    schema_version = uns_str(adata.uns, "schema_version")
    n_genes_in = int(var.shape[0])
    del adata, matrix, var
    prepared, gene_nnz = census_shaped(obs, new_var, x)
    digest = Digest(
        n_cells=int(x.shape[0]),
        primary=bool(np.asarray(obs["is_primary_data"]).any()),
        counts=counts_digest(x, new_var.index),
        joinids=joinid_digest(obs["observation_joinid"]) if joinids_given else None,
    )
    return PreparedDataset(
        dataset_id=dsid,
        adata=prepared,
        info=info,
        source=source,
        gene_nnz=gene_nnz,
        path=path,
        n_genes_in=n_genes_in,
        n_missing_ids=genes.n_missing,
        n_merged_ids=n_merged,
        n_unversioned=genes.n_unversioned,
        symbol_keyed=genes.symbol_keyed,
        placeholders=placeholders,
        mapped=mapped,
        dropped_obs=dropped,
        digest=digest,
        schema_version=schema_version,
    )


def census_shaped(
    obs: pd.DataFrame, var: pd.DataFrame, x: sp.csr_matrix
) -> tuple[ad.AnnData, npt.NDArray[np.int64]]:
    """AnnData with the computed obs columns added (Census column order), and per-gene nnz."""
    import anndata as ad
    import pandas as pd

    cells, gene_nnz = dataset_stats(x)
    obs = obs.copy()
    for k, v in cells.items():
        obs[k] = v
    obs["n_measured_vars"] = np.int64(x.shape[1])
    census = [name for name, _ in OBS_COLUMNS if name in obs.columns]
    obs = obs[census + [c for c in obs.columns if c not in census]]
    obs.index = pd.Index([str(i) for i in range(len(obs))])
    return ad.AnnData(X=x, obs=obs, var=var), gene_nnz
