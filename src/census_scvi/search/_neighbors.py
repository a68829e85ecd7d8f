"""The nearest embedded cells of a user's h5ad, and obs values predicted from them.

``run_neighbors(QUERY.h5ad, run_dir=RUN_DIR, out=OUT.h5ad)``:

1. encodes the query as ``census-scvi map`` does (:mod:`census_scvi.search._query`);
2. searches the run's index (``census-scvi index``) for the ``k`` nearest embedded cells
   (default ``search.k``), at the nprobe calibrated when the index was built unless one is given
   (``--nprobe`` or ``search.nprobe``);
3. reads the requested obs columns of those cells from the census the run embedded and predicts
   each with ``map``'s weights (the shared :mod:`census_scvi.knn` layer);
4. writes OUT.h5ad atomically: the query plus ``obsm["X_scvi"]`` (latent),
   ``obsm["neighbors_joinids"]`` (int64 n x k soma_joinids, nearest first, -1 where missing),
   ``obsm["neighbors_distances"]`` (float32 Euclidean distances, inf where missing), and for each
   column ``obs["<col>_pred"]`` (categorical), ``obs["<col>_confidence"]`` (distance-weighted,
   as ``map``) and ``obs["<col>_vote_share"]`` (plain vote), with ``uns["census_scvi_neighbors"]``.

Examples
--------
>>> from census_scvi.search import run_neighbors
>>> res = run_neighbors("pbmc.h5ad", run_dir="runs/demo", out="pbmc-nn.h5ad")  # doctest: +SKIP
>>> print(res.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from census_scvi.constants import CONFIG_FILE
from census_scvi.errors import CensusScviError
from census_scvi.knn import IndexStatus, index_status, kernel_weights, predict, search_index
from census_scvi.rundir import atomic_path, model_dir, refuse_overwrite
from census_scvi.search._query import encode_query

if TYPE_CHECKING:
    import anndata as ad

    from census_scvi.config import Config

__all__ = [
    "DEFAULT_COLUMNS",
    "OBSM_DISTANCES",
    "OBSM_JOINIDS",
    "NeighborsResult",
    "predict_obs",
    "run_neighbors",
]

logger = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("cell_type", "tissue_general", "disease")
OBSM_LATENT = "X_scvi"
OBSM_JOINIDS = "neighbors_joinids"
OBSM_DISTANCES = "neighbors_distances"
UNS_KEY = "census_scvi_neighbors"


@dataclass
class NeighborsResult:
    """What ``run_neighbors`` did."""

    out: Path
    n_cells: int
    k: int
    nprobe: int
    predictions: dict[str, pd.Series] = field(default_factory=dict)
    mean_confidence: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"neighbors: {self.n_cells:,} cells, {self.k} nearest embedded cells each "
            f"(nprobe {self.nprobe}) in {self.seconds:.0f} s"
        ]
        for col, counts in self.predictions.items():
            lines.append(
                f"  {col}_pred (mean confidence {self.mean_confidence.get(col, float('nan')):.2f}):"
            )
            total = max(self.n_cells, 1)
            for name, n in counts.head(5).items():
                lines.append(f"    {int(n):7,} ({n / total:6.1%})  {name}")
            if len(counts) > 5:
                lines.append(f"    ... and {len(counts) - 5} more values")
        lines.append(f"  wrote {self.out}")
        return "\n".join(lines)


def _check_args(k: int | None, nprobe: int | None, columns: Sequence[str]) -> None:
    if k is not None and k < 1:
        msg = f"-k {k} must be at least 1"
        raise CensusScviError(msg, hint="e.g. -k 30")
    if nprobe is not None and nprobe < 1:
        msg = f"--nprobe {nprobe} must be at least 1"
        raise CensusScviError(msg)
    if not columns or any(not c.strip() for c in columns):
        msg = f"--columns {','.join(columns)!r} must name obs columns, comma-separated"
        raise CensusScviError(msg, hint="e.g. --columns cell_type,tissue_general,disease")


def _run_config(run_dir: Path, overrides: Sequence[str]) -> Config:
    from census_scvi.config import load_config

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        msg = f"{run_dir} is not a run directory: {CONFIG_FILE} missing"
        raise CensusScviError(msg, hint="pass --run the folder 'census-scvi run' wrote (-o)")
    return load_config(path, overrides=overrides)


def _current_index(run_dir: Path) -> IndexStatus:
    """The run's index; an error when it is missing or older than the embedding."""
    status = index_status(run_dir)
    if status.problem == "missing":
        hint = f"run 'census-scvi index -o {run_dir}' first"
        raise CensusScviError(status.reason(), hint=hint)
    if status.problem == "stale":
        raise CensusScviError(status.reason(), hint=f"rebuild it: 'census-scvi index -o {run_dir}'")
    return status


