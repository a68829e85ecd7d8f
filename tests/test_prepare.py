"""The prepare stage on small SOMA censuses: oracle, artifacts, errors, skip/force, CLI."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from typer.testing import CliRunner

from census_scvi.batches import batch_labels
from census_scvi.cli import app
from census_scvi.config import load_config
from census_scvi.errors import CensusScviError
from census_scvi.prepare import run_prepare

ASSAYS = ["10x 3' v3", "10x 3' v2", "10x 5' v1", "Smart-seq2"]
SUSPENSION = ["cell", "cell", "nucleus", "cell"]


def make_census(path: Path, *, n: int = 1200, g: int = 300, seed: int = 0) -> ad.AnnData:
    """A tiny census (``census_data/homo_sapiens``) written with tiledbsoma.io.from_anndata."""
    import tiledbsoma as soma
    import tiledbsoma.io

    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.5, 2.0, size=g)
    ds = rng.integers(0, 4, n)
    effect = rng.lognormal(0, 0.5, (4, g))
    x = rng.negative_binomial(2, 2 / (2 + mu * effect[ds])).astype(np.float32)
    x = sp.csr_matrix(x)
    obs = pd.DataFrame(
        {
            "dataset_id": pd.Categorical([f"ds{d}" for d in ds]),
            "assay": pd.Categorical(np.array(ASSAYS)[ds]),
            "suspension_type": pd.Categorical(np.array(SUSPENSION)[ds]),
            "donor_id": pd.Categorical(
                [f"donor{d}_{k}" for d, k in zip(ds, rng.integers(0, 2, n), strict=False)]
            ),
            "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "monocyte"], n)),
            "is_primary_data": rng.random(n) > 0.1,
            "nnz": np.diff(x.indptr).astype(np.int64),
        },
        index=[str(i) for i in range(n)],
    )
    ids = [f"ENSG{i:011d}" for i in range(g)]
    var = pd.DataFrame({"feature_id": ids, "feature_name": [f"G{i}" for i in range(g)]}, index=ids)
    adata = ad.AnnData(x, obs=obs, var=var)
    path = str(path)
    with soma.Collection.create(path) as root:
        root.add_new_collection("census_data")
    tiledbsoma.io.from_anndata(f"{path}/census_data/homo_sapiens", adata, "RNA", X_layer_name="raw")
    with soma.Collection.open(f"{path}/census_data", "w") as data:
        with soma.Experiment.open(f"{path}/census_data/homo_sapiens") as exp:
            data.set("homo_sapiens", exp, use_relative_uri=True)
    return adata


FILTER = "is_primary_data == True and nnz >= 100"


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    path = tmp_path_factory.mktemp("prep") / "census"
    adata = make_census(path)
    return str(path), adata


def _cfg(uri, *extra):
    return load_config(
        None,
        overrides=[
            f"census.uri={uri}",
            f"census.obs_query_model={FILTER}",
            "hvg.top_n_hvg=60",
            *extra,
        ],
    )


def _reference(adata, filt, hvg_batch, n_top, sep="//"):
    """The cells the filter selects, and scanpy's seurat_v3 on them."""
    sel = adata[adata.obs.query(filt).index].copy()
    sel.obs["hvg_batch"] = batch_labels(sel.obs, hvg_batch, sep)
    ref = sc.pp.highly_variable_genes(
        sel, flavor="seurat_v3", n_top_genes=n_top, batch_key="hvg_batch", inplace=False
    )
    return sel, ref


def _jaccard(a, b):
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


