"""Writing a Census-shaped SOMA census: the one writer ``build-census`` and ``demo-data`` share.

Both stages create the root the same way (:func:`create_census_root`), store dataframes through
:func:`create_dataframe` with the column types of :mod:`census_scvi.soma._schema`
(:func:`schema_table`), write the presence matrix with :func:`write_presence_matrix` and
``census_info`` with :func:`census_scvi.soma._census_info.write_census_info`. They differ in how X
gets in: ``build-census`` appends h5ad files with ``tiledbsoma.io`` (its registration matches cells
and genes against an existing experiment), the mini census streams generated blocks through
:class:`CountsWriter` (bounded memory, no registration needed).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
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
    "create_census_root",
    "create_dataframe",
    "create_experiment",
    "drop_member",
    "open_collection",
    "schema_table",
    "write_presence_matrix",
]

logger = logging.getLogger(__name__)

X_TILE = 2048  # X space-tile extent on both dims (tiledbsoma's default, declared explicitly)
WRITE_NNZ = 4_000_000  # buffered non-zeros per CountsWriter write (bounded memory, few fragments)


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


def schema_table(frame: pd.DataFrame, columns: tuple[tuple[str, ColumnKind], ...]) -> pa.Table:
    """``frame``'s ``columns``, in that order and with the schema's types, and a ``soma_joinid``.

    ``soma_joinid`` is the row number. Categories become dictionary (enumeration) columns, strings
    ``large_string``; a column of ``columns`` that ``frame`` lacks is an error (KeyError).
    """
    import pyarrow as pa

    arrays = {"soma_joinid": pa.array(np.arange(len(frame), dtype=np.int64))}
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


class CountsWriter:
    """``<ms>/X/raw`` (float32) from row-major COO pieces, written in TileDB's global order.

    Pieces are buffered up to ``buffer_nnz`` non-zeros and written as one fragment each. Every piece
    must be row-major (rows ascending, columns ascending within a row) and start after the rows of
    the previous one; the buffer is then put in TileDB's global order (space tiles of
    :data:`X_TILE` x :data:`X_TILE` in row-major order, row-major inside a tile) with one stable
    argsort of the tile number, and written with ``sort_coords=False``. TileDB checks the order
    and refuses out-of-order or duplicate coordinates, so a wrong piece fails loudly.

    Why not let TileDB sort: its sort of an unordered write was most of the mini census's time.
    ``python benchmarks/bench_demo_data.py --x-write 20000`` (20.5M non-zeros of mini-census counts,
    20,000 cells x 2,000 genes, 4M-value writes; 2 cores shared, load ~9): global order 7.9 s
    (2.6M nnz/s), the same writes unordered 43.7 s, ``tiledbsoma.io.from_anndata`` of the whole
    matrix (build-census's path) 55.6 s with 2.2x the peak RSS (2.46 vs 1.12 GiB). An earlier
    ad-hoc run at load ~3.5 gave 19.6-23.4 s unordered vs 25-41 s for ``from_anndata``.
    """

    def __init__(self, ms_uri: str, shape: tuple[int, int], *, buffer_nnz: int = WRITE_NNZ) -> None:
        import pyarrow as pa
        import tiledbsoma as soma

        self.shape = shape
        self.buffer_nnz = buffer_nnz
        self._col_tiles = -(-shape[1] // X_TILE)
        self._pieces: list[tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]] = []
        self._buffered = 0
        self._next_row = 0
        tile = {"tile": X_TILE}
        create = {"dims": {"soma_dim_0": tile, "soma_dim_1": tile}}
        with open_collection(f"{ms_uri}/X", "w") as xcoll:
            arr = xcoll.add_new_sparse_ndarray(
                X_RAW,
                type=pa.float32(),
                shape=shape,
                platform_config={"tiledb": {"create": create}},
            )
            uri = arr.uri
            arr.close()
        self._array: Any = soma.SparseNDArray.open(uri, "w")

    def append(
        self,
        rows: npt.NDArray[np.integer[Any]],
        cols: npt.NDArray[np.integer[Any]],
        values: npt.NDArray[np.float32],
    ) -> None:
        """Buffer one row-major piece (see the class docstring); writes when the buffer is full."""
        if len(rows) == 0:
            return
        if int(rows[0]) < self._next_row:
            msg = f"CountsWriter pieces must come in row order: row {rows[0]} < {self._next_row}"
            raise ValueError(msg)
        self._next_row = int(rows[-1]) + 1
        self._pieces.append((rows.astype(np.int64), cols.astype(np.int64), values))
        self._buffered += len(values)
        if self._buffered >= self.buffer_nnz:
            self.flush()

    def flush(self) -> None:
        """Write the buffered pieces as one fragment in global order."""
        from tiledbsoma.options import TileDBWriteOptions

        if not self._pieces:
            return
        rows, cols, vals = (np.concatenate(p) for p in zip(*self._pieces, strict=True))
        self._pieces.clear()
        self._buffered = 0
        if self._col_tiles > 1:  # row-major across column tiles -> tile by tile
            order = np.argsort((rows // X_TILE) * self._col_tiles + cols // X_TILE, kind="stable")
            rows, cols, vals = rows[order], cols[order], vals[order]
        self._array.write(
            _coo_table(rows, cols, vals), platform_config=TileDBWriteOptions(sort_coords=False)
        )

    def close(self) -> None:
        """Write what is buffered and close the array."""
        try:
            self.flush()
        finally:
            self._array.close()

    def __enter__(self) -> CountsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # nothing more is written after a failure
            self._array.close()
