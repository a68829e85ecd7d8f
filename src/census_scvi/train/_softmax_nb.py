"""The negative-binomial log-likelihood of scVI's decoder, differentiated from its logits.

scVI's decoder ends in ``px_scale = softmax(logits)``, ``mu = exp(library) * px_scale``, and the
loss is the negative-binomial log-likelihood of the counts given ``mu`` and the gene-wise
``theta`` (:mod:`._likelihood` sums it zero-aware). Left to autograd, the backward walks that
chain one cells x genes pass per operator: the likelihood's dense term (``theta * (log(theta +
eps) - log(theta + mu + eps))``: its division, products and negation), the gradient of ``mu``
accumulated from the dense and the non-zero terms, the library product and the softmax (its
``sum(g * s)`` and product). Per cell the gradient has a closed form::

    q_g = mu_g dLL/dmu_g = -mu_g theta_g / (theta_g + mu_g + eps)        dense
          + x_g mu_g (1 / (mu_g + eps) - 1 / (theta_g + mu_g + eps))    at the non-zeros
    dLL/dlogits_g = q_g - px_scale_g * sum_h q_h,   dLL/dlibrary = sum_h q_h

and ``theta``'s gradient is two matrix-vector products over the same cells x genes terms plus
the non-zeros. :class:`SoftmaxNegativeBinomial` computes the value as :mod:`._likelihood` does
and its backward in ~5 dense passes, with ``digamma(theta)`` once per gene. At 1024 cells x
8000 genes (11.7% non-zero, n_hidden 512), the likelihood from the logits forward and backward
took 239 -> 131 ms per step in a profile (ad-hoc probe; figures: docs/benchmarks.md, "The
likelihood from the decoder's logits, and the first encoder layer on the non-zeros").

It is the same math as scvi-tools' to float rounding:
``tests/test_likelihood.py::test_softmax_nb_equals_autograd_through_scvi_tools`` compares values
and the gradients of the logits, library and theta in float64.
Import lazily (imports torch).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["SoftmaxLogits", "SoftmaxNegativeBinomial"]


class SoftmaxLogits(NamedTuple):
    """What scVI's decoder computed ``mu`` from: ``rate = exp(library) * softmax(logits)``."""

    logits: torch.Tensor  # (cells, genes), with its autograd graph
    library: torch.Tensor  # (cells, 1), log library size
    scale: torch.Tensor  # softmax(logits)
    rate: torch.Tensor  # exp(library) * scale


class SoftmaxNegativeBinomial(torch.autograd.Function):
    """Per-cell NB log-likelihood from the decoder's logits, with a closed-form backward.

    ``apply(logits, library, theta, scale, rate, nonzeros, eps)``: ``scale`` and ``rate`` are
    the decoder's own ``softmax(logits)`` and ``exp(library) * scale`` (their values are used;
    the gradient goes to ``logits``, ``library`` and the gene-wise ``theta``), ``nonzeros`` the
    counts' non-zeros (:func:`._likelihood._find_nonzeros`). Returns the (cells,) sums.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        library: torch.Tensor,
        theta: torch.Tensor,
        scale: torch.Tensor,
        rate: torch.Tensor,
        nonzeros: Any,
        eps: float,
    ) -> torch.Tensor:
        del logits, library  # their gradient comes from scale and rate
        denominator = torch.add(rate, theta + eps)  # theta + mu + eps
        log_ratio = torch.log(denominator)
        torch.sub(torch.log(theta + eps), log_ratio, out=log_ratio)
        dense = log_ratio.mv(theta)  # sum_g theta (log(theta + eps) - log(theta + mu + eps))
        nz = nonzeros
        theta_nz = theta.index_select(0, nz.gene)
        mu_nz = rate.reshape(-1).index_select(0, nz.flat)
        den_nz = denominator.reshape(-1).index_select(0, nz.flat)
        terms = (
            nz.counts * (torch.log(mu_nz + eps) - torch.log(den_nz))
            + torch.lgamma(nz.counts + theta_nz)
            - torch.lgamma(theta).index_select(0, nz.gene)
            - torch.lgamma(nz.counts + 1)
        )
        ctx.save_for_backward(theta, scale, rate, denominator, log_ratio, mu_nz, den_nz, theta_nz)
        ctx.nonzeros, ctx.eps = nz, eps
        return dense + torch.segment_reduce(terms, "sum", lengths=nz.lengths)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        theta, scale, rate, denominator, log_ratio, mu_nz, den_nz, theta_nz = ctx.saved_tensors
        nz, eps = ctx.nonzeros, ctx.eps
        ratio = torch.div(theta, denominator)  # -dLL/dmu, dense part
        grad_theta = grad @ log_ratio - grad @ ratio + grad.sum() * (theta / (theta + eps))
        grad_nz = torch.repeat_interleave(grad, nz.lengths)
        grad_theta.index_add_(
            0,
            nz.gene,
            grad_nz
            * (
                torch.digamma(nz.counts + theta_nz)
                - torch.digamma(theta).index_select(0, nz.gene)
                - nz.counts / den_nz
            ),
        )
        minus_q = ratio.mul_(rate)  # -q, dense part
        minus_q.reshape(-1).index_add_(
            0, nz.flat, mu_nz * (nz.counts / (mu_nz + eps) - nz.counts / den_nz), alpha=-1
        )
        minus_row_sum = minus_q.sum(1, keepdim=True)
        grad_cells = grad.unsqueeze(1)
        grad_logits = minus_q.addcmul_(scale, minus_row_sum, value=-1).mul_(-grad_cells)
        grad_library = -minus_row_sum * grad_cells if ctx.needs_input_grad[1] else None
        return grad_logits, grad_library, grad_theta, None, None, None, None
