"""The fast likelihood: oracle against scvi-tools' own log-likelihoods, loss, gradients,
training history and saved models."""

from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import pytest
import scvi
import torch
from lightning.pytorch import Callback
from scvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from scvi.distributions._negative_binomial import log_nb_positive, log_zinb_positive
from scvi.nn import DecoderSCVI

from _autograd import graph_names
from census_scvi.errors import CensusScviError
from census_scvi.train._decoder import NoZeroInflationDecoder, skip_unused_dropout_head
from census_scvi.train._likelihood import (
    FastLikelihoodVAE,
    _find_nonzeros,
    fast_log_prob_sum,
    install_fast_likelihood,
    nb_log_likelihood,
    poisson_log_likelihood,
    zinb_log_likelihood,
)
from census_scvi.train._softmax_nb import SoftmaxNegativeBinomial

N_CELLS, N_GENES = 96, 300


def _data(dtype: torch.dtype, seed: int = 0):
    """Counts with ~80% zeros, some huge; means down to 1e-7; theta from 1e-3 to 1e6."""
    g = torch.Generator().manual_seed(seed)
    shape = (N_CELLS, N_GENES)
    keep = torch.rand(shape, generator=g) < 0.2
    x = torch.where(keep, torch.poisson(torch.full(shape, 3.0), generator=g) + 1, 0.0)
    x[0, :10] = 5000.0
    x[1] = 0.0  # a cell without counts
    x[:, 0] = 0.0  # a gene without counts
    mu = torch.exp(torch.empty(shape).uniform_(-16, 6, generator=g))
    theta = torch.exp(torch.empty(N_GENES).uniform_(-7, 14, generator=g))
    pi = torch.randn(shape, generator=g) * 3
    return [t.to(dtype) for t in (x, mu, theta, pi)]


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone().requires_grad_() for t in tensors]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype)  # not just the sum
    return list(torch.autograd.grad((out * weights).sum(), inputs))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, floor: float = 0.0) -> None:
    """Float tolerance relative to the largest magnitude (per-cell sums cancel large terms).

    ``floor``: the least absolute tolerance, for a gradient that is zero but for rounding (a
    bias just before batch norm: ~1e-17 in float64, ~1e-8 in float32, either way).
    """
    atol = max(rtol * float(b.detach().abs().max()), floor)
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


CASES = {
    "nb": (
        lambda x, mu, theta, pi: nb_log_likelihood(x, mu, theta),
        lambda x, mu, theta, pi: log_nb_positive(x, mu, theta.expand_as(mu), eps=1e-8).sum(-1),
    ),
    "zinb": (
        lambda x, mu, theta, pi: zinb_log_likelihood(x, mu, theta, pi),
        lambda x, mu, theta, pi: log_zinb_positive(x, mu, theta.expand_as(mu), pi, eps=1e-8).sum(
            -1
        ),
    ),
    "poisson": (
        lambda x, mu, theta, pi: poisson_log_likelihood(x, mu),
        lambda x, mu, theta, pi: torch.distributions.Poisson(mu).log_prob(x).sum(-1),
    ),
}


def _uses(kind: str) -> list[int]:
    """Which of (mu, theta, pi) the likelihood has gradients for."""
    return {"nb": [0, 1], "zinb": [0, 1, 2], "poisson": [0]}[kind]


def _value_and_grads(f, x: torch.Tensor, params: list[torch.Tensor], kind: str):
    leaves = _leaves(*params)
    out = f(x, *leaves)
    return [out.detach(), *_grads(out, [leaves[i] for i in _uses(kind)])]


@pytest.mark.parametrize("kind", list(CASES))
def test_values_and_gradients_equal_scvi_tools_in_float64(kind):
    fast, stock = CASES[kind]
    x, *params = _data(torch.float64)
    ours, theirs = _value_and_grads(fast, x, params, kind), _value_and_grads(stock, x, params, kind)
    for a, b in zip(ours, theirs, strict=True):
        _close(a, b, 1e-12)


