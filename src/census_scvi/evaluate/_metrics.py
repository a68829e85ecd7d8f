"""scib-metrics and classifier scores of embeddings (the implementation behind ``evaluate``).

scib-metrics' ``Benchmarker`` does the scoring; we only choose the metrics, give it an exact
k-NN search (scikit-learn, fast and deterministic for the sample sizes evaluated here, where
pynndescent's index build dominates) shared across the batch keys, and return plain dicts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import BATCH_METRICS, BIO_METRICS
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import anndata as ad

__all__ = [
    "BATCH_METRICS",
    "BIO_METRICS",
    "METRIC_HELP",
    "benchmark",
    "classifier_scores",
    "pca_baseline",
]

logger = logging.getLogger(__name__)

# one line per score, for the report (names as scib-metrics' get_results(clean_names=True))
METRIC_HELP = {
    "Isolated labels": "bio: how well cell types found in few batches stay separate (silhouette)",
    "Leiden NMI": "bio: agreement of Leiden clusters with cell types (normalised mutual info)",
    "Leiden ARI": "bio: agreement of Leiden clusters with cell types (adjusted Rand index)",
    "KMeans NMI": "bio: agreement of k-means clusters with cell types (normalised mutual info)",
    "KMeans ARI": "bio: agreement of k-means clusters with cell types (adjusted Rand index)",
    "Silhouette label": "bio: cell types form compact, separate groups (rescaled silhouette)",
    "cLISI": "bio: neighbourhoods hold one cell type (1 = pure), inverse Simpson index",
    "BRAS": "batch: batches mix within each cell type (batch-removal adapted silhouette)",
    "iLISI": "batch: neighbourhoods hold many batches (1 = as many as possible)",
    "KBET": "batch: local batch composition matches the global one (kBET acceptance)",
    "Graph connectivity": "batch: each cell type forms one connected k-NN graph across batches",
    "PCR comparison": "batch: variance explained by batch drops vs the unintegrated PCA",
    "Bio conservation": "aggregate: mean of the bio-conservation scores",
    "Batch correction": "aggregate: mean of the batch-correction scores",
    "Total": "aggregate: 0.6 x bio conservation + 0.4 x batch correction (scIB weighting)",
}


def pca_baseline(counts: ad.AnnData, *, n_pcs: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """Unintegrated baseline: PCA of log-normalised counts (total 1e4, log1p) of the given genes."""
    import scanpy as sc

    a = counts.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    n = max(1, min(n_pcs, a.n_obs - 1, a.n_vars - 1))
    sc.pp.pca(a, n_comps=n, random_state=seed)
    return np.asarray(a.obsm["X_pca"], dtype=np.float32)


class _CachedNeighbors:
    """Exact k-NN (scikit-learn), computed once per embedding and reused for every batch key."""

    def __init__(self) -> None:
        self._cache: dict[tuple[tuple[int, ...], bytes], Any] = {}

    def __call__(self, x: np.ndarray, k: int) -> Any:
        import hashlib

        from scib_metrics.nearest_neighbors import NeighborsResults
        from sklearn.neighbors import NearestNeighbors

        arr = np.ascontiguousarray(x)
        key = (arr.shape, hashlib.sha1(arr.tobytes()).digest())
        hit = self._cache.get(key)
        if hit is None or hit.n_neighbors < k:
            k_eff = min(k, arr.shape[0])
            nn = NearestNeighbors(n_neighbors=k_eff).fit(arr)
            dist, ind = nn.kneighbors(arr)
            hit = NeighborsResults(indices=ind, distances=dist)
            self._cache[key] = hit
        return hit if hit.n_neighbors == k else hit.subset_neighbors(k)


def _collections(skip: Sequence[str], *, bio: bool) -> tuple[Any, Any]:
    from scib_metrics.benchmark import BatchCorrection, BioConservation

    bio_kw = {f.name: f.name not in skip for f in fields(BioConservation)}
    batch_kw = {f.name: f.name not in skip for f in fields(BatchCorrection)}
    bio_c = BioConservation(**bio_kw) if bio and any(bio_kw.values()) else None
    batch_c = BatchCorrection(**batch_kw) if any(batch_kw.values()) else None
    return bio_c, batch_c


def _label_spans_batches(labels: npt.NDArray[np.str_], batches: npt.NDArray[np.str_]) -> bool:
    """True when at least one label occurs in two or more batches."""
    import pandas as pd

    per_label = pd.DataFrame({"l": labels, "b": batches}).groupby("l")["b"].nunique()
    return bool((per_label >= 2).any())


def benchmark(
    embeddings: Mapping[str, npt.NDArray[np.floating]],
    *,
    labels: npt.ArrayLike,
    batches: Mapping[str, npt.ArrayLike],
    baseline: str,
    skip_metrics: Sequence[str] = (),
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, float]]:
    """scib-metrics on each embedding, once per batch key.

    The first batch key gets bio conservation and batch correction; the others only batch
    correction (bio conservation barely depends on the batch key). A batch key with a single
    value gets no batch-correction scores (the first one still gets bio conservation).

    Returns
    -------
    ``(scores, seconds)``: ``scores[batch_key][embedding][metric]`` (clean metric names plus the
    aggregates ``Bio conservation``, ``Batch correction``, ``Total``), and the wall time per key.
    """
    import anndata as ad
    import pandas as pd

    try:
        from scib_metrics.benchmark import Benchmarker
    except ImportError:
        msg = "evaluate needs scib-metrics, which is not installed"
        raise CensusScviError(msg, hint='pip install "census-scvi[eval]"') from None

    labels = np.asarray(labels).astype(str)
    names = list(embeddings)
    n = labels.shape[0]
    adata = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n)]))
    adata.obs["_label"] = pd.Categorical(labels)
    for name, emb in embeddings.items():
        adata.obsm[name] = np.asarray(emb, dtype=np.float32)
    neighbors = _CachedNeighbors()
    scores: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    for i, (key, values) in enumerate(batches.items()):
        values = np.asarray(values).astype(str)
        skip = list(skip_metrics)
        if not _label_spans_batches(labels, values):
            # scib-metrics BRAS (silhouette_batch) averages within labels over batches and fails
            # ("No objects to concatenate") when no label occurs in two batches.
            logger.warning(
                "evaluate: no label occurs in two %s batches; BRAS (per-label batch silhouette) skipped",
                key,
            )
            skip.append("bras")
        bio_c, batch_c = _collections(skip, bio=i == 0)
        if np.unique(values).size < 2:
            logger.info("evaluate: batch key %s has one value; no batch-correction scores", key)
            if bio_c is None:
                continue
            batch_c = None  # a single batch: bio conservation only
        elif batch_c is None and bio_c is None:
            continue
        adata.obs["_batch"] = pd.Categorical(values)
        t0 = time.perf_counter()
        bm = Benchmarker(
            adata,
            batch_key="_batch",
            label_key="_label",
            embedding_obsm_keys=names,
            pre_integrated_embedding_obsm_key=baseline,
            bio_conservation_metrics=bio_c,
            batch_correction_metrics=batch_c,
            progress_bar=False,
        )
        bm.prepare(neighbor_computer=neighbors)
        bm.benchmark()
        table = bm.get_results(min_max_scale=False).drop("Metric Type")
        scores[key] = {
            emb: {str(m): float(v) for m, v in table.loc[emb].items() if pd.notna(v)}
            for emb in names
        }
        seconds[key] = time.perf_counter() - t0
        logger.info("evaluate: scib-metrics for batch key %s in %.1f s", key, seconds[key])
    return scores, seconds


def classifier_scores(
    embedding: npt.NDArray[np.floating],
    labels: npt.ArrayLike,
    *,
    test_size: float = 0.4,
    n_neighbors: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy and macro F1 of logistic regression and k-NN predicting ``labels``.

    A stratified ``1 - test_size`` / ``test_size`` split (60/40 by default, as the Census embedding
    benchmark); features standardised on the training part.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels).astype(str)
    x = np.asarray(embedding, dtype=np.float32)
    # classes with one cell cannot be stratified; they go to the training part
    uniq, counts = np.unique(y, return_counts=True)
    rare = np.isin(y, uniq[counts < 2])
    idx = np.arange(y.size)
    try:
        tr, te = train_test_split(
            idx[~rare], test_size=test_size, random_state=seed, stratify=y[~rare]
        )
    except ValueError:  # too few cells per class for a stratified split: a plain random split
        tr, te = train_test_split(idx[~rare], test_size=test_size, random_state=seed)
    tr = np.concatenate([tr, idx[rare]])
    out: dict[str, float] = {}
    models = {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "knn": make_pipeline(
            StandardScaler(), KNeighborsClassifier(n_neighbors=min(n_neighbors, tr.size))
        ),
    }
    for name, clf in models.items():
        clf.fit(x[tr], y[tr])
        pred = clf.predict(x[te])
        out[f"{name}_accuracy"] = float(accuracy_score(y[te], pred))
        out[f"{name}_macro_f1"] = float(f1_score(y[te], pred, average="macro"))
    out["n_train"] = float(tr.size)
    out["n_test"] = float(te.size)
    return out
