"""census_scvi.counts: the raw-count and gene-id rules build-census and map share."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from census_scvi import CensusScviError
from census_scvi.counts import (
    LOG_MAX,
    check_counts,
    clean_gene_ids,
    count_problem,
    ensembl_fraction,
    ensembl_organism,
    is_ensembl_gene,
    is_versioned_ensembl,
    log_counts_hint,
    looks_like_symbols,
    nonzero_moments,
    strip_version,
    strip_versions,
)


def _counts(seed: int = 0, shape: tuple[int, int] = (40, 30)) -> np.ndarray:
    return np.random.default_rng(seed).poisson(2.0, shape).astype(np.float32)


def _lognorm(x: np.ndarray) -> np.ndarray:
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


# ------------------------------------------------------------------------------------------
# count_problem
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x",
    [
        _counts(),
        _counts().astype(np.int32),
        _counts().astype(np.float64),
        sp.csr_matrix(_counts()),
        np.zeros((0, 4), np.float32),
    ],
    ids=["float32", "int32", "float64", "csr", "empty"],
)
def test_raw_counts_pass_in_any_storage(x):
    assert count_problem(x) is None


def test_log_normalised_is_refused_as_non_integer_and_recognised():
    x = _lognorm(_counts())
    p = count_problem(sp.csr_matrix(x))
    assert p is not None and p.kind == "non-integer"
    assert p.looks_log_normalised
    nonint = x[x != np.round(x)]
    assert p.n_values == nonint.size
    assert p.value == pytest.approx(float(nonint[0]))  # the first non-integer stored value
    assert p.max == pytest.approx(float(x.max()))
    assert p.describe().startswith("non-integer values (e.g. ")
    assert f"max {float(x.max()):.4g}" in p.describe()


def test_normalised_but_not_logged_is_not_called_log_normalised():
    x = _counts() / np.maximum(_counts().sum(1, keepdims=True), 1) * 1e4  # CP10k, max >> 50
    p = count_problem(x)
    assert p is not None and p.kind == "non-integer"
    assert p.max is not None and p.max > LOG_MAX
    assert not p.looks_log_normalised


def test_negative_values_report_the_minimum():
    x = _counts()
    x[3, 4] = -2.5
    x[5, 6] = -0.5
    p = count_problem(x)
    assert p is not None and (p.kind, p.n_values, p.value) == ("negative", 2, -2.5)
    assert p.describe() == "negative values (min -2.5)"
    pi = count_problem(np.array([[1, -3], [2, 0]], dtype=np.int64))
    assert pi is not None and pi.kind == "negative" and pi.integer_dtype
    assert pi.describe() == "negative values (min -3)"


def test_non_finite_and_non_numeric():
    x = _counts()
    x[0, 0] = np.nan
    x[1, 1] = np.inf
    p = count_problem(x)
    assert p is not None and (p.kind, p.n_values) == ("non-finite", 2)
    assert p.describe() == "NaN or infinite values"
    b = count_problem(np.ones((2, 2), dtype=bool))
    assert b is not None and b.kind == "dtype" and b.describe() == "values of type bool"


def test_checks_come_in_order_nan_before_negative_before_fraction():
    x = np.array([[0.5, -1.0, np.nan]])
    assert count_problem(x).kind == "non-finite"
    assert count_problem(x[:, :2]).kind == "negative"
    assert count_problem(x[:, :1]).kind == "non-integer"


# ------------------------------------------------------------------------------------------
# check_counts (map's wording)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "match", "hint"),
    [
        (_lognorm(_counts()), r"non-integer values \(cells 0-39: [\d,]+ values, e\.g\. ", "UMI"),
        (np.array([[1.0, -1.0]]), r"negative values \(cells 0-39, min -1\)", "not scaled data"),
        (np.array([[1, -4]]), r"negative values \(cells 0-39, min -4\)", "UMI/read counts"),
        (np.array([[1.0, np.nan]]), r"has 1 NaN or infinite values \(cells 0-39\)", "UMI"),
    ],
    ids=["log-normalised", "negative-float", "negative-int", "nan"],
)
def test_check_counts_messages(x, match, hint):
    with pytest.raises(CensusScviError, match=match) as e:
        check_counts(x, where="cells 0-39", log_hint=None)
    assert hint in (e.value.hint or "")
    assert "the query's X" in str(e.value)


def test_check_counts_uses_the_log_hint_and_passes_counts():
    check_counts(sp.csr_matrix(_counts()), where="cells 0-39", log_hint="elsewhere")
    with pytest.raises(CensusScviError) as e:
        check_counts(_lognorm(_counts()), where="cells 0-39", log_hint="raw is in .raw")
    assert e.value.hint == "raw is in .raw"


def test_log_counts_hint_names_the_layer_or_raw():
    x = _lognorm(_counts())
    a = ad.AnnData(X=x)
    assert log_counts_hint(a) is None
    a.layers["counts"] = _counts()
    assert "layers['counts']" in (log_counts_hint(a) or "")
    b = ad.AnnData(X=x)
    b.raw = ad.AnnData(X=_counts())
    assert "adata.raw.to_adata()" in (log_counts_hint(b) or "")


def test_nonzero_moments_match_numpy():
    x = _counts(3, (50, 20)).astype(np.float64)
    x[0] = 0  # no non-zero
    x[1, :] = 0
    x[1, 3] = 7  # one non-zero: variance 0
    nz = x != 0
    mean, var = nonzero_moments(nz.sum(1), x.sum(1), (x**2).sum(1))
    rows = [r[r != 0] for r in x]
    oracle_mean = [v.mean() if v.size else 0.0 for v in rows]
    oracle_var = [v.var(ddof=1) if v.size > 1 else 0.0 for v in rows]
    np.testing.assert_allclose(mean, oracle_mean, rtol=1e-12)
    np.testing.assert_allclose(var, oracle_var, rtol=1e-9, atol=1e-12)
    assert mean[0] == var[0] == var[1] == 0.0 and mean[1] == 7.0


# ------------------------------------------------------------------------------------------
# gene ids
# ------------------------------------------------------------------------------------------
def test_clean_gene_ids_strips_and_maps_missing_to_none():
    values = [" ENSG00000141510 ", None, np.nan, pd.NA, "", "nan", "None", "NA", "<NA>", "TP53"]
    assert clean_gene_ids(values).tolist() == [
        "ENSG00000141510",
        *[None] * 8,
        "TP53",
    ]


def test_versioned_ensembl_ids_are_normalised():
    ids = ["ENSG00000141510.17", "ENSMUSG00000059552.3", "ENSG00000141510", "TP53", None, "A.1"]
    out, n = strip_versions(ids)
    assert out.tolist() == [
        "ENSG00000141510",
        "ENSMUSG00000059552",
        "ENSG00000141510",
        "TP53",
        None,
        "A.1",
    ]
    assert n == 2
    assert strip_version("ENSG01.7") == "ENSG01"  # short test ids too (map's tests use them)
    assert is_versioned_ensembl("ENSG00000141510.17")
    assert not is_versioned_ensembl("ENSG00000141510")
    assert not is_versioned_ensembl("RP11-34P13.7")  # a clone-based symbol, not Ensembl


def test_symbols_are_detected():
    symbols = ["TP53", "CD3E", "MS4A1", "ENSG00000141510"]
    ensembl = ["ENSG00000141510", "ENSG00000198851.9", "ENSMUSG00000059552", "TP53"]
    assert looks_like_symbols(symbols)
    assert not looks_like_symbols(ensembl)
    assert not looks_like_symbols([None, None])  # no ids at all: nothing to call symbols
    assert ensembl_fraction(ensembl) == pytest.approx(0.75)
    assert is_ensembl_gene("ENSG00000141510") and not is_ensembl_gene("ENSA")


def test_build_and_map_read_the_same_ids():
    """One rule: build-census's var ids and map's query ids agree on the same var."""
    from pathlib import Path

    from census_scvi.build._genes import read_gene_ids
    from census_scvi.mapping._genes import query_gene_ids

    raw = ["ENSG00000000001.4", " ENSG00000000002", "nan", "", "ENSG00000000003", "NA"]
    var = pd.DataFrame({"ids": raw}, index=[f"g{i}" for i in range(len(raw))])
    genes = read_gene_ids(var, Path("x.h5ad"), "ids", var)
    query = query_gene_ids(ad.AnnData(X=np.zeros((1, len(raw))), var=var), "ids")
    present = [strip_version(q) for q in query if q is not None]
    assert genes.ids.tolist() == present == [f"ENSG0000000000{i}" for i in (1, 2, 3)]
    assert genes.keep.tolist() == [i for i, q in enumerate(query) if q is not None]
    assert genes.n_missing == 3 and genes.n_unversioned == 1 and not genes.symbol_keyed


def test_ensembl_organism_by_gene_id_prefix():
    human = [f"ENSG{i:011d}" for i in range(8)]
    mouse = [f"ENSMUSG{i:011d}" for i in range(8)]
    assert ensembl_organism(human) == ("homo_sapiens", 1.0)
    assert ensembl_organism(mouse + human[:2] + ["TP53", None]) == ("mus_musculus", 0.8)
    assert ensembl_organism(["ENSMMUG00000000001"]) == ("macaca_mulatta", 1.0)
    assert ensembl_organism(["TP53", "CD3E"]) == (None, 0.0)
    assert ensembl_organism(["ENSDARG00000000001"]) == (None, 0.0)  # zebrafish: not in the Census
