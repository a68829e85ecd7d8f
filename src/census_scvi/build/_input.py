"""``build-census`` input side: one h5ad -> one Census-shaped AnnData (one ``dataset_id``).

Census-shaped means: ``X`` float32 CSR raw counts without stored zeros; ``obs`` with the Census
obs columns (:data:`~census_scvi.soma._schema.OBS_COLUMNS`) plus the registration key
(:data:`~census_scvi.soma._schema.OBS_KEY`) and a plain string index; ``var`` indexed (unnamed
index) by ``feature_id`` with ``feature_name``, ``feature_length`` and the ``nnz`` /
``n_measured_obs`` columns set to 0 (the census-wide values are computed after ingestion).
Unnamed indexes matter: tiledbsoma records a named index and restores it as the index on export,
whereas the Census (and every stage) reads ``feature_id`` as a var column.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.errors import CensusScviError
from census_scvi.soma._schema import (
    MAPPABLE_OBS,
    OBS_COLUMNS,
    OBS_KEY,
    ORGANISM_TERMS,
    UNKNOWN,
)

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt
    import pandas as pd
    import scipy.sparse as sp

__all__ = [
    "PreparedDataset",
    "census_shaped",
    "dataset_stats",
    "load_columns_map",
    "peek_dataset_id",
    "prepare_h5ad",
]

logger = logging.getLogger(__name__)

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{5,}$")
_ENSEMBL_VERSIONED = re.compile(r"^(ENS[A-Z]*G\d{5,})\.\d+$")
_MISSING_IDS = frozenset({"", "nan", "none", "null", "na", "<na>"})
_LOG_MAX = 50.0  # non-integer data with a max below this looks log-normalised
_SYMBOL_FRACTION = 0.5  # below this fraction of Ensembl-like ids, the file is keyed by symbols
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
# --columns
# ------------------------------------------------------------------------------------------
def load_columns_map(path: str | Path | None) -> dict[str, str]:
    """Read a ``--columns`` YAML file: ``census_column: your_column`` per line.

    Raises
    ------
    CensusScviError
        When the file is missing, is not a mapping of strings, or names a column that is not a
        mappable Census obs column (computed columns come from the counts).
    """
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        msg = f"--columns file '{p}' does not exist"
        raise CensusScviError(msg)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        msg = f"--columns file '{p}' is not valid YAML: {str(e).splitlines()[0]}"
        raise CensusScviError(msg) from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()
    ):
        msg = f"--columns file '{p}' must map census columns to your column names (strings)"
        raise CensusScviError(msg, hint="e.g. 'donor_id: patient' one per line")
    bad = sorted(set(data) - set(MAPPABLE_OBS))
    if bad:
        msg = f"--columns file '{p}' maps unknown Census obs column(s) {bad}"
        raise CensusScviError(msg, hint=f"valid: {', '.join(MAPPABLE_OBS)}")
    return dict(data)


# ------------------------------------------------------------------------------------------
# dataset id (cheap: reads obs and uns only)
# ------------------------------------------------------------------------------------------
def _read_h5ad(path: Path, *, backed: bool) -> ad.AnnData:
    import anndata as ad

    if not path.is_file():
        msg = f"input h5ad '{path}' does not exist"
        raise CensusScviError(msg)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as e:  # noqa: BLE001 - h5py/anndata raise many types for a bad file
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        msg = f"cannot read '{path}' as an h5ad file: {first}"
        raise CensusScviError(msg) from None


def _uns_str(uns: Mapping[str, Any], key: str) -> str | None:
    value = uns.get(key)
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str | int | np.integer) and str(value).strip():
        return str(value).strip()
    return None


def _dataset_id(
    path: Path, obs: pd.DataFrame, uns: Mapping[str, Any], columns: Mapping[str, str]
) -> str:
    """The mapped column, else ``uns['dataset_id']``, else an obs ``dataset_id``, else the stem."""
    col = columns.get("dataset_id")
    if col is None and _uns_str(uns, "dataset_id") is not None:
        return str(_uns_str(uns, "dataset_id"))
    if col is None and "dataset_id" in obs.columns:
        col = "dataset_id"
    if col is not None:
        if col not in obs.columns:
            msg = f"{path.name}: --columns maps dataset_id to '{col}', which obs lacks"
            raise CensusScviError(msg, hint=f"obs columns: {', '.join(map(str, obs.columns))}")
        values = obs[col].dropna().astype(str).unique()
        if len(values) != 1:
            msg = f"{path.name}: obs '{col}' has {len(values)} dataset ids; one h5ad must be one dataset"
            raise CensusScviError(msg, hint="split the file by that column first")
        return str(values[0])
    return path.stem


def peek_dataset_id(path: Path, columns: Mapping[str, str]) -> tuple[str, int]:
    """``(dataset_id, n_cells)`` of an h5ad without reading its matrices."""
    adata = _read_h5ad(path, backed=True)
    try:
        return _dataset_id(path, adata.obs, adata.uns, columns), int(adata.n_obs)
    finally:
        adata.file.close()


# ------------------------------------------------------------------------------------------
# counts
# ------------------------------------------------------------------------------------------
def _count_problem(matrix: Any) -> tuple[str, str | None] | None:
    """``(what was found, hint)`` when ``matrix`` is not non-negative integer counts."""
    import scipy.sparse as sp

    data = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    data = np.asarray(data).ravel()
    if data.size == 0:
        return None
    if data.dtype.kind in "iu":
        lo = data.min()
        if lo < 0:
            return f"negative values (min {lo})", "raw counts are never negative"
        return None
    if data.dtype.kind not in "f":
        return f"values of type {data.dtype}", None
    if not np.isfinite(data).all():
        return "NaN or infinite values", None
    lo, hi = float(data.min()), float(data.max())
    if lo < 0:
        return (
            f"negative values (min {lo:.4g})",
            "it looks scaled/centred; point --counts-layer at the raw counts",
        )
    frac = data[np.not_equal(data, np.round(data))]
    if frac.size:
        found = f"non-integer values (e.g. {float(frac[0]):.4g}; max {hi:.4g})"
        if hi <= _LOG_MAX:
            return found, (
                "it looks log-normalised; keep the raw counts in .raw or a layer "
                "(--counts-layer NAME)"
            )
        return found, "it looks normalised; pass the raw counts with --counts-layer NAME"
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
        problem = _count_problem(matrix)
        if problem:
            msg = f"{path.name}: {source} does not hold raw counts: {problem[0]}"
            raise CensusScviError(msg, hint=problem[1])
        return matrix, adata.var, source
    if adata.X is None:
        msg = f"{path.name}: X is empty"
        raise CensusScviError(msg, hint="pass the raw counts with --counts-layer NAME")
    problem = _count_problem(adata.X)
    if problem is None:
        return adata.X, adata.var, "X"
    if adata.raw is not None:
        raw_problem = _count_problem(adata.raw.X)
        if raw_problem is None:
            logger.info("%s: X is not raw counts (%s); using .raw.X", path.name, problem[0])
            return adata.raw.X, adata.raw.var, ".raw.X"
        msg = (
            f"{path.name}: neither X nor .raw.X holds raw counts: X has {problem[0]}, "
            f".raw.X has {raw_problem[0]}"
        )
        raise CensusScviError(msg, hint=problem[1] or raw_problem[1])
    layers = f" (layers: {', '.join(adata.layers.keys())})" if len(adata.layers) else ""
    msg = f"{path.name}: X does not hold raw counts: {problem[0]}; .raw is absent{layers}"
    raise CensusScviError(msg, hint=problem[1])


def _as_csr32(matrix: Any) -> sp.csr_matrix:
    import scipy.sparse as sp

    out = sp.csr_matrix(matrix, dtype=np.float32)
    out.eliminate_zeros()
    out.sum_duplicates()
    return out


# ------------------------------------------------------------------------------------------
# genes
# ------------------------------------------------------------------------------------------
@dataclass
class _Genes:
    keep: npt.NDArray[np.intp]  # var rows kept (missing ids dropped)
    ids: npt.NDArray[np.object_]  # feature_id per kept row (may repeat)
    n_missing: int
    n_unversioned: int
    symbol_keyed: bool


def _gene_ids(
    var: pd.DataFrame, path: Path, gene_ids: str | None, adata_var: pd.DataFrame
) -> _Genes:
    import pandas as pd

    if gene_ids is None:
        raw_ids = pd.Series(var.index, index=var.index)
    elif gene_ids in var.columns:
        raw_ids = var[gene_ids]
    elif gene_ids in adata_var.columns:  # counts from .raw, ids in the main var
        raw_ids = adata_var[gene_ids].reindex(var.index)
    else:
        msg = f"{path.name}: var has no column '{gene_ids}' (--gene-ids)"
        raise CensusScviError(
            msg, hint=f"var columns: {', '.join(map(str, var.columns)) or 'none'}"
        )
    ids = raw_ids.astype(object).where(raw_ids.notna(), "").astype(str).str.strip().to_numpy()
    missing = np.isin(np.char.lower(ids.astype(str)), list(_MISSING_IDS))
    keep = np.flatnonzero(~missing)
    ids = ids[keep]
    n_unversioned = 0
    for i, g in enumerate(ids):
        m = _ENSEMBL_VERSIONED.match(g)
        if m:
            ids[i] = m.group(1)
            n_unversioned += 1
    ensembl = np.fromiter((bool(_ENSEMBL.match(g)) for g in ids), dtype=bool, count=len(ids))
    symbol_keyed = bool(len(ids)) and float(ensembl.mean()) < _SYMBOL_FRACTION
    if symbol_keyed:
        where = f"var column '{gene_ids}'" if gene_ids else "the var index"
        example = ", ".join(ids[:3])
        logger.warning(
            "%s: genes in %s look like symbols (%s), not Ensembl ids; the Census and models "
            "trained on it use Ensembl ids - pass --gene-ids COLUMN if the file has them",
            path.name,
            where,
            example,
        )
    return _Genes(
        keep=keep,
        ids=ids.astype(object),
        n_missing=int(missing.sum()),
        n_unversioned=n_unversioned,
        symbol_keyed=symbol_keyed,
    )


def _merge_duplicates(
    x: sp.csr_matrix, ids: npt.NDArray[np.object_]
) -> tuple[sp.csr_matrix, npt.NDArray[np.object_], npt.NDArray[np.intp], int]:
    """Sum the columns of duplicated ids: ``(x, unique ids, first row per id, n merged)``."""
    import pandas as pd
    import scipy.sparse as sp

    codes, uniques = pd.factorize(pd.Index(ids))
    if len(uniques) == len(ids):
        return x, ids, np.arange(len(ids)), 0
    # a 0/1 (genes x unique ids) matrix: x @ m sums the duplicated columns, sparse throughout
    m = sp.csr_matrix(
        (np.ones(len(ids), dtype=np.float32), (np.arange(len(ids)), codes)),
        shape=(len(ids), len(uniques)),
    )
    first = np.full(len(uniques), -1, dtype=np.intp)
    for i in range(len(codes) - 1, -1, -1):
        first[codes[i]] = i
    return _as_csr32(x @ m), np.asarray(uniques, dtype=object), first, len(ids) - len(uniques)


# ------------------------------------------------------------------------------------------
# obs
# ------------------------------------------------------------------------------------------
def _as_bool(series: pd.Series, path: Path, col: str) -> npt.NDArray[np.bool_]:
    if series.dtype == bool:
        return series.to_numpy()
    text = series.astype(str).str.strip().str.lower()
    truthy, falsy = {"true", "1", "yes", "t"}, {"false", "0", "no", "f"}
    bad = ~text.isin(truthy | falsy)
    if bad.any():
        msg = f"{path.name}: obs '{col}' is not boolean (e.g. {series[bad.to_numpy()].iloc[0]!r})"
        raise CensusScviError(msg, hint="use True/False values for is_primary_data")
    return text.isin(truthy).to_numpy()


def _census_obs(
    obs: pd.DataFrame,
    path: Path,
    dataset_id: str,
    columns: Mapping[str, str],
) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """The Census obs columns (computed ones excluded) from the file's obs."""
    import pandas as pd

    n = len(obs)
    names = obs.index.astype(str)
    if names.duplicated().any():
        import anndata as ad

        logger.warning("%s: obs names repeat; made unique (suffixes -1, -2, ...)", path.name)
        names = ad.utils.make_index_unique(pd.Index(names))
    out: dict[str, Any] = {}
    placeholders: list[str] = []
    mapped: dict[str, str] = {}
    for name, kind in OBS_COLUMNS:
        if name not in MAPPABLE_OBS:
            continue
        src = columns.get(name)
        if src is not None and src not in obs.columns:
            msg = f"{path.name}: --columns maps {name} to '{src}', which obs lacks"
            raise CensusScviError(msg, hint=f"obs columns: {', '.join(map(str, obs.columns))}")
        if src is None and name in obs.columns:
            src = name
        if src is not None and src != name:
            mapped[name] = src
        if name == "dataset_id":
            out[name] = pd.Categorical([dataset_id] * n)
        elif name == "observation_joinid":
            source = obs[src] if src is not None else pd.Series(names, index=obs.index)
            out[name] = source.astype(str).to_numpy().astype(object)
        elif name == "is_primary_data":
            out[name] = _as_bool(obs[src], path, src) if src is not None else np.ones(n, bool)
        elif kind == "category":
            if src is None:
                placeholders.append(name)
                out[name] = pd.Categorical([UNKNOWN] * n)
            else:
                s = obs[src]
                values = s.astype(object).where(s.notna(), UNKNOWN).astype(str)
                out[name] = pd.Categorical(values.to_numpy())
        else:  # pragma: no cover - every mappable column is handled above
            msg = f"internal: unhandled obs column kind {kind} for {name}"
            raise AssertionError(msg)
    # the registration key: unique per cell across the census (observation_joinid is not:
    # CELLxGENE repeats it for the non-primary copies of a cell in other datasets)
    out[OBS_KEY] = np.asarray([f"{dataset_id}:{o}" for o in names], dtype=object)
    return pd.DataFrame(out), placeholders, mapped


