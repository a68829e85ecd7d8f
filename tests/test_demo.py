"""The mini census: Census layout and schema, statistics equal to X, real structure, determinism."""

from __future__ import annotations

import cellxgene_census
import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import tiledbsoma as soma
from typer.testing import CliRunner

from census_scvi import CensusScviError, load_config
from census_scvi.cli import app
from census_scvi.demo import make_mini_census
from census_scvi.soma import get_experiment, open_census

OBS_STRING = [
    "dataset_id", "assay", "assay_ontology_term_id", "cell_type", "cell_type_ontology_term_id",
    "development_stage", "disease", "donor_id", "observation_joinid", "self_reported_ethnicity",
    "sex", "suspension_type", "tissue", "tissue_general", "tissue_type",
]  # fmt: skip
OBS_TYPES = {
    "soma_joinid": pa.int64(),
    "is_primary_data": pa.bool_(),
    "raw_sum": pa.float32(),
    "nnz": pa.int64(),
    "raw_mean_nnz": pa.float32(),
    "raw_variance_nnz": pa.float32(),
    "n_measured_vars": pa.int64(),
}
VAR_TYPES = {
    "soma_joinid": pa.int64(),
    "feature_length": pa.int64(),
    "nnz": pa.int64(),
    "n_measured_obs": pa.int64(),
}


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _read_x(exp) -> sp.csr_matrix:
    x = exp.ms["RNA"].X["raw"]
    tbl = x.read().tables().concat()
    n_obs, n_var = x.shape
    return sp.csr_matrix(
        (
            tbl["soma_data"].to_numpy(),
            (tbl["soma_dim_0"].to_numpy(), tbl["soma_dim_1"].to_numpy()),
        ),
        shape=(n_obs, n_var),
    )


def test_get_anndata_returns_exactly_the_reported_model_cells(mini_census, mini_census_result):
    with cellxgene_census.open_soma(uri=mini_census) as census:
        adata = cellxgene_census.get_anndata(
            census, "Homo sapiens", obs_value_filter="is_primary_data == True and nnz >= 300"
        )
    expected = mini_census_result.organisms["homo_sapiens"].model_cells
    np.testing.assert_array_equal(np.sort(adata.obs["soma_joinid"].to_numpy()), expected)
    assert 0 < len(expected) < mini_census_result.organisms["homo_sapiens"].n_cells


def test_layout_and_schema_types(mini_census):
    with cellxgene_census.open_soma(uri=mini_census) as census:
        assert set(census["census_info"].keys()) >= {"summary", "datasets", "summary_cell_counts"}
        assert set(census["census_data"].keys()) == {"homo_sapiens", "mus_musculus"}
        for org in ("homo_sapiens", "mus_musculus"):
            exp = census["census_data"][org]
            assert exp.ms["RNA"].X["raw"].schema.field("soma_data").type == pa.float32()
            obs_schema = exp.obs.schema
            for col in OBS_STRING:
                assert _is_string(obs_schema.field(col).type), (org, col)
            for col, t in OBS_TYPES.items():
                assert obs_schema.field(col).type == t, (org, col)
            var_schema = exp.ms["RNA"].var.schema
            for col in ("feature_id", "feature_name"):
                assert _is_string(var_schema.field(col).type)
            for col, t in VAR_TYPES.items():
                assert var_schema.field(col).type == t, (org, col)
        summary = census["census_info"]["summary"].read().concat().to_pandas()
        assert {"census_schema_version", "total_cell_count"} <= set(summary["label"])


def test_categories_read_back(mini_census):
    """tiledbsoma 2.3.0 pitfall: enumeration columns written through the wrong handle read empty."""
    with cellxgene_census.open_soma(uri=mini_census) as census:
        obs = census["census_data"]["homo_sapiens"].obs.read().concat().to_pandas()
    assert obs["cell_type"].dtype == "category"
    assert obs["cell_type"].nunique() == 10
    assert obs["dataset_id"].notna().all()
    assert set(obs["assay"].cat.categories) == {"10x 3' v2", "10x 3' v3", "10x 5' v1", "Smart-seq2"}


