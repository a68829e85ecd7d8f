"""Mapping a user's dataset: gene alignment and overlap (numpy oracles), raw-count checks,
label transfer, calibration on held-out mini-census datasets, the CLI, and real PBMC data."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from _evalmap_fixtures import held_out_query, reference_run
from census_scvi.cli import app
from census_scvi.errors import CensusScviError
from census_scvi.mapping import align_genes, gene_overlap, run_map, transfer_labels

MODEL_GENES = ["ENSG01", "ENSG02", "ENSG03", "ENSG04", "ENSG05"]


def _query(x: np.ndarray, ids: list[str | None], **kw) -> ad.AnnData:
    var = pd.DataFrame(
        {"gene_ids": np.array(ids, dtype=object)}, index=[f"SYM{i}" for i in range(len(ids))]
    )
    return ad.AnnData(X=sp.csr_matrix(x.astype(np.float32)), var=var, **kw)


# ----------------------------------------------------------------------------------------------
# gene alignment and overlap (fast, numpy oracles)
def test_align_reorders_zero_fills_drops_and_sums_duplicates():
    rng = np.random.default_rng(0)
    # query columns: ENSG03, extra gene, ENSG01.7 (versioned), no id, ENSG05, ENSG03 again
    ids = ["ENSG03", "ENSG99", "ENSG01.7", None, "ENSG05", "ENSG03"]
    x = rng.poisson(2.0, size=(7, len(ids)))
    got = align_genes(_query(x, ids), MODEL_GENES, gene_ids="gene_ids").toarray()
    oracle = np.zeros((7, 5))
    oracle[:, 0] = x[:, 2]
    oracle[:, 2] = x[:, 0] + x[:, 5]
    oracle[:, 4] = x[:, 4]
    np.testing.assert_array_equal(got, oracle)


def test_overlap_report_numbers():
    rng = np.random.default_rng(1)
    ids = ["ENSG03", "ENSG99", "ENSG01", None, "ENSG05", "ENSG98"]
    x = rng.poisson(3.0, size=(50, len(ids)))
    rep = gene_overlap(_query(x, ids), MODEL_GENES, gene_ids="gene_ids", chunk_size=16)
    assert (rep.n_found, rep.n_model_genes, rep.n_query_genes, rep.n_query_genes_used) == (
        3,
        5,
        6,
        3,
    )
    assert rep.gene_fraction == pytest.approx(0.6)
    assert rep.count_fraction == pytest.approx(x[:, [0, 2, 4]].sum() / x.sum())
    assert rep.missing_examples == ["ENSG02", "ENSG04"]
    assert rep.gene_id_source == "gene_ids"
    assert "3 / 5 model genes found (60.0%)" in rep.line()


def test_unknown_gene_id_column_lists_columns():
    with pytest.raises(
        CensusScviError, match="'ensembl' is not in the query's var; its columns: gene_ids"
    ):
        gene_overlap(_query(np.ones((2, 2)), ["ENSG01", "ENSG02"]), MODEL_GENES, gene_ids="ensembl")


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.array([[1.5, 0.0], [2.0, 1.0]]), "non-integer values"),
        (np.array([[1.0, -1.0], [2.0, 1.0]]), "negative values"),
        (np.array([[1.0, np.nan], [2.0, 1.0]]), "NaN or infinite"),
    ],
)
def test_counts_must_be_raw(values, match):
    with pytest.raises(CensusScviError, match=match):
        gene_overlap(_query(values, ["ENSG01", "ENSG02"]), MODEL_GENES, gene_ids="gene_ids")


def test_log_normalised_x_hints_at_counts_layer_and_raw():
    rng = np.random.default_rng(2)
    counts = rng.poisson(2.0, size=(20, 2)).astype(np.float32)
    lognorm = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    a = _query(lognorm, ["ENSG01", "ENSG02"])
    a.layers["counts"] = sp.csr_matrix(counts)
    with pytest.raises(CensusScviError) as e:
        gene_overlap(a, MODEL_GENES, gene_ids="gene_ids")
    assert "non-integer" in str(e.value) and "layers['counts']" in str(e.value)
    b = _query(lognorm, ["ENSG01", "ENSG02"])
    b.raw = _query(counts, ["ENSG01", "ENSG02"])
    with pytest.raises(CensusScviError, match=r"adata\.raw\.to_adata\(\)"):
        gene_overlap(b, MODEL_GENES, gene_ids="gene_ids")


# ----------------------------------------------------------------------------------------------
# label transfer (fast)
def test_transfer_labels_confidence_and_unknown():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0]])
    ref = np.concatenate([c + rng.normal(scale=1.0, size=(200, 2)) for c in centres])
    ref_labels = np.array(["A"] * 200 + ["B"] * 200)
    query = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 0.0]])
    res = transfer_labels(query, ref, ref_labels, n_neighbors=15, unknown_threshold=0.9)
    assert list(res.best[:2]) == ["A", "B"]
    assert res.confidence[0] == pytest.approx(1.0) and res.confidence[1] == pytest.approx(1.0)
    assert 0.4 < res.confidence[2] < 0.9 and res.labels[2] == "unknown"
    assert ((res.confidence >= 0) & (res.confidence <= 1)).all()
    # a neighbourhood 2/3 A, 1/3 B at equal distances gives confidence 2/3
    ref2 = np.zeros((3, 2))
    res2 = transfer_labels(np.zeros((1, 2)), ref2, ["A", "A", "B"], n_neighbors=3)
    assert res2.best[0] == "A" and res2.confidence[0] == pytest.approx(2 / 3, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# on the mini census: held-out datasets as the query (slow: trains the reference once)
@pytest.fixture(scope="module")
def reference(mini_census, tmp_path_factory) -> Path:
    return reference_run(mini_census, str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def mapped(mini_census, reference, tmp_path_factory):
    d = tmp_path_factory.mktemp("map")
    query = held_out_query(mini_census, d / "query.h5ad")
    result = run_map(query, run_dir=reference, out=d / "mapped.h5ad")
    return query, result, ad.read_h5ad(d / "mapped.h5ad")


@pytest.mark.slow
def test_held_out_datasets_map_with_calibrated_confidence(mapped):
    _, result, out = mapped
    truth = out.obs["cell_type"].astype(str).to_numpy()
    pred = out.obs["predicted_cell_type"].astype(str).to_numpy()
    conf = out.obs["predicted_cell_type_confidence"].to_numpy()
    assert ((conf >= 0) & (conf <= 1)).all()
    assert (pred[conf < 0.5] == "unknown").all() and (pred[conf >= 0.5] != "unknown").all()
    called = pred != "unknown"
    accuracy = float((pred[called] == truth[called]).mean())
    assert accuracy >= 0.9, accuracy
    assert called.mean() >= 0.85, called.mean()
    # calibration: accuracy rises with confidence (bins with >= 20 cells)
    edges = [0.0, 0.5, 0.75, 0.9, 1.01]
    bins = np.digitize(conf, edges) - 1
    acc = [
        float((pred[bins == b] == truth[bins == b]).mean())
        for b in range(len(edges) - 1)
        if (bins == b).sum() >= 20
    ]
    assert len(acc) >= 2 and all(a <= b + 0.02 for a, b in zip(acc, acc[1:], strict=False)), acc
    assert acc[-1] >= 0.95, acc
    assert result.overlap.gene_fraction == 1.0 and result.overlap.n_query_genes == 1000


@pytest.mark.slow
def test_output_file_layout(mapped, reference):
    query, result, out = mapped
    q = ad.read_h5ad(query)
    assert out.n_obs == q.n_obs and (out.obs_names == q.obs_names).all()
    assert (out.X != q.X).nnz == 0  # the user's data is kept as it was
    assert out.obsm["X_scvi"].shape == (q.n_obs, 10) and np.isfinite(out.obsm["X_scvi"]).all()
    assert isinstance(out.obs["predicted_cell_type"].dtype, pd.CategoricalDtype)
    rep = out.uns["census_scvi_map"]["overlap"]
    assert rep["n_found"] == 500 and rep["n_model_genes"] == 500
    # the reference run has no index: exact search, and uns says so
    uns = out.uns["census_scvi_map"]
    assert uns["search"] == "exact" and "no finished index" in uns["search_reason"]
    assert 0 < rep["count_fraction"] < 1
    assert result.picture is not None and result.picture.read_bytes()[:4] == b"\x89PNG"
    assert "model genes found" in result.summary()


@pytest.mark.slow
def test_latent_equals_embed_stage_latent_for_the_same_cells(mini_census, reference, tmp_path):
    """A reference cell mapped as a query gets the embedding the embed stage gave it."""
    import cellxgene_census

    latent = np.load(reference / "embed" / "latent.npy")
    idx = np.load(reference / "embed" / "latent-idx.npy")
    pick = idx[::50]
    with cellxgene_census.open_soma(uri=mini_census) as census:
        q = cellxgene_census.get_anndata(census, "homo_sapiens", obs_coords=pick)
    q.var_names = q.var["feature_id"].astype(str).to_numpy()
    q = q[np.argsort(q.obs["soma_joinid"].to_numpy())].copy()
    run_map_out = run_map(
        _write(q, tmp_path / "q.h5ad"), run_dir=reference, out=tmp_path / "o.h5ad"
    )
    z = ad.read_h5ad(run_map_out.out).obsm["X_scvi"]
    np.testing.assert_allclose(z, latent[np.searchsorted(idx, np.sort(pick))], rtol=1e-4, atol=1e-4)


def _write(a: ad.AnnData, path: Path) -> Path:
    a.write_h5ad(path)
    return path


@pytest.mark.slow
def test_refuses_low_overlap_naming_numbers_and_cause(mapped, reference, tmp_path, caplog):
    query, _, _ = mapped
    q = ad.read_h5ad(query)
    # symbols in the index: no model gene found
    sym = q.copy()
    sym.var_names = [f"GENE{i}" for i in range(sym.n_vars)]
    with pytest.raises(CensusScviError) as e:
        run_map(_write(sym, tmp_path / "sym.h5ad"), run_dir=reference, out=tmp_path / "o.h5ad")
    msg = str(e.value)
    assert "only 0 of 500 model genes (0.0%)" in msg and "map.min_overlap (30%)" in msg
    assert "gene symbols" in msg and "--gene-ids" in msg
    # mouse ids
    mouse = q.copy()
    mouse.var_names = [f"ENSMUSG{i:011d}" for i in range(mouse.n_vars)]
    with pytest.raises(CensusScviError, match="wrong organism"):
        run_map(_write(mouse, tmp_path / "mouse.h5ad"), run_dir=reference, out=tmp_path / "o.h5ad")
    assert not (tmp_path / "o.h5ad").exists()
    # half the model genes: a warning, and the mapping goes on
    model_genes = ad.read_h5ad(query).var_names  # all census genes; the model uses 500 of them
    from census_scvi.scvi_model import model_var_names

    genes = model_var_names(reference / "train" / "scvi.model")
    half = q[:, ~model_genes.isin(list(genes)[:250])].copy()
    with caplog.at_level(logging.WARNING, logger="census_scvi"):
        res = run_map(
            _write(half, tmp_path / "half.h5ad"), run_dir=reference, out=tmp_path / "h.h5ad"
        )
    assert res.overlap.n_found == 250 and res.overlap.gene_fraction == pytest.approx(0.5)
    assert any("50.0% of the model's genes" in r.getMessage() for r in caplog.records)
    # an existing output is not overwritten without force
    with pytest.raises(CensusScviError, match="already exists"):
        run_map(_write(half, tmp_path / "half.h5ad"), run_dir=reference, out=tmp_path / "h.h5ad")


@pytest.mark.slow
def test_cli_map(mapped, reference, tmp_path):
    query, _, _ = mapped
    out = tmp_path / "cli.h5ad"
    res = CliRunner().invoke(
        app,
        ["-q", "map", str(query), "--run", str(reference), "-o", str(out),
         "--set", "map.unknown_threshold=0.8"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "500 / 500 model genes found" in res.output and "predicted cell_type" in res.output
    a = ad.read_h5ad(out)
    conf = a.obs["predicted_cell_type_confidence"].to_numpy()
    assert (a.obs["predicted_cell_type"].astype(str).to_numpy()[conf < 0.8] == "unknown").all()
    res = CliRunner().invoke(app, ["map", str(query), "--run", str(tmp_path), "-o", str(out)])
    assert res.exit_code == 2 and "not a run directory" in res.output


# ----------------------------------------------------------------------------------------------
# real data: a reference census built from Zheng's sorted PBMCs, the 10x PBMC 1k as the query
T_CELLS = {"memoryt", "regulatoryt", "thelper", "cytotoxict", "naivet", "naivecytotoxic"}


@pytest.mark.slow
def test_real_pbmc_maps_onto_sorted_pbmc_reference(shared_file, tmp_path):
    from census_scvi.build import build_census
    from census_scvi.config import load_config
    from census_scvi.pipeline import run_pipeline

    zheng = shared_file("zheng_sorted_pbmc_9types.h5ad")
    pbmc = shared_file("pbmc1k_v2_10x_raw.h5ad")
    census = tmp_path / "zheng-census"
    build_census(str(census), [zheng], gene_ids="gene_ids")
    cfg = load_config(
        None,
        overrides=[
            f"census.uri={census}",
            "census.demo=null",
            "hvg.top_n_hvg=1000",
            "hvg.hvg_batch=[assay]",
            "model.n_hidden=64",
            "train.max_epochs=30",
            "train.batch_size=256",
            "train.checkpoint_every_n_epochs=1000",
            "training_plan.lr=5e-3",
            "embed.write_minified_model=false",
        ],
    )
    run_dir = tmp_path / "run"
    run_pipeline(cfg, run_dir=run_dir, to_stage="embed")

    out = tmp_path / "pbmc1k-mapped.h5ad"
    res = run_map(pbmc, run_dir=run_dir, out=out, gene_ids="gene_ids")

    # overlap oracle: the model's genes vs the query's non-missing gene_ids
    from census_scvi.scvi_model import model_var_names

    genes = model_var_names(run_dir / "train" / "scvi.model")
    q = ad.read_h5ad(pbmc)
    ids = q.var["gene_ids"]
    in_model = ids.notna().to_numpy() & ids.isin(genes).to_numpy()
    col_sums = np.asarray(q.X.sum(axis=0)).ravel()
    assert res.overlap.n_model_genes == len(genes) == 1000
    assert res.overlap.n_found == len(set(ids[in_model]))
    assert res.overlap.n_query_genes_used == int(in_model.sum())
    assert res.overlap.count_fraction == pytest.approx(col_sums[in_model].sum() / col_sums.sum())
    assert res.overlap.gene_fraction > 0.9  # the reference genes are mostly in 10x's gene list

    a = ad.read_h5ad(out)
    pred = a.obs["predicted_cell_type"].astype(str)
    group = np.where(pred.isin(T_CELLS), "T cells", pred)
    counts = pd.Series(group).value_counts()
    assert counts.index[0] == "T cells", counts
    assert counts["T cells"] / a.n_obs > 0.3, counts
    assert (res.picture is not None) and res.picture.is_file()
