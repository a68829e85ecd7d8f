"""The shared k-NN layer: nearest-cell search and the kernel-weighted vote, for ``map`` and ``search``.

Stages may not import each other, so what both ``census-scvi map`` (label transfer) and
``census-scvi index`` / ``neighbors`` (the IVF_FLAT index, obs predictions) need lives here:

- ``_deps``: the optional TileDB-Vector-Search import and its install hint;
- ``_rows``: block reads of ``latent.npy`` (memory flat in cells);
- ``_index``: opening and querying an index (:func:`search_index`), exact k-NN streamed over a
  memmap (the oracle), recall@k and the nprobe calibration;
- ``_current``: whether ``RUN_DIR/index`` is current for the run's embedding;
- ``_vote``: ``map``'s Gaussian-kernel weights and the weighted / plain vote;
- ``_transfer``: label transfer with a confidence, from exact neighbours (scikit-learn) or from
  neighbours an index found.

A shared layer: it imports only other shared layers (``rundir``, ``constants``, ``errors``),
never a stage (its ``ruff.toml`` bans them).
"""

from census_scvi.knn._current import IndexStatus, embedding_identity, index_status
from census_scvi.knn._deps import INSTALL_HINT, have_vector_search, vector_search
from census_scvi.knn._index import (
    Calibration,
    calibrate_nprobe,
    exact_knn,
    joinid_rows,
    open_index,
    query_index,
    recall_at_k,
    search_index,
)
from census_scvi.knn._rows import iter_blocks, take_rows
from census_scvi.knn._transfer import (
    KnnLabelTransfer,
    TransferResult,
    sorted_codes,
    transfer_from_neighbors,
)
from census_scvi.knn._vote import Prediction, kernel_weights, predict

__all__ = [
    "INSTALL_HINT",
    "Calibration",
    "IndexStatus",
    "KnnLabelTransfer",
    "Prediction",
    "TransferResult",
    "calibrate_nprobe",
    "embedding_identity",
    "exact_knn",
    "have_vector_search",
    "index_status",
    "iter_blocks",
    "joinid_rows",
    "kernel_weights",
    "open_index",
    "predict",
    "query_index",
    "recall_at_k",
    "search_index",
    "sorted_codes",
    "take_rows",
    "transfer_from_neighbors",
    "vector_search",
]
