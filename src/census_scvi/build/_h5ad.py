"""Reading one input h5ad: the file, its uns strings, its ``dataset_id`` and the ``--columns`` map.

Cheap reads (obs and uns only, backed) come first, so dataset-id conflicts fail before any matrix
is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.errors import CensusScviError
from census_scvi.soma._schema import MAPPABLE_OBS, ORGANISM_TERMS

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

__all__ = [
    "Peek",
    "check_declared_organism",
    "dataset_id",
    "declared_organism",
    "load_columns_map",
    "peek_dataset_id",
    "read_h5ad",
    "uns_str",
]


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
# the file and its dataset id (cheap: reads obs and uns only)
# ------------------------------------------------------------------------------------------
def read_h5ad(path: Path, *, backed: bool) -> ad.AnnData:
    """The h5ad at ``path`` (``backed``: matrices left on disk), or a one-line error."""
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


def uns_str(uns: Mapping[str, Any], key: str) -> str | None:
    """``uns[key]`` as a non-empty string (bytes, 1-element arrays and ints accepted), else None."""
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


def dataset_id(
    path: Path, obs: pd.DataFrame, uns: Mapping[str, Any], columns: Mapping[str, str]
) -> str:
    """The mapped column, else ``uns['dataset_id']``, else an obs ``dataset_id``, else the stem."""
    col = columns.get("dataset_id")
    if col is None and uns_str(uns, "dataset_id") is not None:
        return str(uns_str(uns, "dataset_id"))
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


def declared_organism(uns: Mapping[str, Any], obs: pd.DataFrame) -> str | None:
    """The organism ontology term the file declares (uns, else a single-valued obs column)."""
    found = uns_str(uns, "organism_ontology_term_id")
    if found is None and "organism_ontology_term_id" in obs.columns:
        values = obs["organism_ontology_term_id"].dropna().astype(str).unique()
        found = str(values[0]) if len(values) == 1 else None
    return found


def check_declared_organism(found: str | None, path: Path, organism: str) -> None:
    """Refuse a file that declares another organism than ``organism``'s."""
    expected = ORGANISM_TERMS.get(organism)
    if expected is not None and found is not None and found != expected:
        msg = f"{path.name}: organism is {found}, not {organism} ({expected})"
        raise CensusScviError(msg, hint="pass --organism for that organism, or check the file")


@dataclass
class Peek:
    """What an input says about itself without its matrices being read."""

    dataset_id: str
    n_cells: int
    organism_term: str | None
    gene_ids: Any
    """The var index, or var's (else ``.raw.var``'s) ``--gene-ids`` column when it has one."""


def peek_dataset_id(path: Path, columns: Mapping[str, str], gene_ids: str | None = None) -> Peek:
    """Dataset id, cell count, declared organism and gene ids of an h5ad (matrices not read):
    enough to refuse a conflicting id or another organism's file before any work (ingestion
    checks the organism again, with the ids of the var that goes with the counts)."""
    adata = read_h5ad(path, backed=True)
    try:
        var = adata.var
        if gene_ids is not None and gene_ids not in var.columns and adata.raw is not None:
            var = adata.raw.var
        ids = var[gene_ids] if gene_ids is not None and gene_ids in var.columns else var.index
        return Peek(
            dataset_id=dataset_id(path, adata.obs, adata.uns, columns),
            n_cells=int(adata.n_obs),
            organism_term=declared_organism(adata.uns, adata.obs),
            gene_ids=ids.to_numpy(),
        )
    finally:
        adata.file.close()
