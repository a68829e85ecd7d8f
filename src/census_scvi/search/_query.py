"""A query h5ad's latent, computed as ``census-scvi map`` computes it.

The same steps as ``map``: the query's gene ids (var index or a var column; Ensembl version
suffixes ignored when the model's ids have none) are aligned onto the model's genes by one sparse
0/1 product per chunk (missing genes zero, duplicate ids added up, extra genes dropped), X is
checked to hold raw counts, and the trained model's encoder gives the posterior mean
(:func:`census_scvi.scvi_model.encode_csr`). Below ``map.min_overlap`` of the model's genes the
query is refused; below ``map.warn_overlap`` a warning is logged.

The raw-count check, the gene-id rules and the alignment matrix (``gene_selection``) are the
shared ones (:mod:`census_scvi.counts`), which ``map`` uses too.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.counts import (
    check_counts,
    gene_selection,
    log_counts_hint,
    query_gene_ids,
)
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import anndata as ad
    import scipy.sparse as sp

__all__ = ["encode_query", "gene_selection", "query_gene_ids"]

logger = logging.getLogger(__name__)


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
    s, _, _ = gene_selection(query_gene_ids(adata, gene_ids), list(encoder.var_names))
    n_found = int((np.asarray(s.sum(axis=0)).ravel() > 0).sum())
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
