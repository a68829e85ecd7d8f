"""``map --truth COLUMN``: score the transferred labels against a known label column of the query.

Scores (``uns["census_scvi_map"]["truth"]`` and the printed summary):

- ``accuracy``: predicted label (after ``map.unknown_threshold``) equals the truth, over every
  query cell with a truth value; a cell called ``unknown`` counts as wrong;
- ``accuracy_called`` and ``fraction_called``: the same over the cells not called ``unknown``,
  and how many those are;
- ``macro_f1``: scikit-learn's macro-averaged F1 over the truth's labels (``unknown`` calls are
  misses of their true label);
- ``confusion``: cells per (truth, predicted) pair, a DataFrame (rows: truth);
- ``confidence_bins``: per confidence bin (edges :data:`CONFIDENCE_EDGES`), the cells in it and
  the accuracy of their most probable label whatever the threshold: calibration at a glance.

Truth labels that no reference cell carries cannot be predicted right; how many cells have one is
reported (``n_cells_label_not_in_reference``) and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

    from census_scvi.knn import TransferResult

__all__ = ["CONFIDENCE_EDGES", "TruthScores", "check_truth_column", "score_truth"]

logger = logging.getLogger(__name__)

#: Confidence bin edges; the last bin includes 1.0.
CONFIDENCE_EDGES = (0.0, 0.5, 0.75, 0.9, 1.0)


def query_obs_columns(path: Path) -> list[str] | None:
    """The obs columns of an h5ad, read from its header only (None when it cannot tell)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            order = f["obs"].attrs.get("column-order")
            return [] if order is None else [str(c) for c in np.atleast_1d(order)]
    except (OSError, KeyError, TypeError, AttributeError):
        return None


def check_truth_column(columns: list[str] | None, truth: str | None, *, query: Path) -> None:
    """Refuse a ``--truth`` column the query's obs lacks, listing the valid ones."""
    if truth is None or columns is None or truth in columns:
        return
    msg = (
        f"--truth column {truth!r} is not in {query.name}'s obs; valid: "
        f"{', '.join(columns) or 'none'}"
    )
    raise CensusScviError(msg, hint="pass the query obs column with the known labels")


@dataclass
class TruthScores:
    """Predictions scored against the query's ``column``."""

    column: str
    n_cells: int
    n_scored: int
    accuracy: float
    accuracy_called: float
    fraction_called: float
    macro_f1: float
    n_cells_label_not_in_reference: int
    confusion: pd.DataFrame
    confidence_bins: pd.DataFrame
    examples_not_in_reference: list[str] = field(default_factory=list)

    def to_uns(self) -> dict[str, Any]:
        """For ``uns`` (h5ad-writable: numbers, strings, DataFrames)."""
        return {
            "column": self.column,
            "n_cells": self.n_cells,
            "n_scored": self.n_scored,
            "accuracy": self.accuracy,
            "accuracy_called": self.accuracy_called,
            "fraction_called": self.fraction_called,
            "macro_f1": self.macro_f1,
            "n_cells_label_not_in_reference": self.n_cells_label_not_in_reference,
            "confusion": self.confusion,
            "confidence_bins": self.confidence_bins,
        }

    def lines(self) -> list[str]:
        """The summary's lines."""
        out = [
            f"  against {self.column} ({self.n_scored:,} cells): accuracy {self.accuracy:.3f}, "
            f"macro F1 {self.macro_f1:.3f}; {self.fraction_called:.1%} called, accuracy "
            f"{self.accuracy_called:.3f} among them",
            "    confidence   cells   accuracy",
        ]
        for row in self.confidence_bins.itertuples(index=False):
            acc = "-" if row.n_cells == 0 else f"{row.accuracy:.3f}"
            out.append(f"    {row.bin:<11} {row.n_cells:7,}   {acc}")
        if self.n_cells_label_not_in_reference:
            out.append(
                f"    {self.n_cells_label_not_in_reference:,} cells have a {self.column} no "
                f"reference cell has (e.g. {self.examples_not_in_reference[0]!r})"
            )
        return out


def score_truth(
    adata: ad.AnnData,
    column: str,
    res: TransferResult,
    reference_labels: npt.ArrayLike,
    *,
    unknown_label: str,
) -> TruthScores:
    """Score ``res`` (one prediction per query cell) against ``adata.obs[column]``.

    Cells whose truth is missing (NaN) are left out of every score; cells called
    ``unknown_label`` count as wrong (and as not called).
    """
    import pandas as pd
    from sklearn.metrics import f1_score

    values = adata.obs[column]
    scored = values.notna().to_numpy()
    truth = values[scored].astype(str).to_numpy()
    pred = res.labels[scored].astype(str)
    best = res.best[scored].astype(str)
    conf = res.confidence[scored]
    if truth.size == 0:
        msg = f"--truth column {column!r} has no values (all missing)"
        raise CensusScviError(msg, hint="pass the query obs column with the known labels")
    called = pred != unknown_label
    known = set(np.asarray(reference_labels).astype(str).tolist())
    absent = ~np.isin(truth, list(known))
    if absent.any():
        logger.warning(
            "map: %d of %d cells have a %s no reference cell has (e.g. %r): they count as wrong",
            int(absent.sum()),
            truth.size,
            column,
            str(truth[absent][0]),
        )
    classes = sorted(set(truth.tolist()))
    return TruthScores(
        column=column,
        n_cells=int(adata.n_obs),
        n_scored=int(truth.size),
        accuracy=float((pred == truth).mean()),
        accuracy_called=float((pred[called] == truth[called]).mean()) if called.any() else 0.0,
        fraction_called=float(called.mean()),
        macro_f1=float(f1_score(truth, pred, labels=classes, average="macro", zero_division=0)),
        n_cells_label_not_in_reference=int(absent.sum()),
        confusion=pd.crosstab(
            pd.Series(truth, name=column), pd.Series(pred, name=f"predicted_{column}")
        ),
        confidence_bins=_bins(conf, best == truth),
        examples_not_in_reference=sorted(set(truth[absent].tolist()))[:5],
    )


def _bins(conf: npt.NDArray[np.float32], right: npt.NDArray[np.bool_]) -> pd.DataFrame:
    import pandas as pd

    edges = np.asarray(CONFIDENCE_EDGES)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, edges.size - 2)
    rows = []
    for b in range(edges.size - 1):
        inside = which == b
        close = "]" if b == edges.size - 2 else ")"
        rows.append(
            {
                "bin": f"[{edges[b]:.2f}, {edges[b + 1]:.2f}{close}",
                "n_cells": int(inside.sum()),
                "accuracy": float(right[inside].mean()) if inside.any() else float("nan"),
            }
        )
    return pd.DataFrame(rows)
