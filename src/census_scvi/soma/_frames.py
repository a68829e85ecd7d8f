"""Whole SOMA dataframes as pandas (census_info tables, one obs column): small reads only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["read_dataframe"]


def read_dataframe(df: Any, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A whole SOMA dataframe as pandas, in ``soma_joinid`` order (absent ``columns`` skipped)."""
    names = None if columns is None else [c for c in columns if c in df.schema.names]
    table = df.read(column_names=names).concat()
    out = table.to_pandas()
    if "soma_joinid" in out.columns:
        out = out.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
    return out
