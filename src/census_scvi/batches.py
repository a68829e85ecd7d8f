"""The batch label: several obs columns joined into one string per cell.

The original pipeline glued the columns with no separator (``"ab" + "c" == "a" + "bc"``). We join
them with ``anndata.batch_key_separator`` (default ``"//"``) and escape, inside each value, every
character the separator is made of (and the escape character ``\\`` itself) with a backslash, so
two different tuples can never give the same label. Values that do not contain those characters
(all real Census values) are left as they are. ``separator=""`` reproduces the original labels
exactly (no escaping; not collision free).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from census_scvi.errors import CensusScviError

__all__ = ["batch_codes", "batch_labels", "check_columns"]

_ESCAPE = "\\"


def check_columns(columns: Sequence[str], available: Sequence[str], *, what: str) -> None:
    """Fail with the valid columns listed when one of ``columns`` is not in ``available``.

    Parameters
    ----------
    columns
        Column names a config asks for.
    available
        The obs columns present.
    what
        The config key naming the columns (for the message), e.g. ``"anndata.batch_key"``.
    """
    missing = [c for c in columns if c not in available]
    if missing:
        msg = (
            f"{what} names obs column(s) {', '.join(repr(m) for m in missing)} that do not exist; "
            f"valid columns: {', '.join(sorted(available))}"
        )
        raise CensusScviError(msg, hint=f"fix {what} in the config")


def _escape(values: pd.Index, separator: str) -> pd.Index:
    """Backslash-escape the separator's characters and the backslash in each value."""
    if not separator:
        return values
    special = sorted(set(separator) | {_ESCAPE})
    out = values
    if any(out.str.contains(c, regex=False).any() for c in special):
        # the backslash first, so the escapes added for the others are not escaped twice
        out = out.str.replace(_ESCAPE, _ESCAPE * 2, regex=False)
        for c in special:
            if c != _ESCAPE:
                out = out.str.replace(c, _ESCAPE + c, regex=False)
    return out


def _factorize(column: pd.Series) -> tuple[npt.NDArray[np.int64], pd.Index]:
    """Codes and the string form of each distinct value (``astype(str)``, as the original).

    Works on distinct values, so it stays fast for tens of millions of rows.
    """
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = np.asarray(column.cat.codes, dtype=np.int64)
        names = pd.Index(pd.Series(column.cat.categories, dtype=object).astype(str))
        if (codes < 0).any():  # missing: Categorical.astype(str) spells it 'nan'
            names = names.append(pd.Index(["nan"]))
            codes = np.where(codes < 0, len(names) - 1, codes)
        return codes, names
    codes, uniques = pd.factorize(column, use_na_sentinel=True)
    codes = np.asarray(codes, dtype=np.int64)
    names = pd.Index(pd.Series(np.asarray(uniques, dtype=object), dtype=object).astype(str))
    missing = codes < 0
    if missing.any():  # None -> 'None', NaN -> 'nan', as astype(str) spells them
        na_codes, na_names = pd.factorize(column[missing].astype(str))
        codes[missing] = len(names) + na_codes
        names = names.append(pd.Index(na_names))
    return codes, names


def batch_codes(
    obs: pd.DataFrame, keys: Sequence[str], separator: str = "//"
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.object_]]:
    """Integer batch code per row and the label of each code (labels sorted).

    Works on the distinct combinations only, so it is fast for tens of millions of cells.

    Parameters
    ----------
    obs
        Per-cell table holding the ``keys`` columns.
    keys
        Columns to combine, in order.
    separator
        Put between the parts (see the module docstring for the escaping).

    Returns
    -------
    ``(codes, labels)`` with ``labels[codes[i]]`` the label of row ``i``.
    """
    keys = list(keys)
    if not keys:
        msg = "batch keys are empty; give at least one obs column"
        raise CensusScviError(msg)
    check_columns(keys, list(obs.columns), what="batch key")
    n = len(obs)
    combined = np.zeros(n, dtype=np.int64)
    parts: list[pd.Index] = []
    combo_parts: list[npt.NDArray[np.int64]] = []
    for key in keys:
        codes, names = _factorize(obs[key])
        parts.append(_escape(names, separator))
        # combine with the previous codes, then re-factorize so the codes stay small
        combined = combined * len(names) + codes
        uniq, combined = np.unique(combined, return_inverse=True)
        combined = combined.astype(np.int64).reshape(-1)
        # remember, for each distinct combination, its code in every column so far
        prev = [p[uniq // len(names)] for p in combo_parts]
        combo_parts = [*prev, uniq % len(names)]
    if n == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=object)
    labels_u = np.asarray(parts[0][combo_parts[0]], dtype=object)
    for part, code in zip(parts[1:], combo_parts[1:], strict=True):
        labels_u = labels_u + separator + np.asarray(part[code], dtype=object)
    # distinct labels, sorted; with separator='' two combinations may share one label
    labels, remap = np.unique(labels_u.astype(str), return_inverse=True)
    codes_out = remap.reshape(-1)[combined].astype(np.int32)
    return codes_out, labels.astype(object)


def batch_labels(obs: pd.DataFrame, keys: Sequence[str], separator: str = "//") -> np.ndarray:
    """The batch label of every row: ``keys`` columns joined by ``separator``.

    Parameters
    ----------
    obs
        Per-cell table holding the ``keys`` columns (categorical or not).
    keys
        Columns to join, in order (``anndata.batch_key``).
    separator
        ``anndata.batch_key_separator``; ``""`` reproduces the original pipeline's labels.

    Returns
    -------
    Object array of ``str``, one label per row of ``obs``.

    Examples
    --------
    >>> obs = pd.DataFrame({"dataset_id": ["d1", "d1"], "assay": ["10x 3' v3", "10x 5' v1"]})
    >>> batch_labels(obs, ["dataset_id", "assay"]).tolist()
    ["d1//10x 3' v3", "d1//10x 5' v1"]
    """
    codes, labels = batch_codes(obs, keys, separator)
    return labels[codes]
