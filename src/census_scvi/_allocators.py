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

import os

__all__ = ["KEEP_ENV", "use_lean_allocators"]

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
