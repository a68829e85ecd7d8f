"""Which neighbour search ``map``'s label transfer uses: the run's index, or exact search.

With a current index (``census-scvi index``: ``RUN_DIR/index/ivf_flat``, built from the run's
embedding as it is now), ``map`` searches it over every embedded cell, at the nprobe calibrated at
build time (``search.nprobe`` overrides it): each neighbour's soma_joinid is found among the
embedding's ascending joinids (``np.searchsorted``) and its label read from one int32 code per
embedded cell. Exact search (scikit-learn, over a stratified sample of at most
``map.knn_reference_cells`` cells) stays the fallback: with ``map.use_index: false``, without an
index, with an index of an earlier embedding, or without TileDB-Vector-Search; one log line says
which. Both paths weight and vote alike (:mod:`census_scvi.knn`).

Measured on the mini census (two held-out datasets as the query, ~17k embedded cells, k = 15,
the calibrated nprobe): label-transfer accuracy 0.9236 with the index and 0.9255 exact, within the
0.005 that ``tests/test_map_index.py`` requires.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from census_scvi.knn import (
    INSTALL_HINT,
    TransferResult,
    have_vector_search,
    index_status,
    joinid_rows,
    search_index,
    sorted_codes,
    transfer_from_neighbors,
)

__all__ = ["SearchPlan", "index_transfer", "plan_search"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchPlan:
    """The search ``map`` will use, and why."""

    kind: Literal["index", "exact"]
    reason: str
    path: Path | None = None
    nprobe: int | None = None

    def to_uns(self) -> dict[str, Any]:
        """What ``uns["census_scvi_map"]`` records (h5ad-safe: no None)."""
        out: dict[str, Any] = {"search": self.kind, "search_reason": self.reason}
        if self.kind == "index":
            out |= {"index": str(self.path), "nprobe": int(self.nprobe or 1)}
        return out


def plan_search(run_dir: Path, *, use_index: bool, nprobe: int | None) -> SearchPlan:
    """The index when it can be used, else exact search; logs one line saying which and why.

    A stale index and a missing TileDB-Vector-Search are warnings (an index is there, unused);
    no index, or ``map.use_index: false``, is an info line.
    """
    hint = f"'census-scvi index -o {run_dir}'"
    level = logging.INFO
    if not use_index:
        plan = SearchPlan("exact", "map.use_index is false")
    else:
        status = index_status(run_dir)
        if status.problem == "missing":
            plan = SearchPlan("exact", f"{status.reason()}; {hint} builds one")
        elif status.problem == "stale":
            plan, level = (
                SearchPlan("exact", f"{status.reason()}; {hint} rebuilds it"),
                logging.WARNING,
            )
        elif not have_vector_search():
            why = f"an index is there but TileDB-Vector-Search is not installed ({INSTALL_HINT})"
            plan, level = SearchPlan("exact", why), logging.WARNING
        else:
            n = int(nprobe or status.nprobe)
            why = f"the run's index, nprobe {n} ({'search.nprobe' if nprobe else 'calibrated'})"
            plan = SearchPlan("index", why, status.path, n)
    where = "every embedded cell" if plan.kind == "index" else "a reference sample"
    logger.log(level, "map: %s search over %s: %s", plan.kind, where, plan.reason)
    return plan


def index_transfer(
    plan: SearchPlan,
    z: npt.NDArray[np.float32],
    codes: npt.NDArray[np.int32],
    classes: npt.NDArray[np.object_],
    joinids: npt.NDArray[np.int64],
    *,
    n_neighbors: int,
    memory_gib: float,
    unknown_threshold: float,
    unknown_label: str,
) -> TransferResult:
    """Label transfer from the index's ``n_neighbors`` nearest embedded cells of each query cell.

    ``codes`` (into ``classes``) hold the label of every embedded cell, in ``joinids`` order.
    """
    assert plan.path is not None and plan.nprobe is not None
    k = min(n_neighbors, int(joinids.size))
    ids, dist = search_index(
        plan.path, z, k=k, nprobe=plan.nprobe, memory_gib=memory_gib, who="map"
    )
    rows = joinid_rows(joinids, ids)
    found = rows >= 0
    raw = np.where(found, codes[np.where(found, rows, 0)], 0)
    ranked, sorted_classes = sorted_codes(raw, classes)  # ties break as exact search's
    return transfer_from_neighbors(
        np.where(found, ranked, -1),
        dist,
        sorted_classes,
        unknown_threshold=unknown_threshold,
        unknown_label=unknown_label,
    )