# ----------------------------------------------------------------------------------------------
def test_artifacts_agree_with_scanpy_and_the_census(census, tmp_path):
    uri, adata = census
    cfg = _cfg(uri, "hvg.min_genes=120")
    result = run_prepare(cfg, run_dir=tmp_path)
    pdir = tmp_path / "prepare"
    assert (tmp_path / "config.yaml").is_file()

    sel, ref = _reference(adata, FILTER + " and nnz >= 120", ["suspension_type", "assay"], 60)
    hvg = pd.read_parquet(pdir / "hvg.parquet")
    assert list(hvg.columns[:3]) == ["soma_joinid", "feature_id", "feature_name"]
    for c in ["means", "variances", "variances_norm", "highly_variable", "rank"]:
        assert c in hvg.columns
    assert len(hvg) == adata.n_vars and hvg["soma_joinid"].tolist() == list(range(adata.n_vars))
    ours = hvg.loc[hvg["highly_variable"], "feature_id"]
    theirs = ref.index[ref["highly_variable"]]
    assert _jaccard(ours, theirs) >= 0.99
    np.testing.assert_allclose(hvg["variances_norm"], ref["variances_norm"], rtol=1e-6)
    np.testing.assert_allclose(hvg["means"], ref["means"], rtol=1e-6)

    # cells: the filtered cells in soma_joinid order, with their batch label
    cells = pd.read_parquet(pdir / "cells.parquet")
    assert cells["soma_joinid"].dtype == np.int64
    assert cells["soma_joinid"].tolist() == sel.obs.index.astype(int).tolist()
    expected = batch_labels(sel.obs, ["dataset_id", "assay", "suspension_type", "donor_id"])
    assert cells["batch"].tolist() == expected.tolist()

    # the training h5ad: cells x HVGs in ascending var soma_joinid order, raw counts
    h = ad.read_h5ad(pdir / "anndata_model.h5ad")
    assert sp.issparse(h.X) and h.X.format == "csr" and h.X.dtype == np.float32
    # one index dtype: scipy would cast all of `indices` on every mini-batch otherwise
    assert h.X.indptr.dtype == h.X.indices.dtype == np.int32
    assert h.obs_names.tolist() == [str(i) for i in cells["soma_joinid"]]
    assert h.obs["batch"].astype(str).tolist() == expected.tolist()
    for c in ["soma_joinid", "dataset_id", "assay", "suspension_type", "donor_id", "cell_type"]:
        assert c in h.obs.columns
    genes = hvg[hvg["highly_variable"]].sort_values("soma_joinid")
    assert h.var_names.tolist() == genes["feature_id"].tolist()
    assert h.var["feature_name"].tolist() == genes["feature_name"].tolist()
    expected_x = sel[:, genes["feature_id"].to_numpy()].X
    assert (h.X != expected_x).nnz == 0

    # summary and manifest
    text = result.summary()
    removed = {k: n for k, _, n in result.removed}
    assert removed["census.obs_query_model"] == adata.n_obs - len(adata.obs.query(FILTER))
    assert removed["hvg.min_genes"] == len(adata.obs.query(FILTER)) - sel.n_obs
    assert f"Kept {sel.n_obs:,} of {adata.n_obs:,} cells" in text
    assert "hvg.min_genes" in text and "anndata_model.h5ad" in text
    manifest = json.loads((pdir / "manifest.json").read_text())
    assert manifest["stage"] == "prepare"
    assert manifest["figures"]["n_cells"] == sel.n_obs
    assert manifest["figures"]["n_hvg"] == 60
    assert not list(pdir.glob(".*tmp*"))


def test_small_chunks_give_identical_artifacts(census, tmp_path):
    uri, _ = census
    run_prepare(_cfg(uri), run_dir=tmp_path / "a")
    run_prepare(_cfg(uri, "hvg.chunk_nnz=10000"), run_dir=tmp_path / "b")
    a, b = tmp_path / "a" / "prepare", tmp_path / "b" / "prepare"
    pd.testing.assert_frame_equal(
        pd.read_parquet(a / "hvg.parquet"), pd.read_parquet(b / "hvg.parquet"), rtol=1e-12
    )
    ha, hb = ad.read_h5ad(a / "anndata_model.h5ad"), ad.read_h5ad(b / "anndata_model.h5ad")
    assert (ha.X != hb.X).nnz == 0 and ha.obs_names.equals(hb.obs_names)


