"""Aligning a query's genes to the model's and the overlap report.

The alignment is one sparse product per chunk, ``X_query @ S`` with ``S`` a 0/1 matrix (query gene
-> model gene): it reorders, drops genes the model lacks, leaves model genes the query lacks at
zero and adds up query columns that share one id, without densifying anything. (scvi-tools'
``prepare_query_anndata`` pads with a dense block and reports only the gene fraction; we also need
the fraction of counts and a per-chunk pass for large queries.) The raw-count checks and gene-id
cleaning are shared with build-census (:mod:`census_scvi.counts`) and re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.counts import (
    check_counts,
    gene_selection,
    log_counts_hint,
    query_gene_ids,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "OverlapReport",
    "check_counts",
    "gene_selection",
    "likely_cause",
    "log_counts_hint",
    "query_gene_ids",
]


@dataclass
class OverlapReport:
    """How much of the model's gene space a query covers.

    Attributes
    ----------
    n_model_genes
        Genes the model was trained on.
    n_found
        Model genes present in the query.
    gene_fraction
        ``n_found / n_model_genes``.
    n_query_genes
        Genes (columns) in the query.
    n_query_genes_used
        Query columns mapped onto a model gene.
    count_fraction
        Fraction of the query's total counts in the used columns.
    n_duplicate_ids
        Query columns whose id repeats another column's (their counts are added up).
    gene_id_source
        ``"var_names"`` or the var column the ids came from.
    missing_examples
        A few model genes the query lacks.
    """

    n_model_genes: int
    n_found: int
    gene_fraction: float
    n_query_genes: int
    n_query_genes_used: int
    count_fraction: float = float("nan")
    n_duplicate_ids: int = 0
    gene_id_source: str = "var_names"
    missing_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.n_found:,} / {self.n_model_genes:,} model genes found "
            f"({self.gene_fraction:.1%}); they hold {self.count_fraction:.1%} of the query's counts "
            f"({self.n_query_genes_used:,} of {self.n_query_genes:,} query genes used)"
        )


def likely_cause(
    query_ids: Sequence[str | None] | npt.NDArray[np.object_], model_ids: Sequence[str]
) -> str:
    """A guess at why few genes match (symbols vs Ensembl ids, another organism)."""
    q = [str(v) for v in query_ids if v is not None][:2000]
    m = [str(v) for v in model_ids][:2000]
    if not q:
        return "the query has no gene ids"

    def frac(ids: list[str], prefix: str) -> float:
        return float(np.mean([i.startswith(prefix) for i in ids])) if ids else 0.0

    model_human = frac(m, "ENSG") > 0.5
    model_mouse = frac(m, "ENSMUSG") > 0.5
    q_ens = frac(q, "ENS") > 0.5
    if (model_human or model_mouse) and not q_ens:
        return (
            f"the query's gene ids look like gene symbols (e.g. '{q[0]}') while the model uses "
            f"Ensembl ids (e.g. '{m[0]}'): pass --gene-ids with the var column holding Ensembl ids"
        )
    if model_human and frac(q, "ENSMUSG") > 0.5:
        return "the query's genes are mouse Ensembl ids (ENSMUSG) but the model is human (ENSG): wrong organism"
    if model_mouse and frac(q, "ENSG0") > 0.5:
        return "the query's genes are human Ensembl ids (ENSG) but the model is mouse (ENSMUSG): wrong organism"
    if not (model_human or model_mouse) and q_ens:
        return (
            f"the query uses Ensembl ids (e.g. '{q[0]}') but the model's genes are not "
            f"(e.g. '{m[0]}'): use the same kind of gene id as the model"
        )
    return (
        "the query measures few of the model's genes (a targeted panel, or a different annotation)"
    )
