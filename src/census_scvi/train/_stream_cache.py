"""Stream mode's local cache: the cells x model genes CSR the first pass read, kept on disk.

Stream mode reads every gene of its cells from SOMA and drops the other genes; at the
census-like shape (8000 of 20,000 genes) that read costs more CPU than the model step, so on a
2-core machine stream training ran at 1.21x scvi-tools (n_hidden 128) against 2.14x for memory
mode, whose rows are already in memory (docs/benchmarks.md, "Train"). Training runs tens to
hundreds of epochs over the same cells, so :class:`StreamCache` writes each I/O batch through to
local disk as the first pass reads it (``train/stream_cache/`` of the run; 8 bytes per kept
value, no extra pass), and later passes read their rows back from it: a few ``pread`` calls per
I/O batch (a shuffle chunk is consecutive cells, so its rows are one contiguous range), no
TileDB, no decompression, memory bounded as before (nothing is memory-mapped: mapped pages
would count in RSS and grow with the cells). Same data, same order: a pass reads the same CSR
rows whichever reader it has (tested against the SOMA reader).

Files, all raw little-endian arrays checked against ``cache.json`` on open: ``indices.i32`` and
``data.f32`` (the kept values, appended I/O batch after I/O batch), ``offsets.i64`` (each cell's
first value, -1 while not cached) and ``lengths.i32`` (its value count), cells in ascending
``soma_joinid``. The cache is the run's own (it never leaves the run directory and is removed
when training finishes); one from elsewhere is still read as untrusted data: its index is
bounds-checked on open and every read's gene columns before use. Not used with DataLoader
worker processes or several ranks (each would write the same files); when the disk would not
hold it, or a write fails, it is dropped with a warning and training reads SOMA as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from census_scvi.errors import CensusScviError
from census_scvi.train._read_ahead import prefetched

__all__ = ["CACHE_DIR", "CachedRowReader", "CachingReader", "StreamCache"]

logger = logging.getLogger(__name__)

CACHE_DIR = "stream_cache"
_MANIFEST = "cache.json"
_FORMAT = 1
# (file, dtype) of the value files and the per-cell index
_INDICES, _DATA = ("indices.i32", np.int32), ("data.f32", np.float32)
_OFFSETS, _LENGTHS = ("offsets.i64", np.int64), ("lengths.i32", np.int32)
_DISK_MARGIN = 1 << 30  # free bytes left on the disk beyond the projected cache


def fingerprint(
    experiment_uri: str, sorted_ids: npt.NDArray[np.int64], var: npt.NDArray[Any]
) -> str:
    """What a cache holds: the experiment, its cells and its model genes."""
    h = hashlib.sha256(experiment_uri.encode())
    h.update(np.ascontiguousarray(sorted_ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(var, dtype="<i8").tobytes())
    return h.hexdigest()


class StreamCache:
    """Rows of stream mode's cells, written through as they are first read, read back after.

    Parameters
    ----------
    directory
        The cache folder (``train/stream_cache`` of the run); made if missing.
    sorted_ids
        Every cell the data module serves (``soma_joinid``, ascending).
    n_vars
        Model genes (the CSR's columns).
    key
        :func:`fingerprint` of what is cached; a cache on disk with another key is replaced.
    """

    def __init__(
        self, directory: Path, sorted_ids: npt.NDArray[np.int64], n_vars: int, key: str
    ) -> None:
        self.directory = Path(directory)
        self.sorted_ids = sorted_ids
        self.n_vars = int(n_vars)
        self.key = key
        self.enabled = True
        self.offsets, self.lengths = self._load_index()
        self._nnz = self._file_values(_INDICES)
        self._checked_space = False

    # --------------------------------------------------------------------------------------
    # opening
    # --------------------------------------------------------------------------------------
    def _path(self, spec: tuple[str, Any]) -> Path:
        return self.directory / spec[0]

    def _file_values(self, spec: tuple[str, Any]) -> int:
        p = self._path(spec)
        return p.stat().st_size // np.dtype(spec[1]).itemsize if p.exists() else 0

    def _load_index(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
        n = len(self.sorted_ids)
        empty = np.full(n, -1, np.int64), np.zeros(n, np.int32)
        try:
            meta = json.loads((self.directory / _MANIFEST).read_text())
        except (OSError, ValueError):
            meta = None
        if (
            not isinstance(meta, dict)
            or meta.get("format") != _FORMAT
            or meta.get("key") != self.key
            or self._has_links()
        ):
            self._reset()
            return empty
        try:
            offsets = np.fromfile(self._path(_OFFSETS), dtype=_OFFSETS[1])
            lengths = np.fromfile(self._path(_LENGTHS), dtype=_LENGTHS[1])
        except OSError:  # stopped before its first pass ended: nothing to reuse
            self._reset()
            return empty
        n_values = min(self._file_values(_INDICES), self._file_values(_DATA))
        cached = offsets >= 0
        ok = (
            len(offsets) == n
            and len(lengths) == n
            and bool((offsets >= -1).all())
            and bool((lengths >= 0).all())
            and bool((offsets[cached] + lengths[cached] <= n_values).all())
        )
        if not ok:
            logger.warning("stream cache at %s is inconsistent; starting it again", self.directory)
            self._reset()
            return empty
        # values past the last indexed cell (a run stopped between its writes) are cut, so the
        # next appends start both files at the same value
        end = int((offsets[cached] + lengths[cached]).max(initial=0))
        for spec in (_INDICES, _DATA):
            if self._file_values(spec) > end:
                os.truncate(self._path(spec), end * np.dtype(spec[1]).itemsize)
        logger.info(
            "stream cache: %d of %d cells cached at %s", int(cached.sum()), n, self.directory
        )
        return offsets, lengths

    def _has_links(self) -> bool:
        paths = [self.directory, *(self._path(f) for f in (_INDICES, _DATA, _OFFSETS, _LENGTHS))]
        return any(p.is_symlink() for p in paths)

    def _reset(self) -> None:
        """An empty cache: the folder (the run's own) emptied; a link is removed, not followed."""
        if self.directory.is_symlink() or self.directory.is_file():
            self.directory.unlink()
        elif self.directory.is_dir():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        (self.directory / _MANIFEST).write_text(
            json.dumps({"format": _FORMAT, "key": self.key, "n_cells": len(self.sorted_ids)})
        )

    # --------------------------------------------------------------------------------------
    # state
    # --------------------------------------------------------------------------------------
    def positions(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Index of each id in ``sorted_ids`` (ids must be cells of the cache)."""
        return np.searchsorted(self.sorted_ids, ids)

    def holds(self, ids: npt.NDArray[np.int64]) -> bool:
        """Whether every cell of ``ids`` is cached (a pass reads the cache only then)."""
        return self.enabled and bool((self.offsets[self.positions(ids)] >= 0).all())

    def drop(self, why: str) -> None:
        """Stop caching and delete the files (training reads SOMA from now on)."""
        if not self.enabled:
            return
        logger.warning("stream cache dropped (%s); training reads SOMA every epoch", why)
        self.enabled = False
        shutil.rmtree(self.directory, ignore_errors=True)

    # --------------------------------------------------------------------------------------
    # writing
    # --------------------------------------------------------------------------------------
    def record(self, ids: npt.NDArray[np.int64], x: sp.csr_matrix) -> None:
        """Append the rows of ``x`` (one per id, in order) whose cells are not cached yet."""
        if not self.enabled:
            return
        pos = self.positions(ids)
        new = np.flatnonzero(self.offsets[pos] < 0)
        if len(new) == 0:
            return
        if len(new) < len(ids):
            x = x[new]
        indptr = np.asarray(x.indptr, dtype=np.int64)
        if not self._room_for(int(indptr[-1]), len(new)):
            return
        try:
            self._append(_INDICES, x.indices)
            self._append(_DATA, x.data)
        except OSError as e:
            self.drop(f"writing {self.directory}: {e.strerror or e}")
            return
        self.offsets[pos[new]] = self._nnz + indptr[:-1]
        self.lengths[pos[new]] = np.diff(indptr).astype(np.int32)
        self._nnz += int(indptr[-1])

    def _append(self, spec: tuple[str, Any], values: npt.NDArray[Any]) -> None:
        with _open_for_writing(self._path(spec), os.O_APPEND) as f:
            f.write(np.ascontiguousarray(values, dtype=spec[1]).data)

    def _room_for(self, nnz: int, n_cells: int) -> bool:
        """Once, from the first I/O batch: would the disk hold the whole cache (+1 GiB)?"""
        if self._checked_space:
            return True
        self._checked_space = True
        need = nnz * 8 / max(n_cells, 1) * len(self.sorted_ids) + 12 * len(self.sorted_ids)
        free = shutil.disk_usage(self.directory).free
        if free < need + _DISK_MARGIN:
            self.drop(
                f"it would take ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free at "
                f"{self.directory}; train.stream_cache: false turns it off"
            )
            return False
        logger.info("stream cache: ~%.1f GB at %s", need / 1e9, self.directory)
        return True

    def flush(self) -> None:
        """Write the per-cell index (after the values it points at): a resumed run reuses it."""
        if not self.enabled:
            return
        try:
            for spec, arr in ((_OFFSETS, self.offsets), (_LENGTHS, self.lengths)):
                tmp = self._path(spec).with_suffix(".tmp")
                with _open_for_writing(tmp, os.O_TRUNC) as f:
                    f.write(np.ascontiguousarray(arr, dtype=spec[1]).data)
                tmp.replace(self._path(spec))
        except OSError as e:
            self.drop(f"writing {self.directory}: {e.strerror or e}")

    # --------------------------------------------------------------------------------------
    # reading
    # --------------------------------------------------------------------------------------
    def read(self, ids: npt.NDArray[np.int64]) -> sp.csr_matrix:
        """``X[ids]`` from the cache as float32 CSR (every id cached: :meth:`holds`)."""
        pos = self.positions(ids)
        starts, lengths = self.offsets[pos], self.lengths[pos].astype(np.int64)
        indptr = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        indices = np.empty(int(indptr[-1]), np.int32)
        data = np.empty(int(indptr[-1]), np.float32)
        # runs of cells whose values follow each other in the files: one read each
        breaks = np.flatnonzero(starts[1:] != starts[:-1] + lengths[:-1]) + 1
        run_first = np.r_[0, breaks]
        run_stop = np.r_[breaks, len(ids)]
        for spec, out in ((_INDICES, indices), (_DATA, data)):
            fd = os.open(self._path(spec), os.O_RDONLY)
            try:
                for a, b in zip(run_first.tolist(), run_stop.tolist(), strict=True):
                    _pread_into(fd, out[indptr[a] : indptr[b]], int(starts[a]))
            finally:
                os.close(fd)
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.n_vars):
            msg = f"stream cache at {self.directory} has gene columns outside 0..{self.n_vars - 1}"
            raise CensusScviError(
                msg, hint="delete that folder (it is rebuilt) or set train.stream_cache: false"
            )
        return sp.csr_matrix((data, indices, indptr), shape=(len(ids), self.n_vars))


def _open_for_writing(path: Path, mode: int) -> Any:
    """``path`` opened to write (``mode``: ``os.O_APPEND`` or ``os.O_TRUNC``), never through a
    link: one planted in a run directory fails (ELOOP) instead of making us write elsewhere."""
    flags = os.O_WRONLY | os.O_CREAT | mode | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def _pread_into(fd: int, out: npt.NDArray[Any], first_value: int) -> None:
    view = out.data.cast("B")
    offset = first_value * out.itemsize
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            msg = f"a stream cache file ended early ({done} of {len(view)} bytes)"
            raise CensusScviError(
                msg,
                hint="delete train/stream_cache (it is rebuilt) or set train.stream_cache: false",
            )
        done += n


class CachingReader:
    """A SOMA reader whose I/O batches are also written to the cache (the first pass)."""

    whole_matrix = False

    def __init__(self, inner: Any, cache: StreamCache) -> None:
        self.inner, self.cache = inner, cache

    def prefetched(
        self, batches: Iterable[npt.NDArray[np.int64]]
    ) -> Iterator[tuple[npt.NDArray[np.int64], sp.csr_matrix]]:
        for ids, x in self.inner.prefetched(batches):
            self.cache.record(ids, x)
            yield ids, x

    def close(self) -> None:
        self.inner.close()
        self.cache.flush()


class CachedRowReader:
    """I/O batches read back from the cache, the next one in the read-ahead thread."""

    whole_matrix = False

    def __init__(self, cache: StreamCache) -> None:
        self.cache = cache

    def prefetched(
        self, batches: Iterable[npt.NDArray[np.int64]]
    ) -> Iterator[tuple[npt.NDArray[np.int64], sp.csr_matrix]]:
        return prefetched(self.cache.read, batches)

    def close(self) -> None:
        """Nothing held between reads."""