@pytest.mark.parametrize("kind", list(CASES))
def test_float32_as_accurate_as_scvi_tools(kind):
    """Against the float64 value: our float32 error is at most about scvi-tools' own."""
    fast, stock = CASES[kind]
    x, *params = _data(torch.float32)
    truth = _value_and_grads(stock, x.double(), [p.double() for p in params], kind)
    ours, theirs = _value_and_grads(fast, x, params, kind), _value_and_grads(stock, x, params, kind)
    for a, b, t in zip(ours, theirs, truth, strict=True):
        our_error = float((a.double() - t).abs().max())
        their_error = float((b.double() - t).abs().max())
        assert our_error <= 1.5 * their_error + 1e-6 * float(t.abs().max())


def test_cell_wise_theta_and_expanded_views():
    x, mu, theta, pi = _data(torch.float64, seed=1)
    full = theta * torch.linspace(0.5, 2.0, N_CELLS, dtype=theta.dtype)[:, None]  # gene-batch
    for t in (full, theta[None, :], theta.expand_as(mu)):
        _close(
            nb_log_likelihood(x, mu, t),
            log_nb_positive(x, mu, t.expand_as(mu), eps=1e-8).sum(-1),
            1e-12,
        )
        _close(
            zinb_log_likelihood(x, mu, t, pi),
            log_zinb_positive(x, mu, t.expand_as(mu), pi, eps=1e-8).sum(-1),
            1e-12,
        )


def test_shapes_are_checked():
    x, mu, theta, pi = _data(torch.float32)
    with pytest.raises(CensusScviError, match="theta of shape"):
        nb_log_likelihood(x, mu, theta[:-1])
    with pytest.raises(CensusScviError, match="mu has shape"):
        nb_log_likelihood(x, mu[:-1], theta)
    with pytest.raises(CensusScviError, match="counts have 3 dimensions"):
        nb_log_likelihood(x[None], mu[None], theta)


def test_counts_outside_the_support_are_left_to_scvi_tools():
    x, mu, theta, pi = _data(torch.float32)
    nan = x.clone()
    nan[3, 3] = float("nan")
    assert fast_log_prob_sum(NegativeBinomial(mu=mu, theta=theta), nan) is None
    negative = x.clone()
    negative[3, 3] = -1.0
    assert fast_log_prob_sum(NegativeBinomial(mu=mu, theta=theta), negative) is None
    fractional = x + 0.5 * (x > 0)
    zinb = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=pi)
    assert fast_log_prob_sum(zinb, fractional) is None  # scvi-tools warns there
    assert fast_log_prob_sum(Poisson(mu), fractional) is None  # torch raises there
    assert fast_log_prob_sum(zinb, x[None]) is None  # n_samples > 1
    assert fast_log_prob_sum(torch.distributions.Normal(mu, 1.0), x) is None
    assert fast_log_prob_sum(zinb, x) is not None


# --- a real SCVI module ---------------------------------------------------------------------


def _model(gene_likelihood: str, seed: int = 0) -> scvi.model.SCVI:
    scvi.settings.seed = seed
    adata = scvi.data.synthetic_iid(batch_size=200, n_genes=120, n_batches=2)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    return scvi.model.SCVI(adata, n_hidden=32, n_latent=5, gene_likelihood=gene_likelihood)


