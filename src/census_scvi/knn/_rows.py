"""Reading rows of ``latent.npy`` in blocks with plain file reads, so memory stays flat in cells.

Slicing the memory map that ``rundir.load_embedding`` returns would do, except that every page
read through a map stays mapped into the process and counts in its resident set until the map
is closed: a pass over a 20 GB latent would show (and, under a cgroup limit, be charged) 20 GB.
Reading the same bytes with ``readinto`` into one reused block keeps the pass at one block.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

__all__ = ["iter_blocks", "take_rows"]


def _file_backed(latent: npt.NDArray[np.floating]) -> tuple[str, int] | None:
    """``(path, byte offset)`` of a C-ordered float32 ``np.memmap``'s data, else None."""
    if not isinstance(latent, np.memmap) or not latent.filename:
        return None
    if latent.dtype != np.float32 or not latent.flags.c_contiguous or latent.ndim != 2:
        return None
    return str(latent.filename), int(latent.offset)


def iter_blocks(
    latent: npt.NDArray[np.floating], rows_per_block: int
) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
    """``(start, rows start..start+len)`` blocks of ``latent`` as float32, first to last.

    The yielded array is reused between blocks: copy what must outlive the step.
    """
    n, d = latent.shape
    where = _file_backed(latent)
    if where is None:
        for start in range(0, n, rows_per_block):
            yield start, np.asarray(latent[start : start + rows_per_block], dtype=np.float32)
        return
    path, offset = where
    buf = np.empty((min(rows_per_block, n), d), dtype=np.float32)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        for start in range(0, n, rows_per_block):
            m = min(rows_per_block, n - start)
            view = buf[:m]
            got = f.readinto(view.data.cast("B"))
            if got != view.nbytes:  # pragma: no cover - the file shrank under us
                msg = f"{path}: short read at row {start} ({got} of {view.nbytes} bytes)"
                raise OSError(msg)
            yield start, view


def take_rows(
    latent: npt.NDArray[np.floating], rows: npt.NDArray[np.int64], rows_per_block: int = 1 << 16
) -> npt.NDArray[np.float32]:
    """``latent[rows]`` (``rows`` sorted ascending) in one streamed pass."""
    out = np.empty((rows.size, latent.shape[1]), dtype=np.float32)
    lo = 0
    for start, block in iter_blocks(latent, rows_per_block):
        hi = int(np.searchsorted(rows, start + block.shape[0]))
        if hi > lo:
            out[lo:hi] = block[rows[lo:hi] - start]
        lo = hi
        if lo == rows.size:
            break
    return out
