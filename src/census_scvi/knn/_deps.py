"""The optional dependency: TileDB-Vector-Search, imported only where an index is built or read."""

from __future__ import annotations

from typing import Any

from census_scvi.errors import CensusScviError

__all__ = ["INSTALL_HINT", "have_vector_search", "vector_search"]

INSTALL_HINT = "pip install 'census-scvi[search]'"


def vector_search() -> Any:
    """``tiledb.vector_search``, or a one-line error naming the install command when absent."""
    try:
        import tiledb.vector_search as vs
    except ImportError as e:
        msg = f"the nearest-cell index needs TileDB-Vector-Search, which is not installed ({e})"
        raise CensusScviError(msg, hint=f"install it with: {INSTALL_HINT}") from None
    return vs


def have_vector_search() -> bool:
    """Whether TileDB-Vector-Search imports (``map`` falls back to exact search without it)."""
    try:
        vector_search()
    except CensusScviError:
        return False
    return True
