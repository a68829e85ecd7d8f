"""Prepare stage: training cells, highly variable genes, batch labels, the model h5ad."""

from census_scvi.prepare._stage import (
    CELLS_FILE,
    PrepareResult,
    cell_filters,
    highly_variable_genes,
    run_prepare,
    select_cells,
    write_model_anndata,
)

__all__ = [
    "CELLS_FILE",
    "PrepareResult",
    "cell_filters",
    "highly_variable_genes",
    "run_prepare",
    "select_cells",
    "write_model_anndata",
]
