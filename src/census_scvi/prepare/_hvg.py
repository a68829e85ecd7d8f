"""Streaming Seurat v3 highly variable genes: two passes over chunks of raw counts.

Why our own and not ``cellxgene_census.experimental.pp.highly_variable_genes``: the Census
implementation is the reference we follow line by line (same moments, same LOESS fit with jitter
retries, same clipping, same ranking as ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")``),
but its memory grows with the number of cells (an ``IntIndexer`` hash of every cell id, eager
prefetch of unbounded TileDB reads) and about half its time goes to that hash lookup. Here the
caller hands us chunks whose rows are already mapped to batch codes with a plain array lookup,
sized by a non-zero budget, so memory is bounded by the chunk size and the ``n_batches x n_genes``
accumulators, never by the cell count. The accumulators are ``numpy.bincount`` sums (float64),
so no numba compilation is paid at import.

A chunk is a tuple ``(batch, gene, value)`` of equal-length arrays: the batch code and gene
index of every stored (non-zero) value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from census_scvi.errors import CensusScviError

__all__ = ["Chunk", "PassSums", "moment_sums", "seurat_v3_from_chunks"]

logger = logging.getLogger(__name__)

Chunk = tuple[npt.NDArray[np.integer], npt.NDArray[np.integer], npt.NDArray[np.floating]]
#: ``pass_sums(pass_number, clip_val)`` -> per batch and gene (sum, sum of squares).
PassSums = Callable[
    [int, "npt.NDArray[np.float64] | None"],
    tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
]


def moment_sums(
    chunks: Iterable[Chunk], n_batches: int, n_genes: int, clip_val: npt.NDArray[np.float64] | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per batch and gene: sum and sum of squares of the values (clipped when ``clip_val``)."""
    size = n_batches * n_genes
    s1 = np.zeros(size, dtype=np.float64)
    s2 = np.zeros(size, dtype=np.float64)
    flat_clip = None if clip_val is None else clip_val.reshape(-1)
    for batch, gene, value in chunks:
        if n_batches == 1:
            key = np.asarray(gene, dtype=np.intp)
        else:
            key = np.asarray(batch, dtype=np.intp) * n_genes
            key += gene
        v = np.asarray(value, dtype=np.float64)
        if flat_clip is not None:
            np.minimum(v, flat_clip[key], out=v)
        s1 += np.bincount(key, weights=v, minlength=size)
        np.square(v, out=v)
        s2 += np.bincount(key, weights=v, minlength=size)
    return s1.reshape(n_batches, n_genes), s2.reshape(n_batches, n_genes)