def test_hvg_split_across_processes_equals_one_process(census, tmp_path, caplog):
    """Per-process partial sums, merged in order: the same HVGs as a single process."""
    uri, _ = census
    small = "hvg.chunk_nnz=10000"  # several chunks, so each process gets its own group
    one = run_prepare(_cfg(uri, small, "train.mode=stream"), run_dir=tmp_path / "one")
    with caplog.at_level("INFO"):
        three = run_prepare(
            _cfg(uri, small, "train.mode=stream", "hvg.processes=2"), run_dir=tmp_path / "three"
        )
    assert "HVG pass 2/2: 2 of 2 process groups done" in caplog.text
    a = pd.read_parquet(tmp_path / "one" / "prepare" / "hvg.parquet")
    b = pd.read_parquet(tmp_path / "three" / "prepare" / "hvg.parquet")
    # pass 1 sums integer counts: exact; pass 2 sums clipped values: float64 rounding only
    for col in ("means", "variances"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy())
    np.testing.assert_allclose(a["variances_norm"], b["variances_norm"], rtol=1e-12)
    for col in ("highly_variable", "rank", "highly_variable_nbatches"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy())
    assert one.n_hvg == three.n_hvg == 60


def test_split_chunks_covers_every_chunk_in_order():
    from census_scvi.prepare._parallel import split_chunks

    chunks = [slice(0, 10), slice(10, 15), slice(15, 40), slice(40, 41), slice(41, 60)]
    for parts in (1, 2, 3, 5, 8):
        groups = split_chunks(chunks, parts)
        assert [c for g in groups for c in g] == chunks
        assert 1 <= len(groups) <= min(parts, len(chunks)) and all(groups)
    assert split_chunks([], 4) == []


def test_skip_force_and_change_detection(census, tmp_path, caplog):
    uri, _ = census
    first = run_prepare(_cfg(uri), run_dir=tmp_path)
    assert not first.skipped
    mtime = (tmp_path / "prepare" / "hvg.parquet").stat().st_mtime_ns

    again = run_prepare(_cfg(uri, "train.max_epochs=3"), run_dir=tmp_path)  # not prepare's
    assert again.skipped and "already done" in again.summary()
    assert again.n_cells == first.n_cells and again.n_hvg == first.n_hvg
    assert (tmp_path / "prepare" / "hvg.parquet").stat().st_mtime_ns == mtime

    forced = run_prepare(_cfg(uri), run_dir=tmp_path, force=True)
    assert not forced.skipped
    assert (tmp_path / "prepare" / "hvg.parquet").stat().st_mtime_ns != mtime

    changed = run_prepare(_cfg(uri, "hvg.top_n_hvg=40"), run_dir=tmp_path)
    assert not changed.skipped and changed.n_hvg == 40

    # a missing artifact is redone even when the manifest matches
    (tmp_path / "prepare" / "cells.parquet").unlink()
    assert not run_prepare(_cfg(uri, "hvg.top_n_hvg=40"), run_dir=tmp_path).skipped


def test_changed_census_is_detected(tmp_path):
    uri = tmp_path / "census"
    make_census(uri, n=300, g=80, seed=1)
    cfg = _cfg(uri, "hvg.top_n_hvg=20", "census.obs_query_model=nnz >= 10")
    assert not run_prepare(cfg, run_dir=tmp_path / "run").skipped
    assert run_prepare(cfg, run_dir=tmp_path / "run").skipped
    import shutil

    shutil.rmtree(uri)
    make_census(uri, n=300, g=80, seed=2)
    assert not run_prepare(cfg, run_dir=tmp_path / "run").skipped