@pytest.mark.parametrize("organism", ["homo_sapiens", "mus_musculus"])
def test_computed_columns_equal_values_from_x(mini_census, organism):
    with cellxgene_census.open_soma(uri=mini_census) as census:
        exp = census["census_data"][organism]
        obs = exp.obs.read().concat().to_pandas().set_index("soma_joinid").sort_index()
        var = exp.ms["RNA"].var.read().concat().to_pandas().set_index("soma_joinid").sort_index()
        X = _read_x(exp)
    dense = X.toarray().astype(np.float64)
    nnz = (dense > 0).sum(axis=1)
    np.testing.assert_array_equal(obs["nnz"].to_numpy(), nnz)
    np.testing.assert_allclose(obs["raw_sum"].to_numpy(), dense.sum(axis=1), rtol=1e-6)
    masked = np.where(dense > 0, dense, np.nan)
    with np.errstate(all="ignore"):
        mean = np.nanmean(masked, axis=1)
        var_ = np.nanvar(masked, axis=1, ddof=1)
    np.testing.assert_allclose(obs["raw_mean_nnz"].to_numpy(), np.nan_to_num(mean), rtol=1e-5)
    np.testing.assert_allclose(
        obs["raw_variance_nnz"].to_numpy(), np.nan_to_num(var_), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_array_equal(var["nnz"].to_numpy(), (dense > 0).sum(axis=0))
    # n_measured_obs: cells of datasets that measure the gene; each cell measures n_measured_vars
    assert (var["n_measured_obs"] <= len(obs)).all()
    assert (var["n_measured_obs"] >= var["nnz"]).all()
    assert var["n_measured_obs"].sum() == obs["n_measured_vars"].sum()
    assert (obs["n_measured_vars"] <= len(var)).all()
    assert (obs["n_measured_vars"] >= obs["nnz"]).all()


def test_design_features(mini_census):
    with cellxgene_census.open_soma(uri=mini_census) as census:
        obs = census["census_data"]["homo_sapiens"].obs.read().concat().to_pandas()
        X = _read_x(census["census_data"]["homo_sapiens"])
    primary = obs[obs["is_primary_data"]]
    assert primary["dataset_id"].nunique() >= 6
    assert primary["assay"].nunique() == 4
    assert set(primary["suspension_type"]) == {"cell", "nucleus"}
    assert primary["donor_id"].nunique() > primary["dataset_id"].nunique()
    frac_dup = 1 - obs["is_primary_data"].mean()
    assert 0.07 < frac_dup < 0.13
    assert 0.005 < (obs["nnz"] < 300).mean() < 0.08
    # non-primary cells duplicate a primary cell of another dataset: same counts, same joinid key
    dups = obs[~obs["is_primary_data"]]
    by_key = primary.set_index("observation_joinid")
    for _, row in dups.head(20).iterrows():
        src = by_key.loc[row["observation_joinid"]]
        assert src["dataset_id"] != row["dataset_id"]
        assert (X[int(row["soma_joinid"])] != X[int(src["soma_joinid"])]).nnz == 0
    # composition differs between datasets
    comp = primary.groupby("dataset_id", observed=True)["cell_type"].value_counts(normalize=True)
    spread = comp.unstack().fillna(0).std(axis=0)
    assert spread.max() > 0.05


def test_structure_cell_types_separate_and_batches_are_visible(mini_census):
    import scanpy as sc
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    with cellxgene_census.open_soma(uri=mini_census) as census:
        adata = cellxgene_census.get_anndata(
            census, "Homo sapiens", obs_value_filter="is_primary_data == True and nnz >= 300"
        )
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=30, random_state=0)
    knn = KNeighborsClassifier(n_neighbors=15)
    acc_type = cross_val_score(knn, adata.obsm["X_pca"], adata.obs["cell_type"], cv=3).mean()
    acc_ds = cross_val_score(knn, adata.obsm["X_pca"], adata.obs["dataset_id"], cv=3).mean()
    chance_ds = adata.obs["dataset_id"].value_counts(normalize=True).max()
    assert acc_type >= 0.8, acc_type
    assert acc_ds >= chance_ds + 0.25, (acc_ds, chance_ds)


