"""Which census an embedding came from, as the embed manifest records it (``census``).

``map`` (and anything else that reads the embedded cells' obs later) opens the census recorded
here, not the one ``config.yaml`` names today: ``{cache}`` expands per user, a census may be
rebuilt, and a run directory may be read on another machine. So the record holds where the census
was (an absolute ``uri``, or the Census ``version`` and the release it resolved to) and a
fingerprint a reader checks before trusting it:

- ``obs_count``: cells in the experiment's obs;
- ``n_cells`` and ``joinids_sha256``: how many cells were embedded and a sha256 of their
  soma_joinids (``latent-idx.npy``'s values), which ties the record to the rows on disk;
- ``obs_sample``: the identifying obs values (``dataset_id``, ``observation_joinid``, ``nnz``,
  ``raw_sum`` where present) of up to :data:`SAMPLE_CELLS` embedded cells, evenly spaced, so
  that another census of the same size (a mini census built with another seed) is told apart.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import SOMA_JOINID

if TYPE_CHECKING:
    import tiledbsoma as soma

    from census_scvi.config import Config

__all__ = ["SAMPLE_CELLS", "census_record", "joinids_sha256"]

#: Embedded cells whose identifying obs values the record keeps.
SAMPLE_CELLS = 16
#: obs columns that identify a cell (the Census schema's; those present are used).
_ID_COLUMNS = ("dataset_id", "observation_joinid", "nnz", "raw_sum")


def joinids_sha256(joinids: npt.NDArray[np.int64]) -> str:
    """sha256 of the soma_joinids as little-endian int64 bytes (the order counts)."""
    data = np.ascontiguousarray(np.asarray(joinids, dtype="<i8"))
    return hashlib.sha256(data.tobytes()).hexdigest()


def census_record(
    config: Config,
    experiment: soma.Experiment,
    joinids: npt.NDArray[np.int64],
    *,
    release: str,
) -> dict[str, Any]:
    """The manifest's ``census`` entry: where the embedded census is and its fingerprint.

    Parameters
    ----------
    config
        The resolved config (``census.uri`` / ``census.version`` / ``census.organism``).
    experiment
        The open experiment the cells were embedded from.
    joinids
        The embedded cells' soma_joinids, in row order.
    release
        The census version written in the embedding metadata (release name or build date).
    """
    uri = config.census_uri()
    if uri is not None and "://" not in uri:
        uri = str(Path(uri).resolve())
    return {
        "uri": uri,
        "version": None if uri is not None else config.census.version,
        "release": release,
        "organism": config.census.organism,
        "obs_count": int(experiment.obs.count),
        "n_cells": len(joinids),
        "joinids_sha256": joinids_sha256(joinids),
        "obs_sample": obs_sample(experiment, joinids),
    }


def obs_sample(experiment: soma.Experiment, joinids: npt.NDArray[np.int64]) -> dict[str, list[str]]:
    """Identifying obs values (as strings) of up to :data:`SAMPLE_CELLS` evenly spaced cells."""
    from census_scvi.soma import read_obs

    n = len(joinids)
    if n == 0:
        return {SOMA_JOINID: []}
    pick = np.unique(np.linspace(0, n - 1, min(n, SAMPLE_CELLS)).astype(np.int64))
    ids = np.asarray(joinids[pick], dtype=np.int64)
    names = set(experiment.obs.keys())
    columns = [c for c in _ID_COLUMNS if c in names]
    obs = read_obs(experiment, ids, columns)
    out = {SOMA_JOINID: [str(int(j)) for j in ids]}
    for c in columns:
        out[c] = [str(v) for v in obs[c].astype(str).to_numpy()]
    return out
