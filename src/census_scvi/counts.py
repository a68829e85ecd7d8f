"""Raw counts and gene ids, checked one way for every stage that takes a user's file.

Two stages read matrices and gene ids they did not write: ``build-census`` (an h5ad to ingest) and
``map`` (a query to embed). Both need the same answers: is this matrix raw counts (non-negative
integers, float storage allowed), and if not, what it looks like (log-normalised, scaled); which
var entries have no id; which ids are versioned Ensembl ids (``ENSG00000141510.17``) to strip; and
whether the file is keyed by gene symbols. The questions are answered here; each stage words its own
message and hint around the answer (its options differ: ``--counts-layer`` vs ``adata.X``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import anndata as ad
    import numpy.typing as npt
    import scipy.sparse as sp

__all__ = [
    "gene_selection",
    "query_gene_ids",
    "LOG_MAX",
    "MISSING_IDS",
    "SYMBOL_FRACTION",
    "CountProblem",
    "check_counts",
    "clean_gene_ids",
    "count_problem",
    "ENSEMBL_GENE_PREFIXES",
    "ensembl_fraction",
    "ensembl_organism",
    "is_ensembl_gene",
    "is_versioned_ensembl",
    "log_counts_hint",
    "looks_like_symbols",
    "nonzero_moments",
    "strip_version",
    "strip_versions",
]

#: Ensembl gene-id prefix of each organism the Census holds (``ENSMUSG00000000001``: mouse).
ENSEMBL_GENE_PREFIXES = {
    "homo_sapiens": "ENSG",
    "mus_musculus": "ENSMUSG",
    "macaca_mulatta": "ENSMMUG",
    "callithrix_jacchus": "ENSCJAG",
    "pan_troglodytes": "ENSPTRG",
}
LOG_MAX = 50.0
"""Non-integer data whose maximum is at most this looks log-normalised (log1p of CP10k is < 15)."""
SYMBOL_FRACTION = 0.5
"""Below this fraction of Ensembl gene ids, a file is keyed by gene symbols."""
MISSING_IDS = frozenset({"", "nan", "none", "null", "na", "<na>"})
"""Gene id values (lower-cased, stripped) that mean "no id"."""

_ENSEMBL_GENE = re.compile(r"^ENS[A-Z]*G\d{5,}$")
_VERSIONED = re.compile(r"^(ENS[A-Z]*\d+)\.\d+$")  # any Ensembl stable id with a .N version

ProblemKind = Literal["dtype", "non-finite", "negative", "non-integer"]


# ------------------------------------------------------------------------------------------
# raw counts
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CountProblem:
    """Why a matrix is not raw counts: the first failed check, with its figures.

    Attributes
    ----------
    kind
        ``"dtype"`` (not integers or floats), ``"non-finite"`` (NaN/inf), ``"negative"`` or
        ``"non-integer"``; checked in that order.
    dtype
        The stored values' dtype.
    n_values
        Stored values failing the check.
    value
        ``"negative"``: the minimum; ``"non-integer"``: the first non-integer value.
    max
        The largest stored value (``"negative"`` and ``"non-integer"``).
    """

    kind: ProblemKind
    dtype: np.dtype[Any]
    n_values: int = 0
    value: float | int | None = None
    max: float | int | None = None

    @property
    def integer_dtype(self) -> bool:
        return self.dtype.kind in "iu"

    @property
    def looks_log_normalised(self) -> bool:
        """Non-integer values all at most :data:`LOG_MAX`."""
        return self.kind == "non-integer" and self.max is not None and self.max <= LOG_MAX

    def describe(self) -> str:
        """What was found, e.g. ``"non-integer values (e.g. 0.6931; max 2.398)"``."""
        if self.kind == "dtype":
            return f"values of type {self.dtype}"
        if self.kind == "non-finite":
            return "NaN or infinite values"
        if self.kind == "negative":
            lo = self.value if self.integer_dtype else f"{float(self.value or 0):.4g}"
            return f"negative values (min {lo})"
        return f"non-integer values (e.g. {float(self.value or 0):.4g}; max {float(self.max or 0):.4g})"


def _stored_values(x: Any) -> npt.NDArray[Any]:
    import scipy.sparse as sp

    data = x.data if sp.issparse(x) else x
    return np.asarray(data).ravel()


def count_problem(x: Any) -> CountProblem | None:
    """None when ``x`` holds raw counts (non-negative integers, any numeric storage), else why not.

    Parameters
    ----------
    x
        A dense array or a scipy sparse matrix (only stored values are checked).

    Examples
    --------
    >>> count_problem(np.log1p(np.array([[1.0, 3.0]]))).kind
    'non-integer'
    >>> count_problem(np.array([[0, 2], [5, 1]])) is None
    True
    """
    data = _stored_values(x)
    if data.size == 0:
        return None
    if data.dtype.kind in "iu":
        lo = data.min()
        if lo < 0:
            return CountProblem(
                "negative", data.dtype, int((data < 0).sum()), lo.item(), data.max().item()
            )
        return None
    if data.dtype.kind != "f":
        return CountProblem("dtype", data.dtype, int(data.size))
    finite = np.isfinite(data)
    if not finite.all():
        return CountProblem("non-finite", data.dtype, int((~finite).sum()))
    lo, hi = float(data.min()), float(data.max())
    if lo < 0:
        return CountProblem("negative", data.dtype, int((data < 0).sum()), lo, hi)
    frac = np.flatnonzero(np.not_equal(data, np.round(data)))
    if frac.size:
        return CountProblem("non-integer", data.dtype, int(frac.size), float(data[frac[0]]), hi)
    return None


def check_counts(x: Any, *, where: str, log_hint: str | None, what: str = "the query's X") -> None:
    """Raise when ``x`` (a chunk of the query's X) is not raw counts: NaN, negative or fractional.

    Parameters
    ----------
    x
        A dense array or scipy sparse matrix.
    where
        Names the rows checked, for the message (e.g. ``"cells 0-16383"``).
    log_hint
        Extra hint when X looks log-normalised and raw counts seem to be elsewhere
        (:func:`log_counts_hint`).
    what
        Names the matrix in the message.

    Raises
    ------
    CensusScviError
        With the first problem :func:`count_problem` finds, its figures and ``where``.
    """
    p = count_problem(x)
    if p is None:
        return
    hint = log_hint or "map the unnormalised UMI/read counts"
    if p.kind == "dtype":
        msg = f"{what} has dtype {p.dtype}, not numbers"
        raise CensusScviError(msg)
    if p.kind == "non-finite":
        msg = f"{what} has {p.n_values:,} NaN or infinite values ({where}); raw counts are needed"
        raise CensusScviError(msg, hint=hint)
    if p.kind == "negative":
        lo = p.value if p.integer_dtype else f"{float(p.value or 0):.3g}"
        msg = f"{what} has negative values ({where}, min {lo}); raw counts are needed"
        if not p.integer_dtype and log_hint is None:
            hint += " (not scaled data)"
        raise CensusScviError(msg, hint=hint)
    msg = (
        f"{what} has non-integer values ({where}: {p.n_values:,} values, e.g. "
        f"{float(p.value or 0):.4g}); scVI needs raw counts"
    )
    raise CensusScviError(msg, hint=hint)


def log_counts_hint(adata: ad.AnnData) -> str | None:
    """A hint naming where raw counts are, when X does not hold them but ``.raw`` or a layer does."""
    for name in ("counts", "raw_counts", "raw", "umi", "UMI"):
        if name in adata.layers:
            return (
                f"X looks normalised; raw counts seem to be in layers['{name}']: set "
                f"adata.X = adata.layers['{name}'], write the h5ad and map it"
            )
    if adata.raw is not None:
        return (
            "X looks normalised; raw counts may be in .raw: write adata.raw.to_adata() to an h5ad "
            "and map that"
        )
    return None


def nonzero_moments(
    nnz: npt.ArrayLike, total: npt.ArrayLike, total_sq: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per cell, the mean and sample variance (``ddof=1``) of its non-zero counts.

    From the count of non-zeros, their sum and their sum of squares (what a streaming pass over X
    accumulates): the Census's ``raw_mean_nnz`` and ``raw_variance_nnz``. The mean is 0 without
    non-zeros, the variance 0 below two; rounding below 0 is clipped.

    Examples
    --------
    >>> mean, var = nonzero_moments(np.array([3]), np.array([6.0]), np.array([14.0]))
    >>> float(mean[0]), float(var[0])
    (2.0, 1.0)
    """
    n = np.asarray(nnz)
    s1 = np.asarray(total, dtype=np.float64)
    s2 = np.asarray(total_sq, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s1 / np.maximum(n, 1), 0.0)
        var = np.where(n > 1, (s2 - n * mean**2) / np.maximum(n - 1, 1), 0.0)
    return mean, np.maximum(var, 0.0)


# ------------------------------------------------------------------------------------------
# gene ids
# ------------------------------------------------------------------------------------------
def clean_gene_ids(values: Iterable[Any]) -> npt.NDArray[np.object_]:
    """Gene ids as stripped strings, None where missing (NaN, None, or one of :data:`MISSING_IDS`).

    Examples
    --------
    >>> clean_gene_ids([" ENSG00000141510 ", None, "nan", ""]).tolist()
    ['ENSG00000141510', None, None, None]
    """
    import pandas as pd

    out = np.array(list(values), dtype=object)
    missing = pd.isna(out)
    for i, v in enumerate(out):
        s = None if missing[i] else str(v).strip()
        out[i] = None if s is None or s.lower() in MISSING_IDS else s
    return out


def is_ensembl_gene(gene_id: str) -> bool:
    """``ENSG00000141510``, ``ENSMUSG00000059552``: an unversioned Ensembl gene id."""
    return bool(_ENSEMBL_GENE.match(gene_id))


def is_versioned_ensembl(gene_id: str) -> bool:
    """An Ensembl stable id with a version suffix (``ENSG00000141510.17``)."""
    return bool(_VERSIONED.match(gene_id))


def strip_version(gene_id: str) -> str:
    """``ENSG00000141510.17`` -> ``ENSG00000141510``; any other id unchanged."""
    m = _VERSIONED.match(gene_id)
    return m.group(1) if m else gene_id


def strip_versions(ids: Sequence[str | None]) -> tuple[npt.NDArray[np.object_], int]:
    """Ensembl version suffixes removed (None kept): ``(ids, how many were stripped)``."""
    out = np.empty(len(ids), dtype=object)
    n = 0
    for i, g in enumerate(ids):
        m = None if g is None else _VERSIONED.match(g)
        if m:
            out[i] = m.group(1)
            n += 1
        else:
            out[i] = g
    return out, n


def ensembl_fraction(ids: Iterable[str | None]) -> float:
    """Fraction of the (non-missing) ids that are Ensembl gene ids, versioned or not."""
    present = [strip_version(g) for g in ids if g is not None]
    if not present:
        return 0.0
    return sum(map(is_ensembl_gene, present)) / len(present)


def looks_like_symbols(ids: Sequence[str | None]) -> bool:
    """Whether ids look like gene symbols (fewer than :data:`SYMBOL_FRACTION` Ensembl gene ids).

    Examples
    --------
    >>> looks_like_symbols(["TP53", "CD3E", "ENSG00000141510"])
    True
    """
    return any(g is not None for g in ids) and ensembl_fraction(ids) < SYMBOL_FRACTION


_ENSEMBL_PREFIX = re.compile(r"^(ENS[A-Z]*G)\d{5,}$")


def ensembl_organism(ids: Iterable[str | None]) -> tuple[str | None, float]:
    """The organism most Ensembl gene ids belong to, by prefix, and the fraction that do.

    Only unversioned Ensembl gene ids count (others are ignored); ``(None, 0.0)`` when there are
    none or their prefix is not in :data:`ENSEMBL_GENE_PREFIXES`.

    Examples
    --------
    >>> ensembl_organism(["ENSMUSG00000000001", "ENSMUSG00000000028", "ENSG00000141510"])
    ('mus_musculus', 0.6666666666666666)
    """
    by_prefix: dict[str, int] = {}
    for g in ids:
        m = _ENSEMBL_PREFIX.match(g) if g is not None else None
        if m is not None:
            by_prefix[m.group(1)] = by_prefix.get(m.group(1), 0) + 1
    total = sum(by_prefix.values())
    if total == 0:
        return None, 0.0
    prefix, n = max(by_prefix.items(), key=lambda kv: kv[1])
    organism = next((o for o, p in ENSEMBL_GENE_PREFIXES.items() if p == prefix), None)
    return (organism, n / total) if organism is not None else (None, 0.0)


def query_gene_ids(adata: ad.AnnData, gene_ids: str | None) -> npt.NDArray[np.object_]:
    """The query's gene id per column (None where missing): var_names or the ``gene_ids`` column."""
    if gene_ids is None:
        values = pd.Series(adata.var_names, dtype=object)
    else:
        if gene_ids not in adata.var.columns:
            cols = ", ".join(map(str, adata.var.columns)) or "none"
            msg = f"--gene-ids column '{gene_ids}' is not in the query's var; its columns: {cols}"
            raise CensusScviError(msg, hint="omit --gene-ids to use the var index")
        values = pd.Series(adata.var[gene_ids].to_numpy(), dtype=object)
    return clean_gene_ids(values.to_numpy())


def gene_selection(
    query_ids: Sequence[str | None] | npt.NDArray[np.object_], model_ids: Sequence[str]
) -> tuple[sp.csr_matrix, npt.NDArray[np.bool_], int]:
    """The 0/1 matrix mapping query columns onto model genes.

    Ensembl version suffixes (``ENSG00000141510.17``) are ignored when the model's ids have none.

    Returns
    -------
    ``(S, used, n_duplicates)``: ``S`` (n_query_genes x n_model_genes), the query columns used,
    and how many used columns repeat an id already seen.
    """
    import scipy.sparse as sp

    model = pd.Index([str(m) for m in model_ids])
    strip = not any(is_versioned_ensembl(m) for m in model[:50])
    q = np.array(
        [None if v is None else (strip_version(v) if strip else v) for v in query_ids],
        dtype=object,
    )
    target = model.get_indexer(pd.Index(q.astype(str)))
    target[pd.isna(pd.Series(q)).to_numpy()] = -1
    used = target >= 0
    rows = np.flatnonzero(used)
    s = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, target[used])),
        shape=(len(q), len(model)),
    )
    n_dup = int(rows.size - np.unique(target[used]).size)
    return s, used, n_dup