def test_failed_write_leaves_no_partial_files(census, tmp_path, monkeypatch):
    uri, _ = census
    import census_scvi.prepare._io as io

    def boom(path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io, "write_csr_h5ad", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run_prepare(_cfg(uri), run_dir=tmp_path)
    pdir = tmp_path / "prepare"
    assert not (pdir / "anndata_model.h5ad").exists()
    assert not (pdir / "manifest.json").exists()
    assert not list(pdir.glob(".*"))


def test_full_disk_stops_the_h5ad_write_before_hdf5_fails(census, tmp_path, monkeypatch):
    """HDF5 meeting a full disk crashed the process at exit (139); the writer stops first."""
    import shutil
    from collections import namedtuple

    from census_scvi.errors import CensusScviError

    uri, _ = census
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def nearly_full(path):
        if "prepare" in str(path):
            return usage(10 * 2**20, 10 * 2**20 - 4096, 4096)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(CensusScviError) as e:
        run_prepare(_cfg(uri), run_dir=tmp_path)
    text = str(e.value)
    assert text.startswith("need about ") and f"GiB free in {tmp_path / 'prepare'}" in text
    assert "; 3.8e-06 GiB free" in text and len(text.splitlines()) == 1
    pdir = tmp_path / "prepare"
    assert not (pdir / "anndata_model.h5ad").exists()
    assert not (pdir / "manifest.json").exists()
    assert not list(pdir.glob(".*"))


def test_stream_mode_writes_no_h5ad_and_optional_pkl(census, tmp_path):
    uri, _ = census
    cfg = _cfg(uri, "train.mode=stream", "anndata.write_hv_genes_pkl=true")
    result = run_prepare(cfg, run_dir=tmp_path)
    pdir = tmp_path / "prepare"
    assert not (pdir / "anndata_model.h5ad").exists()
    assert (pdir / "cells.parquet").is_file()
    hvg = pd.read_parquet(pdir / "hvg.parquet")
    with (pdir / "hv_genes.pkl").open("rb") as f:
        idx = pickle.load(f)  # our own file, written by this test
    assert list(idx) == sorted(hvg.loc[hvg["highly_variable"], "soma_joinid"])
    assert "anndata" not in result.outputs


def test_filter_matching_no_cell(census, tmp_path):
    uri, _ = census
    with pytest.raises(CensusScviError, match=r"matches none of the 1,200 cells"):
        run_prepare(_cfg(uri, "census.obs_query=nnz > 100000"), run_dir=tmp_path)


def test_filter_naming_unknown_column_lists_valid_columns(census, tmp_path):
    uri, _ = census
    with pytest.raises(CensusScviError) as e:
        run_prepare(_cfg(uri, "census.obs_query=tissue_generl == 'lung'"), run_dir=tmp_path)
    msg = str(e.value)
    assert "census.obs_query" in msg and "'tissue_generl'" in msg
    assert "valid columns:" in msg and "dataset_id" in msg and "is_primary_data" in msg


def test_unparsable_filter(census, tmp_path):
    uri, _ = census
    with pytest.raises(CensusScviError, match="not a valid SOMA value filter"):
        run_prepare(_cfg(uri, "census.obs_query=nnz >>= 3"), run_dir=tmp_path)


@pytest.mark.parametrize("key", ["hvg.hvg_batch", "anndata.batch_key"])
def test_unknown_batch_column(census, tmp_path, key):
    uri, _ = census
    with pytest.raises(CensusScviError, match=rf"{key} names obs column\(s\) 'donor'.*valid"):
        run_prepare(_cfg(uri, f"{key}=[assay, donor]"), run_dir=tmp_path)


def test_top_n_hvg_larger_than_gene_count(census, tmp_path, caplog):
    uri, adata = census
    with caplog.at_level(logging.WARNING, logger="census_scvi"):
        result = run_prepare(_cfg(uri, "hvg.top_n_hvg=5000"), run_dir=tmp_path)
    assert "more than the 300 genes" in caplog.text
    assert result.n_hvg == adata.n_vars
    assert ad.read_h5ad(tmp_path / "prepare" / "anndata_model.h5ad").n_vars == adata.n_vars


def test_single_cell_hvg_batch(census, tmp_path, caplog):
    uri, adata = census
    one = int(np.flatnonzero(adata.obs.eval(FILTER) & (adata.obs["dataset_id"] == "ds0"))[0])
    cfg = _cfg(
        uri,
        f"census.obs_query=dataset_id != 'ds0' or soma_joinid == {one}",
        "hvg.hvg_batch=[dataset_id]",
    )
    with caplog.at_level(logging.WARNING, logger="census_scvi"):
        result = run_prepare(cfg, run_dir=tmp_path)
    assert "HVG batch 'ds0' has a single cell" in caplog.text
    assert result.n_hvg == 60


# ----------------------------------------------------------------------------------------------
# the mini census (the project's demo data) and the CLI
# ----------------------------------------------------------------------------------------------
def test_mini_census_oracle(mini_census, tmp_path):
    import cellxgene_census

    cfg = load_config(None, overrides=[f"census.uri={mini_census}", "hvg.top_n_hvg=300"])
    run_prepare(cfg, run_dir=tmp_path)
    hvg = pd.read_parquet(tmp_path / "prepare" / "hvg.parquet")
    with cellxgene_census.open_soma(uri=mini_census) as c:
        adata = cellxgene_census.get_anndata(
            c,
            "homo_sapiens",
            X_name="raw",
            obs_value_filter=cfg.model_obs_filter(),
            column_names={"obs": ["soma_joinid", "suspension_type", "assay"]},
        )
    adata.obs["hvg_batch"] = batch_labels(adata.obs, ["suspension_type", "assay"])
    ref = sc.pp.highly_variable_genes(
        adata, flavor="seurat_v3", n_top_genes=300, batch_key="hvg_batch", inplace=False
    )
    ours = hvg.loc[hvg["highly_variable"], "soma_joinid"]
    theirs = adata.var.loc[ref["highly_variable"].to_numpy(), "soma_joinid"]
    assert _jaccard(ours, theirs) >= 0.99
    h = ad.read_h5ad(tmp_path / "prepare" / "anndata_model.h5ad")
    assert h.n_obs == adata.n_obs and h.n_vars == 300


def test_cli_end_to_end(mini_census, tmp_path):
    runner = CliRunner()
    args = ["prepare", "-c", "configs/demo.yaml", "-o", str(tmp_path)]
    args += ["--set", f"census.uri={mini_census}", "--set", "hvg.top_n_hvg=200"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Selected 200 highly variable genes" in res.stdout
    assert (tmp_path / "prepare" / "manifest.json").is_file()
    assert ad.read_h5ad(tmp_path / "prepare" / "anndata_model.h5ad").n_vars == 200
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "already done" in res.stdout

    bad = runner.invoke(app, [*args, "--set", "census.obs_query=nope == 1"])
    assert bad.exit_code == 2
    assert "'nope'" in bad.output and "valid columns" in bad.output


# ----------------------------------------------------------------------------------------------
# chunked reads
# ----------------------------------------------------------------------------------------------
def test_plan_chunks_respects_the_budget():
    from census_scvi.soma import plan_chunks

    nnz = np.random.default_rng(0).integers(1, 500, 1000)
    chunks = plan_chunks(nnz, 1000, chunk_nnz=2000, mean_nnz=0)
    assert chunks[0].start == 0 and chunks[-1].stop == 1000
    assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:], strict=False))
    assert all(nnz[c].sum() <= 2000 or c.stop - c.start == 1 for c in chunks)
    even = plan_chunks(None, 1000, chunk_nnz=2000, mean_nnz=300)
    assert [c.stop - c.start for c in even[:2]] == [6, 6]


