"""Writing a Census-shaped SOMA census: the one writer ``build-census`` and ``demo-data`` share.

Both stages create the root the same way (:func:`create_census_root`), store dataframes through
:func:`create_dataframe` with the column types of :mod:`census_scvi.soma._schema`
(:func:`schema_table`), write the presence matrix with :func:`write_presence_matrix` and
``census_info`` with :func:`census_scvi.soma._census_info.write_census_info`. They differ in how X
gets in: ``build-census`` appends h5ad files with ``tiledbsoma.io`` (its registration matches cells
and genes against an existing experiment), the mini census streams generated blocks through
:class:`CountsWriter` (bounded memory, no registration needed), from several processes at once:
each writes its own rows of X (:func:`create_counts_array`) and obs
(:func:`create_empty_dataframe`, enumerations fixed up front) as its own fragments, and
:func:`consolidate` tidies the arrays at the end.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from census_scvi.constants import CENSUS_DATA, CENSUS_INFO, MEASUREMENT, X_RAW
from census_scvi.soma._schema import PRESENCE_MATRIX, ColumnKind

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd
    import pyarrow as pa

__all__ = [
    "WRITE_NNZ",
    "X_TILE",
    "CountsWriter",
    "consolidate",
    "create_census_root",
    "create_counts_array",
    "create_dataframe",
    "create_empty_dataframe",
    "create_experiment",
    "drop_member",
    "open_collection",
    "schema_table",
    "write_presence_matrix",
]

logger = logging.getLogger(__name__)

X_TILE = 2048  # X space-tile extent on both dims (tiledbsoma's default, declared explicitly)
WRITE_NNZ = 4_000_000  # buffered non-zeros per CountsWriter submit (bounded memory)
# X filters: ByteShuffle before zstd level 1 on every column. 15.6M census-shape non-zeros: 25 MB
# in 1.1 s of CPU, tiledbsoma's default (zstd 3, no shuffle) 30 MB in 2.2 s (both with TileDB's
# order checks off; 2 cores shared, load ~9). The row ids had DoubleDelta; ByteShuffle against it:
# the same size (13.32 vs 13.34 bits per value), 48 vs 52-55 ns of write CPU per value, and reads
# no slower (29 vs 37 ns per value; an ad-hoc script: 8 census-shape blocks written through
# CountsWriter both ways, then read back whole with tiledbsoma; 2026-12-02).
_X_FILTERS = {
    "dims": {
        "soma_dim_0": {
            "tile": X_TILE,
            "filters": [{"_type": "ByteShuffleFilter"}, {"_type": "ZstdFilter", "level": 1}],
        },
        "soma_dim_1": {
            "tile": X_TILE,
            "filters": [{"_type": "ByteShuffleFilter"}, {"_type": "ZstdFilter", "level": 1}],
        },
    },
    "attrs": {
        "soma_data": {
            "filters": [{"_type": "ByteShuffleFilter"}, {"_type": "ZstdFilter", "level": 1}]
        }
    },
}
# TileDB's per-cell checks of a global-order write: ~40% of its CPU. Turned off only for writers
# whose order holds by construction (CountsWriter(checked=False)), with tests on the round trip.
# Those writers run one per core (the mini census's writer processes), so TileDB's own thread
# pools only wait for each other: their waits spin in sched_yield (~6% of a 250k-cell census's
# samples in `perf record -g`). One thread each: 250,000 census-shape cells, 2 writers,
# interleaved runs 3,454 / 3,698 -> 3,898 / 3,977 cells/s, system CPU 24.7 / 20.6 -> 14.5 /
# 14.2 s (`bench_demo_data.py --sizes 250000 --genes 20000 --shape census --processes 2`).
_UNCHECKED: dict[str, str | float] = {
    "sm.check_coord_dups": "false",
    "sm.check_coord_oob": "false",
    "sm.check_global_order": "false",
    "sm.compute_concurrency_level": "1",
    "sm.io_concurrency_level": "1",
}


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def open_collection(uri: str | Path, mode: Literal["r", "w"] = "r") -> Any:
    """Open a SOMA collection of any kind (Collection, Experiment, Measurement), typed loosely."""
    import tiledbsoma as soma

    return soma.open(str(uri), mode)


def create_census_root(
    path: Path, *, created_by: str, metadata: Mapping[str, str] | None = None
) -> None:
    """An empty census at ``path`` (must not exist): the root with ``census_info``, ``census_data``."""
    import tiledbsoma as soma

    with soma.Collection.create(str(path)) as root:  # type: ignore[var-annotated]
        root.metadata["created_by"] = created_by
        for key, value in (metadata or {}).items():
            root.metadata[key] = value
        root.add_new_collection(CENSUS_INFO).close()
        root.add_new_collection(CENSUS_DATA).close()


def create_experiment(census_data_uri: str, organism: str) -> str:
    """An empty ``census_data/<organism>`` with ``ms/RNA/X``; returns the experiment's URI."""
    import tiledbsoma as soma

    with open_collection(census_data_uri, "w") as data:
        exp = data.add_new_collection(organism, soma.Experiment)
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection(MEASUREMENT, soma.Measurement)
        rna.add_new_collection("X").close()
        rna.close()
        ms.close()
        uri = str(exp.uri)
        exp.close()
    return uri


