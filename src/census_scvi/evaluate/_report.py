"""Human-readable outputs of ``evaluate``: report.md, model_card.md and the UMAP picture."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.evaluate._metrics import METRIC_HELP

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["model_card_markdown", "report_markdown"]

logger = logging.getLogger(__name__)

_AGGREGATES = ("Bio conservation", "Batch correction", "Total")
_CLASSIFIER_ROWS = {
    "logreg_accuracy": "Logistic regression accuracy",
    "logreg_macro_f1": "Logistic regression macro F1",
    "knn_accuracy": "k-NN accuracy",
    "knn_macro_f1": "k-NN macro F1",
}
_CLASSIFIER_HELP = (
    "cell-type classifiers trained on 60% of the sampled cells' embedding, scored on the other 40%"
)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _table(rows: Sequence[tuple[str, list[float | None]]], header: Sequence[str]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, vals in rows:
        out.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |")
    return out


def report_markdown(metrics: Mapping[str, Any], *, embeddings: Sequence[str]) -> str:
    """The evaluation report: one table per batch key (embeddings side by side), then classifiers."""
    lines = [
        "# Evaluation report",
        "",
        f"{metrics['n_cells_sampled']:,} of {metrics['n_cells_embedded']:,} embedded cells "
        f"(stratified by `{metrics['label_key']}`), {metrics['n_genes']:,} genes. "
        f"Labels: `{metrics['label_key']}`. Baseline `PCA`: {metrics['n_pcs']} principal "
        "components of log-normalised counts of the model's genes, same cells. Higher is better "
        "for every score (scib-metrics, not min-max scaled).",
        "",
    ]
    seen: set[str] = set()
    for key, per_emb in metrics["scib"].items():
        metric_names = list(dict.fromkeys(m for e in embeddings for m in per_emb.get(e, {})))
        body = [m for m in metric_names if m not in _AGGREGATES]
        aggs = [m for m in _AGGREGATES if m in metric_names]
        rows = [(m, [per_emb.get(e, {}).get(m) for e in embeddings]) for m in body]
        rows += [(f"**{m}**", [per_emb.get(e, {}).get(m) for e in embeddings]) for m in aggs]
        lines += [f"## Batch = `{key}`", ""]
        lines += _table(rows, ["score", *embeddings])
        lines.append("")
        seen.update(metric_names)
    cls = metrics.get("classifier", {})
    if cls:
        lines += ["## Cell-type classifiers", ""]
        rows = [
            (label, [cls.get(e, {}).get(k) for e in embeddings])
            for k, label in _CLASSIFIER_ROWS.items()
        ]
        lines += _table(rows, ["score", *embeddings])
        lines.append("")
    lines += ["## What the scores mean", ""]
    for name, text in METRIC_HELP.items():
        if name in seen:
            lines.append(f"- **{name}**: {text}.")
    if cls:
        lines.append(f"- **Classifier accuracy / macro F1**: {_CLASSIFIER_HELP}.")
    skipped = metrics.get("metrics_skipped") or []
    if skipped:
        lines += [
            "",
            f"Not computed (evaluate.skip_metrics): {', '.join(f'`{s}`' for s in skipped)}.",
        ]
    return "\n".join(lines) + "\n"


def _history_summary(history: Mapping[str, pd.DataFrame] | None) -> list[str]:
    if not history:
        return ["- no training history saved with the model"]
    out = []
    for key in ("elbo_train", "elbo_validation", "reconstruction_loss_train", "kl_local_train"):
        df = history.get(key)
        if df is None or len(df) == 0:
            continue
        vals = np.asarray(df.to_numpy(), dtype=float).ravel()
        out.append(
            f"- `{key}`: {vals[0]:.2f} (epoch 1) -> {vals[-1]:.2f} (epoch {vals.size}), "
            f"min {np.nanmin(vals):.2f}"
        )
    return out or ["- no training history saved with the model"]


def model_card_markdown(
    *,
    config_yaml: str,
    census: Mapping[str, Any],
    metrics: Mapping[str, Any],
    n_genes: int,
    n_train_cells: int | None,
    history: Mapping[str, pd.DataFrame] | None,
    model_summary: Mapping[str, Any],
    versions: Mapping[str, str],
) -> str:
    """A model card: data, model, training, metrics, versions, intended use and limits."""
    agg = metrics.get("aggregate", {})
    lines = [
        "# Model card: scVI embedding (census-scvi)",
        "",
        "## Data",
        "",
        f"- Census: `{census.get('uri') or census.get('version')}` "
        f"(organism `{census.get('organism')}`)",
        f"- Training cell filter: `{census.get('model_filter')}`",
        f"- Training cells: {n_train_cells:,}"
        if n_train_cells is not None
        else "- Training cells: unknown",
        f"- Embedded cells: {metrics['n_cells_embedded']:,}",
        f"- Genes (highly variable, model inputs): {n_genes:,}",
        f"- Batch label: `{census.get('batch_key')}` (one scVI batch per distinct value)",
        "",
        "## Model",
        "",
    ]
    lines += [f"- {k}: `{v}`" for k, v in model_summary.items()]
    lines += ["", "## Training history", "", *_history_summary(history), "", "## Metrics", ""]
    if agg:
        embs = list(agg)
        rows = [
            (m, [agg[e].get(m) for e in embs])
            for m in _AGGREGATES
            if any(m in agg[e] for e in embs)
        ]
        lines += _table(rows, ["aggregate (batch = batch label)", *embs])
        lines.append("")
    cls = metrics.get("classifier", {})
    for e, vals in cls.items():
        lines.append(
            f"- {e}: cell-type accuracy logistic regression {_fmt(vals.get('logreg_accuracy'))}, "
            f"k-NN {_fmt(vals.get('knn_accuracy'))}"
        )
    lines += [
        "",
        "Details: `evaluate/report.md`, `evaluate/metrics.json`; picture: `evaluate/umap.png`.",
        "",
        "## Intended use",
        "",
        "- A shared low-dimensional space for the census's cells: neighbour search, clustering,",
        "  atlas-level visualisation, and mapping new datasets (`census-scvi map`) with label",
        "  transfer by weighted k-NN.",
        "- The model does not encode batch covariates, so unseen batches (a user's dataset) embed",
        "  from expression alone.",
        "",
        "## Limits",
        "",
        "- Trained on the highly variable genes only; a query missing many of them maps poorly",
        "  (`census-scvi map` reports the overlap and refuses below `map.min_overlap`).",
        "- Expects raw counts (integers) from assays like those in the census; normalised or",
        "  log-transformed input is rejected.",
        "- Batch correction is learnt for the batches seen in training; strong technical effects of",
        "  a new assay may remain. Label transfer cannot predict cell types absent from the",
        "  reference: low-confidence cells are called 'unknown'.",
        "- Scores are measured on a stratified sample and depend on the label annotation quality.",
        "",
        "## Package versions",
        "",
        *[f"- {k} {v}" for k, v in versions.items()],
        "",
        "## Configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"