def _mean_var(
    s1: npt.NDArray[np.float64], s2: npt.NDArray[np.float64], n: npt.NDArray[np.int64] | int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean and unbiased variance from sums, as scanpy's ``_get_mean_var`` computes them."""
    n_col = np.asarray(n, dtype=np.float64).reshape(-1, 1) if np.ndim(n) else float(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / n_col
        var = s2 / n_col - mean**2
        var *= n_col / (n_col - 1)
    return mean, var


def _fit_loess(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    *,
    span: float,
    max_jitter: float,
    batch_name: str,
    n_cells: int,
) -> npt.NDArray[np.float64]:
    """LOESS of log variance on log mean; on skmisc's numerical failure retry with jitter.

    The Census code notes that ``skmisc.loess`` sometimes fails with "reciprocal condition
    number" on low-entropy batches; adding tiny uniform jitter to ``x`` (1e-18, growing tenfold
    up to ``max_jitter``) resolves it. The jitter is seeded, so runs are reproducible.
    """
    from skmisc.loess import loess

    rng = np.random.default_rng(0)
    jitter = 0.0
    while True:
        xx = x if jitter == 0 else x + rng.uniform(-jitter, jitter, x.shape[0])
        try:
            model = loess(xx, y, span=span, degree=2)
            model.fit()
            return np.asarray(model.outputs.fitted_values, dtype=np.float64)
        except ValueError as e:
            jitter = 1e-18 if jitter == 0 else jitter * 10.0
            if jitter >= max_jitter:
                msg = (
                    f"the Seurat v3 LOESS fit failed for HVG batch '{batch_name}' ({n_cells} cells, "
                    f"{x.shape[0]} variable genes) even with jitter up to {max_jitter:g}: "
                    f"{str(e).strip()[:120]}"
                )
                raise CensusScviError(
                    msg,
                    hint="merge small batches (change hvg.hvg_batch) or raise hvg.max_loess_jitter",
                ) from None
            logger.info(
                "LOESS failed for HVG batch '%s' (%s); retrying with jitter %.0e",
                batch_name,
                str(e).strip()[:80],
                jitter,
            )


def seurat_v3_from_chunks(
    read_chunks: Callable[[int], Iterable[Chunk]] | None,
    *,
    n_cells: Sequence[int] | npt.NDArray[np.integer],
    n_genes: int,
    n_top_genes: int,
    batch_names: Sequence[str] | None = None,
    span: float = 0.3,
    max_loess_jitter: float = 1e-6,
    pass_sums: PassSums | None = None,
) -> pd.DataFrame:
    """Seurat v3 HVG statistics from two streamed passes over the counts.

    Parameters
    ----------
    read_chunks
        ``read_chunks(pass_number)`` returns a fresh iterable of ``(batch, gene, value)`` chunks
        covering every stored value of the selected cells once (called with 1, then 2); None
        when ``pass_sums`` is given.
    n_cells
        Cells in each batch (``len(n_cells)`` is the number of batches).
    n_genes
        Number of genes (columns); gene indices in chunks are ``0..n_genes-1``.
    n_top_genes
        How many genes to flag ``highly_variable``.
    batch_names
        Names of the batches, for messages.
    span
        LOESS span (fraction of genes in each local fit), as in scanpy.
    max_loess_jitter
        Largest jitter tried when the LOESS fit fails.
    pass_sums
        Computes a pass's sums some other way (e.g. split across processes,
        :mod:`census_scvi.prepare._parallel`); default: :func:`moment_sums` over ``read_chunks``.

    Returns
    -------
    One row per gene (in gene index order) with columns ``means``, ``variances`` (over all
    cells), ``variances_norm`` (mean over batches), ``highly_variable_rank`` (median rank over
    batches where it is in the top ``n_top_genes``), ``highly_variable_nbatches``,
    ``highly_variable`` and ``rank`` (0 = most variable; the order used to pick the HVGs).

    Notes
    -----
    Same numbers as ``scanpy.pp.highly_variable_genes(flavor="seurat_v3", batch_key=...)``,
    except for batches scanpy cannot handle (it fails on them): a batch with one cell, or in
    which no gene varies, is left out of the ranking with a warning. A gene that is constant in
    a batch gets normalised variance 0 there, as in scanpy.
    """
    counts: npt.NDArray[np.int64] = np.asarray(n_cells, dtype=np.int64)
    n_batches = len(counts)
    if batch_names is None:
        batch_names = [str(i) for i in range(n_batches)]
    if n_batches == 0 or counts.sum() == 0:
        msg = "no cells to select highly variable genes from"
        raise CensusScviError(msg)

    if pass_sums is None:
        if read_chunks is None:
            msg = "seurat_v3_from_chunks needs read_chunks or pass_sums"
            raise ValueError(msg)

        def pass_sums(p: int, clip: npt.NDArray[np.float64] | None) -> tuple[Any, Any]:
            return moment_sums(read_chunks(p), n_batches, n_genes, clip)

    # pass 1: per-batch moments
    s1, s2 = pass_sums(1, None)
    b_mean, b_var = _mean_var(s1, s2, counts)
    all_mean, all_var = _mean_var(s1.sum(axis=0), s2.sum(axis=0), int(counts.sum()))
    del s1, s2

    # per-batch LOESS fit of log variance on log mean -> regularised std, clip value
    reg_std, clip_val, used = _fit_batches(
        b_mean, b_var, counts, batch_names, span=span, max_loess_jitter=max_loess_jitter
    )

    # pass 2: sums of clipped values
    c1, c2 = pass_sums(2, clip_val)
    nb = counts.astype(np.float64).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_var = (1 / ((nb - 1) * np.square(reg_std))) * (
            nb * np.square(b_mean) + c2 - 2 * c1 * b_mean
        )
    norm_var = norm_var[used]
    del c1, c2

    return _rank(norm_var, all_mean, all_var, n_top_genes, n_genes)


def _fit_batches(
    b_mean: npt.NDArray[np.float64],
    b_var: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    batch_names: Sequence[str],
    *,
    span: float,
    max_loess_jitter: float,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Per batch: regularised std (LOESS of log variance on log mean), clip value, and used."""
    n_batches, n_genes = b_mean.shape
    reg_std = np.ones((n_batches, n_genes), dtype=np.float64)
    clip_val = np.zeros((n_batches, n_genes), dtype=np.float64)
    used = np.zeros(n_batches, dtype=bool)
    for b in range(n_batches):
        n = int(counts[b])
        not_const = b_var[b] > 0
        if n < 2 or not not_const.any():
            why = "has a single cell" if n < 2 else f"has no gene that varies across its {n} cells"
            logger.warning(
                "HVG batch '%s' %s; it is left out of the HVG ranking", batch_names[b], why
            )
            continue
        fitted = np.zeros(n_genes, dtype=np.float64)
        fitted[not_const] = _fit_loess(
            np.log10(b_mean[b, not_const]),
            np.log10(b_var[b, not_const]),
            span=span,
            max_jitter=max_loess_jitter,
            batch_name=str(batch_names[b]),
            n_cells=n,
        )
        reg_std[b] = np.sqrt(10**fitted)
        clip_val[b] = reg_std[b] * np.sqrt(n) + b_mean[b]
        used[b] = True
    if not used.any():
        msg = (
            f"no HVG batch has two or more cells with varying counts ({n_batches} batches, "
            f"{int(counts.sum())} cells)"
        )
        raise CensusScviError(msg, hint="select more cells or change hvg.hvg_batch")
    return reg_std, clip_val, used


def _rank(
    norm_var: npt.NDArray[np.float64],
    all_mean: npt.NDArray[np.float64],
    all_var: npt.NDArray[np.float64],
    n_top_genes: int,
    n_genes: int,
) -> pd.DataFrame:
    """Combine batches exactly as scanpy does (SelectIntegrationFeatures in Seurat v3)."""
    ranked = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float32)
    nbatches_hv = np.sum(ranked < n_top_genes, axis=0).astype(int)
    ranked[ranked >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)

    df = pd.DataFrame(
        {
            "means": all_mean,
            "variances": all_var,
            "variances_norm": np.mean(norm_var, axis=0),
            "highly_variable_rank": median_rank,
            "highly_variable_nbatches": nbatches_hv,
        }
    )
    order = (
        df[["highly_variable_rank", "highly_variable_nbatches"]]
        .sort_values(
            ["highly_variable_rank", "highly_variable_nbatches"],
            ascending=[True, False],
            na_position="last",
        )
        .index.to_numpy()
    )
    rank = np.empty(n_genes, dtype=np.int64)
    rank[order] = np.arange(n_genes)
    df["highly_variable"] = rank < n_top_genes
    df["rank"] = rank
    return df