def drop_member(parent_uri: str, key: str, root: Path) -> None:
    """Remove member ``key`` of a collection and delete its folder (inside ``root`` only)."""
    with open_collection(parent_uri, "w") as parent:
        if key not in parent:
            return
        uri = parent[key].uri
        del parent[key]
    path = _path(uri)
    if str(path.resolve()).startswith(str(root.resolve())) and path.exists():
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------------
# dataframes
# ------------------------------------------------------------------------------------------
def _arrow_column(col: pd.Series, kind: ColumnKind) -> pa.Array:
    import pandas as pd
    import pyarrow as pa

    if kind == "category":
        if not isinstance(col.dtype, pd.CategoricalDtype):
            col = pd.Series(pd.Categorical(col.astype(str).to_numpy()), index=col.index)
        return pa.array(col)
    if kind == "string":
        return pa.array(col.astype(str).tolist(), type=pa.large_string())
    if kind == "bool":
        return pa.array(col.to_numpy().astype(bool))
    return pa.array(col.to_numpy().astype(np.int64 if kind == "int64" else np.float32))


def schema_table(
    frame: pd.DataFrame, columns: tuple[tuple[str, ColumnKind], ...], *, first_joinid: int = 0
) -> pa.Table:
    """``frame``'s ``columns``, in that order and with the schema's types, and a ``soma_joinid``.

    ``soma_joinid`` is ``first_joinid`` plus the row number. Categories become dictionary
    (enumeration) columns, strings ``large_string``; a column of ``columns`` that ``frame`` lacks
    is an error (KeyError).
    """
    import pyarrow as pa

    joinids = np.arange(first_joinid, first_joinid + len(frame), dtype=np.int64)
    arrays = {"soma_joinid": pa.array(joinids)}
    for name, kind in columns:
        arrays[name] = _arrow_column(frame[name], kind)
    return pa.table(arrays)


def create_dataframe(parent_uri: str, key: str, table: pa.Table, *, root: Path) -> None:
    """(Re)create dataframe ``key`` under ``parent_uri`` holding ``table`` (with ``soma_joinid``).

    An existing member ``key`` is dropped first (its folder deleted if inside ``root``). Written
    through a freshly opened handle: with tiledbsoma 2.3.0, writing through the handle
    ``add_new_dataframe`` returns can store enumeration (categorical) columns with empty value
    lists, and reads then fail in ``to_pandas``.
    """
    import tiledbsoma as soma

    drop_member(parent_uri, key, root)
    schema = table.schema.remove(table.schema.get_field_index("soma_joinid"))
    with open_collection(parent_uri, "w") as parent:
        sdf = parent.add_new_dataframe(
            key,
            schema=schema,
            index_column_names=["soma_joinid"],
            domain=[(0, max(table.num_rows, 1) - 1)],
        )
        uri = sdf.uri
        sdf.close()
    with soma.DataFrame.open(uri, "w") as w:
        w.write(table)


def create_empty_dataframe(
    parent_uri: str,
    key: str,
    schema: pa.Schema,
    *,
    n_rows: int,
    enumerations: Mapping[str, Sequence[str]],
    root: Path,
) -> str:
    """(Re)create an empty dataframe for ``n_rows`` rows, every enumeration's values fixed now.

    For writers in several processes: each writes its own ``soma_joinid`` rows as fragments; with
    every value of every dictionary column already in the schema, no write evolves the schema
    (concurrent evolutions would race). ``schema`` has no ``soma_joinid``; ``enumerations`` maps
    each dictionary column to all its values. Returns the dataframe's URI.
    """
    import pyarrow as pa
    import tiledbsoma as soma

    drop_member(parent_uri, key, root)
    with open_collection(parent_uri, "w") as parent:
        sdf = parent.add_new_dataframe(
            key, schema=schema, index_column_names=["soma_joinid"], domain=[(0, max(n_rows, 1) - 1)]
        )
        uri = str(sdf.uri)
        sdf.close()
    values = {
        c: pa.array(list(v), type=schema.field(c).type.value_type) for c, v in enumerations.items()
    }
    with soma.DataFrame.open(uri, "w") as w:  # a fresh handle (see create_dataframe)
        w.extend_enumeration_values(values)
    return uri


