"""The model card (``evaluate/model_card.md``): data, model, training, metrics, versions, limits."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.constants import PREPARE_DIR
from census_scvi.evaluate._report import AGGREGATES, fmt, table

if TYPE_CHECKING:
    import pandas as pd

    from census_scvi.config import ModelConfig

__all__ = ["extra_versions", "model_card_markdown", "model_facts", "n_train_cells"]


def n_train_cells(run_dir: Path) -> int | None:
    """Rows of ``prepare/cells.parquet`` (the training cells), None when it is not there."""
    p = run_dir / PREPARE_DIR / "cells.parquet"
    if not p.is_file():
        return None
    import pyarrow.parquet as pq

    return int(pq.read_metadata(p).num_rows)


def model_facts(model_path: Path, model: ModelConfig) -> tuple[dict[str, Any], Any]:
    """Model settings for the card (from the saved registry) and its training history."""
    import warnings

    from census_scvi.scvi_model import load_model, model_info

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_model(model_path, accelerator="cpu")  # verified: a model file is data
    registry = loaded.registry_
    n_batches = len(model_info(model_path).batch_categories)
    facts = {
        "class": "scvi.model.SCVI",
        "scvi-tools": registry.get("scvi_version", "?"),
        "n_latent": model.n_latent,
        "n_hidden": model.n_hidden,
        "n_layers": model.n_layers,
        "dropout_rate": model.dropout_rate,
        "gene_likelihood": model.gene_likelihood,
        "encode_covariates": model.encode_covariates,
        "batches (batch_key 'batch')": n_batches,
        "saved at": str(model_path),
    }
    return facts, loaded.history


def extra_versions() -> dict[str, str]:
    """Versions of the evaluation's own dependencies (beside ``rundir.package_versions``)."""
    out = {}
    for name in ("scib-metrics", "jax", "scikit-learn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


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


_USE_AND_LIMITS = (
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
)


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
            (m, [agg[e].get(m) for e in embs]) for m in AGGREGATES if any(m in agg[e] for e in embs)
        ]
        lines += table(rows, ["aggregate (batch = batch label)", *embs])
        lines.append("")
    cls = metrics.get("classifier", {})
    for e, vals in cls.items():
        lines.append(
            f"- {e}: cell-type accuracy logistic regression {fmt(vals.get('logreg_accuracy'))}, "
            f"k-NN {fmt(vals.get('knn_accuracy'))} (chance: majority class "
            f"{fmt(vals.get('chance_majority'))})"
        )
    lines += [
        "",
        "Details: `evaluate/report.md`, `evaluate/metrics.json`; picture: `evaluate/umap.png`.",
        "",
        *_USE_AND_LIMITS,
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
