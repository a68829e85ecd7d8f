"""Fair classifier scores (issue 16): k-NN on the embedding as is, batch mixing, chance levels,
one-valued batch keys; each against a simple oracle."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from census_scvi.errors import CensusScviError
from census_scvi.evaluate import (
    batch_mixing_accuracy,
    chance_levels,
    classifier_accuracy,
)


def _pca_like(n: int = 1200, n_noise: int = 40, seed: int = 0):
    """Labels carried by 3 high-variance components; 40 low-variance components of pure noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    centers = rng.normal(0, 6, (6, 3))
    informative = centers[y] + rng.normal(0, 1, (n, 3))
    noise = rng.normal(0, 0.3, (n, n_noise))
    return np.hstack([informative, noise]).astype(np.float32), y.astype(str)


def test_knn_uses_the_embedding_as_is_not_standardised():
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _pca_like()
    got = classifier_accuracy(x, y, test_size=0.4, n_neighbors=15, seed=0)
    # the oracle: the same stratified split, scikit-learn's k-NN on the raw embedding
    tr, te = train_test_split(np.arange(y.size), test_size=0.4, random_state=0, stratify=y)
    oracle = KNeighborsClassifier(n_neighbors=15).fit(x[tr], y[tr]).score(x[te], y[te])
    scaled = (
        make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=15))
        .fit(x[tr], y[tr])
        .score(x[te], y[te])
    )
    assert got["knn_accuracy"] == pytest.approx(oracle)
    assert oracle > 0.9
    assert scaled < oracle - 0.15, (scaled, oracle)  # what standardising would have cost


def test_chance_levels_on_a_known_label_distribution():
    y = np.array(["a"] * 700 + ["b"] * 200 + ["c"] * 100)
    x = np.random.default_rng(0).normal(size=(y.size, 5))
    got = classifier_accuracy(x, y, test_size=0.4, seed=0)
    assert got["n_test"] == 400
    assert got["chance_majority"] == pytest.approx(0.7)  # the stratified test split keeps 70% 'a'
    assert got["chance_uniform"] == pytest.approx(1 / 3)
    assert chance_levels(["x", "x", "x", "y"], n_classes=4) == {
        "chance_majority": 0.75,
        "chance_uniform": 0.25,
    }


def test_batch_mixing_mixed_is_near_chance_separated_is_one():
    rng = np.random.default_rng(0)
    n = 1600
    labels = rng.integers(0, 4, n).astype(str)
    batches = rng.integers(0, 4, n)
    cell_type = np.eye(4)[labels.astype(int)] * 8
    mixed = cell_type + rng.normal(size=(n, 4))  # the batch leaves no trace
    apart = np.hstack([cell_type, np.eye(4)[batches] * 8]) + rng.normal(size=(n, 8))
    b = batches.astype(str)

    m = batch_mixing_accuracy(mixed, b, labels=labels)
    s = batch_mixing_accuracy(apart, b, labels=labels)
    assert m["chance_majority"] == pytest.approx(0.25, abs=0.03)
    assert m["chance_uniform"] == 0.25 and m["n_batches"] == 4
    assert abs(m["knn_accuracy"] - m["chance_majority"]) < 0.06, m
    assert abs(m["within_label_knn_accuracy"] - m["within_label_chance_majority"]) < 0.08, m
    assert m["n_labels_scored"] == 4
    assert s["knn_accuracy"] > 0.99 and s["within_label_knn_accuracy"] > 0.99, s
    with pytest.raises(CensusScviError, match="two or more batches"):
        batch_mixing_accuracy(mixed, np.full(n, "one"), labels=labels)


def test_within_label_score_leaves_out_cell_types_in_one_batch():
    rng = np.random.default_rng(1)
    labels = np.repeat(["T", "B"], 200)
    batches = np.where(labels == "T", rng.integers(0, 2, 400).astype(str), "b0")
    x = rng.normal(size=(400, 3))
    got = batch_mixing_accuracy(x, batches, labels=labels)
    assert got["n_labels_scored"] == 1  # 'B' cells are all in one batch


@pytest.mark.slow
def test_one_valued_batch_key_gives_one_log_line_and_no_score(caplog):
    from census_scvi.config import load_config
    from census_scvi.evaluate._stage import _Sample, _scores

    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 3, n).astype(str)
    emb = (np.eye(3)[labels.astype(int)] * 5 + rng.normal(size=(n, 3))).astype(np.float32)
    sample = _Sample(
        positions=np.arange(n),
        obs=None,  # type: ignore[arg-type]
        counts=None,  # type: ignore[arg-type]
        labels=labels,
        batches={"batch": rng.integers(0, 3, n).astype(str), "assay": np.full(n, "10x 3' v3")},
    )
    ev = load_config(
        None, overrides=["evaluate.skip_metrics=[kbet_per_label,nmi_ari_cluster_labels_leiden]"]
    ).evaluate
    with caplog.at_level(logging.INFO, logger="census_scvi"):
        got = _scores(ev, {"scVI": emb, "PCA": emb[:, ::-1].copy()}, sample, {})
    about_assay = [r for r in caplog.records if "assay" in r.getMessage()]
    assert len(about_assay) == 1, [r.getMessage() for r in about_assay]
    assert "one value" in about_assay[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "assay" not in got["scib"] and "assay" not in got["batch_classifier"]
    assert set(got["batch_classifier"]) == {"batch"}
    assert "bras" in got["scib_metrics_ran"]["batch"]
    assert "kbet_per_label" in got["scib_default_metrics"]
