"""scib-metrics scores of embeddings and the PCA baseline (the implementation behind ``evaluate``).

scib-metrics' ``Benchmarker`` does the scoring; we only choose the metrics, give it an exact
k-NN search (scikit-learn, fast and deterministic for the sample sizes evaluated here, where
pynndescent's index build dominates) shared across the batch keys, and return plain dicts with
the list of metrics that ran (the aggregates average those, so they differ from the
Benchmarker's defaults when some are left out).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from importlib.util import find_spec
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
    "EVAL_INSTALL",
    "METRIC_HELP",
    "ScibScores",
    "benchmark",
    "pca_baseline",
    "require_scib_metrics",
    "scib_default_metrics",
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


EVAL_INSTALL = "pip install 'census-scvi[eval]'"


def require_scib_metrics() -> None:
    """Fail at once, naming the install command, when scib-metrics (the ``eval`` extra) is missing."""
    if find_spec("scib_metrics") is None:
        msg = "evaluate needs scib-metrics, which is not installed"
        raise CensusScviError(msg, hint=EVAL_INSTALL)


def scib_default_metrics() -> list[str]:
    """The metric switches scib-metrics' ``Benchmarker`` turns on by default."""
    from scib_metrics.benchmark import BatchCorrection, BioConservation

    return [
        f.name for c in (BioConservation, BatchCorrection) for f in fields(c) if f.default is True
    ]


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence the known warnings of scib-metrics, jax, scanpy and scikit-learn, here only.

    Deprecation notices of those packages (their own business), anndata's "Transforming to str
    index" (the census reader's integer obs index) and umap's "ParametricUMAP will be unavailable"
    (an import-time note that tensorflow is absent), and scib-metrics' "PCR comparison score is
    negative ... Setting to 0" (the report shows the 0).
    """
    with warnings.catch_warnings():
        for module in ("scib_metrics", "jax", "sklearn", "scanpy", "anndata", "umap", "numba"):
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
        warnings.filterwarnings("ignore", message="Transforming to str index")
        warnings.filterwarnings("ignore", message=".*ParametricUMAP will be unavailable.*")
        warnings.filterwarnings("ignore", message="PCR comparison score is negative")
        yield


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


def _switched_on(collection: Any) -> list[str]:
    return (
        []
        if collection is None
        else [f.name for f in fields(collection) if getattr(collection, f.name)]
    )


def _label_spans_batches(labels: npt.NDArray[np.str_], batches: npt.NDArray[np.str_]) -> bool:
    """True when at least one label occurs in two or more batches."""
    import pandas as pd

    per_label = pd.DataFrame({"l": labels, "b": batches}).groupby("l")["b"].nunique()
    return bool((per_label >= 2).any())


@dataclass
class ScibScores:
    """What :func:`benchmark` computed.

    Attributes
    ----------
    scores
        ``scores[batch_key][embedding][metric]``: clean metric names plus the aggregates
        ``Bio conservation``, ``Batch correction``, ``Total``.
    seconds
        Wall time per batch key.
    ran
        The scib-metrics switches (``BIO_METRICS`` / ``BATCH_METRICS`` names) that ran, per key.
    single_valued
        Batch keys with one value (no batch-correction scores).
    """

    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    ran: dict[str, list[str]] = field(default_factory=dict)
    single_valued: list[str] = field(default_factory=list)


def _plan(
    key: str,
    values: npt.NDArray[np.str_],
    labels: npt.NDArray[np.str_],
    skip: Sequence[str],
    *,
    first: bool,
) -> tuple[Any, Any]:
    """The bio / batch metric collections for one batch key (None: not computed)."""
    if np.unique(values).size < 2:
        logger.info("evaluate: batch key %s has one value; no batch-correction scores", key)
        return _collections(skip, bio=first)[0], None  # bio conservation only, on the first key
    skip = list(skip)
    if "bras" not in skip and not _label_spans_batches(labels, values):
        # scib-metrics BRAS (silhouette_batch) averages within labels over batches and fails
        # ("No objects to concatenate") when no label occurs in two batches.
        logger.warning(
            "evaluate: no label occurs in two %s batches; BRAS (per-label batch silhouette) skipped",
            key,
        )
        skip.append("bras")
    return _collections(skip, bio=first)


def benchmark(
    embeddings: Mapping[str, npt.NDArray[np.floating]],
    *,
    labels: npt.ArrayLike,
    batches: Mapping[str, npt.ArrayLike],
    baseline: str,
    skip_metrics: Sequence[str] = (),
) -> ScibScores:
    """scib-metrics on each embedding, once per batch key.

    The first batch key gets bio conservation and batch correction; the others only batch
    correction (bio conservation barely depends on the batch key). A batch key with a single
    value gets no batch-correction scores (the first one still gets bio conservation), with one
    log line.

    Parameters
    ----------
    embeddings
        Name -> (n_cells x d) array; must include ``baseline``.
    labels
        Cell labels (bio conservation).
    batches
        Batch key name -> one batch per cell.
    baseline
        The unintegrated embedding (used by ``pcr_comparison``).
    skip_metrics
        scib-metrics switches to leave out (e.g. ``"kbet_per_label"``).

    Returns
    -------
    A :class:`ScibScores`.
    """
    require_scib_metrics()
    labels = np.asarray(labels).astype(str)
    _check_shapes(embeddings, labels, baseline)
    out = ScibScores()
    neighbors = _CachedNeighbors()
    adata = _anndata(embeddings, labels)
    with quiet_warnings():  # importing scib-metrics warns too (umap, jax)
        for i, (key, raw) in enumerate(batches.items()):
            values = np.asarray(raw).astype(str)
            if np.unique(values).size < 2:
                out.single_valued.append(key)
            bio_c, batch_c = _plan(key, values, labels, skip_metrics, first=i == 0)
            if bio_c is None and batch_c is None:
                continue
            t0 = time.perf_counter()
            out.scores[key] = _run_benchmarker(adata, values, bio_c, batch_c, baseline, neighbors)
            out.ran[key] = _switched_on(bio_c) + _switched_on(batch_c)
            out.seconds[key] = time.perf_counter() - t0
            logger.info("evaluate: scib-metrics for batch key %s in %.1f s", key, out.seconds[key])
    return out


def _check_shapes(
    embeddings: Mapping[str, npt.NDArray[np.floating]], labels: npt.NDArray[np.str_], baseline: str
) -> None:
    if baseline not in embeddings:
        msg = f"baseline '{baseline}' is not one of the embeddings {list(embeddings)}"
        raise CensusScviError(msg)
    n = labels.shape[0]
    for name, emb in embeddings.items():
        if np.asarray(emb).shape[0] != n:
            msg = f"embedding '{name}' has {np.asarray(emb).shape[0]} rows, labels have {n}"
            raise CensusScviError(msg)


def _anndata(
    embeddings: Mapping[str, npt.NDArray[np.floating]], labels: npt.NDArray[np.str_]
) -> ad.AnnData:
    import anndata as ad
    import pandas as pd

    adata = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(labels.shape[0])]))
    adata.obs["_label"] = pd.Categorical(labels)
    for name, emb in embeddings.items():
        adata.obsm[name] = np.asarray(emb, dtype=np.float32)
    return adata


def _run_benchmarker(
    adata: ad.AnnData,
    batch: npt.NDArray[np.str_],
    bio_c: Any,
    batch_c: Any,
    baseline: str,
    neighbors: _CachedNeighbors,
) -> dict[str, dict[str, float]]:
    import pandas as pd
    from scib_metrics.benchmark import Benchmarker

    adata.obs["_batch"] = pd.Categorical(batch)
    names = list(adata.obsm)
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
    return {
        emb: {str(m): float(v) for m, v in table.loc[emb].items() if pd.notna(v)} for emb in names
    }
