"""``map`` reads the census its run embedded (issue 12 item 10), checks ``--labels`` / ``--truth``
before any heavy work and scores against ``--truth`` (issue 16 item 2), on a real tiny run.

The run: a tiny scVI trained with scvi-tools directly (test_embed's ``train_tiny_model``), then the
real embed stage over every cell of the session's mini census; the query is two datasets of that
census as a user's h5ad.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from census_scvi.cli import app
from census_scvi.errors import CensusScviError
from census_scvi.mapping import run_map
from test_embed import embed_config, train_tiny_model

QUERY_DATASETS = ("hs-dataset-05", "hs-dataset-06")


@pytest.fixture(scope="module")
def census_copy(mini_census, tmp_path_factory) -> str:
    """A private copy of the mini census (tests move it away and back)."""
    dst = tmp_path_factory.mktemp("map-census") / "census"
    shutil.copytree(mini_census, dst)
    return str(dst)


@pytest.fixture(scope="module")
def run(census_copy, tmp_path_factory) -> Path:
    from census_scvi.embed import run_embed

    run_dir = tmp_path_factory.mktemp("map-census") / "run"
    train_tiny_model(census_copy, run_dir)
    run_embed(embed_config(census_copy, "embed.write_minified_model=false"), run_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def query(census_copy, tmp_path_factory) -> Path:
    import cellxgene_census

    datasets = ", ".join(f"'{d}'" for d in QUERY_DATASETS)
    with cellxgene_census.open_soma(uri=census_copy) as census:
        q = cellxgene_census.get_anndata(
            census, "homo_sapiens", obs_value_filter=f"dataset_id in [{datasets}]"
        )
    q.var_names = q.var["feature_id"].astype(str).to_numpy()
    q.obs_names = q.obs["soma_joinid"].astype(str).to_numpy()
    q.obs = q.obs[["cell_type", "dataset_id"]].copy()
    q.obs["author_label"] = q.obs["cell_type"].astype(str)
    q.obs.loc[q.obs_names[:5], "author_label"] = np.nan  # missing truth values are left out
    path = tmp_path_factory.mktemp("map-census") / "query.h5ad"
    q.write_h5ad(path)
    return path


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "embed" / "manifest.json").read_text())


def _point_config_at(run_dir: Path, uri: str, *, demo: bool = False) -> None:
    """Edit RUN_DIR/config.yaml's census as another user's config would resolve it."""
    path = run_dir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["census"]["uri"] = uri
    cfg["census"]["demo"] = {"cells": 500, "genes": 200, "seed": 3} if demo else None
    path.write_text(yaml.safe_dump(cfg))


@pytest.fixture
def config_restored(run):
    path = run / "config.yaml"
    before = path.read_text()
    yield
    path.write_text(before)


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embed_manifest_records_census_and_fingerprint(run, census_copy):
    rec = _manifest(run)["census"]
    idx = np.load(run / "embed" / "latent-idx.npy")
    assert rec["uri"] == str(Path(census_copy).resolve()) and rec["version"] is None
    assert rec["organism"] == "homo_sapiens" and rec["obs_count"] == 3000 == rec["n_cells"]
    import hashlib

    assert rec["joinids_sha256"] == hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()
    sample = rec["obs_sample"]
    assert len(sample["soma_joinid"]) == 16 and {"dataset_id", "nnz"} <= set(sample)
    assert rec["release"]  # the census's build date (a local census)


@pytest.mark.slow
def test_map_uses_the_embedded_census_not_the_current_cache(
    run, query, tmp_path, monkeypatch, config_restored
):
    """config.yaml's {cache} now points at an empty cache with a demo config: before, map built
    a 500-cell demo census there and mapped against it (exit 0, nearly all 'unknown')."""
    cache = tmp_path / "someone-elses-cache"
    monkeypatch.setenv("CENSUS_SCVI_CACHE", str(cache))
    _point_config_at(run, "{cache}/mini-census", demo=True)
    # k=1: each query cell (embedded too) is its own nearest reference cell, if the labels
    # come from the census it was embedded from
    self_hit = ["map.n_neighbors=1", "map.unknown_threshold=0"]
    run_map(query, run_dir=run, out=tmp_path / "o.h5ad", overrides=self_hit)
    assert not cache.exists()  # no demo census built
    out = ad.read_h5ad(tmp_path / "o.h5ad")
    assert out.uns["census_scvi_map"]["census"] == _manifest(run)["census"]["uri"]
    assert out.uns["census_scvi_map"]["n_embedded_cells"] == 3000
    pred = out.obs["predicted_cell_type"].astype(str).to_numpy()
    assert (pred == out.obs["cell_type"].astype(str).to_numpy()).mean() > 0.95


@pytest.mark.slow
def test_map_refuses_another_census_in_one_line(run, query, tmp_path, config_restored):
    from census_scvi.demo import make_mini_census

    other = make_mini_census(tmp_path / "other", n_cells=3000, n_genes=200, seed=7).path
    smaller = make_mini_census(tmp_path / "smaller", n_cells=400, n_genes=100, seed=0).path
    # same size, other cells: the obs sample tells them apart
    with pytest.raises(CensusScviError, match="is not the one this run embedded: cell ") as e:
        run_map(query, run_dir=run, out=tmp_path / "o.h5ad", overrides=[f"census.uri={other}"])
    assert "\n" not in str(e.value)
    res = CliRunner().invoke(
        app,
        ["map", str(query), "--run", str(run), "-o", str(tmp_path / "o.h5ad"),
         "--set", f"census.uri={smaller}"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "obs has 400 cells, the embedded census had 3,000" in res.output
    assert not (tmp_path / "o.h5ad").exists()


@pytest.mark.slow
def test_map_refuses_a_moved_census_and_accepts_its_new_place(
    run, query, census_copy, tmp_path, config_restored
):
    moved = tmp_path / "moved-census"
    shutil.move(census_copy, moved)
    try:
        with pytest.raises(CensusScviError, match="does not exist") as e:
            run_map(query, run_dir=run, out=tmp_path / "o.h5ad")
        assert "--set census.uri=" in e.value.hint
        res = run_map(
            query, run_dir=run, out=tmp_path / "o.h5ad", overrides=[f"census.uri={moved}"]
        )
        assert res.n_cells > 0
    finally:
        shutil.move(moved, census_copy)


@pytest.mark.slow
def test_map_refuses_unfinished_or_changed_embedding(run, query, tmp_path):
    manifest = run / "embed" / "manifest.json"
    saved = manifest.read_bytes()
    manifest.unlink()
    try:
        with pytest.raises(CensusScviError, match="embed has not finished"):
            run_map(query, run_dir=run, out=tmp_path / "o.h5ad")
    finally:
        manifest.write_bytes(saved)
    idx_path = run / "embed" / "latent-idx.npy"
    idx = np.load(idx_path)
    try:
        np.save(idx_path, idx[::-1].copy())
        with pytest.raises(CensusScviError, match="is not the embedding the manifest recorded"):
            run_map(query, run_dir=run, out=tmp_path / "o.h5ad")
    finally:
        np.save(idx_path, idx)


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wrong_labels_or_truth_column_refused_before_reading_x(run, query, tmp_path, monkeypatch):
    import census_scvi.mapping._stage as stage

    def never(*a, **k):
        raise AssertionError("heavy work started")

    monkeypatch.setattr(stage, "_read_query", never)  # reading X: the first heavy step
    monkeypatch.setattr(stage, "gene_overlap", never)
    with pytest.raises(CensusScviError, match="--labels column 'celltype' is not in") as e:
        run_map(query, run_dir=run, out=tmp_path / "o.h5ad", labels="celltype")
    assert "cell_type" in str(e.value) and "dataset_id" in str(e.value)  # the valid ones
    with pytest.raises(CensusScviError, match="--truth column 'truth' is not in query.h5ad") as e:
        run_map(query, run_dir=run, out=tmp_path / "o.h5ad", truth="truth")
    assert "author_label" in str(e.value) and "cell_type" in str(e.value)


@pytest.mark.slow
def test_cli_map_truth_scores_in_uns_and_summary(run, query, tmp_path):
    from sklearn.metrics import f1_score

    out = tmp_path / "t.h5ad"
    res = CliRunner().invoke(
        app,
        ["-q", "map", str(query), "--run", str(run), "-o", str(out), "--truth", "author_label"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "against author_label" in res.output and "macro F1" in res.output
    assert "confidence   cells   accuracy" in res.output
    a = ad.read_h5ad(out)
    t = a.uns["census_scvi_map"]["truth"]
    keep = a.obs["author_label"].notna().to_numpy()
    truth = a.obs["author_label"].astype(str).to_numpy()[keep]
    pred = a.obs["predicted_cell_type"].astype(str).to_numpy()[keep]
    assert t["n_scored"] == keep.sum() == a.n_obs - 5
    assert t["accuracy"] == pytest.approx((pred == truth).mean())
    f1 = f1_score(truth, pred, labels=sorted(set(truth)), average="macro", zero_division=0)
    assert t["macro_f1"] == pytest.approx(f1)
    confusion = t["confusion"]
    assert isinstance(confusion, pd.DataFrame) and confusion.to_numpy().sum() == keep.sum()
    bins = t["confidence_bins"]
    assert list(bins["n_cells"]) and int(bins["n_cells"].sum()) == keep.sum()