def _loss_and_grads(model: scvi.model.SCVI, tensors: dict):
    module = model.module
    module.train()
    module.zero_grad()
    torch.manual_seed(1)
    _, _, losses = module(tensors, loss_kwargs={"kl_weight": 0.7})
    losses.loss.backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("gene_likelihood", ["nb", "zinb", "poisson"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_module_loss_and_every_gradient_unchanged(gene_likelihood, dtype, rtol):
    model = _model(gene_likelihood)
    model.module.to(dtype)
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=256)))
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    stock, stock_grads = _loss_and_grads(model, tensors)
    install_fast_likelihood(model)
    assert type(model.module) is FastLikelihoodVAE
    expected = NoZeroInflationDecoder if gene_likelihood != "zinb" else DecoderSCVI
    assert type(model.module.decoder) is expected
    fast, fast_grads = _loss_and_grads(model, tensors)
    torch.testing.assert_close(fast.loss, stock.loss, rtol=rtol / 10, atol=0)
    key = "reconstruction_loss"
    _close(fast.reconstruction_loss[key], stock.reconstruction_loss[key], rtol / 10)
    assert fast_grads.keys() == stock_grads.keys()
    assert ("px_r" in fast_grads) == (gene_likelihood != "poisson")
    rounding = 10 * torch.finfo(dtype).eps * max(float(g.abs().max()) for g in stock_grads.values())
    for name, grad in stock_grads.items():
        _close(fast_grads[name], grad, rtol, floor=rounding)


@pytest.mark.parametrize("library_grad", [False, True])
def test_softmax_nb_equals_autograd_through_scvi_tools(library_grad):
    """From the logits: softmax, library product and log_nb_positive, differentiated by autograd."""
    x, mu, theta, _ = _data(torch.float64)
    logits = torch.log(mu)  # means down to 1e-7 of each other, counts up to 5000
    library = torch.log(torch.linspace(10.0, 1e5, N_CELLS, dtype=torch.float64)).unsqueeze(1)
    stock = _leaves(logits, library, theta)
    scale = torch.softmax(stock[0], -1)
    rate = torch.exp(stock[1]) * scale
    expected = log_nb_positive(x, rate, stock[2].expand_as(rate), eps=1e-8).sum(-1)
    fused = _leaves(logits, library, theta)
    with torch.no_grad():
        scale, rate = torch.softmax(logits, -1), torch.exp(library) * torch.softmax(logits, -1)
    got = SoftmaxNegativeBinomial.apply(
        fused[0],
        fused[1] if library_grad else library,
        fused[2],
        scale,
        rate,
        _find_nonzeros(x),
        1e-8,
    )
    _close(got, expected.detach(), 1e-12)
    wanted = [0, 1, 2] if library_grad else [0, 2]
    grads = _grads(got, [fused[i] for i in wanted])
    for grad, oracle in zip(grads, _grads(expected, [stock[i] for i in wanted]), strict=True):
        _close(grad, oracle, 1e-10)


def test_module_nb_loss_goes_through_the_logits_and_leaves_nothing_behind():
    model = _model("nb")
    install_fast_likelihood(model)
    module = model.module
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=64)))
    inference, generative, losses = module(tensors, loss_kwargs={"kl_weight": 1.0})
    px = generative["px"]
    assert px.census_scvi_softmax.rate.data_ptr() == px.mu.data_ptr()
    assert "last_softmax" not in vars(module.decoder)  # handed over, not kept
    assert "SoftmaxNegativeBinomialBackward" in graph_names(losses.loss)
    copy.deepcopy(module)  # no graph left on the module


@pytest.mark.parametrize("gene_likelihood", ["nb", "poisson"])
def test_skipping_the_unused_dropout_head_changes_no_value_or_gradient(gene_likelihood):
    """Bit for bit: the same loss and gradients with the head computed and left out."""
    model = _model(gene_likelihood)
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=256)))
    install_fast_likelihood(model)
    model.module.decoder.__class__ = DecoderSCVI  # the fast loss with scvi-tools' decoder
    with_head, with_head_grads = _loss_and_grads(model, tensors)
    assert skip_unused_dropout_head(model.module)
    assert type(model.module.decoder) is NoZeroInflationDecoder
    model.module.decoder.keeps_logits = False  # the same loss path as with the stock decoder
    without, without_grads = _loss_and_grads(model, tensors)
    torch.testing.assert_close(without.loss, with_head.loss, rtol=0, atol=0)
    assert without_grads.keys() == with_head_grads.keys()
    assert not any(k.startswith("decoder.px_dropout_decoder") for k in without_grads)
    for name, grad in with_head_grads.items():
        torch.testing.assert_close(without_grads[name], grad, rtol=0, atol=0, msg=name)


