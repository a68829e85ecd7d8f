"""scVI's decoder without the zero-inflation head where the likelihood has none.

scvi-tools' ``DecoderSCVI.forward`` computes ``px_dropout`` (a ``Linear(n_hidden, genes)``) for
every likelihood, but ``VAE.generative`` reads it only for ``zinb``: for ``nb`` and ``poisson``
it is one full-size matrix product per step whose result is thrown away (and that gets no
gradient). At the census-like shape (1024 cells x 8000 genes, n_hidden 512) it is 8.4 GFLOP:
63 ms on 2 cores, and one scVI step (nb, the fast loss) went from 632 to 542 ms without it
(ad-hoc probes, docs/benchmarks.md "The unused zero-inflation head"). Leaving it out changes
no value, gradient or parameter: the head's weights stay in the module (and the state dict),
untouched, as they are in scvi-tools' training.
It also keeps the logits it computed ``px_scale`` from (`NoZeroInflationDecoder.last_softmax`),
for :mod:`._softmax_nb`, which differentiates the likelihood from them; the values it returns
are computed as ``DecoderSCVI`` computes them, bit for bit.
Import lazily (imports torch and scvi-tools).
"""

from __future__ import annotations

from typing import Any

import torch
from scvi.nn import DecoderSCVI

from census_scvi.train._softmax_nb import SoftmaxLogits

__all__ = ["NoZeroInflationDecoder", "skip_unused_dropout_head"]

_WITHOUT_DROPOUT = ("nb", "poisson")


class NoZeroInflationDecoder(DecoderSCVI):
    """``DecoderSCVI`` whose forward returns ``None`` for ``px_dropout`` and skips its product.

    Made by `skip_unused_dropout_head` by switching a decoder's class in place: same object,
    parameters and state-dict keys; never built directly. With a softmax scale activation each
    forward leaves its logits in ``last_softmax`` (a `SoftmaxLogits`) for
    `~census_scvi.train._likelihood.FastLikelihoodVAE.generative` to take; ``keeps_logits =
    False`` (on the class or one decoder) turns that off.
    """

    keeps_logits = True

    def forward(
        self, dispersion: str, z: torch.Tensor, library: torch.Tensor, *cat_list: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, None]:
        """``DecoderSCVI.forward``'s computation, less ``px_dropout_decoder``."""
        px = self.px_decoder(z, *cat_list)
        linear, activation = self.px_scale_decoder  # what Sequential.forward calls, in order
        logits = linear(px)
        px_scale = activation(logits)
        px_rate = torch.exp(library) * px_scale
        px_r = self.px_r_decoder(px) if dispersion == "gene-cell" else None
        keep = (
            self.keeps_logits
            and isinstance(activation, torch.nn.Softmax)
            and activation.dim in (-1, logits.dim() - 1)
            and not torch.compiler.is_compiling()  # an attribute write would break the graph
        )
        self.last_softmax = SoftmaxLogits(logits, library, px_scale, px_rate) if keep else None
        return px_scale, px_r, px_rate, None

    def take_softmax_logits(self) -> SoftmaxLogits | None:
        """The last forward's `SoftmaxLogits` (or None), handed over once: nothing stays behind."""
        kept = self.__dict__.pop("last_softmax", None)
        return kept if isinstance(kept, SoftmaxLogits) else None


def skip_unused_dropout_head(module: Any) -> bool:
    """Switch a ``VAE``'s stock decoder to `NoZeroInflationDecoder` for ``nb`` / ``poisson``.

    Returns whether the decoder now skips the head (also when it already did). ``zinb`` (which reads the head), other likelihoods and decoders of
    any other class are left as they are.
    """
    decoder = getattr(module, "decoder", None)
    if getattr(module, "gene_likelihood", None) not in _WITHOUT_DROPOUT:
        return False
    if type(decoder) is not DecoderSCVI:
        return type(decoder) is NoZeroInflationDecoder
    decoder.__class__ = NoZeroInflationDecoder
    return True