def consolidate(uri: str, *, fragments: bool) -> None:
    """Consolidate and vacuum an array: its fragments too when ``fragments``, else the fragment
    metadata and commit files only (what opening many fragments costs; no data is rewritten).

    TileDB sizes consolidation buffers from ``sm.mem.total_budget`` (10 GiB by default): merging
    the 20,000-row obs of a mini census took 1.7 GiB that way, ~0.1 GiB with a 512 MiB budget.
    """
    import tiledbsoma as soma

    modes = ["fragments"] if fragments else []
    context = soma.SOMATileDBContext(tiledb_config=_CONSOLIDATION)
    with soma.open(uri, "w", context=context) as arr:
        arr._handle.consolidate_and_vacuum([*modes, "fragment_meta", "commits"])


# ------------------------------------------------------------------------------------------
# sparse arrays
# ------------------------------------------------------------------------------------------
def _coo_table(rows: npt.ArrayLike, cols: npt.ArrayLike, values: npt.ArrayLike) -> pa.Table:
    import pyarrow as pa

    return pa.table(
        {
            "soma_dim_0": np.asarray(rows, dtype=np.int64),
            "soma_dim_1": np.asarray(cols, dtype=np.int64),
            "soma_data": np.asarray(values),
        }
    )


def write_presence_matrix(
    ms_uri: str,
    root: Path,
    *,
    shape: tuple[int, int],
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    values: npt.NDArray[np.bool_],
) -> None:
    """(Re)write ``<ms>/feature_dataset_presence_matrix`` (census_info/datasets rows x var, bool).

    ``rows`` are census_info/datasets ``soma_joinid`` values (the table is shared by every
    organism), ``cols`` var ``soma_joinid`` values.
    """
    import pyarrow as pa
    import tiledbsoma as soma

    drop_member(ms_uri, PRESENCE_MATRIX, root)
    with soma.Measurement.open(ms_uri, "w") as ms:
        arr = ms.add_new_sparse_ndarray(PRESENCE_MATRIX, type=pa.bool_(), shape=shape)
        uri = arr.uri
        arr.close()
    if len(rows):
        with soma.SparseNDArray.open(uri, "w") as w:
            w.write(_coo_table(rows, cols, np.asarray(values, dtype=bool)))


_CONSOLIDATION: dict[str, str | float] = {"sm.mem.total_budget": str(512 << 20)}


def create_counts_array(ms_uri: str, shape: tuple[int, int]) -> str:
    """An empty ``<ms>/X/raw`` (float32, :data:`X_TILE` tiles, the X filters); returns its URI."""
    import pyarrow as pa

    with open_collection(f"{ms_uri}/X", "w") as xcoll:
        arr = xcoll.add_new_sparse_ndarray(
            X_RAW,
            type=pa.float32(),
            shape=shape,
            platform_config={"tiledb": {"create": _X_FILTERS}},
        )
        uri = str(arr.uri)
        arr.close()
    return uri