def _arrays(path):
    with cellxgene_census.open_soma(uri=str(path)) as census:
        exp = census["census_data"]["homo_sapiens"]
        obs = exp.obs.read().concat().to_pandas()
        return _read_x(exp), obs


def test_deterministic_per_seed(tmp_path):
    a = make_mini_census(tmp_path / "a", n_cells=300, n_genes=150, seed=3)
    b = make_mini_census(tmp_path / "b", n_cells=300, n_genes=150, seed=3)
    c = make_mini_census(tmp_path / "c", n_cells=300, n_genes=150, seed=4)
    xa, oa = _arrays(a.path)
    xb, ob = _arrays(b.path)
    xc, _ = _arrays(c.path)
    assert (xa != xb).nnz == 0
    assert oa.equals(ob)
    assert (xa != xc).nnz > 0


def test_refuses_existing_path_and_bad_sizes(tmp_path):
    make_mini_census(tmp_path / "m", n_cells=200, n_genes=120)
    with pytest.raises(CensusScviError, match="already exists"):
        make_mini_census(tmp_path / "m", n_cells=200, n_genes=120)
    make_mini_census(tmp_path / "m", n_cells=200, n_genes=120, force=True)
    with pytest.raises(CensusScviError, match="at least 100"):
        make_mini_census(tmp_path / "z", n_cells=10, n_genes=120)
    assert not (tmp_path / "z").exists()


def test_cli_demo_data_prints_summary(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["demo-data", str(out), "--cells", "400", "--genes", "150"])
    assert res.exit_code == 0, res.output
    assert "homo_sapiens: 400 cells x 150 genes" in res.stdout
    assert "datasets" in res.stdout and "cell types" in res.stdout
    res = runner.invoke(app, ["demo-data", str(out), "--cells", "400", "--genes", "150"])
    assert res.exit_code == 2
    assert "already exists" in res.stderr


def test_open_census_organism_names(mini_census):
    cfg = load_config(None, overrides=[f"census.uri={mini_census}"])
    with open_census(cfg) as census:
        a = get_experiment(census, "Homo sapiens")
        b = get_experiment(census, "homo_sapiens")
        assert a.uri == b.uri
        with pytest.raises(CensusScviError, match="present: homo_sapiens, mus_musculus"):
            get_experiment(census, "danio rerio")


def test_open_census_missing_uri_and_offline_version(tmp_path, monkeypatch):
    cfg = load_config(None, overrides=[f"census.uri={tmp_path / 'nope'}", "census.demo=null"])
    with pytest.raises(CensusScviError, match="does not exist"), open_census(cfg):
        pass

    def offline(**kwargs):
        raise ValueError("The Census version 'x' is not valid. Cannot resolve mirror.")

    monkeypatch.setattr(cellxgene_census, "open_soma", offline)
    cfg = load_config(None, overrides=["census.uri=null", "census.version=1999-01-01"])
    with pytest.raises(CensusScviError) as e, open_census(cfg):
        pass
    assert "census.uri" in str(e.value) and "1999-01-01" in str(e.value)


def test_demo_config_builds_mini_census_on_first_use(tmp_path):
    uri = tmp_path / "auto-census"
    cfg = load_config(
        None, overrides=[f"census.uri={uri}", "census.demo={cells: 300, genes: 120, seed: 1}"]
    )
    with open_census(cfg) as census:
        assert isinstance(census, soma.Collection)
        assert census["census_data"]["homo_sapiens"].obs.count == 300
    assert uri.exists()


def test_presence_matrix_rows_are_dataset_joinids(mini_census):
    """Rows index census_info/datasets (shared by both organisms); True where a gene has counts."""
    with cellxgene_census.open_soma(uri=mini_census) as census:
        datasets = census["census_info"]["datasets"].read().concat().to_pandas()
        for org in ("homo_sapiens", "mus_musculus"):
            exp = census["census_data"][org]
            pm = exp.ms["RNA"]["feature_dataset_presence_matrix"].read().tables().concat()
            rows = np.unique(pm["soma_dim_0"].to_numpy())
            obs = exp.obs.read(column_names=["dataset_id"]).concat().to_pandas()
            ids = set(datasets.set_index("soma_joinid").loc[rows, "dataset_id"])
            assert ids == set(obs["dataset_id"].unique()), org


