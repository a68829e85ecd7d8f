"""Map stage: a user's h5ad onto a trained model, gene alignment, label transfer."""

from census_scvi.mapping._stage import (
    MapResult,
    align_genes,
    encode_query,
    gene_overlap,
    run_map,
    transfer_labels,
)

__all__ = [
    "MapResult",
    "align_genes",
    "encode_query",
    "gene_overlap",
    "run_map",
    "transfer_labels",
]
