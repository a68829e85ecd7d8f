"""Index stage: a TileDB-Vector-Search IVF_FLAT index over every embedded cell.

``run_index(config, run_dir=RUN_DIR)`` reads ``embed/latent.npy`` (memory-mapped) and
``embed/latent-idx.npy`` and writes into ``RUN_DIR/index/``:

- ``ivf_flat/``: the index (external ids = obs soma_joinids; squared Euclidean distances), the
  kind the Census's ``find_nearest_obs`` opens;
- ``manifest.json``, last, with the build figures, the nprobe calibrated to reach the recall
  target and ``"index": {"type": "IVFFlat", "relative_uri": "index/ivf_flat", ...}``.

It also records ``{"type": "IVFFlat", "relative_uri": "index/ivf_flat"}`` under ``indexes`` in
``embed/embedding.soma``'s ``CxG_embedding_info`` (relative to the run directory).

Why ``RUN_DIR/index/`` and not inside ``embed/``: every stage owns one folder of the run
directory (its manifest, its writer lock, its temporaries), so ``embed --force`` and embed's
clean-up of killed writers never touch the index, and a rebuilt index never touches embed's
folder beyond the one metadata key. The index is redone when the embedding changes (the embed
manifest or latent files differ), when its settings change, or with ``force``.

Resumable: the index is built under a temporary name (``index/.ivf_flat.tmp-PID``) with its
staged inputs (``index/.scratch.tmp-PID``) and renamed when complete; a killed build leaves only
those hidden temporaries, which the next run removes (it holds ``index/.writer.lock``).

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.search import run_index
>>> print(run_index(load_config("runs/demo/config.yaml"), run_dir="runs/demo").summary())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from census_scvi.constants import (
    EMBED_DIR,
    EMBEDDING_SOMA,
    INDEX_DIR,
    INDEX_NAME,
    INDEX_RELATIVE_URI,
    STAGE_LOCK,
)
from census_scvi.errors import CensusScviError
from census_scvi.knn import calibrate_nprobe, embedding_identity, open_index, vector_search
from census_scvi.rundir import (
    atomic_path,
    load_embedding,
    peak_rss_bytes,
    remove_within,
    run_stage,
)
from census_scvi.search._build import ingest_ivf_flat
from census_scvi.search._metadata import INDEX_TYPE, embedding_indexes, record_index

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from census_scvi.config import Config

__all__ = [
    "INDEX_DIR",
    "INDEX_NAME",
    "INDEX_RELATIVE_URI",
    "IndexResult",
    "embedding_identity",
    "run_index",
]

logger = logging.getLogger(__name__)


@dataclass
class IndexResult:
    """What ``run_index`` did (or found already done)."""

    run_dir: Path
    skipped: bool
    figures: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.run_dir / INDEX_RELATIVE_URI

    def summary(self) -> str:
        f = self.figures
        if self.skipped:
            head = (
                f"index: already built at {self.path} (embedding unchanged; --force rebuilds it)."
            )
        else:
            rss = f.get("peak_rss_bytes", 0) / 2**20
            head = (
                f"index: built {self.path} in {f.get('build_seconds', 0):.1f} s "
                f"(+{f.get('calibrate_seconds', 0):.1f} s calibration, peak RSS {rss:.0f} MiB)."
            )
        where = f.get("recorded_in")
        return (
            f"{head} IVF_FLAT over {f.get('n_cells', 0):,} cells x {f.get('n_features', 0)} "
            f"dimensions, {f.get('partitions', 0):,} partitions; default nprobe "
            f"{f.get('nprobe')} gives recall@{f.get('k')} {f.get('recall', float('nan')):.3f} "
            f"(measured on {f.get('calibration_cells', 0):,} cells against exact search)."
            + (f" Recorded in {self.run_dir / where}." if where else "")
        )


def _check_args(k: int, recall_target: float, calibration_cells: int, memory_mib: int) -> None:
    if k < 1:
        msg = f"k={k} must be at least 1"
        raise CensusScviError(msg)
    if not 0.0 < recall_target <= 1.0:
        msg = f"recall_target={recall_target} must be in (0, 1]"
        raise CensusScviError(msg, hint="e.g. 0.95")
    if calibration_cells < 1 or memory_mib < 1:
        msg = (
            f"calibration_cells={calibration_cells} and build_memory_mib={memory_mib} must be >= 1"
        )
        raise CensusScviError(msg)


def run_index(
    config: Config,
    *,
    run_dir: str | os.PathLike[str],
    force: bool = False,
    partitions: int | None = None,
    k: int | None = None,
    recall_target: float | None = None,
    calibration_cells: int | None = None,
    build_memory_mib: int | None = None,
    seed: int = 0,
) -> IndexResult:
    """Build (or find current) the IVF_FLAT index over every embedded cell of ``run_dir``.

    The settings left None are the config's ``search`` section's (``search.partitions``, ...).

    Parameters
    ----------
    config
        The run's resolved config (identifies the run; its ``search`` section the settings).
    run_dir
        A run directory whose embed stage has finished.
    force
        Rebuild even when the index is current.
    partitions
        k-means partitions; default ``search.partitions``, whose null is ``sqrt(n_cells)``
        (TileDB-Vector-Search's default).
    k, recall_target
        The default nprobe recorded is the smallest reaching ``recall_target`` recall@``k``
        (``search.k``, ``search.recall_target``).
    calibration_cells
        Indexed cells queried (against exact search over every cell) to measure recall.
    build_memory_mib
        Vectors read per ingestion step, in MiB (the build's memory apart from k-means).
    seed
        Seeds the k-means training sample and the calibration cells.

    Returns
    -------
    An :class:`IndexResult`; the index is at ``RUN_DIR/index/ivf_flat``.
    """
    given: dict[str, Any] = {"partitions": partitions, "k": k, "recall_target": recall_target}
    given |= {"calibration_cells": calibration_cells, "build_memory_mib": build_memory_mib}
    settings = {key: getattr(config.search, key) if v is None else v for key, v in given.items()}
    memory_mib = int(settings.pop("build_memory_mib"))  # how, not what: not in the identity
    settings["seed"] = seed
    vs = vector_search()
    _check_args(settings["k"], settings["recall_target"], settings["calibration_cells"], memory_mib)
    run_dir = Path(run_dir)
    latent, joinids = load_embedding(run_dir)
    inputs = {
        "embedding": embedding_identity(run_dir),
        "settings": json.dumps(settings, sort_keys=True),
        "tiledb-vector-search": str(getattr(vs, "__version__", "unknown")),
    }
    with run_stage(
        run_dir,
        INDEX_DIR,
        config=config,
        sections=(),
        inputs=inputs,
        force=force,
        write_config=False,
        lock=STAGE_LOCK,
    ) as run:
        if run.skipped:
            figures = dict(run.figures)
            figures["recorded_in"] = _ensure_recorded(run_dir)
            return IndexResult(run_dir, skipped=True, figures=figures)
        figures = _build(run.dir, latent, joinids, settings, memory_mib)
        figures["recorded_in"] = _ensure_recorded(run_dir)
        entry = {"type": INDEX_TYPE, "relative_uri": INDEX_RELATIVE_URI}
        run.record(
            figures=figures,
            outputs={"index": run.dir / INDEX_NAME},
            extra={"index": {**entry, "nprobe": figures["nprobe"], "k": figures["k"]}},
        )
    return IndexResult(run_dir, skipped=False, figures=figures)


def _build(
    sdir: Path,
    latent: npt.NDArray[np.float32],
    joinids: npt.NDArray[np.int64],
    settings: dict[str, Any],
    build_memory_mib: int,
) -> dict[str, Any]:
    """Build under a temporary name, calibrate nprobe on it, then rename it into place."""
    import time

    scratch = sdir / f".scratch.tmp-{os.getpid()}"
    n, d = latent.shape
    try:
        with atomic_path(sdir / INDEX_NAME) as tmp:
            t0 = time.perf_counter()
            build = ingest_ivf_flat(
                tmp,
                latent,
                joinids,
                scratch=scratch,
                partitions=settings["partitions"],
                build_memory_mib=build_memory_mib,
                seed=settings["seed"],
            )
            remove_within(scratch, sdir)  # free the staged copy before calibrating
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cal = calibrate_nprobe(
                open_index(str(tmp), memory_gib=build_memory_mib / 1024),
                latent,
                partitions=build["partitions"],
                k=settings["k"],
                target=settings["recall_target"],
                n_queries=settings["calibration_cells"],
                seed=settings["seed"],
            )
            calibrate_s = time.perf_counter() - t0
    finally:
        if scratch.exists():
            remove_within(scratch, sdir)
    if cal.recall < settings["recall_target"]:  # pragma: no cover - every partition is exact
        logger.warning("index: recall@%d %.3f at every partition", cal.k, cal.recall)
    return {
        "n_cells": int(n),
        "n_features": int(d),
        **build,
        "nprobe": cal.nprobe,
        "recall": cal.recall,
        "k": cal.k,
        "recall_target": settings["recall_target"],
        "calibration_cells": cal.n_queries,
        "recall_by_nprobe": {str(p): r for p, r in cal.tried.items()},
        "build_seconds": round(build_s, 3),
        "calibrate_seconds": round(calibrate_s, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _ensure_recorded(run_dir: Path) -> str | None:
    """Record the index in ``embedding.soma``'s metadata unless it already is.

    Returns the embedding's path relative to the run directory, or None without one.
    """
    uri = run_dir / EMBED_DIR / EMBEDDING_SOMA
    if not uri.exists():
        logger.info("index: no %s (embed.write_soma is off); nothing to record", uri)
        return None
    entry = {"type": INDEX_TYPE, "relative_uri": INDEX_RELATIVE_URI}
    if entry not in embedding_indexes(uri):
        record_index(uri, INDEX_RELATIVE_URI)
    return f"{EMBED_DIR}/{EMBEDDING_SOMA}"
