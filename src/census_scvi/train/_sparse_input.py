"""scVI's first encoder layer on the counts' non-zeros, CPU only.

The encoder's first layer is ``Linear(genes, n_hidden)`` applied to ``log1p(counts)``, which is
zero wherever the counts are: 11.7% of 1024 x 8000 HVGs are non-zero at the census-like shape.
scvi-tools computes it dense: ``log1p`` and a copy (``torch.cat`` of the input alone, in
``FCLayers``) of the whole batch, then a dense product forward and another for the weight
gradient (8.4 GFLOP each at n_hidden 512). Here both products run over the non-zeros only:

- forward ``out[c] = bias + sum_g log1p(x[c, g]) W[:, g]``, one row of ``W.T`` per non-zero
  (:func:`_rows_times`, numba, cells in parallel);
- weight gradient ``dW.T[g] = sum_c log1p(x[c, g]) grad[c]``, the same kernel over the
  non-zeros grouped by gene (a counting sort, :func:`_by_gene`);
- no input gradient (the counts have none).

Written by hand because torch's own sparse product is slower than the dense one here: 1024 x
8000 at 11.7% non-zero, n_hidden 512, 2 threads, forward 41.8 ms against 65.1 ms dense and 81.8
ms for ``torch.sparse.mm`` (MKL CSR); ad-hoc probes, docs/benchmarks.md, "The likelihood from
the decoder's logits, and the first encoder layer on the non-zeros".

`~census_scvi.train._likelihood.FastLikelihoodVAE` uses it (`sparse_first_layer` switches the
encoder's class): same parameters and state dict, the same values to float rounding
(``tests/test_sparse_input.py`` against the dense layer).
Import lazily (imports torch, numba and scvi-tools).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba
import numpy as np
import numpy.typing as npt
import torch
from scvi.nn import FCLayers

__all__ = [
    "SparseFirstLayerFCLayers",
    "SparseRows",
    "sparse_first_layer",
    "sparse_linear",
    "sparse_rows_of",
]


class SparseRows(NamedTuple):
    """A cells x genes matrix by its non-zeros, row-major (CSR)."""

    indptr: npt.NDArray[np.int64]  # (cells + 1,)
    genes: npt.NDArray[np.int64]  # column of each non-zero
    values: torch.Tensor  # (nnz,), the values at those positions
    n_genes: int

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, genes)."""
        return len(self.indptr) - 1, self.n_genes


@numba.njit(parallel=True, nogil=True, cache=True)  # type: ignore[misc]
def _rows_times(
    indptr: npt.NDArray[np.int64],
    columns: npt.NDArray[np.int64],
    values: npt.NDArray[Any],
    dense: npt.NDArray[Any],
    out: npt.NDArray[Any],
) -> None:
    """``out[r] += sum_p values[p] * dense[columns[p]]`` over row ``r``'s entries ``p``."""
    width = dense.shape[1]
    for r in numba.prange(indptr.shape[0] - 1):
        row = out[r]
        for p in range(indptr[r], indptr[r + 1]):
            source = dense[columns[p]]
            v = values[p]
            for j in range(width):
                row[j] += v * source[j]


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _by_gene(
    indptr: npt.NDArray[np.int64],
    genes: npt.NDArray[np.int64],
    values: npt.NDArray[Any],
    n_genes: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[Any]]:
    """The same entries grouped by gene (CSC as gene-major rows): counting sort, stable."""
    gene_ptr = np.zeros(n_genes + 1, np.int64)
    for p in range(genes.shape[0]):
        gene_ptr[genes[p] + 1] += 1
    for g in range(n_genes):
        gene_ptr[g + 1] += gene_ptr[g]
    fill = gene_ptr[:-1].copy()
    cells = np.empty(genes.shape[0], np.int64)
    out_values = np.empty_like(values)
    for c in range(indptr.shape[0] - 1):
        for p in range(indptr[c], indptr[c + 1]):
            q = fill[genes[p]]
            cells[q] = c
            out_values[q] = values[p]
            fill[genes[p]] = q + 1
    return gene_ptr, cells, out_values


