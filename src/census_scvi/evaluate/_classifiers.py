"""Classifier scores of an embedding: how well it predicts the cell type."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from census_scvi.errors import CensusScviError

__all__ = ["classifier_accuracy"]


def _check_test_size(test_size: float) -> None:
    if not 0.0 < test_size < 1.0:
        msg = f"test_size={test_size} must be in (0, 1)"
        raise CensusScviError(msg, hint="set evaluate.test_size to a fraction, e.g. 0.4")


def _split(
    y: npt.NDArray[np.str_], *, test_size: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Stratified train/test positions; classes with one cell go to the training part."""
    from sklearn.model_selection import train_test_split

    uniq, counts = np.unique(y, return_counts=True)
    rare = np.isin(y, uniq[counts < 2])
    idx = np.arange(y.size)
    try:
        tr, te = train_test_split(
            idx[~rare], test_size=test_size, random_state=seed, stratify=y[~rare]
        )
    except ValueError:  # too few cells per class for a stratified split: a plain random split
        tr, te = train_test_split(idx[~rare], test_size=test_size, random_state=seed)
    return np.concatenate([tr, idx[rare]]).astype(np.int64), np.asarray(te, dtype=np.int64)


def classifier_accuracy(
    embedding: npt.NDArray[np.floating],
    labels: npt.ArrayLike,
    *,
    test_size: float = 0.4,
    n_neighbors: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """Cell-type accuracy and macro F1 of logistic regression and k-NN on an embedding.

    A stratified ``1 - test_size`` / ``test_size`` split (60/40 by default, as the Census
    embedding benchmark); features standardised on the training part.

    Parameters
    ----------
    embedding
        n_cells x d.
    labels
        One label per cell.
    test_size
        Held-out fraction.
    n_neighbors
        k of the k-NN classifier.
    seed
        Split seed.

    Returns
    -------
    ``logreg_accuracy``, ``logreg_macro_f1``, ``knn_accuracy``, ``knn_macro_f1``, ``n_train``,
    ``n_test``.
    """
    _check_test_size(test_size)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels).astype(str)
    x = np.asarray(embedding, dtype=np.float32)
    tr, te = _split(y, test_size=test_size, seed=seed)
    models = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "knn": make_pipeline(
            StandardScaler(), KNeighborsClassifier(n_neighbors=min(n_neighbors, tr.size))
        ),
    }
    out: dict[str, float] = {}
    for name, clf in models.items():
        clf.fit(x[tr], y[tr])
        pred = clf.predict(x[te])
        out[f"{name}_accuracy"] = float(accuracy_score(y[te], pred))
        out[f"{name}_macro_f1"] = float(f1_score(y[te], pred, average="macro"))
    out["n_train"] = float(tr.size)
    out["n_test"] = float(te.size)
    return out
