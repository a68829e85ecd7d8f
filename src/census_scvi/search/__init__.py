"""Nearest-cell search: an IVF_FLAT index over every embedded cell, and neighbours of a query.

``run_index`` builds ``RUN_DIR/index/ivf_flat`` (TileDB-Vector-Search, the index the Census's
``find_nearest_obs`` reads) and records it in ``embedding.soma``'s metadata; ``run_neighbors``
encodes a user's h5ad, finds its nearest embedded cells and predicts obs columns from them.
Needs the ``search`` extra (``pip install 'census-scvi[search]'``).

What ``map`` shares with this stage lives in shared layers: the query's raw-count check and gene
alignment in :mod:`census_scvi.counts`, the index queries, exact k-NN, the index's freshness and
the kernel-weighted vote in :mod:`census_scvi.knn` (re-exported here as before), the index's
folder names in :mod:`census_scvi.constants`.
"""

from census_scvi.constants import INDEX_DIR, INDEX_NAME, INDEX_RELATIVE_URI
from census_scvi.knn import embedding_identity, exact_knn, open_index, query_index, recall_at_k
from census_scvi.search._neighbors import (
    DEFAULT_COLUMNS,
    OBSM_DISTANCES,
    OBSM_JOINIDS,
    NeighborsResult,
    predict_obs,
    run_neighbors,
)
from census_scvi.search._stage import IndexResult, run_index

__all__ = [
    "DEFAULT_COLUMNS",
    "INDEX_DIR",
    "INDEX_NAME",
    "INDEX_RELATIVE_URI",
    "OBSM_DISTANCES",
    "OBSM_JOINIDS",
    "IndexResult",
    "NeighborsResult",
    "embedding_identity",
    "exact_knn",
    "open_index",
    "predict_obs",
    "query_index",
    "recall_at_k",
    "run_index",
    "run_neighbors",
]
