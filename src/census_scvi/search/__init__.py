"""Nearest-cell search: an IVF_FLAT index over every embedded cell, and neighbours of a query.

``run_index`` builds ``RUN_DIR/index/ivf_flat`` (TileDB-Vector-Search, the index the Census's
``find_nearest_obs`` reads) and records it in ``embedding.soma``'s metadata; ``run_neighbors``
encodes a user's h5ad, finds its nearest embedded cells and predicts obs columns from them.
Needs the ``search`` extra (``pip install 'census-scvi[search]'``).

Waiting on the shared layers: the query's gene alignment (``_query.py``) repeats part of
``mapping/_genes.py``, which should move to a shared module both stages import.
"""

from census_scvi.search._knn import exact_knn, open_index, query_index, recall_at_k
from census_scvi.search._neighbors import (
    DEFAULT_COLUMNS,
    OBSM_DISTANCES,
    OBSM_JOINIDS,
    NeighborsResult,
    predict_obs,
    run_neighbors,
)
from census_scvi.search._stage import (
    INDEX_DIR,
    INDEX_NAME,
    INDEX_RELATIVE_URI,
    IndexResult,
    embedding_identity,
    run_index,
)

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
