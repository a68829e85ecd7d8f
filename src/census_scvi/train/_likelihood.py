"""scVI's reconstruction log-likelihood, same math, computed zero-aware on CPU.

scvi-tools' ``log_nb_positive`` evaluates every term on the full cells x genes grid: with the
gene-wise inverse dispersion ``theta`` expanded to the batch, ``lgamma(theta)``,
``log(theta + eps)``, ``lgamma(x + theta)``, ``lgamma(x + 1)`` and ``log(mu + eps)`` are each a
dense transcendental pass, and backward adds dense ``digamma`` passes. The per-cell sum that
``VAE.loss`` needs (``-px.log_prob(x).sum(-1)``) regroups as::

    sum_g theta (log(theta + eps) - L),  L = log(theta + mu + eps)          the one dense log
    + sum_{x > 0} [x (log(mu + eps) - L) + lgamma(x + theta)
                   - lgamma(theta) - lgamma(x + 1)]                         non-zeros only

with ``log(theta + eps)`` and ``lgamma(theta)`` computed once per gene: at ``x = 0`` the last
four terms are exactly zero (``lgamma(0 + theta) - lgamma(theta)`` cancels bit for bit, and
so do their ``digamma`` gradients). The ZINB log-likelihood regroups the same way around its
dense ``softplus`` terms, and the Poisson one keeps only ``-sum rate`` dense.

Finding the non-zeros is part of the cost: ``np.flatnonzero`` on the ``x > 0`` mask takes ~3 ms
for 1024 x 8000 counts at 15% density, against ~16-29 ms for ``torch.nonzero``; per-cell sums
use ``torch.segment_reduce`` (the non-zeros are in row-major order), ~6x faster forward and
backward than ``index_add``. A custom ``autograd.Function`` for the dense term was tried and won
only ~4% (and summed the ``theta`` gradient less accurately), so autograd does the backward.
Figures: docs/benchmarks.md, "Fast likelihood".

`install_fast_likelihood` makes an ``scvi.model.SCVI``'s module use these sums in its loss by
switching the module's class to `FastLikelihoodVAE`, a subclass of ``scvi.module.VAE`` that
adds no parameters, buffers or init arguments: the state dict, ``model.save`` and
``SCVI.load`` stay stock. For ``nb`` and ``poisson`` it also leaves out the decoder's unused
zero-inflation head (:mod:`census_scvi.train._decoder`). Import this module lazily (it imports
torch and scvi-tools).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from scvi.module import VAE
from scvi.module._constants import MODULE_KEYS

from census_scvi.errors import CensusScviError
from census_scvi.train._decoder import skip_unused_dropout_head
from census_scvi.train._softmax_nb import SoftmaxLogits, SoftmaxNegativeBinomial
from census_scvi.train._sparse_input import (
    SparseFirstLayerFCLayers,
    SparseRows,
    sparse_first_layer,
    sparse_rows_of,
)

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "FastLikelihoodVAE",
    "fast_log_prob_sum",
    "install_fast_likelihood",
    "nb_log_likelihood",
    "poisson_log_likelihood",
    "zinb_log_likelihood",
]

logger = logging.getLogger(__name__)

_EPS = 1e-8  # scvi-tools' eps in NegativeBinomial and ZeroInflatedNegativeBinomial.log_prob
_SUPPORTED = ("nb", "zinb", "poisson")
_SOFTMAX_ATTR = "census_scvi_softmax"  # the decoder's logits, on a NegativeBinomial px
_NONZEROS_ATTR = "census_scvi_nonzeros"  # a mini-batch's non-zeros, on its counts tensor
# The sparse first layer costs ~5.5x density of the dense one (1024 x 8000, n_hidden 512: 41.8
# against 65.1 ms forward at 11.7% non-zero); at 37% (2000 of 4000 genes) a step took 140 ms
# against 102 ms dense (benchmarks/bench_train_step.py). Denser batches keep the dense layer.
SPARSE_INPUT_MAX_DENSITY = 0.15


class _Nonzeros(NamedTuple):
    """Where a cells x genes count matrix is non-zero, in row-major order."""

    flat: Tensor  # flat positions (int64)
    gene: Tensor  # gene (column) of each
    lengths: Tensor  # non-zeros per cell, for segment sums
    counts: Tensor  # x at those positions


def _find_nonzeros(x: Tensor) -> _Nonzeros:
    n_cells, n_genes = x.shape
    flat = x.reshape(-1)
    positive = flat > 0
    if positive.device.type == "cpu":
        index_np = np.flatnonzero(positive.numpy())  # ~5x faster than torch.nonzero on CPU
        index = torch.from_numpy(index_np)
        gene = torch.from_numpy(index_np % n_genes)  # numpy's int64 modulo: ~10x torch's
    else:
        index = torch.nonzero(positive).squeeze(1)
        gene = index % n_genes
    starts = torch.arange(n_cells + 1, device=x.device) * n_genes
    lengths = torch.searchsorted(index, starts).diff()
    return _Nonzeros(index, gene, lengths, counts=flat.index_select(0, index))


def _batch_nonzeros(x: Tensor) -> tuple[_Nonzeros, bool]:
    """`_find_nonzeros` of a mini-batch's counts and whether they are in the support, found
    once per step: kept on the tensor itself (the same object reaches ``inference`` and
    ``loss``), for as long as it is unchanged."""
    version = None if x.is_inference() else x._version  # inference tensors keep no version
    kept = getattr(x, _NONZEROS_ATTR, None)
    if kept is not None and kept[0] == version:
        return kept[1], kept[2]
    nz = _find_nonzeros(x)
    in_support = _counts_in_support(x, nz)
    setattr(x, _NONZEROS_ATTR, (version, nz, in_support))
    return nz, in_support


def _per_cell(values: Tensor, nz: _Nonzeros) -> Tensor:
    return torch.segment_reduce(values, "sum", lengths=nz.lengths)


def _gene_wise(theta: Tensor, shape: torch.Size) -> Tensor:
    """``theta`` as (genes,) when it is one value per gene, else as the (cells, genes) matrix.

    scvi-tools' distributions broadcast the gene-wise ``theta`` to the batch as an expanded
    view (stride 0 over cells); that view is folded back so per-gene terms run once per gene.
    """
    if theta.dim() == 1 and theta.shape[0] == shape[1]:
        return theta
    if theta.dim() == 2 and theta.shape[1] == shape[1]:
        if theta.shape[0] == 1 or (theta.shape[0] == shape[0] and theta.stride(0) == 0):
            return theta[0]
        if theta.shape[0] == shape[0]:
            return theta
    msg = f"theta of shape {tuple(theta.shape)} does not fit counts of shape {tuple(shape)}"
    raise CensusScviError(
        msg,
        hint="pass one value per gene, (1, genes) or (cells, genes)",
    )


def _check_matrix(name: str, value: Tensor, shape: torch.Size) -> None:
    if value.shape != shape:
        msg = f"{name} has shape {tuple(value.shape)}, the counts {tuple(shape)}"
        raise CensusScviError(
            msg,
            hint=f"pass {name} as a (cells, genes) matrix like the counts",
        )


def _check_counts(x: Tensor) -> None:
    if x.dim() != 2:
        msg = f"counts have {x.dim()} dimensions, shape {tuple(x.shape)}"
        raise CensusScviError(
            msg,
            hint="pass one (cells, genes) mini-batch",
        )


def _nb_nonzero_terms(nz: _Nonzeros, mu: Tensor, theta: Tensor, eps: float) -> Tensor:
    """``x (log(mu + eps) - log(theta + mu + eps)) + lgamma(x + theta) - lgamma(theta)
    - lgamma(x + 1)`` at the non-zeros.

    ``x log(theta + mu + eps)`` is zero where ``x`` is: computed here from the gathered ``mu``
    and ``theta`` it costs one log per non-zero instead of a dense product and difference
    forward and another product backward (n_hidden 128, 8000 genes: see "Fast likelihood" in
    docs/benchmarks.md).
    """
    if theta.dim() == 1:
        theta_nz = theta.index_select(0, nz.gene)
        lgamma_theta_nz = torch.lgamma(theta).index_select(0, nz.gene)
    else:
        theta_nz = theta.reshape(-1).index_select(0, nz.flat)
        lgamma_theta_nz = torch.lgamma(theta_nz)
    mu_nz = mu.reshape(-1).index_select(0, nz.flat)
    with torch.no_grad():
        lgamma_x1 = torch.lgamma(nz.counts + 1)
    log_ratio = torch.log(mu_nz + eps) - torch.log(theta_nz + mu_nz + eps)
    return nz.counts * log_ratio + torch.lgamma(nz.counts + theta_nz) - lgamma_theta_nz - lgamma_x1


def _nb(x: Tensor, mu: Tensor, theta: Tensor, nz: _Nonzeros, eps: float) -> Tensor:
    """``theta (log(theta + eps) - log(theta + mu + eps))`` stays one term, as in scvi-tools:
    summing ``theta log(theta + eps)`` and ``theta log(theta + mu + eps)`` apart cancels two
    large sums (in float32, 10x scvi-tools' error once theta reaches ~1e6)."""
    dense = theta * (torch.log(theta + eps) - torch.log(theta + mu + eps))
    return dense.sum(-1) + _per_cell(_nb_nonzero_terms(nz, mu, theta, eps), nz)


def _zinb(
    x: Tensor, mu: Tensor, theta: Tensor, zi_logits: Tensor, nz: _Nonzeros, eps: float
) -> Tensor:
    """Zero case ``softplus(pi_theta_log) - softplus(-pi)`` everywhere, corrected at non-zeros."""
    log_theta_mu = torch.log(theta + mu + eps)
    pi_theta_log = theta * (torch.log(theta + eps) - log_theta_mu) - zi_logits
    softplus_zero = F.softplus(pi_theta_log)
    dense = (softplus_zero - F.softplus(-zi_logits)).sum(-1)

    def at_nonzeros(values: Tensor) -> Tensor:
        return values.reshape(-1).index_select(0, nz.flat)

    correction = (
        at_nonzeros(pi_theta_log)
        - at_nonzeros(softplus_zero)
        + _nb_nonzero_terms(nz, mu, theta, eps)
    )
    return dense + _per_cell(correction, nz)


def _poisson(rate: Tensor, nz: _Nonzeros) -> Tensor:
    rate_nz = rate.reshape(-1).index_select(0, nz.flat)
    with torch.no_grad():
        lgamma_x1 = torch.lgamma(nz.counts + 1)
    return _per_cell(nz.counts * torch.log(rate_nz) - lgamma_x1, nz) - rate.sum(-1)


def nb_log_likelihood(x: Tensor, mu: Tensor, theta: Tensor, *, eps: float = _EPS) -> Tensor:
    """Per-cell negative-binomial log-likelihood, summed over genes.

    Equals ``scvi.distributions._negative_binomial.log_nb_positive(x, mu, theta, eps).sum(-1)``
    (to float rounding) with the same gradients, for non-negative counts.

    Parameters
    ----------
    x
        Counts, (cells, genes), dense.
    mu
        Means, (cells, genes), positive.
    theta
        Inverse dispersion: (genes,), (1, genes) or (cells, genes), positive.
    eps
        scvi-tools' numerical-stability constant inside the logs.

    Returns
    -------
    The log-likelihood of each cell, shape (cells,).

    Examples
    --------
    >>> ll = nb_log_likelihood(x, mu, px_r.exp())
    >>> reconstruction_loss = -ll
    """
    _check_counts(x)
    _check_matrix("mu", mu, x.shape)
    return _nb(x, mu, _gene_wise(theta, x.shape), _find_nonzeros(x), eps)


def zinb_log_likelihood(
    x: Tensor, mu: Tensor, theta: Tensor, zi_logits: Tensor, *, eps: float = _EPS
) -> Tensor:
    """Per-cell zero-inflated negative-binomial log-likelihood, summed over genes.

    Equals ``log_zinb_positive(x, mu, theta, zi_logits, eps).sum(-1)`` (to float rounding) with
    the same gradients, for counts that are 0 or above ``eps`` (scvi-tools scores a value in
    ``(0, eps]`` as neither case; integer counts never are).

    Parameters
    ----------
    x
        Counts, (cells, genes), dense.
    mu
        Means, (cells, genes), positive.
    theta
        Inverse dispersion: (genes,), (1, genes) or (cells, genes), positive.
    zi_logits
        Logits of the dropout probability, (cells, genes).
    eps
        scvi-tools' numerical-stability constant inside the logs.

    Returns
    -------
    The log-likelihood of each cell, shape (cells,).

    Examples
    --------
    >>> ll = zinb_log_likelihood(x, mu, px_r.exp(), px_dropout)
    """
    _check_counts(x)
    _check_matrix("mu", mu, x.shape)
    _check_matrix("zi_logits", zi_logits, x.shape)
    return _zinb(x, mu, _gene_wise(theta, x.shape), zi_logits, _find_nonzeros(x), eps)


def poisson_log_likelihood(x: Tensor, rate: Tensor) -> Tensor:
    """Per-cell Poisson log-likelihood, summed over genes.

    Equals ``torch.distributions.Poisson(rate).log_prob(x).sum(-1)`` (to float rounding) with
    the same gradient, for non-negative counts.

    Parameters
    ----------
    x
        Counts, (cells, genes), dense.
    rate
        Poisson rates, (cells, genes), non-negative.

    Returns
    -------
    The log-likelihood of each cell, shape (cells,).

    Examples
    --------
    >>> ll = poisson_log_likelihood(x, px_rate)
    """
    _check_counts(x)
    _check_matrix("rate", rate, x.shape)
    return _poisson(rate, _find_nonzeros(x))


def _counts_in_support(x: Tensor, nz: _Nonzeros) -> bool:
    """Whether ``x`` is finite non-negative integers (NaN fails ``amin() >= 0``)."""
    counts = nz.counts
    return (
        bool(x.amin() >= 0)
        and bool(torch.isfinite(counts).all())
        and bool((counts == counts.round()).all())
    )


@torch.compiler.disable
def fast_log_prob_sum(px: Any, x: Tensor) -> Tensor | None:
    """``px.log_prob(x).sum(-1)`` by the fast sums, or None where they do not apply.

    Never traced by ``torch.compile`` (``training_plan.compile``): its sums run over the
    batch's non-zeros, whose number changes with every batch, so a traced version recompiled
    for each new count until dynamo gave up (a tiny case had not finished its warm-up after
    5 minutes); left out, it runs eagerly between the compiled encoder/decoder graphs
    (``benchmarks/bench_compile.py``).

    They apply to scvi-tools' own ``NegativeBinomial``, ``ZeroInflatedNegativeBinomial`` and
    ``Poisson`` (exact types, no subclass) on CPU, for one dense floating-point (cells, genes)
    batch of finite non-negative integer counts. Anything else (other likelihoods,
    ``n_samples > 1``, other devices, counts outside the support, where scvi-tools warns or
    raises) is left to scvi-tools, so its behaviour is unchanged.
    """
    kind = type(px)
    if kind not in (NegativeBinomial, ZeroInflatedNegativeBinomial, Poisson):
        return None
    mu = px.rate if kind is Poisson else px.mu
    dense_cpu = x.device.type == "cpu" and x.layout == torch.strided and x.is_floating_point()
    if not dense_cpu or x.dim() != 2 or mu.shape != x.shape:
        return None
    nz, in_support = _batch_nonzeros(x)
    if not in_support:
        return None
    if kind is Poisson:
        return _poisson(mu, nz)
    theta = _gene_wise(px.theta, x.shape)
    if kind is NegativeBinomial:
        softmax = _softmax_of(px, mu, theta)
        if softmax is not None:
            return SoftmaxNegativeBinomial.apply(
                softmax.logits, softmax.library, theta, softmax.scale, mu, nz, px._eps
            )
        return _nb(x, mu, theta, nz, px._eps)
    return _zinb(x, mu, theta, px.zi_logits, nz, _EPS)


def _softmax_of(px: Any, mu: Tensor, theta: Tensor) -> SoftmaxLogits | None:
    """The decoder's logits behind ``px``'s mean (`FastLikelihoodVAE.generative`), where they
    are that mean's: same data, shape and dtype, a (cells, genes) softmax, gene-wise theta."""
    softmax = getattr(px, _SOFTMAX_ATTR, None)
    if not isinstance(softmax, SoftmaxLogits) or theta.dim() != 1:
        return None
    rate = softmax.rate
    same = (
        rate.shape == mu.shape
        and rate.dtype == mu.dtype
        and rate.data_ptr() == mu.data_ptr()
        and rate.stride() == mu.stride()
        and softmax.logits.shape == mu.shape
        and softmax.library.shape == (mu.shape[0], 1)
    )
    return softmax if same else None


class _SummedLogProb:
    """Stands in for ``px`` inside ``VAE.loss``: ``log_prob(x)`` returns the per-cell sums shaped
    (cells, 1), so the loss's ``.sum(-1)`` leaves them as they are; any other value goes to
    ``px`` itself."""

    def __init__(self, px: Any, x: Tensor, summed: Tensor) -> None:
        self._px, self._x, self._summed = px, x, summed

    def log_prob(self, value: Tensor) -> Tensor:
        if value is self._x:
            return self._summed.unsqueeze(-1)
        return self._px.log_prob(value)


class FastLikelihoodVAE(VAE):
    """scvi-tools' ``VAE`` whose loss takes the reconstruction term from the fast sums.

    Everything else, including the KL terms, warm-up and the ``LossOutput``, is ``VAE.loss``
    itself. No parameters, buffers or init arguments are added, so the state dict is
    ``VAE``'s and a saved model loads as a plain ``scvi.model.SCVI``. Made by
    `install_fast_likelihood`, never built directly.
    """

    def _regular_inference(
        self,
        x: Tensor,
        batch_index: Tensor,
        cont_covs: Tensor | None = None,
        cat_covs: Tensor | None = None,
        n_samples: int = 1,
    ) -> dict[str, Any]:
        """``VAE._regular_inference``; its encoder's first layer from the non-zeros where it can.

        That is (:mod:`census_scvi.train._sparse_input`): counts of one dense float32/float64
        CPU (cells, genes) batch in the likelihood's support that needs no gradient,
        ``log_variational``, the observed library size, one sample, and an encoder without
        covariates, at most `SPARSE_INPUT_MAX_DENSITY` non-zero. Otherwise ``VAE``'s own.
        """
        rows = self._sparse_encoder_input(x, n_samples)
        if rows is None:
            return super()._regular_inference(x, batch_index, cont_covs, cat_covs, n_samples)
        library = torch.log(x.sum(1)).unsqueeze(1)
        qz, z = self.z_encoder(rows, batch_index)
        return {
            MODULE_KEYS.Z_KEY: z,
            MODULE_KEYS.QZ_KEY: qz,
            MODULE_KEYS.QL_KEY: None,
            MODULE_KEYS.LIBRARY_KEY: library,
        }

    def _sparse_encoder_input(self, x: Tensor, n_samples: int) -> SparseRows | None:
        layers = getattr(self.z_encoder, "encoder", None)
        fits = (
            type(layers) is SparseFirstLayerFCLayers
            and x.dim() == 2
            and layers.fc_layers[0][0].in_features == x.shape[1]  # nothing concatenated
            and self.use_observed_lib_size
            and self.log_variational
            and n_samples == 1
            and x.device.type == "cpu"
            and x.layout == torch.strided
            and x.dtype in (torch.float32, torch.float64)  # numpy's (the kernels')
            and layers.fc_layers[0][0].weight.dtype == x.dtype
            and layers.fc_layers[0][0].weight.device.type == "cpu"  # else VAE's moves x there
            and not x.requires_grad  # the sparse layer gives no input gradient
        )
        if not fits:
            return None
        nz, in_support = _batch_nonzeros(x)
        if not in_support or nz.flat.numel() > SPARSE_INPUT_MAX_DENSITY * x.numel():
            return None
        return sparse_rows_of(x, nz)

    def generative(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``VAE.generative``, with the decoder's logits attached to a negative binomial ``px``.

        The decoder (`~census_scvi.train._decoder.NoZeroInflationDecoder`) hands them over once;
        the loss then differentiates the likelihood from them
        (:class:`~census_scvi.train._softmax_nb.SoftmaxNegativeBinomial`).
        """
        outputs: dict[str, Any] = super().generative(*args, **kwargs)
        take = getattr(self.decoder, "take_softmax_logits", None)
        softmax = take() if take is not None else None
        px = outputs.get(MODULE_KEYS.PX_KEY)
        if softmax is not None and type(px) is NegativeBinomial:
            setattr(px, _SOFTMAX_ATTR, softmax)
        return outputs

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Any],
        generative_outputs: dict[str, Any],
        kl_weight: Tensor | float = 1.0,
    ) -> Any:
        """Compute ``VAE.loss`` with the reconstruction log-likelihood summed zero-aware.

        The signature is ``VAE.loss``'s: scvi-tools' ``TrainingPlan`` reads it to decide
        whether to pass ``kl_weight`` (a ``**kwargs`` here would silently turn warm-up off).
        """
        px = generative_outputs[MODULE_KEYS.PX_KEY]
        x = tensors[REGISTRY_KEYS.X_KEY]
        summed = fast_log_prob_sum(px, x)
        if summed is not None:
            proxy = _SummedLogProb(px, x, summed)
            generative_outputs = {**generative_outputs, MODULE_KEYS.PX_KEY: proxy}
        return super().loss(tensors, inference_outputs, generative_outputs, kl_weight=kl_weight)


def install_fast_likelihood(model_or_module: Any) -> None:
    """Make an SCVI model's module compute its reconstruction loss with the fast sums.

    The module (a ``scvi.module.VAE``) becomes a `FastLikelihoodVAE` in place: same object,
    parameters, state-dict keys and saved format. For nb and poisson its stock decoder also
    becomes a `~census_scvi.train._decoder.NoZeroInflationDecoder`, which skips the unused
    zero-inflation head. Modules of other classes (``LDVAE``, custom subclasses) and
    ``gene_likelihood`` values other than nb / zinb / poisson are left as they are. Calling it
    twice is harmless.

    Parameters
    ----------
    model_or_module
        An ``scvi.model.SCVI`` with its module built, or its ``VAE`` module.

    Examples
    --------
    >>> model = scvi.model.SCVI(adata, gene_likelihood="nb")
    >>> install_fast_likelihood(model)
    >>> model.train(max_epochs=10)
    """
    module = (
        model_or_module
        if isinstance(model_or_module, torch.nn.Module)
        else getattr(model_or_module, "module", None)
    )
    if module is None:
        msg = f"{type(model_or_module).__name__} has no scvi-tools module to install into"
        raise CensusScviError(
            msg,
            hint="build the SCVI model with its AnnData (or datamodule) first",
        )
    if type(module) is FastLikelihoodVAE:
        return
    if type(module) is not VAE or module.gene_likelihood not in _SUPPORTED:
        logger.info(
            "fast likelihood not used: %s with gene_likelihood=%r keeps scvi-tools' loss",
            type(module).__name__,
            getattr(module, "gene_likelihood", None),
        )
        return
    module.__class__ = FastLikelihoodVAE
    skip_unused_dropout_head(module)
    sparse_first_layer(module.z_encoder)
