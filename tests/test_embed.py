"""The embed stage on the mini census: oracle vs the original approach, outputs, resume after
SIGKILL, shards run as separate processes + merge, errors.

The model is trained with scvi-tools directly (fast, and on a subset of datasets so that most
embedded cells come from batches the model never saw), following the train stage's contract:
genes in var soma_joinid order, obs ``batch`` = dataset_id//assay//suspension_type//donor_id,
``train/scvi.model`` registered on ``batch`` with ``encode_covariates=False``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from census_scvi.config import Config, dump_config, load_config
from census_scvi.constants import (
    EMBEDDING_INFO_KEY,
    EMBEDDING_SOMA,
    LATENT_FILE,
    LATENT_IDX_FILE,
    LATENT_VAR_FILE,
    MANIFEST_FILE,
    MINIFIED_MODEL_DIR,
    PROGRESS_FILE,
)
from census_scvi.embed._stage import CHUNK_SLEEP_ENV, round_bfloat16, run_embed
from census_scvi.errors import CensusScviError

BATCH_PARTS = ["dataset_id", "assay", "suspension_type", "donor_id"]
TRAIN_DATASETS = ["hs-dataset-00", "hs-dataset-01", "hs-dataset-02"]
N_GENES = 150


def embed_config(census_uri: str, *extra: str) -> Config:
    return load_config(
        None,
        overrides=[
            f"census.uri={census_uri}",
            "census.demo=null",
            "model.n_latent=6",
            "model.n_hidden=32",
            "embed.chunk_size=400",
            "embed.batch_size=128",
            *extra,
        ],
    )


def train_tiny_model(census_uri: str, run_dir: Path) -> Path:
    """scvi-tools trained directly on 3 datasets' primary cells, saved as train/scvi.model."""
    import cellxgene_census
    import scvi

    from census_scvi.batches import batch_labels

    datasets = ", ".join(f"'{d}'" for d in TRAIN_DATASETS)
    with cellxgene_census.open_soma(uri=census_uri) as census:
        n_vars = census["census_data"]["homo_sapiens"].ms["RNA"].var.count
        genes = np.linspace(0, n_vars - 1, N_GENES).astype(np.int64)  # var soma_joinid order
        adata = cellxgene_census.get_anndata(
            census,
            "Homo sapiens",
            obs_value_filter=f"is_primary_data == True and nnz >= 300 and dataset_id in [{datasets}]",
            var_coords=genes,
        )
    adata.obs["batch"] = batch_labels(adata.obs, BATCH_PARTS, "//")
    adata.obs_names = adata.obs["soma_joinid"].astype(str).to_numpy()
    adata.var_names = adata.var["feature_id"].astype(str).to_numpy()
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=6, n_hidden=32, encode_covariates=False)
    model.train(max_epochs=2, accelerator="cpu", enable_progress_bar=False, batch_size=256)
    model_dir = run_dir / "train" / "scvi.model"
    model.save(str(model_dir), overwrite=True)
    return model_dir


def copy_model(src_run: Path, dst_run: Path) -> None:
    import shutil

    shutil.copytree(src_run / "train", dst_run / "train")


def original_latent(census_uri: str, model_dir: Path) -> tuple[np.ndarray, ...]:
    """The original create-latent approach: whole AnnData -> prepare_query_anndata ->
    load_query_data -> is_trained -> get_latent_representation(return_dist=True)."""
    import cellxgene_census
    import scvi

    from census_scvi.batches import batch_labels

    var_names = scvi.model.SCVI.load_registry(str(model_dir))["field_registries"]["X"][
        "state_registry"
    ]["column_names"]
    with cellxgene_census.open_soma(uri=census_uri) as census:
        var = census["census_data"]["homo_sapiens"].ms["RNA"].var.read().concat().to_pandas()
        ids = var.set_index("feature_id").loc[list(var_names), "soma_joinid"].to_numpy()
        adata = cellxgene_census.get_anndata(census, "Homo sapiens", var_coords=np.sort(ids))
    adata.obs["batch"] = batch_labels(adata.obs, BATCH_PARTS, "//")
    adata.var = adata.var.set_index("feature_id")
    scvi.model.SCVI.prepare_query_anndata(adata, str(model_dir))
    query = scvi.model.SCVI.load_query_data(adata, str(model_dir))
    query.is_trained = True
    mean, var_ = query.get_latent_representation(return_dist=True)
    joinids = adata.obs["soma_joinid"].to_numpy()
    order = np.argsort(joinids)
    libsize = np.asarray(adata.X.sum(axis=1)).reshape(-1)
    datasets = adata.obs["dataset_id"].astype(str).to_numpy()
    return joinids[order], mean[order], var_[order], libsize[order], datasets[order]


