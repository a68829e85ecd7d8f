"""Allocator settings for large, short-lived arrays (every stage reads counts in ~100 MB blocks).

numpy asks the kernel for transparent huge pages for every array over 4 MiB
(``madvise(MADV_HUGEPAGE)``). Where huge pages are ``madvise`` with ``defrag`` ``madvise`` (the
default of Ubuntu and most distributions), the first touch of such memory compacts memory
synchronously, so each block's fresh arrays cost seconds of system CPU. pyarrow's default pool
(mimalloc) does the same when it concatenates large tables, which is why the count readers
concatenate in numpy (:mod:`census_scvi.soma._x`).

Measured on a census-shape mini census (2M cells, 20,000 genes): one read of 16,384 cells (every
gene, then a gene mask and a CSR matrix) cost 0.85 s user + 10.7 s system CPU with the defaults,
0.85 s + 1.4 s with numpy's huge-page advice off and the concatenation in numpy
(``benchmarks/bench_embed_read.py`` for the whole read; user time is unchanged).
Set ``CENSUS_SCVI_DEFAULT_ALLOCATORS=1`` to keep numpy's default.
"""

from __future__ import annotations

import os

__all__ = ["KEEP_ENV", "use_lean_allocators"]

#: Environment variable that keeps numpy's and pyarrow's default allocator settings.
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
