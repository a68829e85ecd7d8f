"""Nearest-cell search: the index over every embedded cell (recall against exact numpy k-NN,
skip, kill and resume, the Census metadata, the search config section), neighbours of a query
(predictions against exact search and against map's weights), the CLI, and the missing optional
dependency. The k-NN pieces are the shared layer's (census_scvi.knn), re-exported by search."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from _evalmap_fixtures import held_out_query, reference_run
from census_scvi.cli import app
from census_scvi.config import load_config
from census_scvi.constants import EMBEDDING_INFO_KEY
from census_scvi.errors import CensusScviError
from census_scvi.knn import KnnLabelTransfer, kernel_weights, predict
from census_scvi.search import (
    OBSM_DISTANCES,
    OBSM_JOINIDS,
    exact_knn,
    open_index,
    predict_obs,
    query_index,
    recall_at_k,
    run_index,
    run_neighbors,
)
from census_scvi.search._build import ingest_ivf_flat

COLUMNS = ["cell_type", "tissue_general", "disease"]

try:
    import tiledb.vector_search  # noqa: F401

    _HAVE_VS = True
except ImportError:  # the search extra is not installed
    _HAVE_VS = False
needs_vs = pytest.mark.skipif(not _HAVE_VS, reason="needs the search extra")


def _exact_ids(q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    d2 = ((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    return ids[np.argsort(d2, axis=1, kind="stable")[:, :k]]


def _id_recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact, strict=True)])
    )


def map_proba_oracle(reference, labels, query, k):
    """map's label probabilities as mapping/_transfer.py computed them before the shared knn
    layer (commit 621e204, KnnLabelTransfer.predict_proba), kept verbatim as the oracle.

    Returns ``(classes, proba, dist, ind)``.
    """
    from sklearn.neighbors import NearestNeighbors

    y = np.asarray(labels).astype(str)
    classes, codes = np.unique(y, return_inverse=True)
    nn = NearestNeighbors(n_neighbors=int(min(k, y.size))).fit(np.asarray(reference, np.float32))
    dist, ind = nn.kneighbors(np.asarray(query, dtype=np.float32))
    scale = dist.mean(axis=1, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    w = np.exp(-(dist**2) / (2.0 * scale**2))
    w /= w.sum(axis=1, keepdims=True)
    proba = np.zeros((dist.shape[0], classes.size), dtype=np.float64)
    rows = np.repeat(np.arange(dist.shape[0]), dist.shape[1])
    np.add.at(proba, (rows, codes[ind].ravel()), w.ravel())
    return classes, proba.astype(np.float32), dist, ind


# ----------------------------------------------------------------------------------------------
# fast: the library pieces on synthetic latents
def test_exact_knn_streams_blocks_and_equals_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 6)).astype(np.float32)
    q = rng.normal(size=(40, 6)).astype(np.float32)
    d2, rows = exact_knn(q, x, k=7, block_bytes=40 * 4 * 50)  # 50 reference rows a block
    full = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(rows, np.argsort(full, axis=1)[:, :7])
    np.testing.assert_allclose(d2, np.sort(full, axis=1)[:, :7], rtol=1e-4, atol=1e-4)


@needs_vs
def test_synthetic_index_recall_and_ids(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(20, 10)) * 3
    x = (centers[rng.integers(0, 20, 5000)] + rng.normal(size=(5000, 10))).astype(np.float32)
    ids = np.arange(5000, dtype=np.int64) * 7 + 3  # external ids are not row numbers
    build = ingest_ivf_flat(
        tmp_path / "idx", x, ids, scratch=tmp_path / "scratch", build_memory_mib=1
    )
    assert build["partitions"] == 70  # sqrt(n)
    index = open_index(str(tmp_path / "idx"))
    q = x[:300] + rng.normal(size=(300, 10)).astype(np.float32) * 0.2
    exact = _exact_ids(q, x, ids, 30)
    got, dist = query_index(index, q, k=30, nprobe=build["partitions"])
    assert _id_recall(got, exact) == 1.0
    d_exact = np.sqrt(((q[:, None, :] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(dist[:, 0], d_exact.min(axis=1), rtol=1e-4, atol=1e-4)
    got, dist = query_index(index, q, k=30, nprobe=8)
    kth = np.sort(d_exact, axis=1)[:, 29]
    assert recall_at_k(dist, kth, k=30) == pytest.approx(_id_recall(got, exact), abs=1e-9)


def test_block_reads_of_a_memmap_equal_the_array(tmp_path):
    from census_scvi.knn import iter_blocks, take_rows

    x = np.random.default_rng(3).normal(size=(1003, 7)).astype(np.float32)
    np.save(tmp_path / "latent.npy", x)
    mm = np.load(tmp_path / "latent.npy", mmap_mode="r")
    for arr in (mm, x):  # file reads for the memmap, slices otherwise
        got = np.concatenate([b.copy() for _, b in iter_blocks(arr, 100)])
        np.testing.assert_array_equal(got, x)
        rows = np.sort(np.random.default_rng(4).choice(1003, 50, replace=False))
        np.testing.assert_array_equal(take_rows(arr, rows, rows_per_block=64), x[rows])


def test_weights_and_votes_match_map_and_plain_plurality():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(400, 5)).astype(np.float32)
    labels = rng.choice(np.array(["a", "b", "c", "d"]), size=400)
    q = rng.normal(size=(60, 5)).astype(np.float32)
    classes, proba, dist, ind = map_proba_oracle(ref, labels, q, 15)
    codes = np.unique(labels, return_inverse=True)[1]
    pred = predict(codes[ind], kernel_weights(dist), n_classes=classes.size)
    # map's exact path: the very figures map gave before (float64 distances, float64 weights)
    np.testing.assert_array_equal(pred.codes, proba.argmax(axis=1))
    np.testing.assert_array_equal(pred.confidence, proba.max(axis=1))
    res = KnnLabelTransfer(ref, labels, n_neighbors=15).predict(q, unknown_threshold=0.6)
    np.testing.assert_array_equal(res.best, classes[proba.argmax(axis=1)])
    np.testing.assert_array_equal(res.confidence, proba.max(axis=1))
    low = proba.max(axis=1) < 0.6
    assert low.any() and (res.labels[low] == "unknown").all()
    assert (res.labels[~low] == res.best[~low]).all()
    # the index's float32 distances weigh alike within float32 rounding
    f32 = predict(codes[ind], kernel_weights(dist.astype(np.float32)), n_classes=classes.size)
    assert kernel_weights(dist.astype(np.float32)).dtype == np.float32
    np.testing.assert_allclose(f32.confidence, proba.max(axis=1), rtol=1e-5, atol=1e-6)
    votes = np.stack([(codes[ind] == c).sum(axis=1) for c in range(classes.size)], axis=1)
    share_of_pred = votes[np.arange(60), pred.codes] / 15
    np.testing.assert_allclose(pred.vote_share, share_of_pred, rtol=1e-6)
    # a missing neighbour (-1, inf) carries neither weight nor vote
    nc, d = codes[ind].copy(), dist.astype(np.float32).copy()
    nc[:, -1], d[:, -1] = -1, np.inf
    part = predict(nc, kernel_weights(d), n_classes=classes.size)
    assert (part.vote_share * 14 == np.round(part.vote_share * 14)).all()


def test_ties_break_as_map_and_index_neighbours_resolve_to_rows():
    from census_scvi.knn import joinid_rows, sorted_codes, transfer_from_neighbors

    # four neighbours at one distance, two "b" then two "a": a tie, won by the first sorted class
    ref = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=np.float32)
    labels = ["b", "b", "a", "a"]
    q = np.zeros((1, 2), dtype=np.float32)
    classes, proba, _, _ = map_proba_oracle(ref, labels, q, 4)
    assert classes[proba.argmax(axis=1)][0] == "a" and proba.max() == pytest.approx(0.5)
    res = KnnLabelTransfer(ref, labels, n_neighbors=4).predict(q)
    assert res.best[0] == "a" and res.confidence[0] == pytest.approx(0.5)
    # the index path: label codes in first-seen order (b=0, a=1) are re-coded into sorted order
    first_seen = np.array(["b", "a"], dtype=object)
    ranked, sorted_classes = sorted_codes(np.array([[0, 0, 1, 1]]), first_seen)
    assert list(sorted_classes) == ["a", "b"] and ranked.tolist() == [[1, 1, 0, 0]]
    dist = np.ones((1, 4), dtype=np.float32)
    got = transfer_from_neighbors(ranked, dist, sorted_classes)
    assert got.best[0] == "a" and got.confidence[0] == pytest.approx(0.5)
    # a cell without any neighbour: the unknown label, confidence 0
    none = transfer_from_neighbors(np.full((1, 4), -1), np.full((1, 4), np.inf), sorted_classes)
    assert none.best[0] == "unknown" and none.labels[0] == "unknown" and none.confidence[0] == 0
    # soma_joinids the index found -> rows of the embedding (-1 stays missing)
    joinids = np.array([3, 10, 17], dtype=np.int64)
    found = np.array([[17, -1, 3], [10, 3, -1]], dtype=np.int64)
    assert joinid_rows(joinids, found).tolist() == [[2, -1, 0], [1, 0, -1]]
    with pytest.raises(CensusScviError, match="not in the run's embedding"):
        joinid_rows(joinids, np.array([[11]]))
    with pytest.raises(CensusScviError, match="not strictly ascending"):
        joinid_rows(joinids[::-1].copy(), found)


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tiledb.vector_search", None)
    with pytest.raises(CensusScviError, match=r"pip install 'census-scvi\[search\]'"):
        run_index(load_config(None), run_dir=tmp_path)
    res = CliRunner().invoke(app, ["index", "-o", str(tmp_path)])
    assert res.exit_code == 2
    assert "pip install 'census-scvi[search]'" in res.output


# ----------------------------------------------------------------------------------------------
# on the mini census's reference run (slow: trains the reference once per session)
@pytest.fixture(scope="module")
def reference(mini_census, tmp_path_factory) -> Path:
    return reference_run(mini_census, str(tmp_path_factory.getbasetemp()))


def _copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("index"))
    return dest


@pytest.fixture(scope="module")
def indexed(reference, tmp_path_factory):
    run = _copy_run(reference, tmp_path_factory.mktemp("search") / "run")
    result = run_index(load_config(run / "config.yaml"), run_dir=run)
    return run, result


@pytest.fixture(scope="module")
def neighbors(mini_census, indexed, tmp_path_factory):
    run, _ = indexed
    d = tmp_path_factory.mktemp("neighbors")
    query = held_out_query(mini_census, d / "query.h5ad")
    res = run_neighbors(query, run_dir=run, out=d / "nn.h5ad", k=30, columns=COLUMNS)
    return query, res, ad.read_h5ad(d / "nn.h5ad")


@pytest.mark.slow
@needs_vs
def test_index_recall_at_30_against_exact_numpy_knn(indexed):
    run, result = indexed
    latent = np.load(run / "embed" / "latent.npy")
    ids = np.load(run / "embed" / "latent-idx.npy")
    f = result.figures
    assert f["n_cells"] == latent.shape[0] and f["n_features"] == latent.shape[1]
    assert f["partitions"] == int(np.sqrt(latent.shape[0]))
    assert f["recall"] >= 0.95 and f["k"] == 30
    # new cells near the embedded ones, not in the index
    rng = np.random.default_rng(0)
    pick = rng.choice(latent.shape[0], 400, replace=False)
    q = latent[pick] + rng.normal(size=(400, latent.shape[1])).astype(np.float32) * 0.05
    got, _ = query_index(open_index(str(result.path)), q, k=30, nprobe=f["nprobe"])
    recall = _id_recall(got, _exact_ids(q, latent, ids, 30))
    assert recall >= 0.95, (recall, f["nprobe"], f["recall_by_nprobe"])


@pytest.mark.slow
@needs_vs
def test_index_is_recorded_in_embedding_metadata_and_manifest(indexed):
    import tiledbsoma as soma

    run, result = indexed
    entry = {"type": "IVFFlat", "relative_uri": "index/ivf_flat"}
    with soma.SparseNDArray.open(str(run / "embed" / "embedding.soma")) as arr:
        info = json.loads(arr.metadata[EMBEDDING_INFO_KEY])
    assert info["indexes"] == [entry]
    assert info["n_embeddings"] == result.figures["n_cells"]  # the rest is kept
    assert (run / info["indexes"][0]["relative_uri"]).resolve() == result.path.resolve()
    manifest = json.loads((run / "index" / "manifest.json").read_text())
    assert {k: manifest["index"][k] for k in entry} == entry
    assert manifest["index"]["nprobe"] == result.figures["nprobe"]
    assert "index/ivf_flat" in manifest["files"]
    assert "IVF_FLAT over" in result.summary() and "recall@30" in result.summary()


@pytest.mark.slow
@needs_vs
def test_index_rerun_is_skipped_and_repairs_the_metadata(indexed):
    import tiledbsoma as soma

    run, result = indexed
    uri = str(run / "embed" / "embedding.soma")
    before = (run / "index" / "manifest.json").read_text()
    with soma.SparseNDArray.open(uri) as arr:
        info = json.loads(arr.metadata[EMBEDDING_INFO_KEY])
    info.pop("indexes")  # as after 'embed --force' rewrote the embedding identically
    with soma.SparseNDArray.open(uri, "w") as arr:
        arr.metadata[EMBEDDING_INFO_KEY] = json.dumps(info)
    again = run_index(load_config(run / "config.yaml"), run_dir=run)
    assert again.skipped and again.figures["nprobe"] == result.figures["nprobe"]
    assert (run / "index" / "manifest.json").read_text() == before
    with soma.SparseNDArray.open(uri) as arr:
        assert json.loads(arr.metadata[EMBEDDING_INFO_KEY])["indexes"][0]["type"] == "IVFFlat"
    assert "already built" in again.summary()


@pytest.mark.slow
@needs_vs
def test_index_settings_come_from_the_search_section_and_the_flag_wins(reference, tmp_path):
    run = _copy_run(reference, tmp_path / "run")
    sets = ["search.partitions=16", "search.calibration_cells=200", "search.k=10"]
    result = run_index(load_config(run / "config.yaml", overrides=sets), run_dir=run)
    f = result.figures
    assert (f["partitions"], f["calibration_cells"], f["k"]) == (16, 200, 10)
    assert "recall@10" in result.summary()
    args = ["index", "-o", str(run)] + [a for s in sets for a in ("--set", s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "already built" in res.output  # same settings: skipped
    res = CliRunner().invoke(app, [*args, "--partitions", "8"])
    assert res.exit_code == 0, res.output
    assert "index: built" in res.output and "8 partitions" in res.output
    figures = json.loads((run / "index" / "manifest.json").read_text())["figures"]
    assert figures["partitions"] == 8 and figures["k"] == 10


@pytest.mark.slow
@needs_vs
def test_killed_build_leaves_nothing_visible_and_rerun_builds(reference, tmp_path):
    run = _copy_run(reference, tmp_path / "run")
    script = textwrap.dedent(
        f"""
        import os, signal
        import census_scvi.search._stage as stage
        from census_scvi.config import load_config

        def killed(*args, **kwargs):  # the index is built, under its temporary name
            os.kill(os.getpid(), signal.SIGKILL)

        stage.calibrate_nprobe = killed
        stage.run_index(load_config({str(run / "config.yaml")!r}), run_dir={str(run)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = sorted(p.name for p in (run / "index").iterdir())
    assert not [n for n in left if not n.startswith(".")], left  # no index, no manifest
    assert any(n.startswith(".ivf_flat.tmp-") for n in left), left
    result = run_index(load_config(run / "config.yaml"), run_dir=run)
    assert not result.skipped and result.figures["recall"] >= 0.95
    assert sorted(p.name for p in (run / "index").iterdir()) == ["ivf_flat", "manifest.json"]


@pytest.mark.slow
@needs_vs
def test_neighbors_output_layout(neighbors, indexed):
    query, res, out = neighbors
    q = ad.read_h5ad(query)
    n = q.n_obs
    assert out.n_obs == n and (out.obs_names == q.obs_names).all()
    ids, dist = out.obsm[OBSM_JOINIDS], out.obsm[OBSM_DISTANCES]
    assert ids.shape == (n, 30) and ids.dtype == np.int64 and (ids >= 0).all()
    assert dist.shape == (n, 30) and dist.dtype == np.float32
    assert (np.diff(dist, axis=1) >= -1e-5).all()  # nearest first
    embedded = np.load(indexed[0] / "embed" / "latent-idx.npy")
    assert np.isin(ids, embedded).all()
    for col in COLUMNS:
        assert isinstance(out.obs[f"{col}_pred"].dtype, pd.CategoricalDtype)
        for key in (f"{col}_confidence", f"{col}_vote_share"):
            v = out.obs[key].to_numpy()
            assert v.dtype == np.float32 and ((v >= 0) & (v <= 1)).all()
    assert out.uns["census_scvi_neighbors"]["k"] == 30
    accuracy = (out.obs["cell_type_pred"].astype(str) == out.obs["cell_type"].astype(str)).mean()
    assert accuracy >= 0.85, accuracy
    assert "cell_type_pred" in res.summary()


@pytest.mark.slow
@needs_vs
def test_neighbors_latent_is_maps_latent(neighbors, indexed):
    from census_scvi.mapping import encode_query

    query, _, out = neighbors
    z = encode_query(ad.read_h5ad(query), indexed[0] / "train" / "scvi.model", accelerator="cpu")
    np.testing.assert_allclose(out.obsm["X_scvi"], z, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_vs
def test_neighbors_predictions_equal_exact_search(mini_census, neighbors, indexed, tmp_path):
    """Index predictions = predictions from exact k-NN over every embedded cell."""
    import cellxgene_census
    from sklearn.neighbors import NearestNeighbors

    query, _, out = neighbors
    run, result = indexed
    latent = np.load(run / "embed" / "latent.npy")
    ids = np.load(run / "embed" / "latent-idx.npy")
    z = out.obsm["X_scvi"]
    dist, rows = NearestNeighbors(n_neighbors=30).fit(latent).kneighbors(z)
    with cellxgene_census.open_soma(uri=mini_census) as census:
        exp = census["census_data"]["homo_sapiens"]
        exact = predict_obs(exp, ids[rows], dist, COLUMNS)
        ref_types = exp.obs.read(column_names=["soma_joinid", "cell_type"]).concat().to_pandas()
    # at the default (calibrated) nprobe
    for col in COLUMNS:
        agree = (out.obs[f"{col}_pred"].astype(str).to_numpy() == np.asarray(exact[col][0])).mean()
        assert agree >= 0.98, (col, agree)
    # searching every partition gives the exact neighbours and the same predictions
    full = run_neighbors(
        query, run_dir=run, out=tmp_path / "all.h5ad", nprobe=result.figures["partitions"]
    )
    got = ad.read_h5ad(full.out)
    np.testing.assert_allclose(got.obsm[OBSM_DISTANCES], dist, rtol=1e-4, atol=1e-4)
    # the same cells, rank by rank, but for near-ties (float32 vs float64 distances) in another
    # order: each cell found lies at the exact k-NN distance of its rank
    found = got.obsm[OBSM_JOINIDS]
    assert (found != ids[rows]).mean() < 1e-3
    d_found = np.linalg.norm(z[:, None, :] - latent[np.searchsorted(ids, found)], axis=-1)
    np.testing.assert_allclose(d_found, dist, rtol=1e-4, atol=1e-4)
    for col in COLUMNS:
        np.testing.assert_array_equal(
            got.obs[f"{col}_pred"].astype(str).to_numpy(), np.asarray(exact[col][0]).astype(str)
        )
        np.testing.assert_allclose(got.obs[f"{col}_confidence"], exact[col][1], atol=1e-5)
    # the confidence is map's: weighted k-NN over every embedded cell at k = 30
    labels = ref_types.set_index("soma_joinid").loc[ids, "cell_type"].astype(str).to_numpy()
    proba = map_proba_oracle(latent, labels, z, 30)[1]
    np.testing.assert_allclose(got.obs["cell_type_confidence"], proba.max(axis=1), atol=1e-5)


@pytest.mark.slow
@needs_vs
def test_vote_share_is_predict_obs_metadata_confidence(mini_census, neighbors):
    import cellxgene_census
    from cellxgene_census.experimental import predict_obs_metadata
    from cellxgene_census.experimental._embedding_search import NeighborObs

    _, _, out = neighbors
    nn = NeighborObs(distances=out.obsm[OBSM_DISTANCES], neighbor_ids=out.obsm[OBSM_JOINIDS])
    with cellxgene_census.open_soma(uri=mini_census) as census:
        theirs = predict_obs_metadata(
            "homo_sapiens", "local", nn, COLUMNS, experiment=census["census_data"]["homo_sapiens"]
        )
    for col in COLUMNS:
        same = theirs[col].astype(str).to_numpy() == out.obs[f"{col}_pred"].astype(str).to_numpy()
        assert same.mean() >= 0.95, (col, same.mean())
        np.testing.assert_allclose(
            out.obs[f"{col}_vote_share"].to_numpy()[same],
            theirs[f"{col}_confidence"].to_numpy()[same],
            rtol=1e-6,
        )


@pytest.mark.slow
@needs_vs
def test_neighbors_refuses_to_overwrite_and_a_stale_index(neighbors, indexed, reference, tmp_path):
    query, res, _ = neighbors
    run, _ = indexed
    with pytest.raises(CensusScviError, match="already exists"):
        run_neighbors(query, run_dir=run, out=res.out)
    with pytest.raises(CensusScviError, match="not in the census obs"):
        run_neighbors(query, run_dir=run, out=tmp_path / "x.h5ad", columns=["no_such_column"])
    stale = _copy_run(run, tmp_path / "stale")
    shutil.copytree(run / "index", stale / "index")
    os.utime(stale / "embed" / "latent.npy")  # as a re-embedding would
    with pytest.raises(CensusScviError, match="earlier embedding"):
        run_neighbors(query, run_dir=stale, out=tmp_path / "y.h5ad")
    bare = _copy_run(reference, tmp_path / "bare")
    with pytest.raises(CensusScviError, match="census-scvi index"):
        run_neighbors(query, run_dir=bare, out=tmp_path / "z.h5ad")


@pytest.mark.slow
@needs_vs
def test_cli_index_and_neighbors(neighbors, indexed, tmp_path):
    query, _, _ = neighbors
    run, _ = indexed
    runner = CliRunner()
    res = runner.invoke(app, ["index", "-o", str(run)])
    assert res.exit_code == 0, res.output
    assert "already built" in res.output
    out = tmp_path / "cli.h5ad"
    args = ["neighbors", str(query), "--run", str(run), "-o", str(out), "-k", "10"]
    res = runner.invoke(app, [*args, "--columns", "cell_type"])
    assert res.exit_code == 0, res.output
    got = ad.read_h5ad(out)
    assert got.obsm[OBSM_JOINIDS].shape == (got.n_obs, 10) and "cell_type_pred" in got.obs
    assert "tissue_general_pred" not in got.obs
    res = runner.invoke(app, [*args, "--columns", "cell_type"])
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, [*args, "--columns", "cell_type", "--force"])
    assert res.exit_code == 0, res.output
    # without -k: search.k
    res = runner.invoke(
        app, [*args[:-2], "--columns", "cell_type", "--set", "search.k=7", "--force"]
    )
    assert res.exit_code == 0, res.output
    assert ad.read_h5ad(out).obsm[OBSM_JOINIDS].shape == (got.n_obs, 7)
