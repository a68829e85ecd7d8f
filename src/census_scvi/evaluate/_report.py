"""The evaluation report (``evaluate/report.md``) from ``metrics.json``, and its table helpers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from census_scvi.evaluate._metrics import METRIC_HELP

__all__ = ["AGGREGATES", "fmt", "report_markdown", "table"]

AGGREGATES = ("Bio conservation", "Batch correction", "Total")
_CLASSIFIER_ROWS = {
    "logreg_accuracy": "Logistic regression accuracy",
    "logreg_macro_f1": "Logistic regression macro F1",
    "knn_accuracy": "k-NN accuracy",
    "knn_macro_f1": "k-NN macro F1",
}
_CLASSIFIER_HELP = (
    "cell-type classifiers trained on 60% of the sampled cells' embedding, scored on the other 40%"
)


def fmt(v: float | None) -> str:
    """A score with three decimals; blank when missing."""
    return "" if v is None else f"{v:.3f}"


def table(rows: Sequence[tuple[str, list[float | None]]], header: Sequence[str]) -> list[str]:
    """A markdown table: one row per ``(name, values)``."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, vals in rows:
        out.append(f"| {name} | " + " | ".join(fmt(v) for v in vals) + " |")
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
        body = [m for m in metric_names if m not in AGGREGATES]
        aggs = [m for m in AGGREGATES if m in metric_names]
        rows = [(m, [per_emb.get(e, {}).get(m) for e in embeddings]) for m in body]
        rows += [(f"**{m}**", [per_emb.get(e, {}).get(m) for e in embeddings]) for m in aggs]
        lines += [f"## Batch = `{key}`", ""]
        lines += table(rows, ["score", *embeddings])
        lines.append("")
        seen.update(metric_names)
    cls = metrics.get("classifier", {})
    if cls:
        lines += ["## Cell-type classifiers", ""]
        rows = [
            (label, [cls.get(e, {}).get(k) for e in embeddings])
            for k, label in _CLASSIFIER_ROWS.items()
        ]
        lines += table(rows, ["score", *embeddings])
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
