"""The minified model (``final_scvi_optimized/``) written cell block by cell block.

scvi-tools builds a minified model from an AnnData held whole: every cell's obs row, batch,
posterior mean and variance (``SCVI.load_query_data`` + ``minify_adata`` + ``save``). At the
Census that is the one per-cell cost of embed: ~480 bytes per cell of traced memory (the obs
with its strings, scvi-tools' AnnData and its minify copy), ~48 GB at 99.6M cells; measured at
census shape, embed's peak RSS grew by ~410 bytes per cell between 1M and 2M cells
(``benchmarks/bench_scale.py``). So scvi-tools makes only a *template*: the same model on one
cell per batch label (so the batch registry, extended with every label new to the model in the
same sorted order, and the new batches' seeded weights are those of the whole query), saved
with ``save_anndata=True``. This module then writes the full ``adata.h5ad`` from it, in
anndata's on-disk format, a block of cells at a time: every group, attribute and small element
of the template is kept (uns, var, categories, encodings), and each per-cell dataset (the obs
index and columns, ``obsm``'s latent, X's ``indptr``) is rewritten for all cells from the
census obs (read in blocks) and the embed arrays (memory maps). ``SCVI.load`` reads the result
as it reads its own (``tests/test_embed.py``, against the in-memory path).

String obs columns (``observation_joinid``) are written as anndata string arrays; the in-memory
path let anndata turn them into categoricals when a value repeats. The values are the same.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import SOMA_JOINID
from census_scvi.errors import CensusScviError
from census_scvi.progress import track

if TYPE_CHECKING:
    import h5py
    import pandas as pd

__all__ = ["MinifiedSource", "write_minified_model"]

logger = logging.getLogger(__name__)

#: Cells per block read from the census obs and written to the h5ad.
BLOCK_CELLS = 1 << 18
_ADATA = "adata.h5ad"
#: scvi-tools' obs column of the observed library size (``SCVI._OBSERVED_LIB_SIZE_KEY``).
LIB_SIZE_KEY = "observed_lib_size"
_STRING_ATTRS = {"encoding-type": "string-array", "encoding-version": "0.2.0"}
_ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}


class MinifiedSource:
    """What the minified AnnData holds per cell, all of it on disk or as codes.

    ``joinids`` (int64), ``codes``/``names`` (the batch label of each cell as codes into its
    labels), ``qz_mean``/``qz_var``/``library_size`` (memory maps of the embed outputs), and
    the census obs ``columns`` to keep, read from ``experiment`` a block at a time.
    """

    def __init__(
        self,
        experiment: Any,
        columns: Sequence[str],
        *,
        joinids: npt.NDArray[np.int64],
        codes: npt.NDArray[np.integer],
        names: npt.NDArray[np.object_],
        qz_mean: npt.NDArray[np.float32],
        qz_var: npt.NDArray[np.float32],
        library_size: npt.NDArray[np.float32],
    ) -> None:
        self.experiment = experiment
        self.columns = list(columns)
        self.joinids, self.codes, self.names = joinids, codes, names
        self.qz_mean, self.qz_var, self.library_size = qz_mean, qz_var, library_size

    def __len__(self) -> int:
        return len(self.joinids)

    def obs(self, rows: npt.NDArray[np.int64] | slice) -> pd.DataFrame:
        """The census obs columns of these rows (index: the str soma_joinid, as AnnData needs)."""
        from census_scvi.soma import read_obs

        ids = np.asarray(self.joinids[rows], dtype=np.int64)
        obs = read_obs(self.experiment, ids, [SOMA_JOINID, *self.columns])
        obs.index = ids.astype(str)
        return obs

    @functools.cached_property
    def string_columns(self) -> frozenset[str]:
        """The kept census obs columns stored as plain strings (not dictionary-encoded)."""
        import pyarrow as pa

        schema = self.experiment.obs.schema
        return frozenset(
            c
            for c in self.columns
            if pa.types.is_string(schema.field(c).type)
            or pa.types.is_large_string(schema.field(c).type)
        )

    @functools.cached_property
    def template_rows(self) -> npt.NDArray[np.int64]:
        """One row per batch label (its first cell), ascending (one pass over the codes)."""
        _, first = np.unique(self.codes, return_index=True)
        return np.sort(first).astype(np.int64)


def write_minified_model(
    model_dir: Path,
    out_dir: Path,
    source: MinifiedSource,
    *,
    seed: int,
    accelerator: str,
    block_cells: int = BLOCK_CELLS,
) -> None:
    """Save the minified model of every cell of ``source`` into ``out_dir`` (a new folder)."""
    import h5py
    import pandas as pd

    from census_scvi.scvi_model import save_minified_model

    rows = source.template_rows
    obs = source.obs(rows)
    labels = pd.Categorical.from_codes(
        source.codes[rows], categories=pd.Index(np.asarray(source.names).astype(str))
    )
    save_minified_model(
        model_dir,
        out_dir,
        obs=obs,
        batch_labels=labels,
        qz_mean=np.asarray(source.qz_mean[rows]),
        qz_var=np.asarray(source.qz_var[rows]),
        library_size=np.asarray(source.library_size[rows]),
        seed=seed,
        accelerator=accelerator,
    )
    template = out_dir / _ADATA
    full = out_dir / f".{_ADATA}.full"
    shutil.copyfile(template, full)
    with h5py.File(template, "r") as src, h5py.File(full, "r+") as dst:
        _Writer(src, dst, source, block_cells).write()
    full.replace(template)


class _Writer:
    """Rewrites the per-cell datasets of a copy of the template h5ad for all cells."""

    def __init__(self, src: h5py.File, dst: h5py.File, source: MinifiedSource, block: int):
        self.src, self.dst, self.source, self.block = src, dst, source, block
        self.n = len(source)

    def write(self) -> None:
        obs = self.dst["obs"]
        order = [str(c) for c in obs.attrs["column-order"]]
        handlers = {c: self._column_writer(c) for c in order}
        index = str(obs.attrs["_index"])
        self._new_dataset(obs, index, None, _STRING_ATTRS)
        for c in order:
            handlers[c].create()
        blocks = [slice(s, min(s + self.block, self.n)) for s in range(0, self.n, self.block)]
        for sl in track(
            blocks,
            description="writing the minified model",
            total=self.n,
            weight=lambda b: b.stop - b.start,
            unit="cells",
        ):
            frame = self.source.obs(sl)
            obs[index][sl] = frame.index.to_numpy(dtype=object)
            for c in order:
                handlers[c].fill(sl, frame)
        self._write_obsm()
        self._write_x()

    # -- datasets --------------------------------------------------------------------------
    def _new_dataset(
        self, group: h5py.Group, name: str, dtype: Any, attrs: dict[str, str], shape: Any = None
    ) -> h5py.Dataset:
        import h5py

        if name in group:
            del group[name]
        dt = h5py.string_dtype("utf-8") if dtype is None else dtype
        ds = group.create_dataset(name, shape=shape or (self.n,), dtype=dt)
        ds.attrs.update(attrs)
        return ds

    def _write_obsm(self) -> None:
        obsm = self.dst["obsm"]
        keys = list(obsm.keys())
        if len(keys) != 2:
            msg = f"scvi-tools' minified AnnData has obsm {keys}; expected the posterior mean and variance"
            raise CensusScviError(msg, hint="embed.write_minified_model: false skips it")
        for key in keys:
            width = obsm[key].shape[1]
            src = self.source.qz_var if key.endswith("qzv") else self.source.qz_mean
            ds = self._new_dataset(obsm, key, np.float32, _ARRAY_ATTRS, (self.n, width))
            for start in range(0, self.n, self.block):
                sl = slice(start, min(start + self.block, self.n))
                ds[sl] = np.asarray(src[sl], dtype=np.float32)

    def _write_x(self) -> None:
        x = self.dst["X"]
        if x.attrs.get("encoding-type") != "csr_matrix" or len(x["data"]) != 0:
            msg = "scvi-tools' minified AnnData has counts in X; expected an empty sparse X"
            raise CensusScviError(msg, hint="embed.write_minified_model: false skips it")
        dtype = np.int64 if self.n >= 2**31 else x["indptr"].dtype
        self._new_dataset(x, "indptr", dtype, {}, (self.n + 1,))  # all zeros: no stored values
        x.attrs["shape"] = np.array([self.n, x.attrs["shape"][1]], dtype=np.int64)

    def _column_writer(self, column: str) -> _Column:
        census = column in self.source.columns or column == SOMA_JOINID
        return _Column(self, column, census=census)


class _Column:
    """One obs column of the full h5ad: created once, then filled block by block.

    A census column comes from the census obs; the library size from the embed output; any
    other column is one scvi-tools derived from the batch (the batch label, its code, the
    labels' code, constant for a model without labels), taken from the template, which holds
    each batch label once.
    """

    def __init__(self, writer: _Writer, name: str, *, census: bool) -> None:
        self.w, self.name, self.census = writer, name, census
        self.tmpl = writer.src["obs"][name]
        self.categories: pd.Index | None = None
        self.by_batch: npt.NDArray[Any] | None = None

    def create(self) -> None:
        import h5py
        import pandas as pd
        from anndata.io import read_elem

        obs = self.w.dst["obs"]
        if self.census and self.name in self.w.source.string_columns:
            # a plain string column of the census (observation_joinid): anndata may have made
            # the template's a categorical of its few values; all cells' are strings
            if self.name in obs:
                del obs[self.name]
            self.w._new_dataset(obs, self.name, None, _STRING_ATTRS)
        elif isinstance(self.tmpl, h5py.Group):  # categorical: codes into the template's
            self.categories = pd.Index(read_elem(self.tmpl["categories"]))
            codes = self.tmpl["codes"]
            dtype = _code_dtype(len(self.categories), codes.dtype)
            self.w._new_dataset(obs[self.name], "codes", dtype, dict(codes.attrs))
        elif self.census and self.tmpl.dtype.kind in "OSU":
            self.w._new_dataset(obs, self.name, None, _STRING_ATTRS)
        else:
            self.w._new_dataset(obs, self.name, self.tmpl.dtype, _ARRAY_ATTRS)
        if not self.census and self.name != LIB_SIZE_KEY:
            self.by_batch = self._by_batch()

    def fill(self, sl: slice, frame: pd.DataFrame) -> None:
        obs = self.w.dst["obs"]
        target = obs[self.name]["codes"] if self.categories is not None else obs[self.name]
        target[sl] = self._values(sl, frame)

    def _values(self, sl: slice, frame: pd.DataFrame) -> npt.NDArray[Any]:
        import pandas as pd

        src = self.w.source
        if self.name == LIB_SIZE_KEY and not self.census:
            return np.asarray(src.library_size[sl], dtype=np.float32)
        if self.by_batch is not None:
            return self.by_batch[np.asarray(src.codes[sl])]
        values = frame[self.name]
        if self.categories is None:
            kind = object if self.name in src.string_columns else None
            return values.to_numpy(dtype=kind)
        if isinstance(values.dtype, pd.CategoricalDtype):
            codes = values.cat.set_categories(self.categories).cat.codes.to_numpy()
        else:
            codes = pd.Categorical(values, categories=self.categories).codes
        if (codes < 0).any():
            msg = f"obs column {self.name!r} has values its categories do not list"
            raise CensusScviError(msg, hint="embed.minified_obs_columns can leave it out")
        return codes

    def _by_batch(self) -> npt.NDArray[Any]:
        from anndata.io import read_elem

        values = read_elem(self.tmpl)
        values = np.asarray(values.codes if self.categories is not None else values)
        template_codes = np.asarray(self.w.source.codes[self.w.source.template_rows])
        lut = np.zeros(len(self.w.source.names), dtype=values.dtype)
        lut[template_codes] = values
        return lut


def _code_dtype(n_categories: int, current: np.dtype[Any]) -> np.dtype[Any]:
    """The narrowest integer type that holds the codes (never narrower than the template's)."""
    for dt in (np.int8, np.int16, np.int32, np.int64):
        if n_categories < np.iinfo(dt).max:
            return max(np.dtype(dt), np.dtype(current), key=lambda d: d.itemsize)
    return np.dtype(np.int64)  # pragma: no cover
