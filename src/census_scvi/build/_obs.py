"""The Census obs columns of an input h5ad: matched by name, mapped with ``--columns``, or unknown.

Computed columns (``nnz``, ``raw_sum``, ...) are not made here: they come from the counts
(:func:`census_scvi.build._input.dataset_stats`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.errors import CensusScviError
from census_scvi.soma._schema import MAPPABLE_OBS, OBS_COLUMNS, OBS_KEY, UNKNOWN

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd

__all__ = ["census_obs"]

logger = logging.getLogger(__name__)


def _as_bool(series: pd.Series, path: Path, col: str) -> npt.NDArray[np.bool_]:
    if series.dtype == bool:
        return series.to_numpy()
    text = series.astype(str).str.strip().str.lower()
    truthy, falsy = {"true", "1", "yes", "t"}, {"false", "0", "no", "f"}
    bad = ~text.isin(truthy | falsy)
    if bad.any():
        msg = f"{path.name}: obs '{col}' is not boolean (e.g. {series[bad.to_numpy()].iloc[0]!r})"
        raise CensusScviError(msg, hint="use True/False values for is_primary_data")
    return text.isin(truthy).to_numpy()


def census_obs(
    obs: pd.DataFrame,
    path: Path,
    dataset_id: str,
    columns: Mapping[str, str],
) -> tuple[pd.DataFrame, list[str], dict[str, str], list[str]]:
    """The Census obs columns (computed ones excluded) from the file's obs.

    Returns the frame, the Census columns filled with placeholders, the ``--columns`` mappings
    used, and the file's obs columns that are not stored (neither a Census column by name nor
    mapped to one): the summary lists them, so none vanishes without a word.
    """
    import pandas as pd

    n = len(obs)
    names = obs.index.astype(str)
    if names.duplicated().any():
        import anndata as ad

        logger.warning("%s: obs names repeat; made unique (suffixes -1, -2, ...)", path.name)
        names = ad.utils.make_index_unique(pd.Index(names))
    out: dict[str, Any] = {}
    placeholders: list[str] = []
    mapped: dict[str, str] = {}
    used: set[str] = set()
    for name, kind in OBS_COLUMNS:
        if name not in MAPPABLE_OBS:
            continue
        src = columns.get(name)
        if src is not None and src not in obs.columns:
            msg = f"{path.name}: --columns maps {name} to '{src}', which obs lacks"
            raise CensusScviError(msg, hint=f"obs columns: {', '.join(map(str, obs.columns))}")
        if src is None and name in obs.columns:
            src = name
        if src is not None and src != name:
            mapped[name] = src
        if src is not None:
            used.add(src)
        if name == "dataset_id":
            out[name] = pd.Categorical([dataset_id] * n)
        elif name == "observation_joinid":
            source = obs[src] if src is not None else pd.Series(names, index=obs.index)
            out[name] = source.astype(str).to_numpy().astype(object)
        elif name == "is_primary_data":
            out[name] = _as_bool(obs[src], path, src) if src is not None else np.ones(n, bool)
        elif kind == "category":
            if src is None:
                placeholders.append(name)
                out[name] = pd.Categorical([UNKNOWN] * n)
            else:
                s = obs[src]
                values = s.astype(object).where(s.notna(), UNKNOWN).astype(str)
                out[name] = pd.Categorical(values.to_numpy())
        else:  # pragma: no cover - every mappable column is handled above
            msg = f"internal: unhandled obs column kind {kind} for {name}"
            raise AssertionError(msg)
    # the registration key: unique per cell across the census (observation_joinid is not:
    # CELLxGENE repeats it for the non-primary copies of a cell in other datasets)
    out[OBS_KEY] = np.asarray([f"{dataset_id}:{o}" for o in names], dtype=object)
    dropped = [str(c) for c in obs.columns if c not in used]
    return pd.DataFrame(out), placeholders, mapped, dropped