def _match_torch_threads() -> None:
    """Run the parallel kernels on as many threads as torch's products (``train.threads``)."""
    available = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(torch.get_num_threads(), available)))


class _SparseLinear(torch.autograd.Function):
    """``rows @ weight.T + bias`` for `SparseRows` ``rows``; gradients for weight and bias."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weight: torch.Tensor, bias: torch.Tensor | None, rows: SparseRows
    ) -> torch.Tensor:
        n_cells = rows.shape[0]
        out = torch.zeros(n_cells, weight.shape[0], dtype=weight.dtype)
        if bias is not None:
            out += bias
        transposed = np.ascontiguousarray(weight.detach().numpy().T)  # (genes, n_hidden)
        _match_torch_threads()
        _rows_times(rows.indptr, rows.genes, rows.values.numpy(), transposed, out.numpy())
        ctx.rows, ctx.has_bias = rows, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        rows: SparseRows = ctx.rows
        grad_np = np.ascontiguousarray(grad.detach().numpy())
        gene_ptr, cells, values = _by_gene(
            rows.indptr, rows.genes, rows.values.numpy(), rows.n_genes
        )
        grad_t = np.zeros((rows.n_genes, grad_np.shape[1]), grad_np.dtype)
        _match_torch_threads()
        _rows_times(gene_ptr, cells, values, grad_np, grad_t)
        grad_weight = torch.from_numpy(np.ascontiguousarray(grad_t.T))
        grad_bias = grad.sum(0) if ctx.has_bias else None
        return grad_weight, grad_bias, None


def sparse_linear(layer: torch.nn.Linear, rows: SparseRows) -> torch.Tensor:
    """``layer(dense(rows))`` computed from the non-zeros (CPU, no input gradient)."""
    return _SparseLinear.apply(layer.weight, layer.bias, rows)


def sparse_rows_of(x: torch.Tensor, nonzeros: Any) -> SparseRows:
    """``log1p(x)`` as `SparseRows`, from ``x``'s non-zeros (:func:`._likelihood._find_nonzeros`)."""
    n_cells, n_genes = x.shape
    indptr = np.zeros(n_cells + 1, np.int64)
    np.cumsum(nonzeros.lengths.numpy(), out=indptr[1:])
    return SparseRows(indptr, nonzeros.gene.numpy(), torch.log1p(nonzeros.counts), n_genes)


class SparseFirstLayerFCLayers(FCLayers):
    """``FCLayers`` that also takes `SparseRows` as its input, where no covariates are injected.

    With no covariates (``n_cov == 0``: scVI's encoder unless ``encode_covariates``)
    ``FCLayers.forward`` applies each layer's modules in order (its ``torch.cat`` of the input
    alone is a copy); that is what this does, the first ``Linear`` from the non-zeros. Any other
    input goes to ``FCLayers.forward``. Made by `sparse_first_layer` by switching the class in
    place (same parameters and state-dict keys), never built directly.
    """

    def forward(self, x: Any, *cat_list: Any, cont: torch.Tensor | None = None) -> torch.Tensor:
        """``FCLayers.forward``; a `SparseRows` ``x`` through the first product from its non-zeros."""
        if not isinstance(x, SparseRows):
            return super().forward(x, *cat_list, cont=cont)
        if self.n_cov or cont is not None:
            msg = "sparse input needs an FCLayers without covariates"
            raise ValueError(msg)
        modules = [m for layer in self.fc_layers for m in layer if m is not None]
        h = sparse_linear(modules[0], x)
        for module in modules[1:]:
            h = module(h)
        return h


def sparse_first_layer(encoder: Any) -> bool:
    """Switch a stock scVI ``Encoder``'s ``FCLayers`` to `SparseFirstLayerFCLayers` where it
    injects no covariates; returns whether it takes `SparseRows` now."""
    layers: Any = getattr(encoder, "encoder", None)
    if type(layers) is SparseFirstLayerFCLayers:
        return True
    if type(layers) is not FCLayers or layers.n_cov:
        return False
    first = layers.fc_layers[0][0]
    if not isinstance(first, torch.nn.Linear):
        return False
    layers.__class__ = SparseFirstLayerFCLayers
    return True
