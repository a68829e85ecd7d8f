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

from census_scvi.counts import (
    ENSEMBL_GENE_PREFIXES,
    clean_gene_ids,
    ensembl_organism,
    looks_like_symbols,
    strip_versions,
)
from census_scvi.errors import CensusScviError
from census_scvi.soma._schema import organism_label

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd
    import scipy.sparse as sp

__all__ = ["Genes", "as_csr32", "check_organism", "merge_duplicates", "read_gene_ids"]

_OTHER_ORGANISM_FRACTION = 0.5  # of the Ensembl gene ids: above, the file is another organism's

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


def check_organism(ids: Any, path: Path, organism: str) -> None:
    """Refuse a file whose Ensembl gene ids are mostly another organism's (``ENSMUSG`` ids into
    ``homo_sapiens``): its genes would match none of the census's, or the wrong ones."""
    found, fraction = ensembl_organism(clean_gene_ids(ids))
    if found is None or found == organism or fraction <= _OTHER_ORGANISM_FRACTION:
        return
    expected = ENSEMBL_GENE_PREFIXES.get(organism)
    want = f" ({expected}...)" if expected else ""
    msg = (
        f"{path.name}: {fraction:.0%} of its Ensembl gene ids are {organism_label(found)} ids "
        f"({ENSEMBL_GENE_PREFIXES[found]}...), not {organism_label(organism)}{want}: most likely "
        f"a {organism_label(found)} dataset"
    )
    hint = (
        f"pass --organism {found} to build a {organism_label(found)} census from it; or check "
        "--gene-ids if the file holds another organism's ids by mistake"
    )
    raise CensusScviError(msg, hint=hint)


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
