"""Fast checks of map's pieces: --truth scores against numpy/scikit-learn oracles, duplicated gene
ids summed and said, and the reference labels read as codes (equal to reading them as strings)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp

from census_scvi.config import MapConfig
from census_scvi.errors import CensusScviError
from census_scvi.knn import TransferResult
from census_scvi.mapping import encode_query, gene_overlap
from census_scvi.mapping._reference import _batch_codes, label_codes
from census_scvi.mapping._stage import MapResult, _checked_overlap
from census_scvi.mapping._truth import check_truth_column, query_obs_columns, score_truth

MODEL_GENES = ["ENSG01", "ENSG02", "ENSG03", "ENSG04"]


def _result(best: list[str], conf: list[float], threshold: float = 0.5) -> TransferResult:
    b = np.array(best, dtype=object)
    c = np.array(conf, dtype=np.float32)
    return TransferResult(labels=np.where(c >= threshold, b, "unknown"), best=b, confidence=c)


def test_score_truth_against_oracles(tmp_path):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    n = 400
    truth = rng.choice(["A", "B", "C"], size=n)
    best = np.where(rng.random(n) < 0.8, truth, rng.choice(["A", "B", "C", "D"], size=n))
    conf = rng.random(n).astype(np.float32)
    conf[:3] = [0.0, 0.5, 1.0]  # the edges
    res = _result(list(best), list(conf))
    obs = pd.DataFrame({"t": pd.Categorical(truth)}, index=[str(i) for i in range(n)])
    obs.loc[obs.index[-10:], "t"] = np.nan  # missing truth: not scored
    a = ad.AnnData(obs=obs)
    s = score_truth(a, "t", res, ["A", "B", "D"], unknown_label="unknown")
    keep = slice(0, n - 10)
    t, p, bst, c = truth[keep], res.labels[keep].astype(str), best[keep], conf[keep]
    assert s.n_cells == n and s.n_scored == n - 10
    assert s.accuracy == pytest.approx((p == t).mean())
    called = p != "unknown"
    assert s.fraction_called == pytest.approx(called.mean())
    assert s.accuracy_called == pytest.approx((p[called] == t[called]).mean())
    f1 = f1_score(t, p, labels=["A", "B", "C"], average="macro", zero_division=0)
    assert s.macro_f1 == pytest.approx(f1)
    # confusion: rows truth, columns predicted, counts
    want = pd.crosstab(t, p)
    np.testing.assert_array_equal(s.confusion.loc[want.index, want.columns].to_numpy(), want)
    # confidence bins: [0, .5) [.5, .75) [.75, .9) [.9, 1]
    bins = s.confidence_bins
    assert list(bins["bin"]) == ["[0.00, 0.50)", "[0.50, 0.75)", "[0.75, 0.90)", "[0.90, 1.00]"]
    for (lo, hi), row in zip(
        [(0, 0.5), (0.5, 0.75), (0.75, 0.9), (0.9, 1.01)], bins.itertuples(), strict=True
    ):
        inside = (c >= lo) & (c < hi)
        assert row.n_cells == inside.sum()
        assert row.accuracy == pytest.approx((bst[inside] == t[inside]).mean())
    # labels no reference cell has (C) are counted and named
    assert s.n_cells_label_not_in_reference == (t == "C").sum()
    assert s.examples_not_in_reference == ["C"]
    lines = "\n".join(s.lines())
    assert "against t (390 cells)" in lines and "have a t no reference cell has (e.g. 'C')" in lines
    # h5ad-writable
    a.uns["truth"] = s.to_uns()
    a.write_h5ad(tmp_path / "t.h5ad")


def test_truth_column_checked_from_the_h5ad_header(tmp_path):
    a = ad.AnnData(
        X=sp.csr_matrix(np.ones((3, 2), dtype=np.float32)),
        obs=pd.DataFrame({"cell_type": ["a", "b", "c"], "donor": ["d"] * 3}, index=list("xyz")),
    )
    a.write_h5ad(tmp_path / "q.h5ad")
    cols = query_obs_columns(tmp_path / "q.h5ad")
    assert cols == ["cell_type", "donor"]
    check_truth_column(cols, "donor", query=tmp_path / "q.h5ad")
    with pytest.raises(
        CensusScviError, match="'truth' is not in q.h5ad's obs; valid: cell_type, donor"
    ):
        check_truth_column(cols, "truth", query=tmp_path / "q.h5ad")
    assert query_obs_columns(tmp_path / "missing.h5ad") is None  # then checked after reading


def test_all_missing_truth_is_an_error():
    a = ad.AnnData(obs=pd.DataFrame({"t": [np.nan, np.nan]}, index=["a", "b"]))
    with pytest.raises(CensusScviError, match="has no values"):
        score_truth(a, "t", _result(["A", "A"], [1, 1]), ["A"], unknown_label="unknown")


def _query(x: np.ndarray, ids: list[str]) -> ad.AnnData:
    var = pd.DataFrame({"gene_ids": ids}, index=[f"SYM{i}" for i in range(len(ids))])
    return ad.AnnData(X=sp.csr_matrix(x.astype(np.float32)), var=var)


def test_duplicated_gene_ids_are_summed_and_said(caplog):
    """Issue 12 item 12: two columns with one id (here also once the Ensembl version is dropped)
    become one model gene holding their sum; the log and the summary say so."""
    rng = np.random.default_rng(1)
    ids = ["ENSG01", "ENSG02.3", "ENSG02.4", "ENSG03", "ENSG01"]
    x = rng.poisson(2.0, size=(6, len(ids)))
    a = _query(x, ids)
    with caplog.at_level(logging.WARNING, logger="census_scvi"):
        rep = _checked_overlap(MapConfig(), a, MODEL_GENES, "gene_ids")
    assert rep.n_duplicate_ids == 2
    msgs = [r.getMessage() for r in caplog.records]
    line = next(m for m in msgs if "repeat the gene id" in m)
    assert "2 query column(s)" in line and "2 model gene(s), e.g. 'ENSG01' from 2 columns" in line
    assert "summed" in line
    res = MapResult(out=None, picture=None, overlap=rep, label_key="cell_type")  # type: ignore[arg-type]
    assert "2 query column(s) repeat another's gene id; their counts are summed" in res.summary()
    # the overlap of an already-summed query is the same as of the original
    summed = np.stack([x[:, 0] + x[:, 4], x[:, 1] + x[:, 2], x[:, 3]], axis=1)
    rep2 = gene_overlap(
        _query(summed, ["ENSG01", "ENSG02", "ENSG03"]), MODEL_GENES, gene_ids="gene_ids"
    )
    assert (rep2.n_found, rep2.count_fraction) == (rep.n_found, pytest.approx(rep.count_fraction))


@pytest.mark.slow
def test_duplicated_columns_encode_as_their_sum(tmp_path):
    """The latent of a query with a gene split over two columns equals that of the summed query."""
    import scvi

    scvi.settings.seed = 0
    data = scvi.data.synthetic_iid(batch_size=40, n_genes=30, n_batches=1)
    data.var_names = [f"ENSG{i:02d}" for i in range(30)]
    scvi.model.SCVI.setup_anndata(data)
    model = scvi.model.SCVI(data, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    model.save(str(tmp_path / "m"), overwrite=True)
    x = np.asarray(data.X.toarray() if sp.issparse(data.X) else data.X)
    half = np.floor(x[:, :1] / 2)
    split = np.concatenate([x[:, :1] - half, x[:, 1:], half], axis=1)
    ids = [*data.var_names, "ENSG00"]
    z_split = encode_query(
        _query(split, ids), tmp_path / "m", gene_ids="gene_ids", accelerator="cpu"
    )
    z = encode_query(
        _query(x, list(data.var_names)), tmp_path / "m", gene_ids="gene_ids", accelerator="cpu"
    )
    np.testing.assert_allclose(z_split, z, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
def test_label_codes_equal_string_labels(mini_census):
    """The reference labels read as codes per Arrow batch equal reading obs as strings."""
    import cellxgene_census

    from census_scvi.soma import read_obs

    with cellxgene_census.open_soma(uri=mini_census) as census:
        exp = census["census_data"]["homo_sapiens"]
        joinids = np.arange(0, 3000, 3, dtype=np.int64)
        codes, classes = label_codes(exp, joinids, "cell_type")
        strings = read_obs(exp, joinids, ["cell_type"])["cell_type"].astype(str).to_numpy()
        np.testing.assert_array_equal(classes[codes], strings)
        assert codes.dtype == np.int32
        with pytest.raises(CensusScviError, match="3 embedded soma_joinids are not in"):
            label_codes(exp, np.array([1, 2, 10_000, 10_001, 10_002]), "cell_type")


def test_batch_codes_strings_dictionaries_and_nulls():
    lookup: dict[str, int] = {}
    a = _batch_codes(pa.chunked_array([pa.array(["x", None, "y", "x"])]), lookup)
    d = pa.DictionaryArray.from_arrays(pa.array([1, 0, None], type=pa.int8()), pa.array(["y", "z"]))
    b = _batch_codes(pa.chunked_array([d]), lookup)
    classes = np.array(list(lookup), dtype=object)
    assert list(classes[a]) == ["x", "nan", "y", "x"]
    assert list(classes[b]) == ["z", "y", "nan"]
