"""The description section of the exported model card: what was trained on what, and its metrics.

scvi-hub's template (``scvi/hub/_template.py``) fills the YAML header, the model parameters,
registry and summary statistics from the saved model; its metric slots are for differential
expression and coefficients of variation, which census-scvi does not compute, so our evaluation
(scib-metrics aggregates from ``evaluate/metrics.json``) goes into the description.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["description_markdown"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "n/a" if v is None else str(v)


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    agg = metrics.get("aggregate") or {}
    if not isinstance(agg, Mapping) or not agg:
        return []
    embeddings = list(agg)
    names = list(dict.fromkeys(m for e in embeddings for m in (agg[e] or {})))
    lines = [
        "",
        "## Evaluation (census-scvi evaluate)",
        "",
        f"On {metrics.get('n_cells_sampled', 'n/a'):,} of "
        f"{metrics.get('n_cells_embedded', 'n/a'):,} embedded cells, labels "
        f"`{metrics.get('label_key', 'n/a')}` (scib-metrics aggregates; `metrics.json` holds all "
        "figures):"
        if isinstance(metrics.get("n_cells_sampled"), int)
        and isinstance(metrics.get("n_cells_embedded"), int)
        else "scib-metrics aggregates (`metrics.json` holds all figures):",
        "",
        "| metric | " + " | ".join(embeddings) + " |",
        "|---|" + "---|" * len(embeddings),
    ]
    for name in names:
        row = [_fmt((agg[e] or {}).get(name)) for e in embeddings]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def description_markdown(
    *,
    census: str,
    organism: str,
    embed_figures: Mapping[str, Any],
    metrics: Mapping[str, Any] | None,
) -> str:
    """The model card's description: data, sizes, how to load it, and the evaluation figures."""
    n_cells = embed_figures.get("n_cells")
    lines = [
        f"An scVI model trained with census-scvi on the CELLxGENE Census-schema data `{census}` "
        f"(organism `{organism}`), on {embed_figures.get('n_genes', 'n/a')} highly variable "
        f"genes with a {embed_figures.get('n_latent', 'n/a')}-dimensional latent space.",
        "",
        "The AnnData shipped with it is minified: no counts, only each embedded cell's latent "
        "posterior (mean and variance) and library size"
        + (f", for {n_cells:,} cells" if isinstance(n_cells, int) else "")
        + ". The model loads from it alone, and maps new data with scArches "
        "(`SCVI.load_query_data`).",
    ]
    return "\n".join(lines + (_metrics_table(metrics) if metrics else []))
