"""The SOMA layer: opening a census, chunked X reads, TileDB settings, the Census schema."""

from __future__ import annotations

from census_scvi.soma._obs import read_counts, read_obs, stratified_indices
from census_scvi.soma._open import (
    census_fingerprint,
    experiment_name,
    get_experiment,
    open_census,
    open_census_uri,
)
from census_scvi.soma._x import XChunk, iter_x_chunks, plan_chunks, tiledb_read_config

__all__ = [
    "XChunk",
    "census_fingerprint",
    "experiment_name",
    "get_experiment",
    "iter_x_chunks",
    "open_census",
    "open_census_uri",
    "plan_chunks",
    "read_counts",
    "read_obs",
    "stratified_indices",
    "tiledb_read_config",
]
