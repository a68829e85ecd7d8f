"""The encoder's first layer from the counts' non-zeros against the dense layer scvi-tools runs."""

from __future__ import annotations

import pytest
import scvi
import torch
from scvi.nn import FCLayers

from _autograd import graph_names
from census_scvi.train import _likelihood
from census_scvi.train._likelihood import _find_nonzeros, install_fast_likelihood
from census_scvi.train._sparse_input import (
    SparseFirstLayerFCLayers,
    sparse_first_layer,
    sparse_linear,
    sparse_rows_of,
)


def _counts(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    keep = torch.rand((70, 130), generator=g) < 0.15
    x = torch.where(keep, torch.poisson(torch.full((70, 130), 4.0), generator=g) + 1, 0.0)
    x[3] = 0.0  # a cell without counts
    x[:, 7] = 0.0  # a gene without counts
    x[5, :] = 2.0  # a dense cell
    return x.to(dtype)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_the_dense_layer_on_log1p(dtype, rtol, bias):
    x = _counts(dtype)
    layer = torch.nn.Linear(x.shape[1], 33, bias=bias).to(dtype)
    weights = torch.linspace(-1.0, 2.0, 70 * 33, dtype=dtype).reshape(70, 33)  # upstream grad
    dense = layer(torch.log1p(x))
    expected = list(torch.autograd.grad((dense * weights).sum(), list(layer.parameters())))
    got = sparse_linear(layer, sparse_rows_of(x, _find_nonzeros(x)))
    scale = float(dense.detach().abs().max())
    torch.testing.assert_close(got, dense.detach(), rtol=0, atol=rtol * scale)
    grads = torch.autograd.grad((got * weights).sum(), list(layer.parameters()))
    for grad, oracle in zip(grads, expected, strict=True):
        assert grad.shape == oracle.shape
        assert grad.is_contiguous()
        torch.testing.assert_close(grad, oracle, rtol=0, atol=rtol * float(oracle.abs().max()))


@pytest.fixture
def any_density(monkeypatch):
    """Sparse input for any density: scvi-tools' synthetic counts are ~69% non-zero."""
    monkeypatch.setattr(_likelihood, "SPARSE_INPUT_MAX_DENSITY", 1.0)


def _model(**kwargs) -> scvi.model.SCVI:
    scvi.settings.seed = 0
    adata = scvi.data.synthetic_iid(batch_size=100, n_genes=80, n_batches=2)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    return scvi.model.SCVI(adata, n_hidden=16, n_latent=4, n_layers=2, **kwargs)


@pytest.mark.filterwarnings("ignore:The value argument must be within the support")
def test_the_module_uses_it_for_counts_and_the_dense_layer_otherwise(any_density):
    model = _model()
    install_fast_likelihood(model)
    assert type(model.module.z_encoder.encoder) is SparseFirstLayerFCLayers
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=64)))
    _, _, losses = model.module(tensors, loss_kwargs={"kl_weight": 1.0})
    assert "_SparseLinearBackward" in graph_names(losses.loss)
    tensors["X"] = tensors["X"] + 0.5  # not counts: scvi-tools' own path, dense log1p
    _, _, losses = model.module(tensors, loss_kwargs={"kl_weight": 1.0})
    assert "_SparseLinearBackward" not in graph_names(losses.loss)
    assert torch.isfinite(losses.loss)


def test_an_encoder_with_covariates_keeps_its_dense_layer():
    model = _model(encode_covariates=True)
    assert not sparse_first_layer(model.module.z_encoder)
    assert type(model.module.z_encoder.encoder) is FCLayers
    install_fast_likelihood(model)
    assert type(model.module.z_encoder.encoder) is FCLayers
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=64)))
    _, _, losses = model.module(tensors, loss_kwargs={"kl_weight": 1.0})
    assert "_SparseLinearBackward" not in graph_names(losses.loss)


def _loss(model: scvi.model.SCVI, tensors: dict) -> torch.Tensor:
    torch.manual_seed(1)  # the same latent sample
    return model.module(tensors, loss_kwargs={"kl_weight": 1.0})[2].loss


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_validation_modes_and_edited_counts(mode, any_density):
    """Lightning validates under inference_mode; counts edited in place are looked at anew."""
    model = _model()
    install_fast_likelihood(model)
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=64)))
    model.module.eval()
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        fast = _loss(model, tensors)
        model.module.z_encoder.encoder.__class__ = FCLayers
        dense = _loss(model, tensors)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=0)
    model.module.z_encoder.encoder.__class__ = SparseFirstLayerFCLayers
    x = tensors["X"]
    with torch.no_grad():
        before = _loss(model, tensors)
        x[:, :10] = 0.0  # same tensor, new counts
        after = _loss(model, tensors)
        model.module.z_encoder.encoder.__class__ = FCLayers
        oracle = _loss(model, tensors)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, oracle, rtol=1e-5, atol=0)


def test_dense_batches_keep_the_dense_layer():
    """Above SPARSE_INPUT_MAX_DENSITY the dense product is the faster one."""
    model = _model()
    install_fast_likelihood(model)
    tensors = next(iter(model._make_data_loader(model.adata, batch_size=64)))
    density = float((tensors["X"] > 0).float().mean())
    assert density > _likelihood.SPARSE_INPUT_MAX_DENSITY
    _, _, losses = model.module(tensors, loss_kwargs={"kl_weight": 1.0})
    assert "_SparseLinearBackward" not in graph_names(losses.loss)
    sparse = tensors["X"] * (
        torch.rand(tensors["X"].shape, generator=torch.Generator().manual_seed(0)) < 0.1
    )
    _, _, losses = model.module({**tensors, "X": sparse}, loss_kwargs={"kl_weight": 1.0})
    assert "_SparseLinearBackward" in graph_names(losses.loss)
