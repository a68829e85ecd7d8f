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
    "chance_majority": "chance: majority class of the test split",
    "chance_uniform": "chance: 1 / number of cell types",
}
_BATCH_ROWS = {
    "knn_accuracy": "k-NN batch accuracy",
    "chance_majority": "chance: majority batch of the test split",
    "within_label_knn_accuracy": "k-NN batch accuracy within cell type",
    "within_label_chance_majority": "chance within cell type (majority batch)",
}


_CLASSIFIER_HELP = (
    "cell-type classifiers on the embedding, scored on held-out cells; higher is better"
)
_BATCH_HELP = (
    "k-NN predicting the batch from the embedding; near chance is well mixed, lower is better"
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
    """The report: scib tables per batch key, the metrics that ran, classifiers, batch mixing."""
    lines = [
        "# Evaluation report",
        "",
        f"{metrics['n_cells_sampled']:,} of {metrics['n_cells_embedded']:,} embedded cells "
        f"(stratified by `{metrics['label_key']}`), {metrics['n_genes']:,} genes. "
        f"Labels: `{metrics['label_key']}`. Baseline `PCA`: {metrics['n_pcs']} principal "
        "components of log-normalised counts of the model's genes, same cells. Higher is better "
        "for every scib score (scib-metrics, not min-max scaled).",
        "",
    ]
    seen: set[str] = set()
    for key, per_emb in metrics["scib"].items():
        lines += _scib_table(key, per_emb, embeddings, seen)
    lines += _scib_ran(metrics)
    lines += _classifier_section(metrics, embeddings)
    lines += _batch_mixing_section(metrics, embeddings)
    lines += ["## What the scores mean", ""]
    lines += [f"- **{name}**: {text}." for name, text in METRIC_HELP.items() if name in seen]
    if metrics.get("classifier"):
        lines.append(f"- **Classifier accuracy / macro F1**: {_CLASSIFIER_HELP}.")
    if metrics.get("batch_classifier"):
        lines.append(f"- **Batch mixing**: {_BATCH_HELP}.")
    skipped = metrics.get("metrics_skipped") or []
    if skipped:
        lines += [
            "",
            f"Not computed (evaluate.skip_metrics): {', '.join(f'`{s}`' for s in skipped)}.",
        ]
    return "\n".join(lines) + "\n"


def _scib_table(
    key: str, per_emb: Mapping[str, Mapping[str, float]], embeddings: Sequence[str], seen: set[str]
) -> list[str]:
    names = list(dict.fromkeys(m for e in embeddings for m in per_emb.get(e, {})))
    body = [m for m in names if m not in AGGREGATES]
    aggs = [m for m in AGGREGATES if m in names]
    rows = [(m, [per_emb.get(e, {}).get(m) for e in embeddings]) for m in body]
    rows += [(f"**{m}**", [per_emb.get(e, {}).get(m) for e in embeddings]) for m in aggs]
    seen.update(names)
    return [f"## Batch = `{key}`", "", *table(rows, ["score", *embeddings]), ""]


def _scib_ran(metrics: Mapping[str, Any]) -> list[str]:
    """Which scib-metrics ran, and how the aggregates differ from the Benchmarker's defaults."""
    ran: Mapping[str, Sequence[str]] = metrics.get("scib_metrics_ran") or {}
    if not ran:
        return []
    lines = ["## scib-metrics that ran", ""]
    lines += [f"- batch = `{key}`: {_names(names)}" for key, names in ran.items()]
    defaults = list(metrics.get("scib_default_metrics") or [])
    first = next(iter(ran.values()))
    left_out = [m for m in defaults if m not in first]
    added = [m for m in first if m not in defaults]
    lines.append("")
    if left_out or added:
        diff = []
        if left_out:
            diff.append(f"also run {_names(left_out)} (left out here)")
        if added:
            diff.append(f"do not run {_names(added)} (run here)")
        text = (
            "The aggregates (bio conservation, batch correction, total) are means over the metrics "
            f"that ran. scib-metrics' Benchmarker defaults {' and '.join(diff)}, so these "
            "aggregates differ from ones computed with the defaults: compare them only with "
            "aggregates of the same metrics."
        )
        if "kbet_per_label" in left_out:
            text += " kBET is off by default here: its JAX compilation costs more than the rest."
        lines.append(text)
    else:
        lines.append("The aggregates use the same metrics as scib-metrics' Benchmarker defaults.")
    lines.append("")
    return lines


def _names(metrics: Sequence[str]) -> str:
    return ", ".join(f"`{m}`" for m in metrics)


def _classifier_section(metrics: Mapping[str, Any], embeddings: Sequence[str]) -> list[str]:
    cls = metrics.get("classifier") or {}
    if not cls:
        return []
    settings = metrics.get("classifier_settings") or {}
    test = float(settings.get("test_size", 0.4))
    k = settings.get("n_neighbors", 15)
    rows = [
        (label, [cls.get(e, {}).get(key) for e in embeddings])
        for key, label in _CLASSIFIER_ROWS.items()
    ]
    return [
        "## Cell-type classifiers",
        "",
        *table(rows, ["score", *embeddings]),
        "",
        f"Trained on {1 - test:.0%} of the sampled cells' embedding, scored on the other "
        f"{test:.0%} (a split stratified by cell type). The k-NN classifier (k = {k}, Euclidean) "
        "uses each embedding as it is, the metric space neighbour search and label transfer use; "
        "the logistic regression standardises each dimension first (on the training part), for "
        "its solver to converge; a linear model can reweight dimensions, so this changes it "
        "little (only through the L2 penalty). Higher is better; a score near its chance level "
        "(the accuracy of always guessing the test split's most frequent cell type, or of "
        "guessing uniformly) means the embedding does not separate cell types.",
        "",
    ]


def _batch_mixing_section(metrics: Mapping[str, Any], embeddings: Sequence[str]) -> list[str]:
    mixing: Mapping[str, Mapping[str, Mapping[str, float | None]]] = (
        metrics.get("batch_classifier") or {}
    )
    if not mixing:
        return []
    rows = []
    for key, per_emb in mixing.items():
        for field, label in _BATCH_ROWS.items():
            rows.append((f"`{key}`: {label}", [per_emb.get(e, {}).get(field) for e in embeddings]))
    return [
        "## Batch mixing (k-NN batch prediction; lower is better)",
        "",
        *table(rows, ["score", *embeddings]),
        "",
        "A k-NN classifier (the embedding as is, same split sizes) predicts each cell's batch from "
        "its neighbours. Well-mixed batches give about the chance level (the test split's most "
        "frequent batch); 1.0 means the batches stay apart. Within cell type: the mean over cell "
        "types with cells in two or more batches (and enough cells to split), so that batches "
        "holding different cell types are not mistaken for unmixed ones.",
        "",
    ]