@pytest.mark.parametrize("buffer", [None, 4096])  # one table per read; several (4 KiB buffers)
@pytest.mark.parametrize("every", [1, 3, 20])  # dense ranges and scattered points
def test_iter_x_chunks_reads_exactly_the_selection(census, every, buffer):
    import tiledbsoma as soma

    from census_scvi.soma import iter_x_chunks, plan_chunks
    from census_scvi.soma._x import tiledb_read_config

    uri, adata = census
    ids = np.arange(5, adata.n_obs, every, dtype=np.int64)
    genes = np.array([3, 4, 50, 299], dtype=np.int64)
    chunks = plan_chunks(None, len(ids), chunk_nnz=5000, mean_nnz=100)
    context = (
        None if buffer is None else soma.SOMATileDBContext(tiledb_config=tiledb_read_config(buffer))
    )
    with soma.open(f"{uri}/census_data/homo_sapiens", context=context) as exp:
        X = exp.ms["RNA"].X["raw"]
        for var in (None, genes):
            got = sp.lil_matrix((len(ids), adata.n_vars), dtype=np.float32)
            for c in iter_x_chunks(X, ids, chunks, var_joinids=var):
                assert len(c.rows) == 0 or (c.rows.min() >= c.row_start)
                got[c.rows, c.cols] = c.data
            want = adata.X[ids]
            if var is not None:
                mask = np.zeros(adata.n_vars, bool)
                mask[var] = True
                want = want.multiply(mask[None, :]).tocsr()
            assert (got.tocsr() != want).nnz == 0