def dataset_stats(
    x: sp.csr_matrix,
) -> tuple[dict[str, npt.NDArray[Any]], npt.NDArray[np.int64]]:
    """Per-cell computed columns and per-gene non-zero counts of CSR counts ``x``.

    ``raw_variance_nnz`` is the sample variance (``ddof=1``) of the non-zero values, 0 when a cell
    has fewer than two; the same convention as :mod:`census_scvi.demo._stage`.
    """
    nnz = np.diff(x.indptr).astype(np.int64)
    data = x.data.astype(np.float64)
    rows = np.repeat(np.arange(x.shape[0]), nnz)
    raw_sum = np.bincount(rows, weights=data, minlength=x.shape[0])
    sq_sum = np.bincount(rows, weights=data**2, minlength=x.shape[0])
    mean = np.where(nnz > 0, raw_sum / np.maximum(nnz, 1), 0.0)
    var = np.where(nnz > 1, (sq_sum - nnz * mean**2) / np.maximum(nnz - 1, 1), 0.0)
    cells = {
        "nnz": nnz,
        "raw_sum": raw_sum.astype(np.float32),
        "raw_mean_nnz": mean.astype(np.float32),
        "raw_variance_nnz": np.maximum(var, 0.0).astype(np.float32),
    }
    gene_nnz = np.bincount(x.indices, minlength=x.shape[1]).astype(np.int64)
    return cells, gene_nnz


