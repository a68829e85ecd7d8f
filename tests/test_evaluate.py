"""The evaluate stage: scVI vs an unintegrated PCA baseline on the mini census, outputs, skip,
errors, and the small library functions against simple oracles."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from _evalmap_fixtures import reference_run, tiny_config
from census_scvi.cli import app
from census_scvi.config import dump_config
from census_scvi.errors import CensusScviError
from census_scvi.evaluate import classifier_accuracy, run_evaluate, stratified_sample


@pytest.fixture(scope="module")
def evaluated(mini_census, tmp_path_factory):
    run_dir = reference_run(mini_census, str(tmp_path_factory.getbasetemp()))
    cfg = tiny_config(mini_census)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden_by_default in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.filterwarnings("ignore", category=hidden_by_default)
        result = run_evaluate(cfg, run_dir=run_dir, force=True)
    return run_dir, cfg, result, caught


def _cells_passing(census_uri: str, value_filter: str) -> int:
    """Human cells of the census that pass ``value_filter`` (the training cells' oracle)."""
    import tiledbsoma as soma

    with soma.open(census_uri) as census:
        obs = census["census_data"]["homo_sapiens"].obs
        return len(obs.read(value_filter=value_filter, column_names=["soma_joinid"]).concat())


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_scvi_beats_pca_on_batch_correction_and_keeps_biology(evaluated):
    _, _, result, _ = evaluated
    agg = result.metrics["aggregate"]
    scvi, pca = agg["scVI"], agg["PCA"]
    assert scvi["Batch correction"] > pca["Batch correction"], agg
    assert scvi["Bio conservation"] >= 0.9 * pca["Bio conservation"], agg
    # the parts of the batch label are scored too, each with its own batch-correction aggregate
    for key in ("batch", "dataset_id", "assay", "suspension_type"):
        assert key in result.metrics["scib"], result.metrics["scib"].keys()
        assert "Batch correction" in result.metrics["scib"][key]["scVI"]
    assert (
        result.metrics["scib"]["dataset_id"]["scVI"]["Batch correction"]
        > (result.metrics["scib"]["dataset_id"]["PCA"]["Batch correction"])
    )
    # cell types stay predictable from the latent (the simulation's ground truth)
    assert result.metrics["classifier"]["scVI"]["knn_accuracy"] > 0.85
    assert result.metrics["classifier"]["scVI"]["logreg_accuracy"] > 0.85


@pytest.mark.slow
def test_outputs_report_card_picture_manifest(evaluated, mini_census):
    run_dir, cfg, result, _ = evaluated
    ev = run_dir / "evaluate"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["aggregate"] == result.metrics["aggregate"]
    n_embedded = np.load(run_dir / "embed" / "latent-idx.npy").size
    assert metrics["n_cells_embedded"] == n_embedded
    assert metrics["n_cells_sampled"] == min(1500, n_embedded)
    assert metrics["n_genes"] == 500 and metrics["label_key"] == "cell_type"
    assert "kbet_per_label" in metrics["metrics_skipped"]

    report = (ev / "report.md").read_text()
    assert "| score | scVI | PCA |" in report
    for line in ("**Batch correction**", "**Bio conservation**", "- **iLISI**:", "- **BRAS**:",
                 "- **cLISI**:", "Classifier accuracy"):  # fmt: skip
        assert line in report, line

    card = (ev / "model_card.md").read_text()
    n_train = _cells_passing(mini_census, cfg.model_obs_filter())
    for text in (mini_census, f"Training cells: {n_train:,}", "Genes (highly variable, model inputs): 500",
                 "scvi-tools", "scib-metrics", "## Intended use", "## Limits", "elbo_train"):  # fmt: skip
        assert text in card, text

    png = (ev / "umap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000

    manifest = json.loads((ev / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate"
    assert set(manifest["outputs"]) == {"metrics.json", "report.md", "umap.png", "model_card.md"}
    assert manifest["figures"]["n_cells_sampled"] == metrics["n_cells_sampled"]
    assert "model" in manifest["inputs"]
    assert manifest["inputs"]["census"].startswith(mini_census)  # soma.census_fingerprint
    assert set(manifest["files"]) == {f"evaluate/{n}" for n in manifest["outputs"]}

    # every classifier score beside its chance level; batch mixing for every batch key
    for emb in ("scVI", "PCA"):
        cls = metrics["classifier"][emb]
        assert 0 < cls["chance_uniform"] <= cls["chance_majority"] < cls["knn_accuracy"]
        for key in ("batch", "dataset_id", "assay", "suspension_type"):
            mix = metrics["batch_classifier"][key][emb]
            assert {"knn_accuracy", "chance_majority", "within_label_knn_accuracy"} <= set(mix)
    mixing = metrics["batch_classifier"]["dataset_id"]
    assert mixing["scVI"]["knn_accuracy"] < mixing["PCA"]["knn_accuracy"]  # scVI mixes better
    assert "kbet_per_label" not in metrics["scib_metrics_ran"]["batch"]
    for text in ("## Batch mixing", "chance: majority class", "## scib-metrics that ran",
                 "differ from ones computed with the defaults", "standardises"):  # fmt: skip
        assert text in report, text


@pytest.mark.slow
def test_default_run_shows_no_third_party_warnings(evaluated):
    *_, caught = evaluated
    assert not caught, [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught]


@pytest.mark.slow
def test_second_run_is_skipped_and_cli_prints_scores(evaluated, tmp_path):
    run_dir, cfg, result, _ = evaluated
    again = run_evaluate(cfg, run_dir=run_dir)
    assert again.skipped and again.metrics["aggregate"] == result.metrics["aggregate"]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_config(cfg))
    res = CliRunner().invoke(app, ["-q", "evaluate", "-c", str(cfg_path), "-o", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "skipped" in res.output and "bio conservation" in res.output
    assert f"{result.metrics['aggregate']['scVI']['Total']:.3f}" in res.output


def test_missing_model_or_embedding_names_the_fix(tmp_path, mini_census):
    cfg = tiny_config(mini_census)
    with pytest.raises(CensusScviError, match="no trained model") as e:
        run_evaluate(cfg, run_dir=tmp_path / "nothing")
    assert "census-scvi train" in str(e.value)


def test_missing_scib_metrics_fails_before_reading_anything(tmp_path, monkeypatch):
    from census_scvi.config import load_config
    from census_scvi.evaluate import _metrics

    real = _metrics.find_spec
    monkeypatch.setattr(
        _metrics, "find_spec", lambda name: None if name == "scib_metrics" else real(name)
    )
    with pytest.raises(CensusScviError, match="scib-metrics") as e:
        # no model, no embedding, no census: the extra is checked before any of them
        run_evaluate(load_config(None), run_dir=tmp_path / "nothing")
    assert "pip install 'census-scvi[eval]'" in str(e.value)


def test_unknown_metric_name_is_rejected(mini_census):
    with pytest.raises(CensusScviError, match="unknown scib-metrics metric"):
        tiny_config(mini_census, "evaluate.skip_metrics=[kbet]")


# ----------------------------------------------------------------------------------------------
def test_stratified_sample_keeps_proportions_and_rare_strata():
    strata = np.array(["a"] * 900 + ["b"] * 95 + ["c"] * 5)
    idx = stratified_sample(strata, n=100, seed=1)
    assert idx.size == 100 and np.all(np.diff(idx) > 0)
    picked = dict(zip(*np.unique(strata[idx], return_counts=True), strict=True))
    assert picked["a"] == 90 and picked["b"] in (9, 10) and picked["c"] >= 1
    assert np.array_equal(stratified_sample(strata, n=5000), np.arange(1000))
    assert not np.array_equal(idx, stratified_sample(strata, n=100, seed=2))
    with pytest.raises(CensusScviError):
        stratified_sample(strata, n=0)


def test_classifier_accuracy_oracle():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 600)
    separable = np.eye(4)[y] * 10 + rng.normal(size=(600, 4))
    noise = rng.normal(size=(600, 4))
    good = classifier_accuracy(separable, y.astype(str))
    bad = classifier_accuracy(noise, y.astype(str))
    assert good["logreg_accuracy"] > 0.98 and good["knn_accuracy"] > 0.98
    assert bad["logreg_accuracy"] < 0.4 and bad["knn_accuracy"] < 0.4
    assert good["n_test"] == 240 and good["n_train"] == 360  # the 60/40 split


def test_umap_coords_above_scanpy_nndescent_threshold():
    """Above 4,096 cells scanpy switches to pynndescent, which broke with scipy 1.17."""
    import numpy as np

    from census_scvi.plots import umap_coords

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 8, (3, 5))
    emb = np.concatenate([c + rng.normal(0, 1, (1700, 5)) for c in centers]).astype(np.float32)
    xy = umap_coords(emb)
    assert xy.shape == (5100, 2)
    assert np.isfinite(xy).all()
    # the three well-separated clusters stay apart in 2-D: nearest centroid recovers membership
    labels = np.repeat(np.arange(3), 1700)
    cent = np.stack([xy[labels == i].mean(axis=0) for i in range(3)])
    pred = np.argmin(((xy[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
    assert (pred == labels).mean() > 0.95


def test_benchmark_when_no_label_spans_two_batches():
    """E.g. a census of one annotated and one unannotated ('unknown') dataset."""
    import numpy as np

    from census_scvi.evaluate._metrics import benchmark

    rng = np.random.default_rng(0)
    n = 300
    labels = np.where(np.arange(n) < 150, "T cell", "unknown")
    labels[:75] = "B cell"
    batches = np.where(np.arange(n) < 150, "zheng", "kang")
    emb = rng.normal(size=(n, 5)).astype(np.float32)
    emb[:75] += 4
    scores = benchmark(
        {"scVI": emb, "PCA": emb[:, ::-1].copy()},
        labels=labels,
        batches={"batch": batches},
        baseline="PCA",
        skip_metrics=("kbet_per_label", "nmi_ari_cluster_labels_leiden"),
    ).scores
    got = scores["batch"]["scVI"]
    assert not any("BRAS" in m or "ilhouette batch" in m for m in got)
    assert 0.0 <= got["Bio conservation"] <= 1.0
    assert "Batch correction" in got


def test_metric_names_are_scib_metrics_switches():
    """config validation and the Benchmarker share one list; it must match scib-metrics."""
    from dataclasses import fields

    from scib_metrics.benchmark import BatchCorrection, BioConservation

    from census_scvi.constants import BATCH_METRICS, BIO_METRICS

    assert set(BIO_METRICS) == {f.name for f in fields(BioConservation)}
    assert set(BATCH_METRICS) == {f.name for f in fields(BatchCorrection)}