def _read_query(query: Path) -> ad.AnnData:
    import anndata as ad

    if not query.is_file():
        msg = f"query file not found: {query}"
        raise CensusScviError(msg)
    try:
        adata = ad.read_h5ad(query)
    except (OSError, KeyError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = f"cannot read {query} as an h5ad file: {first}"
        raise CensusScviError(msg) from None
    if adata.X is None or adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"{query} has no counts ({adata.n_obs} cells x {adata.n_vars} genes)"
        raise CensusScviError(msg, hint="put the raw counts in X")
    return adata


def _check_columns(config: Config, columns: Sequence[str]) -> None:
    from census_scvi.soma import get_experiment, open_census

    with open_census(config) as census:
        present = set(get_experiment(census, config.census.organism).obs.schema.names)
    missing = [c for c in columns if c not in present]
    if missing:
        msg = f"--columns {missing} not in the census obs; valid: {', '.join(sorted(present))}"
        raise CensusScviError(msg, hint="pick obs columns of the census the run embedded")


def predict_obs(
    experiment: Any,
    joinids: npt.NDArray[np.int64],
    distances: npt.NDArray[np.floating],
    columns: Sequence[str],
) -> dict[str, tuple[pd.Categorical, npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
    """Per obs column: the prediction, its weighted confidence and its vote share.

    Parameters
    ----------
    experiment
        The census experiment the neighbours' soma_joinids belong to.
    joinids, distances
        n x k neighbours (-1 / inf where missing) and their Euclidean distances.
    columns
        obs columns to predict.
    """
    from census_scvi.soma import read_obs

    valid = joinids >= 0
    unique = np.unique(joinids[valid])
    obs = read_obs(experiment, unique, list(columns))
    pos = np.searchsorted(unique, np.where(valid, joinids, unique[0] if unique.size else 0))
    weights = kernel_weights(distances)
    out = {}
    for col in columns:
        classes, codes = np.unique(obs[col].astype(str).to_numpy(), return_inverse=True)
        neighbor_codes = np.where(valid, codes[pos] if unique.size else -1, -1)
        pred = predict(neighbor_codes, weights, n_classes=classes.size)
        labels = pd.Categorical.from_codes(pred.codes, categories=pd.Index(classes.astype(str)))
        out[col] = (labels, pred.confidence, pred.vote_share)
    return out


def run_neighbors(
    query: str | os.PathLike[str],
    *,
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    k: int | None = None,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    nprobe: int | None = None,
    gene_ids: str | None = None,
    memory_gib: float | None = None,
    overrides: Sequence[str] = (),
    force: bool = False,
) -> NeighborsResult:
    """Find each query cell's ``k`` nearest embedded cells and predict ``columns`` from them.

    Parameters
    ----------
    query
        h5ad of raw counts (cells x genes).
    run_dir
        A run directory with a trained model, a finished embedding and its index.
    out
        Output h5ad (never overwritten unless ``force``).
    k
        Neighbours per query cell; default ``search.k`` (30).
    columns
        Census obs columns to predict.
    nprobe
        Index partitions searched per cell; default ``search.nprobe``, whose null is the one
        calibrated at build time.
    gene_ids
        Query var column with the model's gene ids (Ensembl); default the var index.
    memory_gib
        Memory for the index's partitions during the search; default ``search.memory_gib``.
    overrides
        ``section.key=value`` settings applied over the run's config.
    force
        Overwrite ``out``.

    Returns
    -------
    A :class:`NeighborsResult`; OUT.h5ad holds the keys listed in the module docstring.
    """
    t0 = time.perf_counter()
    query, run_dir, out = Path(query), Path(run_dir), Path(out)
    columns = [c.strip() for c in columns]
    _check_args(k, nprobe, columns)
    refuse_overwrite(out, force=force, what="output file")
    config = _run_config(run_dir, overrides)
    status = _current_index(run_dir)
    k = int(k or config.search.k)
    nprobe = int(nprobe or config.search.nprobe or status.nprobe)
    memory_gib = config.search.memory_gib if memory_gib is None else memory_gib
    index_uri = status.path
    _check_columns(config, columns)
    adata = _read_query(query)
    z = encode_query(
        adata,
        model_dir(run_dir, config.model.filename),
        gene_ids=gene_ids,
        chunk_size=config.map.chunk_size,
        batch_size=config.map.batch_size,
        accelerator="cpu" if config.train.accelerator == "cpu" else "auto",
        min_overlap=config.map.min_overlap,
        warn_overlap=config.map.warn_overlap,
    )
    ids, dist = search_index(
        index_uri, z, k=k, nprobe=nprobe, memory_gib=memory_gib, who="neighbors"
    )
    from census_scvi.soma import get_experiment, open_census

    with open_census(config) as census:
        preds = predict_obs(get_experiment(census, config.census.organism), ids, dist, columns)
    _annotate(adata, z, ids, dist, preds)
    adata.uns[UNS_KEY] = {
        "run_dir": str(run_dir.resolve()),
        "index": str(index_uri.resolve()),
        "census": str(config.census_uri() or config.census.version),
        "k": k,
        "nprobe": nprobe,
        "columns": list(columns),
        "distance": "euclidean",
        "confidence": "gaussian kernel of width the mean neighbour distance (as census-scvi map)",
    }
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    return NeighborsResult(
        out=out,
        n_cells=int(adata.n_obs),
        k=k,
        nprobe=nprobe,
        predictions={c: p[0].value_counts().sort_values(ascending=False) for c, p in preds.items()},
        mean_confidence={c: float(np.mean(p[1])) for c, p in preds.items()},
        seconds=time.perf_counter() - t0,
    )


def _annotate(
    adata: ad.AnnData,
    z: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    dist: npt.NDArray[np.float32],
    preds: dict[str, tuple[pd.Categorical, npt.NDArray[np.float32], npt.NDArray[np.float32]]],
) -> None:
    adata.obsm[OBSM_LATENT] = z
    adata.obsm[OBSM_JOINIDS] = ids
    adata.obsm[OBSM_DISTANCES] = dist
    for col, (labels, conf, share) in preds.items():
        for key in (f"{col}_pred", f"{col}_confidence", f"{col}_vote_share"):
            if key in adata.obs.columns:
                logger.warning("neighbors: replacing the query's obs column %s", key)
        adata.obs[f"{col}_pred"] = pd.Categorical(labels)
        adata.obs[f"{col}_confidence"] = conf
        adata.obs[f"{col}_vote_share"] = share
