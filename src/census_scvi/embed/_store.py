"""The embed stage's on-disk state: preallocated outputs and ``progress.json``.

Outputs are ``.npy`` files preallocated at full size (``numpy.lib.format.open_memmap``) with their
disk blocks reserved (``posix_fallocate``: a full disk fails at allocation with one line, not with
SIGBUS half-way through); each chunk's rows are written in place, flushed, and only then
recorded as done in ``progress.json``.
A run killed at any point therefore resumes from the chunks recorded, recomputing at most the
chunk in flight, and never duplicates a row (row positions are fixed by the plan).

Several processes (``--shard K/N``) may share one embed folder: every change of
``progress.json`` happens under an exclusive ``flock`` on ``embed/.lock`` (read, update, atomic
rename), and each process writes only the rows of its own chunks. flock is advisory and local to
one host's kernel; on a shared network file system use one embed folder per host or a file system
whose flock is coherent (NFSv4, Lustre with flock mounted).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from census_scvi.constants import (
    EMBED_LOCK_FILE,
    EMBEDDING_SOMA,
    LATENT_FILE,
    LATENT_IDX_FILE,
    LATENT_LIBSIZE_FILE,
    LATENT_VAR_FILE,
    MANIFEST_FILE,
    MINIFIED_MODEL_DIR,
    PROGRESS_FILE,
)
from census_scvi.embed._embedding import META_YML
from census_scvi.errors import disk_full
from census_scvi.rundir import write_json_atomic

__all__ = ["EmbedStore", "chunk_bounds", "shard_chunks"]

logger = logging.getLogger(__name__)

_GIB = 1024**3
#: An upper bound of a .npy header (numpy pads it to a multiple of 64 bytes; ours are ~128).
_HEADER_BYTES = 4096
#: The preallocated arrays of one embed folder.
_ARRAYS = (LATENT_FILE, LATENT_VAR_FILE, LATENT_IDX_FILE, LATENT_LIBSIZE_FILE)
#: posix_fallocate errors that mean "this file system cannot reserve", not "the disk is full".
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def _reserve(path: Path, size: int, directory: Path, *, need: int | None = None) -> None:
    """Reserve ``size`` bytes of disk blocks for ``path`` (a full disk: :func:`disk_full`)."""
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(directory, need or size) from None
        if e.errno not in _NO_FALLOCATE:
            raise
        logger.debug("cannot preallocate %s (%s); writing it unreserved", path, e)
    finally:
        os.close(fd)


def chunk_bounds(chunk: int, chunk_size: int, n_cells: int) -> tuple[int, int]:
    """Row range ``[start, stop)`` of a chunk."""
    start = chunk * chunk_size
    return start, min(start + chunk_size, n_cells)


def shard_chunks(n_chunks: int, shard: tuple[int, int] | None) -> list[int]:
    """The chunks shard ``K/N`` owns: the K-th of N contiguous, near-equal runs of chunks."""
    if shard is None:
        return list(range(n_chunks))
    k, n = shard
    parts = np.array_split(np.arange(n_chunks), n)
    return [int(c) for c in parts[k - 1]]


class EmbedStore:
    """Preallocated outputs and progress of one embed folder."""

    def __init__(self, embed_dir: str | Path) -> None:
        self.dir = Path(embed_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- paths -----------------------------------------------------------------------------------
    @property
    def progress_path(self) -> Path:
        return self.dir / PROGRESS_FILE

    def path(self, name: str) -> Path:
        return self.dir / name

    # -- locking and progress --------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock on the folder's progress (blocks until free)."""
        with (self.dir / EMBED_LOCK_FILE).open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def read_progress(self) -> dict[str, Any] | None:
        """``progress.json``, or None when absent or unreadable."""
        try:
            data: dict[str, Any] = json.loads(self.progress_path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            logger.warning("ignoring unreadable %s", self.progress_path)
            return None
        return data

    def _write_progress(self, progress: dict[str, Any]) -> None:
        write_json_atomic(self.progress_path, progress)

    def done_chunks(self) -> set[int]:
        """Chunks recorded as finished."""
        progress = self.read_progress()
        return set(progress["done"]) if progress else set()

    def mark_done(self, chunk: int) -> None:
        """Record a chunk as finished (call after its rows are flushed)."""
        with self.locked():
            progress = self.read_progress()
            if progress is None:  # pragma: no cover - removed under our feet
                msg = f"{self.progress_path} disappeared while embedding"
                raise RuntimeError(msg)
            progress["done"] = sorted(set(progress["done"]) | {chunk})
            self._write_progress(progress)

    def add_run(self, run: dict[str, Any]) -> None:
        """Append one process's timing (cells, seconds, peak RSS) to the progress record."""
        with self.locked():
            progress = self.read_progress()
            if progress is not None:
                progress.setdefault("runs", []).append(run)
                self._write_progress(progress)

    # -- outputs ---------------------------------------------------------------------------------
    def _outputs_ok(self, plan: dict[str, Any]) -> bool:
        shape = (plan["n_cells"], plan["n_latent"])
        try:
            for name, expect in (
                (LATENT_FILE, shape),
                (LATENT_VAR_FILE, shape),
                (LATENT_IDX_FILE, (plan["n_cells"],)),
                (LATENT_LIBSIZE_FILE, (plan["n_cells"],)),
            ):
                arr = np.load(self.path(name), mmap_mode="r")
                if arr.shape != expect:
                    return False
        except (OSError, ValueError):
            return False
        return True

    def clear(self) -> None:
        """Remove every output, the progress record and the manifest."""
        for name in (MANIFEST_FILE, PROGRESS_FILE, META_YML):
            self.path(name).unlink(missing_ok=True)
        for name in (LATENT_FILE, LATENT_VAR_FILE, LATENT_IDX_FILE, LATENT_LIBSIZE_FILE):
            self.path(name).unlink(missing_ok=True)
        for name in (EMBEDDING_SOMA, MINIFIED_MODEL_DIR):
            if self.path(name).exists():
                shutil.rmtree(self.path(name))

    def ensure_plan(
        self, plan: dict[str, Any], joinids: npt.NDArray[np.int64], *, reset: bool = False
    ) -> dict[str, Any]:
        """Reuse the folder's outputs when they belong to ``plan``; else preallocate new ones.

        Parameters
        ----------
        plan
            ``fingerprint`` (config + model), ``n_cells``, ``n_latent``, ``chunk_size``,
            ``n_chunks``.
        joinids
            The cells' soma_joinids in row order (written to ``latent-idx.npy``).
        reset
            Start over even when the plan matches (``--force``).

        Returns
        -------
        The progress record (``plan``, ``done`` chunk list, ``runs``).
        """
        with self.locked():
            progress = self.read_progress()
            if (
                not reset
                and progress is not None
                and progress.get("plan") == plan
                and self._outputs_ok(plan)
            ):
                # files of an earlier run may be sparse: reserve their blocks before writing
                for name in _ARRAYS:
                    path = self.path(name)
                    _reserve(path, path.stat().st_size, self.dir)
                return progress
            if progress is not None and not reset:
                logger.warning(
                    "%s holds outputs of another config, model or cell set; starting over",
                    self.dir,
                )
            self.clear()
            self._allocate(plan, joinids)
            progress = {"plan": plan, "done": [], "runs": []}
            self._write_progress(progress)  # last: its presence means the outputs exist
            return progress

    def _allocate(self, plan: dict[str, Any], joinids: npt.NDArray[np.int64]) -> None:
        """Create the four arrays at full size with their disk blocks reserved, or none.

        Each is made under a temporary name, reserved with ``posix_fallocate`` (a memory map
        written into a sparse file on a full disk dies of SIGBUS, with no message), and renamed
        only when all four are: a full disk fails here, in one line, leaving nothing behind.
        """
        n, k = plan["n_cells"], plan["n_latent"]
        shapes: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
            LATENT_FILE: ((n, k), np.float32),
            LATENT_VAR_FILE: ((n, k), np.float32),
            LATENT_LIBSIZE_FILE: ((n,), np.float32),
            LATENT_IDX_FILE: ((n,), np.int64),
        }
        need = sum(
            _HEADER_BYTES + int(np.prod(sh)) * np.dtype(dt).itemsize for sh, dt in shapes.values()
        )
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise disk_full(self.dir, need, free)
        tmps = {name: self.dir / f".{name}.tmp-{os.getpid()}" for name in shapes}
        try:
            for name, (shape, dtype) in shapes.items():
                arr = np.lib.format.open_memmap(tmps[name], mode="w+", dtype=dtype, shape=shape)
                del arr  # the header is written, the data still a hole
                _reserve(tmps[name], tmps[name].stat().st_size, self.dir, need=need)
            idx = np.load(tmps[LATENT_IDX_FILE], mmap_mode="r+")
            idx[:] = joinids
            idx.flush()
            del idx
        except BaseException:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
            raise
        for name, tmp in tmps.items():
            tmp.replace(self.path(name))

    def open_outputs(
        self, mode: Literal["r+", "r"] = "r+"
    ) -> tuple[np.memmap[Any, Any], np.memmap[Any, Any], np.memmap[Any, Any]]:
        """Memory maps of ``latent.npy``, ``latent-var.npy`` and the library sizes."""
        return (
            np.load(self.path(LATENT_FILE), mmap_mode=mode),  # type: ignore[return-value]
            np.load(self.path(LATENT_VAR_FILE), mmap_mode=mode),  # type: ignore[return-value]
            np.load(self.path(LATENT_LIBSIZE_FILE), mmap_mode=mode),  # type: ignore[return-value]
        )

    def joinids(self) -> npt.NDArray[np.int64]:
        """The soma_joinid of every row (memory-mapped)."""
        return np.load(self.path(LATENT_IDX_FILE), mmap_mode="r")