def outputs(run_dir: Path) -> dict[str, np.ndarray]:
    e = run_dir / "embed"
    return {name: np.load(e / name) for name in (LATENT_FILE, LATENT_VAR_FILE, LATENT_IDX_FILE)}


@pytest.fixture(scope="module")
def model_run(mini_census, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("embed") / "model-run"
    train_tiny_model(mini_census, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def embedded(mini_census, model_run, tmp_path_factory) -> tuple[Path, object]:
    """An uninterrupted embed run (the reference for resume and shard tests)."""
    run_dir = tmp_path_factory.mktemp("embed") / "full"
    copy_model(model_run, run_dir)
    result = run_embed(embed_config(mini_census), run_dir=run_dir)
    return run_dir, result


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_latent_equals_original_approach_including_unseen_datasets(mini_census, embedded):
    run_dir, result = embedded
    joinids, mean, var, libsize, datasets = original_latent(
        mini_census, run_dir / "train" / "scvi.model"
    )
    out = outputs(run_dir)
    # every cell of the organism: non-primary and low-nnz cells included
    assert len(joinids) == 3000 == result.n_cells
    np.testing.assert_array_equal(out[LATENT_IDX_FILE], joinids)
    unseen = ~np.isin(datasets, TRAIN_DATASETS)
    assert unseen.sum() > 1000  # most cells come from datasets the model never saw
    for got, want in ((out[LATENT_FILE], mean), (out[LATENT_VAR_FILE], var)):
        assert got.dtype == np.float32 and got.shape == (3000, 6)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[unseen], want[unseen], rtol=1e-5, atol=1e-6)
    assert np.abs(out[LATENT_FILE]).max() > 0.1  # a real latent, not zeros
    libs = np.load(run_dir / "embed" / "latent-libsize.npy")
    np.testing.assert_allclose(libs, libsize)


@pytest.mark.slow
def test_soma_embedding_and_manifest(embedded):
    import tiledbsoma as soma
    from cellxgene_census.experimental import get_embedding_metadata

    run_dir, result = embedded
    out = outputs(run_dir)
    uri = str(run_dir / "embed" / EMBEDDING_SOMA)
    with soma.open(uri) as arr:
        assert isinstance(arr, soma.SparseNDArray)
        assert arr.shape == (3000, 6)
        assert arr.nnz == 3000 * 6  # every embedded cell stored explicitly
        tbl = arr.read().tables().concat().to_pandas()
        info = json.loads(arr.metadata[EMBEDDING_INFO_KEY])
    dense = np.zeros((3000, 6), dtype=np.float32)
    dense[tbl["soma_dim_0"], tbl["soma_dim_1"]] = tbl["soma_data"]
    # bfloat16-rounded by default (embed.round_bfloat16); latent.npy keeps full precision
    np.testing.assert_array_equal(
        dense[out[LATENT_IDX_FILE]], round_bfloat16(out[LATENT_FILE].copy())
    )
    assert not np.array_equal(round_bfloat16(out[LATENT_FILE].copy()), out[LATENT_FILE])
    assert info == get_embedding_metadata(uri)
    required = {
        "id", "embedding_name", "title", "description", "primary_contact",
        "additional_contacts", "DOI", "additional_information", "model_link", "data_type",
        "census_version", "experiment_name", "measurement_name", "n_embeddings", "n_features",
        "submission_date",
    }  # fmt: skip
    assert set(info) == required
    assert info["n_embeddings"] == 3000 and info["n_features"] == 6
    assert info["data_type"] == "obs_embedding" and info["experiment_name"] == "homo_sapiens"
    assert set(info["primary_contact"]) == {"name", "email", "affiliation"}

    manifest = json.loads((run_dir / "embed" / MANIFEST_FILE).read_text())
    fig = manifest["figures"]
    assert manifest["stage"] == "embed"
    assert set(manifest["inputs"]) == {"model", "census"}  # the census: soma.census_fingerprint
    assert manifest["outputs"][LATENT_FILE] == f"embed/{LATENT_FILE}"
    assert fig["n_cells"] == 3000 and fig["n_chunks"] == 8 and fig["chunk_size"] == 400
    assert fig["cells_per_s"] > 0 and fig["peak_rss_bytes"] > 0 and fig["wall_seconds"] > 0
    progress = json.loads((run_dir / "embed" / PROGRESS_FILE).read_text())
    assert progress["done"] == list(range(8))
    assert "3,000 cells" in result.summary()


@pytest.mark.slow
def test_minified_model_loads_with_latent_and_no_counts(embedded):
    import scvi

    run_dir, _ = embedded
    out = outputs(run_dir)
    model = scvi.model.SCVI.load(str(run_dir / "embed" / MINIFIED_MODEL_DIR))
    assert model.minified_data_type == "latent_posterior_parameters"
    assert model.adata.n_obs == 3000 and model.adata.X.nnz == 0
    np.testing.assert_array_equal(model.adata.obs["soma_joinid"], out[LATENT_IDX_FILE])
    assert {"cell_type", "dataset_id", "batch"} <= set(model.adata.obs.columns)
    np.testing.assert_allclose(model.get_latent_representation(), out[LATENT_FILE])
    libs = np.load(run_dir / "embed" / "latent-libsize.npy")
    np.testing.assert_allclose(model.adata.obs["observed_lib_size"], libs)


def _in_memory_minified(mini_census, run_dir: Path, out: Path) -> None:
    """The oracle: scvi-tools' minified model built from the whole AnnData in memory (what
    embed did before it wrote the h5ad a block of cells at a time)."""
    import pandas as pd
    import tiledbsoma as soma

    from census_scvi.batches import batch_codes
    from census_scvi.scvi_model import save_minified_model

    latent, var = (
        np.load(run_dir / "embed" / LATENT_FILE),
        np.load(run_dir / "embed" / LATENT_VAR_FILE),
    )
    libs = np.load(run_dir / "embed" / "latent-libsize.npy")
    with soma.open(f"{mini_census}/census_data/homo_sapiens") as exp:
        obs = exp.obs.read().concat().to_pandas()
    codes, names = batch_codes(obs, BATCH_PARTS, "//")
    labels = pd.Categorical.from_codes(codes, categories=pd.Index(names.astype(str)))
    obs.index = obs["soma_joinid"].astype(str).to_numpy()
    save_minified_model(
        run_dir / "train" / "scvi.model", out, obs=obs, batch_labels=labels,
        qz_mean=latent, qz_var=var, library_size=libs, seed=0, accelerator="cpu",
    )  # fmt: skip


@pytest.mark.slow
def test_minified_model_written_in_blocks_equals_the_in_memory_one(mini_census, embedded, tmp_path):
    """The block-by-block h5ad (a template model on one cell per batch, then every per-cell
    dataset rewritten) loads in scvi-tools exactly as the whole-AnnData minified model: obs
    values, batch registry (new batches included), latent, library size, weights."""
    import scvi
    import torch

    run_dir, _ = embedded
    want_dir = tmp_path / "in-memory"
    _in_memory_minified(mini_census, run_dir, want_dir)
    got = scvi.model.SCVI.load(str(run_dir / "embed" / MINIFIED_MODEL_DIR))
    want = scvi.model.SCVI.load(str(want_dir))
    assert got.minified_data_type == want.minified_data_type == "latent_posterior_parameters"
    g, w = got.adata, want.adata
    assert g.shape == w.shape and g.X.nnz == 0
    assert list(g.obs_names) == list(w.obs_names)
    assert list(g.obs.columns) == list(w.obs.columns)
    for c in w.obs.columns:
        a, b = g.obs[c].to_numpy(), w.obs[c].to_numpy()
        if b.dtype.kind in "fiub":
            np.testing.assert_array_equal(a, b, err_msg=c)
        else:
            assert (a.astype(str) == b.astype(str)).all(), c
    for k in w.obsm:
        np.testing.assert_array_equal(g.obsm[k], w.obsm[k])
    reg = [m.adata_manager.get_state_registry("batch")["categorical_mapping"] for m in (got, want)]
    np.testing.assert_array_equal(reg[0], reg[1])
    assert len(reg[0]) > len(TRAIN_DATASETS)  # batches new to the model were added
    for k, v in want.module.state_dict().items():
        torch.testing.assert_close(got.module.state_dict()[k], v, msg=k)
    np.testing.assert_array_equal(got.get_latent_representation(), want.get_latent_representation())


@pytest.mark.slow
def test_skip_force_and_obs_query(mini_census, model_run, embedded, tmp_path):
    run_dir, _ = embedded
    again = run_embed(embed_config(mini_census), run_dir=run_dir)
    assert again.skipped and "skipped" in again.summary()

    sub = tmp_path / "sub"
    copy_model(model_run, sub)
    cfg = embed_config(mini_census, "census.obs_query=dataset_id == 'hs-dataset-05'")
    res = run_embed(cfg, run_dir=sub)
    idx = np.load(sub / "embed" / LATENT_IDX_FILE)
    full = outputs(run_dir)
    keep = np.isin(full[LATENT_IDX_FILE], idx)
    import tiledbsoma as soma

    with soma.open(f"{mini_census}/census_data/homo_sapiens") as exp:
        obs = exp.obs.read(column_names=["soma_joinid", "dataset_id"]).concat().to_pandas()
    want = np.sort(obs.loc[obs["dataset_id"] == "hs-dataset-05", "soma_joinid"].to_numpy())
    assert res.n_cells == len(idx) == len(want) > 100  # the generator's size for that dataset
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(
        np.load(sub / "embed" / LATENT_FILE), full[LATENT_FILE][keep], rtol=1e-5, atol=1e-6
    )
    # a changed config starts over (no stale rows), --force recomputes everything
    query = "census.obs_query=dataset_id == 'hs-dataset-05'"
    cfg100 = embed_config(mini_census, query, "embed.chunk_size=100")
    res2 = run_embed(cfg100, run_dir=sub)
    n_chunks = -(-len(want) // 100)
    assert not res2.skipped and res2.chunks_run == n_chunks and res2.n_chunks == n_chunks
    np.testing.assert_allclose(
        np.load(sub / "embed" / LATENT_FILE), full[LATENT_FILE][keep], rtol=1e-5, atol=1e-6
    )
    assert run_embed(cfg100, run_dir=sub).skipped
    res3 = run_embed(cfg100, run_dir=sub, force=True)
    assert not res3.skipped and res3.chunks_run == n_chunks


def test_errors(mini_census, tmp_path, model_run):
    cfg = embed_config(mini_census)
    with pytest.raises(CensusScviError, match="no trained model"):
        run_embed(cfg, run_dir=tmp_path / "empty")
    with pytest.raises(CensusScviError, match="cannot be used together"):
        run_embed(cfg, run_dir=model_run, shard=(1, 2), merge=True)
    with pytest.raises(CensusScviError, match="K must be between"):
        run_embed(cfg, run_dir=model_run, shard=(3, 2))
    with pytest.raises(CensusScviError, match="discard other shards"):
        run_embed(cfg, run_dir=model_run, shard=(1, 2), force=True)
    fresh = tmp_path / "fresh"
    copy_model(model_run, fresh)
    with pytest.raises(CensusScviError, match="nothing to merge"):
        run_embed(cfg, run_dir=fresh, merge=True)
    bad = embed_config(mini_census, "census.obs_query=dataset_id == 'no-such-dataset'")
    with pytest.raises(CensusScviError, match="selects no cells"):
        run_embed(bad, run_dir=fresh)


def test_round_bfloat16_matches_torch():
    import torch

    rng = np.random.default_rng(0)
    a = (rng.standard_normal(10_000) * rng.choice([1e-3, 1, 1e3], 10_000)).astype(np.float32)
    a[:4] = [0.0, -0.0, 1.0, -2.5]
    want = torch.from_numpy(a.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    got = round_bfloat16(a.copy())
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - a).max() > 0  # it does round


def test_shard_chunk_partition():
    from census_scvi.embed._store import shard_chunks

    for n_chunks in (1, 7, 8, 100):
        for n in (1, 2, 3, 5):
            parts = [shard_chunks(n_chunks, (k, n)) for k in range(1, n + 1)]
            flat = [c for p in parts for c in p]
            assert flat == list(range(n_chunks))  # disjoint, complete, contiguous


# ----------------------------------------------------------------------------------------------
# separate processes: SIGKILL + resume, shards + merge
def _cli(config_path: Path, run_dir: Path, *args: str, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, CHUNK_SLEEP_ENV: str(sleep)}
    cmd = [sys.executable, "-m", "census_scvi.cli", "-q", "embed", "-c", str(config_path)]
    return subprocess.Popen(
        [*cmd, "-o", str(run_dir), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _write_config(cfg: Config, path: Path) -> Path:
    path.write_text(dump_config(cfg))
    return path


def _done(run_dir: Path) -> list[int]:
    try:
        return json.loads((run_dir / "embed" / PROGRESS_FILE).read_text())["done"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(mini_census, model_run, embedded, tmp_path):
    run_dir = tmp_path / "killed"
    copy_model(model_run, run_dir)
    cfg = embed_config(mini_census)
    path = _write_config(cfg, tmp_path / "cfg.yaml")
    proc = _cli(path, run_dir, sleep=3.0)
    deadline = time.monotonic() + 120
    while len(_done(run_dir)) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "embed made no progress"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _done(run_dir)
    assert 2 <= len(done_before) < 8
    assert not (run_dir / "embed" / MANIFEST_FILE).exists()

    result = run_embed(cfg, run_dir=run_dir)
    assert result.complete and result.chunks_run == 8 - len(done_before)  # nothing recomputed
    ref, got = outputs(embedded[0]), outputs(run_dir)
    for name in (LATENT_FILE, LATENT_VAR_FILE, LATENT_IDX_FILE):
        np.testing.assert_array_equal(got[name], ref[name])
    assert len(np.unique(got[LATENT_IDX_FILE])) == 3000  # no row missing, none twice


@pytest.mark.slow
def test_two_shard_processes_then_merge(mini_census, model_run, embedded, tmp_path):
    run_dir = tmp_path / "sharded"
    copy_model(model_run, run_dir)
    cfg = embed_config(mini_census)
    path = _write_config(cfg, tmp_path / "cfg.yaml")
    procs = [_cli(path, run_dir, "--shard", f"{k}/2") for k in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr
        assert "--merge" in stdout
    assert not (run_dir / "embed" / MANIFEST_FILE).exists()
    assert _done(run_dir) == list(range(8))
    runs = json.loads((run_dir / "embed" / PROGRESS_FILE).read_text())["runs"]
    assert sorted(r["shard"] for r in runs) == ["1/2", "2/2"]
    assert sorted(r["chunks"] for r in runs) == [4, 4]

    merged = run_embed(cfg, run_dir=run_dir, merge=True)
    assert merged.complete and merged.chunks_run == 0
    manifest = json.loads((run_dir / "embed" / MANIFEST_FILE).read_text())
    assert manifest["figures"]["processes"] == 2
    ref, got = outputs(embedded[0]), outputs(run_dir)
    for name in (LATENT_FILE, LATENT_VAR_FILE, LATENT_IDX_FILE):
        np.testing.assert_array_equal(got[name], ref[name])
    assert (run_dir / "embed" / EMBEDDING_SOMA).is_dir()


@pytest.mark.slow
def test_a_second_process_of_the_same_shard_is_refused_others_go_on(
    mini_census, model_run, tmp_path, caplog
):
    run_dir = tmp_path / "locked"
    copy_model(model_run, run_dir)
    cfg = embed_config(mini_census)
    path = _write_config(cfg, tmp_path / "cfg.yaml")
    first = _cli(path, run_dir, "--shard", "1/2", sleep=3.0)
    lock = run_dir / "embed" / ".shard-1-of-2.lock"
    deadline = time.monotonic() + 120
    while not lock.exists():
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first shard never took its lock"
        time.sleep(0.1)
    with pytest.raises(CensusScviError, match=f"embed shard 1/2 .*in use by PID {first.pid}"):
        run_embed(cfg, run_dir=run_dir, shard=(1, 2))
    assert run_embed(cfg, run_dir=run_dir, shard=(2, 2)).chunks_run == 4  # in parallel
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock.exists()  # what kill -9 leaves
    with caplog.at_level("WARNING"):
        res = run_embed(cfg, run_dir=run_dir, shard=(1, 2))
    assert "taking over" in caplog.text and not lock.exists()
    assert len(_done(run_dir)) == 8 and res.chunks_run <= 4


@pytest.mark.slow
def test_merge_refuses_missing_chunks(mini_census, model_run, tmp_path):
    run_dir = tmp_path / "partial"
    copy_model(model_run, run_dir)
    cfg = embed_config(mini_census)
    res = run_embed(cfg, run_dir=run_dir, shard=(2, 3))
    assert not res.complete and res.chunks_run == 3 and "--merge" in res.summary()
    with pytest.raises(CensusScviError, match="5 of 8 chunks are not embedded"):
        run_embed(cfg, run_dir=run_dir, merge=True)


@pytest.mark.slow
def test_resume_with_other_execution_settings_keeps_finished_chunks(
    mini_census, model_run, embedded, tmp_path
):
    """embed.batch_size / io_block_size / accelerator change how fast rows are computed, not
    their values: a resume with other values keeps the chunks done; the finished run is then
    recorded under its own config (the manifest hashes the embed section as it is)."""
    from census_scvi.soma import census_fingerprint

    run_dir = tmp_path / "resumed"
    copy_model(model_run, run_dir)
    cfg = embed_config(mini_census)
    assert run_embed(cfg, run_dir=run_dir, shard=(1, 2)).chunks_run == 4
    other = embed_config(mini_census, "embed.batch_size=64", "embed.io_block_size=100")
    res = run_embed(other, run_dir=run_dir)
    assert res.complete and res.chunks_run == 4  # the other half only
    ref, got = outputs(embedded[0]), outputs(run_dir)
    for name in (LATENT_FILE, LATENT_VAR_FILE, LATENT_IDX_FILE):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-7)
    manifest = json.loads((run_dir / "embed" / MANIFEST_FILE).read_text())
    assert manifest["inputs"]["census"] == census_fingerprint(other)
    assert run_embed(other, run_dir=run_dir).skipped
    again = run_embed(cfg, run_dir=run_dir)  # another config: redone, but no chunk recomputed
    assert not again.skipped and again.complete and again.chunks_run == 0


@pytest.mark.slow
def test_torchrun_style_ranks_rank0_merges(mini_census, model_run, embedded, tmp_path, monkeypatch):
    run_dir = tmp_path / "ranks"
    copy_model(model_run, run_dir)
    cfg = embed_config(mini_census)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    from census_scvi.embed._stage import _launched_shard

    assert _launched_shard() is None  # e.g. Lightning's leftover WORLD_SIZE: not a launch
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    r1 = run_embed(cfg, run_dir=run_dir)
    assert r1.shard == (2, 2) and r1.chunks_run == 4 and not r1.complete
    monkeypatch.setenv("RANK", "0")
    r0 = run_embed(cfg, run_dir=run_dir)  # embeds its half, sees all chunks done, writes outputs
    assert r0.shard == (1, 2) and r0.chunks_run == 4 and r0.complete
    assert (run_dir / "embed" / MANIFEST_FILE).is_file()
    ref, got = outputs(embedded[0]), outputs(run_dir)
    for name in (LATENT_FILE, LATENT_VAR_FILE, LATENT_IDX_FILE):
        np.testing.assert_array_equal(got[name], ref[name])
