"""Allocator settings for large, short-lived arrays (every stage reads counts in ~100 MB blocks).

numpy asks the kernel for transparent huge pages for every array over 4 MiB
(``madvise(MADV_HUGEPAGE)``). Where huge pages are ``madvise`` with ``defrag`` ``madvise`` (the
default of Ubuntu and most distributions), the first touch of such memory compacts memory
synchronously, so each block's fresh arrays cost seconds of system CPU. Concatenating large
tables in pyarrow's default pool (mimalloc) was as costly, which is why the count readers
concatenate in numpy (:mod:`census_scvi.soma._x`).

Measured on a census-shape mini census (2M cells, 20,000 genes), per read of 8,192 cells
(every gene, a gene mask, a CSR matrix; ``benchmarks/bench_embed_read.py``, rows ``range`` and
``range-lean``): 1.16 s user + 2.85 s system CPU with numpy's advice, 1.18 + 0.99 without. A
probe of pyarrow's ``concat_tables`` + ``to_numpy`` of a 16,384-cell read spent ~7 s of system
CPU in the pool; the concatenation in numpy ~0.3 s.
Set ``CENSUS_SCVI_DEFAULT_ALLOCATORS=1`` to keep numpy's default.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["KEEP_ENV", "TRAIN_MMAP_THRESHOLD", "fix_mmap_threshold", "libc", "use_lean_allocators"]

#: glibc's mmap threshold while training, fixed. By default glibc raises its mmap threshold (up
#: to 32 MiB) each time a mapped block is freed, and its trim threshold with it (to twice that),
#: so blocks of tens of MB come from the arenas and up to 64 MiB per arena is kept when freed:
#: stream training's peak RSS then rose from epoch to epoch (250k census, 2 epochs, per-phase
#: peaks epoch 0 / validation 0 / epoch 1: 1.98 / 2.39 / 2.31 GiB with the default, 2.07 / 1.78 /
#: 2.09 with 64 MiB fixed). Fixed, the adjustment is off (the trim threshold stays at its
#: default); 64 MiB keeps a step's activations (1024 x 8000 float32: 33 MB) on the heap, which
#: 4 MiB did not (each mapped and faulted in anew: epochs 36-60% slower). Measured with
#: ``benchmarks/bench_train_rss.py`` (docs/benchmarks.md, "Train RSS in a long epoch").
#: The trim threshold is fixed with it, at twice the mmap threshold (glibc's own pairing when it
#: adjusts them): at its 128 KiB default the heap's top was handed back after every step and
#: faulted in again in the next (n_hidden 512, 8000 genes, memory mode, 1 epoch timed, 128 KiB
#: against 128 MiB: system CPU 15.1 -> 11.5 s, 1,956 -> 2,177 cells/s; docs/benchmarks.md,
#: "A fair baseline ... glibc's trim threshold").
TRAIN_MMAP_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters

#: Environment variable that keeps numpy's default (huge-page advice on).
KEEP_ENV = "CENSUS_SCVI_DEFAULT_ALLOCATORS"

_done = False


def use_lean_allocators() -> None:
    """Turn off numpy's huge-page advice (once per process; other code is unaffected)."""
    global _done
    if _done or os.environ.get(KEEP_ENV, "") not in ("", "0"):
        return
    _done = True
    import importlib

    multiarray = importlib.import_module("numpy._core.multiarray")
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is not None:  # numpy >= 1.20 on Linux
        setter(False)


def fix_mmap_threshold(threshold: int = TRAIN_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold, and its trim threshold at twice that (``mallopt``), for this
    process; whether the mmap threshold was set.

    Each is left alone where the environment already sets it (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_``); both with ``CENSUS_SCVI_DEFAULT_ALLOCATORS=1`` or without glibc.
    """
    if os.environ.get(KEEP_ENV, "") not in ("", "0") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None or mallopt(_M_MMAP_THRESHOLD, int(threshold)) != 1:
        return False
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_TRIM_THRESHOLD, 2 * int(threshold))
    return True


@functools.cache
def libc() -> Any:
    """The C library through ctypes (glibc's ``mallopt``, ``malloc_trim``), or None."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
