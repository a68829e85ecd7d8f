"""Streaming Seurat v3 against scanpy's in-memory implementation (the oracle)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from census_scvi.errors import CensusScviError
from census_scvi.prepare._hvg import seurat_v3_from_chunks

COLUMNS = [
    "means",
    "variances",
    "variances_norm",
    "highly_variable_rank",
    "highly_variable_nbatches",
    "highly_variable",
]


def _counts(n=1500, g=300, n_batches=3, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.5, 2.0, size=g)
    batch = rng.integers(0, n_batches, n)
    effect = rng.lognormal(0.0, 0.5, (n_batches, g))
    x = rng.negative_binomial(2, 2 / (2 + mu * effect[batch])).astype(np.float32)
    return x, batch


def _ours(x, batch, n_top, *, chunk=5000, n_batches=None, **kw):
    coo = sp.coo_matrix(x)
    n_batches = int(batch.max()) + 1 if n_batches is None else n_batches

    def read(_pass):
        for s in range(0, coo.nnz, chunk):
            sl = slice(s, s + chunk)
            yield batch[coo.row[sl]], coo.col[sl], coo.data[sl]

    return seurat_v3_from_chunks(
        read,
        n_cells=np.bincount(batch, minlength=n_batches),
        n_genes=x.shape[1],
        n_top_genes=n_top,
        **kw,
    )


def _scanpy(x, batch, n_top):
    a = ad.AnnData(sp.csr_matrix(x))
    a.obs["b"] = pd.Categorical(batch.astype(str))
    return sc.pp.highly_variable_genes(
        a, flavor="seurat_v3", n_top_genes=n_top, batch_key="b", inplace=False
    )


def _assert_same(ours, ref):
    for c in COLUMNS:
        np.testing.assert_allclose(
            ours[c].to_numpy().astype(float),
            ref[c].to_numpy().astype(float),
            rtol=1e-6,
            atol=1e-12,
            equal_nan=True,
            err_msg=c,
        )


@pytest.mark.parametrize("chunk", [997, 10**9])
def test_matches_scanpy_seurat_v3(chunk):
    x, batch = _counts()
    ours = _ours(x, batch, 100, chunk=chunk)
    _assert_same(ours, _scanpy(x, batch, 100))
    assert ours["highly_variable"].sum() == 100
    # rank orders the genes as the selection does: the top 100 ranks are the HVGs
    assert set(np.flatnonzero(ours["rank"] < 100)) == set(np.flatnonzero(ours["highly_variable"]))


def test_single_batch_matches_scanpy():
    x, _ = _counts(n=600, g=200, n_batches=1)
    batch = np.zeros(len(x), dtype=int)
    ours = _ours(x, batch, 50)
    a = ad.AnnData(sp.csr_matrix(x))
    ref = sc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=50, inplace=False)
    for c in ["means", "variances", "variances_norm", "highly_variable"]:
        np.testing.assert_allclose(ours[c].astype(float), ref[c].astype(float), rtol=1e-6)


def test_gene_constant_in_a_batch_matches_scanpy():
    x, batch = _counts()
    x[batch == 0, 5] = 3.0  # constant, non-zero
    x[batch == 1, 7] = 0.0  # constant zero
    ours = _ours(x, batch, 100)
    _assert_same(ours, _scanpy(x, batch, 100))


def test_single_cell_batch_is_left_out_with_a_warning(caplog):
    x, batch = _counts(n_batches=2)
    batch = batch.copy()
    batch[0] = 2  # batch 2 has one cell
    with caplog.at_level(logging.WARNING):
        ours = _ours(x, batch, 100, batch_names=["b0", "b1", "lonely"])
    assert "HVG batch 'lonely' has a single cell" in caplog.text
    keep = batch != 2
    ref = _scanpy(x[keep], batch[keep], 100)  # scanpy itself fails on a one-cell batch
    assert ours["highly_variable"].tolist() == ref["highly_variable"].tolist()
    np.testing.assert_allclose(ours["variances_norm"], ref["variances_norm"], rtol=1e-6)


def test_all_batches_degenerate_fails_clearly():
    x, _ = _counts(n=3, g=20)
    with pytest.raises(CensusScviError, match="no HVG batch has two or more cells"):
        _ours(x, np.array([0, 1, 2]), 5)


def test_loess_failure_is_retried_with_jitter(monkeypatch, caplog):
    import skmisc.loess

    real = skmisc.loess.loess
    calls = {"n": 0}

    def flaky(x, y, **kw):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ValueError("b'reciprocal condition number  2.0467e-15\\n'")
        return real(x, y, **kw)

    monkeypatch.setattr(skmisc.loess, "loess", flaky)
    x, batch = _counts()
    with caplog.at_level(logging.INFO, logger="census_scvi"):
        ours = _ours(x, batch, 100)
    assert calls["n"] == 3 + 2  # 2 failures then 3 batches fitted
    assert "retrying with jitter" in caplog.text
    monkeypatch.setattr(skmisc.loess, "loess", real)
    ref = _scanpy(x, batch, 100)
    # jitter of 1e-17 on log10 means changes nothing visible
    assert ours["highly_variable"].tolist() == ref["highly_variable"].tolist()


def test_loess_failure_that_persists_names_the_batch(monkeypatch):
    import skmisc.loess

    def broken(x, y, **kw):
        raise ValueError("There are other near singularities as well")

    monkeypatch.setattr(skmisc.loess, "loess", broken)
    x, batch = _counts()
    with pytest.raises(CensusScviError, match="LOESS fit failed for HVG batch 'b0'"):
        _ours(x, batch, 100, batch_names=["b0", "b1", "b2"])


def test_more_top_genes_than_genes_flags_every_gene():
    x, batch = _counts(g=50)
    ours = _ours(x, batch, 80)
    assert ours["highly_variable"].all()
    assert sorted(ours["rank"]) == list(range(50))