def test_cells_table_written_in_row_groups_equals_the_frame(tmp_path):
    """cells.parquet is written a row group at a time (labels become strings per group); the
    file is the same table as the whole frame: int64 ids, string labels, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from census_scvi.prepare._io import write_cells

    labels = np.array(["a//x", "b//y", "c//z"], dtype=object)
    codes = np.array([2, 0, 1, 1, 0, 2, 2, 0, 1, 0], dtype=np.int32)
    joinids = np.arange(10, dtype=np.int64) * 7
    path = tmp_path / "cells.parquet"
    write_cells(path, joinids, codes, labels, columns=("soma_joinid", "batch"), rows_per_group=3)
    f = pq.ParquetFile(path)
    assert f.num_row_groups == 4
    assert f.schema_arrow.field("batch").type == pa.string()
    assert f.schema_arrow.field("soma_joinid").type == pa.int64()
    want = pd.DataFrame({"soma_joinid": joinids, "batch": labels[codes]})
    pd.testing.assert_frame_equal(pd.read_parquet(path), want)


@pytest.mark.parametrize(("limit", "want"), [(2**31, np.int32), (10, np.int64)])
def test_h5ad_indptr_is_int32_when_the_values_fit(tmp_path, monkeypatch, limit, want):
    """Written in int64 blocks, ``indptr`` ends int32 (the dtype of ``indices``) below 2**31
    stored values, so scipy's row indexing (scvi-tools' loader) copies no index array; above
    (the limit patched down), it stays int64. The matrix reads back equal either way."""
    from census_scvi.prepare import _io

    monkeypatch.setattr(_io, "_INT32_LIMIT", limit)
    x = sp.random(70, 9, density=0.3, format="csr", dtype=np.float32, random_state=0)
    blocks = [x[a : a + 30] for a in range(0, 70, 30)]
    obs = pd.DataFrame(index=[str(i) for i in range(70)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(9)])
    path = tmp_path / "x.h5ad"
    it = ((b.indptr.astype(np.int64), b.indices.astype(np.int32), b.data) for b in blocks)
    assert _io.write_csr_h5ad(path, obs, var, it) == x.nnz
    h = ad.read_h5ad(path)
    assert h.X.indptr.dtype == want and h.X.indices.dtype == np.int32
    assert (h.X != x).nnz == 0


@pytest.mark.parametrize("buffer", [None, 4096])  # one table per read; several (4 KiB buffers)
@pytest.mark.parametrize("every", [1, 3, 20])  # dense ranges, ranges with gaps, scattered points
def test_value_sums_equal_dense_numpy(census, every, buffer):
    """HVG sums straight from the reads equal numpy's on the dense selection (genes left out
    and values clipped too)."""
    import tiledbsoma as soma

    from census_scvi.prepare._sums import value_sums
    from census_scvi.soma import iter_x_values, plan_chunks
    from census_scvi.soma._x import tiledb_read_config

    uri, adata = census
    rng = np.random.default_rng(every)
    ids = np.arange(5, adata.n_obs, every, dtype=np.int64)
    batch = rng.integers(0, 3, len(ids)).astype(np.int32)
    kept = np.flatnonzero(rng.random(adata.n_vars) < 0.7)
    gene_index = np.full(adata.n_vars - 10, -1, np.int64)  # the last ids have no entry at all
    kept = kept[kept < len(gene_index)]
    gene_index[kept] = np.arange(len(kept))
    clip = rng.uniform(0.5, 3.0, (3, len(kept)))
    chunks = plan_chunks(None, len(ids), chunk_nnz=5000, mean_nnz=100)
    context = (
        None if buffer is None else soma.SOMATileDBContext(tiledb_config=tiledb_read_config(buffer))
    )
    dense = adata.X[ids][:, kept].toarray().astype(np.float64)
    with soma.open(f"{uri}/census_data/homo_sapiens", context=context) as exp:
        X = exp.ms["RNA"].X["raw"]
        for clip_val in (None, clip):
            s1, s2 = value_sums(
                iter_x_values(X, ids, chunks), batch, gene_index, 3, len(kept), clip_val
            )
            for b in range(3):
                v = dense[batch == b]
                if clip_val is not None:
                    v = np.minimum(v, clip_val[b])
                np.testing.assert_allclose(s1[b], v.sum(0), rtol=1e-12)
                np.testing.assert_allclose(s2[b], (v * v).sum(0), rtol=1e-12)