def test_one_schema_with_build_census(mini_census, tmp_path):
    """The mini census and build-census write through one writer: same schema version, same
    census_info tables and column types, obs/var columns in the schema's order."""
    import anndata as ad
    import pandas as pd

    from census_scvi.build import build_census
    from census_scvi.soma._schema import OBS_COLUMNS, SCHEMA_VERSION, VAR_COLUMNS

    x = sp.csr_matrix(np.random.default_rng(0).poisson(1.0, (20, 8)).astype(np.float32))
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(1, 9)])
    ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(20)]), var=var).write_h5ad(
        tmp_path / "a.h5ad"
    )
    built = tmp_path / "built"
    build_census(str(built), [tmp_path / "a.h5ad"])

    def info(uri):
        with cellxgene_census.open_soma(uri=str(uri)) as census:
            tables = {k: census["census_info"][k].schema for k in census["census_info"]}
            summary = census["census_info"]["summary"].read().concat().to_pandas()
            counts = census["census_info"]["summary_cell_counts"].read().concat().to_pandas()
            exp = census["census_data"]["homo_sapiens"]
            names = (exp.obs.schema.names, exp.ms["RNA"].var.schema.names)
        return tables, dict(zip(summary["label"], summary["value"], strict=True)), counts, names

    mini_tables, mini_summary, mini_counts, (mini_obs, mini_var) = info(mini_census)
    built_tables, built_summary, _, (built_obs, built_var) = info(built)
    assert mini_tables.keys() == built_tables.keys()
    for key, schema in mini_tables.items():
        assert schema.names == built_tables[key].names, key
        assert schema.types == built_tables[key].types, key
    assert mini_summary["census_schema_version"] == built_summary["census_schema_version"]
    assert mini_summary["census_schema_version"] == SCHEMA_VERSION
    assert mini_summary["census_scvi_mini_census_seed"] == "0"
    census_obs = [c for c, _ in OBS_COLUMNS]
    assert mini_obs == ["soma_joinid", *census_obs]
    assert [c for c in built_obs if c in census_obs] == census_obs
    assert mini_var == ["soma_joinid", *(c for c, _ in VAR_COLUMNS)]
    # summary_cell_counts from obs, as build-census counts them: an "all" row per organism
    all_rows = mini_counts[mini_counts["category"] == "all"].set_index("organism")
    assert all_rows.loc["Homo sapiens", "total_cell_count"] == 3000
    assert {"cell_type", "assay", "sex"} <= set(mini_counts["category"])


@pytest.mark.parametrize("n_genes", [300, 5000])
def test_counts_writer_global_order_round_trips(tmp_path, n_genes):
    """CountsWriter puts row-major pieces in TileDB's global order (several column tiles too)."""
    from census_scvi.soma._writer import (
        X_TILE,
        CountsWriter,
        create_census_root,
        create_counts_array,
        create_experiment,
    )

    root = tmp_path / "c"
    create_census_root(root, created_by="test")
    ms = f"{create_experiment(f'{root}/census_data', 'homo_sapiens')}/ms/RNA"
    n_cells = X_TILE + 700  # two row tiles
    rng = np.random.default_rng(0)
    dense = (rng.random((n_cells, n_genes)) < 0.01) * rng.integers(1, 9, (n_cells, n_genes))
    dense = dense.astype(np.float32)
    with CountsWriter(create_counts_array(ms, (n_cells, n_genes)), buffer_nnz=20_000) as w:
        for start in range(0, n_cells, 1000):  # pieces that do not align with the tiles
            r, c = np.nonzero(dense[start : start + 1000])
            w.append(r + start, c, dense[start : start + 1000][r, c])
        with pytest.raises(ValueError, match="row order"):
            w.append(np.array([0]), np.array([0]), np.array([1.0], np.float32))
    with soma.open(f"{ms}/X/raw") as x:
        t = x.read().tables().concat()
        got = sp.csr_matrix(
            (t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy())),
            shape=(n_cells, n_genes),
        )
    np.testing.assert_array_equal(got.toarray(), dense)
    assert len(list((tmp_path / "c").rglob("__fragments/*"))) == 1  # one global-order write