def _check_organism(adata: ad.AnnData, path: Path, organism: str) -> None:
    expected = ORGANISM_TERMS.get(organism)
    if expected is None:
        return
    found = _uns_str(adata.uns, "organism_ontology_term_id")
    if found is None and "organism_ontology_term_id" in adata.obs.columns:
        values = adata.obs["organism_ontology_term_id"].dropna().astype(str).unique()
        found = str(values[0]) if len(values) == 1 else None
    if found is not None and found != expected:
        msg = f"{path.name}: organism is {found}, not {organism} ({expected})"
        raise CensusScviError(msg, hint="pass --organism for that organism, or check the file")


# ------------------------------------------------------------------------------------------
# the whole file
# ------------------------------------------------------------------------------------------
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
    import pandas as pd

    adata = _read_h5ad(path, backed=False)
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"{path.name}: empty ({adata.n_obs} cells x {adata.n_vars} genes)"
        raise CensusScviError(msg)
    _check_organism(adata, path, organism)
    dataset_id = _dataset_id(path, adata.obs, adata.uns, columns)
    matrix, var, source = _pick_counts(adata, path, counts_layer)
    genes = _gene_ids(var, path, gene_ids, adata.var)
    if len(genes.keep) == 0:
        msg = f"{path.name}: no gene has an id ({genes.n_missing} missing)"
        raise CensusScviError(msg, hint="check --gene-ids")
    x = _as_csr32(matrix)
    if len(genes.keep) < x.shape[1]:
        x = x[:, genes.keep]
    x, ids, first, n_merged = _merge_duplicates(x, genes.ids)
    kept_var = var.iloc[genes.keep[first]]
    if "feature_name" in kept_var.columns:
        names = kept_var["feature_name"].astype(str).to_numpy()
    elif gene_ids is not None:
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

    obs, placeholders, mapped = _census_obs(adata.obs, path, dataset_id, columns)
    new_var = pd.DataFrame(
        {
            "feature_name": names.astype(object),
            "feature_length": lengths,
            "nnz": np.zeros(len(ids), dtype=np.int64),
            "n_measured_obs": np.zeros(len(ids), dtype=np.int64),
        },
        index=pd.Index(ids.astype(str)),  # unnamed: stored as the feature_id column
    )
    info = {"dataset_h5ad_path": path.name}
    for col, key in _UNS_INFO.items():
        info[col] = _uns_str(adata.uns, key) or ""
    if not info["dataset_title"]:
        info["dataset_title"] = path.stem
    schema_version = _uns_str(adata.uns, "schema_version")
    del adata, matrix
    prepared, gene_nnz = census_shaped(obs, new_var, x)
    return PreparedDataset(
        dataset_id=dataset_id,
        adata=prepared,
        info=info,
        source=source,
        gene_nnz=gene_nnz,
        path=path,
        n_genes_in=int(var.shape[0]),
        n_missing_ids=genes.n_missing,
        n_merged_ids=n_merged,
        n_unversioned=genes.n_unversioned,
        symbol_keyed=genes.symbol_keyed,
        placeholders=placeholders,
        mapped=mapped,
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
