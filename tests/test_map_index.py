"""``map`` with the run's nearest-cell index (issue 15): label transfer over every embedded cell,
as accurate as exact search (within 0.005 on the held-out mini-census datasets), the search used
recorded in ``uns``; exact search when the index is stale, off or unusable (one log line says
why); ``embed.index: true`` builds the index in ``run`` and ``embed``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from _evalmap_fixtures import held_out_query, reference_run, tiny_config
from census_scvi.cli import app
from census_scvi.config import load_config
from census_scvi.knn import index_status
from census_scvi.mapping import run_map
from census_scvi.search import run_index

try:
    import tiledb.vector_search  # noqa: F401

    _HAVE_VS = True
except ImportError:  # the search extra is not installed
    _HAVE_VS = False
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _HAVE_VS, reason="needs the search extra"),
]

#: the picture's reference sample only: small, so that each map run here stays quick
SMALL_PICTURE = "map.reference_sample_size=300"


def _copy_run(src: Path, dest: Path, *, with_index: bool = False) -> Path:
    ignore = None if with_index else shutil.ignore_patterns("index")
    shutil.copytree(src, dest, ignore=ignore)
    return dest


def _map(query: Path, run: Path, out: Path, *sets: str):
    return run_map(query, run_dir=run, out=out, truth="cell_type", overrides=[SMALL_PICTURE, *sets])


def _accuracy(a: ad.AnnData) -> float:
    pred = a.obs["predicted_cell_type"].astype(str).to_numpy()
    return float((pred == a.obs["cell_type"].astype(str).to_numpy()).mean())


@pytest.fixture(scope="module")
def reference(mini_census, tmp_path_factory) -> Path:
    return reference_run(mini_census, str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def indexed(reference, tmp_path_factory) -> Path:
    run = _copy_run(reference, tmp_path_factory.mktemp("map-index") / "run")
    run_index(load_config(run / "config.yaml"), run_dir=run)
    return run


@pytest.fixture(scope="module")
def query(mini_census, tmp_path_factory) -> Path:
    return held_out_query(mini_census, tmp_path_factory.mktemp("map-index") / "query.h5ad")


@pytest.fixture(scope="module")
def both(query, indexed, tmp_path_factory):
    """The same query mapped with the index and with exact search (map.use_index=false)."""
    d = tmp_path_factory.mktemp("map-index")
    with_index = _map(query, indexed, d / "index.h5ad")
    exact = _map(query, indexed, d / "exact.h5ad", "map.use_index=false")
    return with_index, ad.read_h5ad(with_index.out), exact, ad.read_h5ad(exact.out)


def test_index_accuracy_equals_exact_search_within_half_a_percent(both, indexed):
    res, a, res_exact, b = both
    ua, ub = a.uns["census_scvi_map"], b.uns["census_scvi_map"]
    assert ua["search"] == "index" and ub["search"] == "exact"
    assert "map.use_index is false" in ub["search_reason"] and "nprobe" not in ub
    figures = json.loads((indexed / "index" / "manifest.json").read_text())["figures"]
    assert ua["nprobe"] == figures["nprobe"] and "calibrated" in ua["search_reason"]
    assert Path(ua["index"]) == (indexed / "index" / "ivf_flat").resolve()
    n = np.load(indexed / "embed" / "latent-idx.npy").size
    assert ua["n_reference_cells"] == ua["n_embedded_cells"] == n  # every embedded cell
    acc_index, acc_exact = _accuracy(a), _accuracy(b)
    print(f"map accuracy on the held-out datasets: index {acc_index:.4f}, exact {acc_exact:.4f}")
    assert abs(acc_index - acc_exact) <= 0.005, (acc_index, acc_exact)
    assert acc_exact >= 0.85, acc_exact
    assert ua["truth"]["accuracy"] == pytest.approx(acc_index)
    same = (
        a.obs["predicted_cell_type"].astype(str) == b.obs["predicted_cell_type"].astype(str)
    ).mean()
    assert same >= 0.98, same
    assert "search: index, over every" in res.summary()
    assert "search: exact, over a sample of" in res_exact.summary()


def test_index_at_every_partition_gives_exact_searchs_labels(both, query, indexed, tmp_path):
    """Searching every partition finds the exact neighbours: the labels are exact search's."""
    _, _, _, b = both
    partitions = json.loads((indexed / "index" / "manifest.json").read_text())["figures"][
        "partitions"
    ]
    res = _map(query, indexed, tmp_path / "all.h5ad", f"search.nprobe={partitions}")
    a = ad.read_h5ad(res.out)
    assert a.uns["census_scvi_map"]["nprobe"] == partitions
    assert "search.nprobe" in a.uns["census_scvi_map"]["search_reason"]
    pa = a.obs["predicted_cell_type"].astype(str).to_numpy()
    pb = b.obs["predicted_cell_type"].astype(str).to_numpy()
    assert (pa == pb).mean() >= 0.999, (pa != pb).sum()
    np.testing.assert_allclose(
        a.obs["predicted_cell_type_confidence"], b.obs["predicted_cell_type_confidence"], atol=1e-4
    )


