"""Gene ids of an input h5ad: cleaned, unversioned, checked for symbols; duplicated ids merged.

The id rules (what counts as missing, which versions are stripped, when a file is keyed by symbols)
are :mod:`census_scvi.counts`'s, shared with ``map``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.counts import clean_gene_ids, looks_like_symbols, strip_versions
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd
    import scipy.sparse as sp

__all__ = ["Genes", "as_csr32", "merge_duplicates", "read_gene_ids"]

logger = logging.getLogger(__name__)


def as_csr32(matrix: Any) -> sp.csr_matrix:
    """float32 CSR without stored zeros or duplicate entries."""
    import scipy.sparse as sp

    out = sp.csr_matrix(matrix, dtype=np.float32)
    out.eliminate_zeros()
    out.sum_duplicates()
    return out


@dataclass
class Genes:
    """The var rows kept and their ids."""

    keep: npt.NDArray[np.intp]  # var rows kept (missing ids dropped)
    ids: npt.NDArray[np.object_]  # feature_id per kept row (may repeat)
    n_missing: int
    n_unversioned: int
    symbol_keyed: bool


def read_gene_ids(
    var: pd.DataFrame, path: Path, gene_ids: str | None, adata_var: pd.DataFrame
) -> Genes:
    """The ids of ``var``'s genes: the index or column ``gene_ids`` (also looked up in the main
    ``adata_var`` when the counts come from ``.raw``); missing ids dropped, versions stripped."""
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
    cleaned = clean_gene_ids(raw_ids.to_numpy())
    missing = np.fromiter((g is None for g in cleaned), dtype=bool, count=len(cleaned))
    keep = np.flatnonzero(~missing)
    ids, n_unversioned = strip_versions(list(cleaned[keep]))
    symbol_keyed = looks_like_symbols(list(ids))
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
    return Genes(
        keep=keep,
        ids=ids,
        n_missing=int(missing.sum()),
        n_unversioned=n_unversioned,
        symbol_keyed=symbol_keyed,
    )


def merge_duplicates(
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
    return as_csr32(x @ m), np.asarray(uniques, dtype=object), first, len(ids) - len(uniques)