def test_the_dropout_head_stays_for_zinb_and_other_decoders():
    zinb = _model("zinb")
    install_fast_likelihood(zinb)
    assert not skip_unused_dropout_head(zinb.module)
    assert type(zinb.module.decoder) is DecoderSCVI
    nb = _model("nb")

    class OwnDecoder(DecoderSCVI):
        pass

    nb.module.decoder.__class__ = OwnDecoder
    assert not skip_unused_dropout_head(nb.module)
    assert type(nb.module.decoder) is OwnDecoder


def test_unsupported_modules_keep_the_stock_loss():
    normal = _model("normal")
    install_fast_likelihood(normal)
    assert type(normal.module) is scvi.module.VAE
    model = _model("nb")
    install_fast_likelihood(model.module)
    install_fast_likelihood(model)  # twice: harmless
    assert type(model.module) is FastLikelihoodVAE
    with pytest.raises(CensusScviError, match="no scvi-tools module"):
        install_fast_likelihood(object())


class _StepLosses(Callback):
    """The training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _train(gene_likelihood: str, *, fast: bool) -> tuple[scvi.model.SCVI, list[float]]:
    model = _model(gene_likelihood)
    if fast:
        install_fast_likelihood(model)
    scvi.settings.seed = 0
    steps = _StepLosses()
    model.train(
        max_epochs=2,
        batch_size=128,
        accelerator="cpu",
        devices=1,
        check_val_every_n_epoch=1,
        plan_kwargs={"n_epochs_kl_warmup": 2},
        enable_progress_bar=False,
        callbacks=[steps],
    )
    return model, steps.losses


def test_loss_signature_is_vaes():
    """scvi-tools' TrainingPlan passes kl_weight only if the loss's signature names it."""

    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(FastLikelihoodVAE.loss) == params(scvi.module.VAE.loss)


@pytest.mark.slow
@pytest.mark.parametrize("gene_likelihood", ["nb", "zinb"])
def test_training_steps_same_and_saved_model_is_stock(gene_likelihood, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock, stock_steps = _train(gene_likelihood, fast=False)
        fast, fast_steps = _train(gene_likelihood, fast=True)
    assert len(fast_steps) == len(stock_steps) == 6  # 2 epochs of 3 steps, kl warm-up on
    np.testing.assert_allclose(fast_steps, stock_steps, rtol=1e-6)
    for key in ("elbo_train", "reconstruction_loss_train", "kl_local_train", "elbo_validation"):
        np.testing.assert_allclose(
            fast.history[key][key].to_numpy(dtype=float),
            stock.history[key][key].to_numpy(dtype=float),
            rtol=1e-6,
            err_msg=key,
        )
    fast_state, stock_state = fast.module.state_dict(), stock.module.state_dict()
    assert list(fast_state) == list(stock_state)
    for name, value in stock_state.items():
        torch.testing.assert_close(fast_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    copy.deepcopy(fast.module)  # the module still copies (and pickles) by reference
    fast.save(tmp_path / "fast", save_anndata=False)
    loaded = scvi.model.SCVI.load(tmp_path / "fast", adata=fast.adata)
    assert type(loaded.module) is scvi.module.VAE
    assert type(loaded.module.decoder) is DecoderSCVI
    loaded_state = loaded.module.state_dict()
    assert list(loaded_state) == list(stock_state)
    for name, value in fast_state.items():
        torch.testing.assert_close(loaded_state[name], value, rtol=0, atol=0, msg=name)
