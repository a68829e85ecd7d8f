"""The SOMA layer: opening a census, chunked X reads, TileDB settings, the Census schema, and the
one Census writer (``build-census`` and ``demo-data``)."""

from __future__ import annotations

from census_scvi.soma._census_info import cell_counts, write_census_info
from census_scvi.soma._frames import read_dataframe
from census_scvi.soma._obs import read_counts, read_obs, stratified_indices
from census_scvi.soma._open import (
    census_fingerprint,
    experiment_name,
    get_experiment,
    open_census,
    open_census_uri,
)
from census_scvi.soma._writer import (
    CountsWriter,
    create_census_root,
    create_dataframe,
    create_experiment,
    drop_member,
    open_collection,
    schema_table,
    write_presence_matrix,
)
from census_scvi.soma._x import (
    XChunk,
    XValues,
    iter_x_chunks,
    iter_x_values,
    plan_chunks,
    tiledb_read_config,
)

__all__ = [
    "CountsWriter",
    "XChunk",
    "XValues",
    "cell_counts",
    "census_fingerprint",
    "create_census_root",
    "create_dataframe",
    "create_experiment",
    "drop_member",
    "experiment_name",
    "get_experiment",
    "iter_x_chunks",
    "iter_x_values",
    "open_census",
    "open_census_uri",
    "open_collection",
    "plan_chunks",
    "read_counts",
    "read_dataframe",
    "read_obs",
    "schema_table",
    "stratified_indices",
    "tiledb_read_config",
    "write_census_info",
    "write_presence_matrix",
]