def test_stale_index_falls_back_to_exact_search_with_one_line(
    both, query, indexed, tmp_path, caplog
):
    _, _, _, b = both
    stale = _copy_run(indexed, tmp_path / "stale", with_index=True)
    assert index_status(stale).current
    os.utime(stale / "embed" / "latent.npy")  # as a re-embedding would
    assert index_status(stale).problem == "stale"
    with caplog.at_level(logging.INFO, logger="census_scvi"):
        res = _map(query, stale, tmp_path / "s.h5ad")
    said = [r for r in caplog.records if "search over" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    line = said[0].getMessage()
    assert said[0].levelno == logging.WARNING
    assert "exact search" in line and "earlier embedding" in line and "census-scvi index" in line
    out = ad.read_h5ad(res.out)
    assert out.uns["census_scvi_map"]["search"] == "exact"
    assert "earlier embedding" in out.uns["census_scvi_map"]["search_reason"]
    # exact search over the same cells: exactly the use_index=false predictions
    np.testing.assert_array_equal(
        out.obs["predicted_cell_type"].astype(str), b.obs["predicted_cell_type"].astype(str)
    )
    np.testing.assert_array_equal(
        out.obs["predicted_cell_type_confidence"], b.obs["predicted_cell_type_confidence"]
    )


def test_plan_falls_back_without_the_extra_or_when_switched_off(indexed, monkeypatch, caplog):
    from census_scvi.mapping._search import plan_search

    plan = plan_search(indexed, use_index=True, nprobe=None)
    assert plan.kind == "index" and plan.path == indexed / "index" / "ivf_flat"
    assert plan.nprobe == index_status(indexed).nprobe
    assert plan_search(indexed, use_index=True, nprobe=5).nprobe == 5
    assert plan_search(indexed, use_index=False, nprobe=None).kind == "exact"
    monkeypatch.setitem(sys.modules, "tiledb.vector_search", None)
    with caplog.at_level(logging.WARNING, logger="census_scvi"):
        plan = plan_search(indexed, use_index=True, nprobe=None)
    assert plan.kind == "exact" and "pip install 'census-scvi[search]'" in plan.reason
    assert any("not installed" in r.getMessage() for r in caplog.records)


def test_embed_index_true_builds_the_index_in_run_and_embed(reference, mini_census, tmp_path):
    from census_scvi.pipeline import run_pipeline

    run = _copy_run(reference, tmp_path / "run")
    assert index_status(run).problem == "missing"
    res = run_pipeline(tiny_config(mini_census, "embed.index=true"), run_dir=run, to_stage="embed")
    # embed.index is not part of embed's identity: the embedding is kept, the index built
    assert [(s.stage, s.skipped) for s in res.stages][-2:] == [("embed", True), ("index", False)]
    assert index_status(run).current and "IVF_FLAT over" in res.summary()
    runner = CliRunner()
    args = ["embed", "-c", str(run / "config.yaml"), "-o", str(run)]  # embed.index: true in it
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "embed: up to date" in out.output and "index: already built" in out.output
    shutil.rmtree(run / "index")
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "index: built" in out.output and index_status(run).current
    out = runner.invoke(app, [*args, "--set", "embed.index=false"])
    assert out.exit_code == 0 and "index:" not in out.output