class CountsWriter:
    """Non-zeros into an ``X/raw`` array as ONE fragment: a single TileDB global-order write.

    Pieces come through :meth:`append` (row-major, any size) or :meth:`append_ordered` (already in
    global order, whole row tiles); each starts after the rows of the previous one. Buffered
    pieces are put in TileDB's global order (space tiles of :data:`X_TILE` x :data:`X_TILE`,
    row-major, row-major inside a tile: one stable argsort of the tile number) and submitted to the
    open query, whole row tiles at a time, once ``buffer_nnz`` non-zeros are buffered; ``close``
    finalizes the fragment. Several writers (processes) may fill disjoint row ranges of one array
    at once, each its own fragment. With ``checked`` TileDB verifies the order and refuses
    out-of-order or duplicate coordinates; without, those per-cell checks (~40% of the write's
    CPU) are skipped: for callers whose order holds by construction.

    Why: TileDB's sort of an unordered write was most of the mini census's time.
    ``python benchmarks/bench_demo_data.py --x-write 20000`` (20.5M non-zeros of mini-census counts,
    20,000 cells x 2,000 genes, 4M-value writes; 2 cores shared, load ~9): global order 7.9 s
    (2.6M nnz/s), the same writes unordered 43.7 s, ``tiledbsoma.io.from_anndata`` of the whole
    matrix (build-census's path) 55.6 s with 2.2x the peak RSS (2.46 vs 1.12 GiB). One fragment per
    writer instead of one per 4M values keeps X as a few large fragments, so no consolidation has
    to rewrite it. The streaming submits use tiledbsoma's ``ManagedQuery`` (as its own
    ``_write_table`` does; tiledbsoma is pinned below 2.4).

    Examples
    --------
    >>> uri = create_counts_array(ms_uri, (n_cells, n_genes))  # doctest: +SKIP
    >>> with CountsWriter(uri) as w:  # doctest: +SKIP
    ...     w.append(rows, cols, values)
    """

    def __init__(self, uri: str, *, buffer_nnz: int = WRITE_NNZ, checked: bool = True) -> None:
        import tiledbsoma as soma
        import tiledbsoma.pytiledbsoma as clib
        from tiledbsoma._managed_query import ManagedQuery

        self.buffer_nnz = buffer_nnz
        context = None if checked else soma.SOMATileDBContext(tiledb_config=_UNCHECKED)
        self._array: Any = soma.SparseNDArray.open(uri, "w", context=context)
        self.shape = tuple(int(n) for n in self._array.shape)
        self._col_tiles = -(-self.shape[1] // X_TILE)
        self._pieces: list[tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]] = []
        self._buffered = 0
        self._next_row = 0
        self._query: Any = ManagedQuery(self._array)._handle
        self._query.set_layout(clib.ResultOrder.globalorder)
        self._submitted = False

    def append(
        self,
        rows: npt.NDArray[np.integer[Any]],
        cols: npt.NDArray[np.integer[Any]],
        values: npt.NDArray[np.float32],
    ) -> None:
        """Buffer one row-major piece (see the class docstring); submits when the buffer is full."""
        if len(rows) == 0:
            return
        self._check_start(int(rows[0]))
        if self._buffered >= self.buffer_nnz and int(rows[0]) // X_TILE > self._last_tile():
            self._submit_buffer()
        self._next_row = int(rows[-1]) + 1
        self._pieces.append((rows.astype(np.int64), cols.astype(np.int64), values))
        self._buffered += len(values)

    def append_ordered(
        self,
        rows: npt.NDArray[np.int64],
        cols: npt.NDArray[np.int64],
        values: npt.NDArray[np.float32],
    ) -> None:
        """Submit a piece already in global order that covers whole row tiles (the last one may
        end the array), after anything buffered."""
        if len(rows) == 0:
            return
        self._check_start(int(rows.min()))
        self._submit_buffer()
        self._next_row = int(rows.max()) + 1
        self._submit(rows, cols, values)

    def _check_start(self, first: int) -> None:
        if first < self._next_row:
            msg = f"CountsWriter pieces must come in row order: row {first} < {self._next_row}"
            raise ValueError(msg)

    def _last_tile(self) -> int:
        return (self._next_row - 1) // X_TILE

    def _submit_buffer(self) -> None:
        """Submit the buffered pieces in global order."""
        if not self._pieces:
            return
        rows, cols, vals = (np.concatenate(p) for p in zip(*self._pieces, strict=True))
        self._pieces.clear()
        self._buffered = 0
        if self._col_tiles > 1:  # row-major across column tiles -> tile by tile
            order = np.argsort((rows // X_TILE) * self._col_tiles + cols // X_TILE, kind="stable")
            rows, cols, vals = rows[order], cols[order], vals[order]
        self._submit(rows, cols, vals)

    def _submit(
        self, rows: npt.NDArray[Any], cols: npt.NDArray[Any], vals: npt.NDArray[Any]
    ) -> None:
        import pyarrow as pa

        batch = pa.record_batch(
            {
                "soma_dim_0": np.asarray(rows, dtype=np.int64),
                "soma_dim_1": np.asarray(cols, dtype=np.int64),
                "soma_data": np.asarray(vals, dtype=np.float32),
            }
        )
        self._query.submit_batch(batch)
        self._submitted = True

    def close(self) -> None:
        """Submit what is buffered, finalize the fragment and close the array."""
        try:
            self._submit_buffer()
            if self._submitted:
                self._query.finalize()
        finally:
            self._array.close()

    def __enter__(self) -> CountsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # nothing more is written after a failure (no fragment is committed)
            self._array.close()
