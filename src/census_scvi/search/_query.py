"""A query h5ad's latent, computed as ``census-scvi map`` computes it.

The same steps as ``map``: the query's gene ids (var index or a var column; Ensembl version
suffixes ignored when the model's ids have none) are aligned onto the model's genes by one sparse
0/1 product per chunk (missing genes zero, duplicate ids added up, extra genes dropped), X is
checked to hold raw counts, and the trained model's encoder gives the posterior mean
(:func:`census_scvi.scvi_model.encode_csr`). Below ``map.min_overlap`` of the model's genes the
query is refused; below ``map.warn_overlap`` a warning is logged.

The raw-count check and the gene-id rules are the shared ones (:mod:`census_scvi.counts`); the
alignment matrix repeats the few lines of ``mapping/_genes.py``'s ``gene_selection``, because a
stage may not import another stage; it belongs in a shared layer (see the package docstring).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from census_scvi.counts import (
    check_counts,
    clean_gene_ids,
    is_versioned_ensembl,
    log_counts_hint,
    strip_version,
)
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import anndata as ad
    import scipy.sparse as sp

__all__ = ["encode_query", "gene_selection", "query_gene_ids"]

logger = logging.getLogger(__name__)


def query_gene_ids(adata: ad.AnnData, gene_ids: str | None) -> npt.NDArray[np.object_]:
    """The query's gene id per column (None where missing): var_names or the ``gene_ids`` column."""
    if gene_ids is None:
        values = pd.Series(adata.var_names, dtype=object)
    else:
        if gene_ids not in adata.var.columns:
            cols = ", ".join(map(str, adata.var.columns)) or "none"
            msg = f"--gene-ids column '{gene_ids}' is not in the query's var; its columns: {cols}"
            raise CensusScviError(msg, hint="omit --gene-ids to use the var index")
        values = pd.Series(adata.var[gene_ids].to_numpy(), dtype=object)
    return clean_gene_ids(values.to_numpy())


def gene_selection(
    query_ids: npt.NDArray[np.object_], model_ids: Sequence[str]
) -> tuple[sp.csr_matrix, int]:
    """The 0/1 matrix (query genes x model genes) and the number of model genes found.

    Ensembl version suffixes are ignored when the model's ids have none.
    """
    import scipy.sparse as sp

    model = pd.Index([str(m) for m in model_ids])
    strip = not any(is_versioned_ensembl(m) for m in model[:50])
    q = np.array(
        [None if v is None else (strip_version(v) if strip else v) for v in query_ids],
        dtype=object,
    )
    target = model.get_indexer(pd.Index(q.astype(str)))
    target[pd.isna(pd.Series(q)).to_numpy()] = -1
    rows = np.flatnonzero(target >= 0)
    s = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, target[rows])),
        shape=(len(q), len(model)),
    )
    return s, int(np.unique(target[rows]).size)


def _csr(x: Any) -> sp.csr_matrix:
    import scipy.sparse as sp

    return sp.csr_matrix(x) if sp.issparse(x) else sp.csr_matrix(np.asarray(x))


def encode_query(
    adata: ad.AnnData,
    model_path: Path,
    *,
    gene_ids: str | None = None,
    chunk_size: int = 16_384,
    batch_size: int = 1024,
    accelerator: str = "auto",
    min_overlap: float = 0.3,
    warn_overlap: float = 0.8,
) -> npt.NDArray[np.float32]:
    """Posterior-mean latent of each query cell (n_cells x n_latent float32), as ``map`` computes.

    Raises
    ------
    CensusScviError
        When the model encodes the batch, fewer than ``min_overlap`` of its genes are in the
        query, or X is not raw counts.
    """
    from census_scvi.progress import track
    from census_scvi.scvi_model import encode_csr, load_encoder

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
        encoder = load_encoder(model_path, accelerator=accelerator)
    if encoder.encodes_batch:
        msg = f"the model at {model_path} encodes the batch (encode_covariates=true)"
        raise CensusScviError(msg, hint="retrain with model.encode_covariates=false")
    s, n_found = gene_selection(query_gene_ids(adata, gene_ids), list(encoder.var_names))
    fraction = n_found / max(len(encoder.var_names), 1)
    if fraction < min_overlap:
        msg = (
            f"only {n_found:,} of the model's {len(encoder.var_names):,} genes ({fraction:.1%}) "
            f"are in the query, below map.min_overlap ({min_overlap:.0%})"
        )
        raise CensusScviError(msg, hint="pass --gene-ids with the var column of Ensembl ids")
    if fraction < warn_overlap:
        logger.warning(
            "neighbors: only %.1f%% of the model's genes are in the query", 100 * fraction
        )
    out = np.empty((adata.n_obs, encoder.n_latent), dtype=np.float32)
    hint = log_counts_hint(adata)
    steps = [(a, min(a + chunk_size, adata.n_obs)) for a in range(0, adata.n_obs, chunk_size)]
    for start, stop in track(steps, description="encoding query"):
        x = _csr(adata.X[start:stop])
        check_counts(x, where=f"cells {start}-{stop - 1}", log_hint=hint)
        out[start:stop] = encode_csr(
            encoder, (x.astype(np.float32) @ s).tocsr(), batch_size=batch_size
        )[0]
    return out
