"""scvi-hub export: the exported folder loads with scvi.hub.HubModel and gives our latent back,
its model card has the Hugging Face YAML header scvi-hub writes, metrics travel with it,
overwrites are refused, and the missing extra names its install command."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from _evalmap_fixtures import reference_run, tiny_config
from census_scvi.cli import app
from census_scvi.errors import CensusScviError
from census_scvi.hub import export_hub

try:
    import scvi.hub  # noqa: F401

    _HAVE_HUB = True
except ImportError:  # the hub extra (huggingface_hub) is not installed
    _HAVE_HUB = False
needs_hub = pytest.mark.skipif(not _HAVE_HUB, reason="needs the hub extra")

METRICS = {
    "n_cells_embedded": 2000,
    "n_cells_sampled": 1500,
    "label_key": "cell_type",
    "aggregate": {"scVI": {"bio_conservation": 0.61, "total": 0.55}, "PCA": {"total": 0.42}},
}


def test_missing_model_and_missing_extra(monkeypatch, tmp_path):
    with pytest.raises(CensusScviError, match="no minified model"):
        export_hub(tmp_path / "run", tmp_path / "hub")
    model = tmp_path / "run" / "embed" / "final_scvi_optimized"
    model.mkdir(parents=True)
    for name in ("model.pt", "adata.h5ad"):
        (model / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "scvi.hub", None)
    with pytest.raises(CensusScviError, match=r"pip install 'census-scvi\[hub\]'"):
        export_hub(tmp_path / "run", tmp_path / "hub")
    res = CliRunner().invoke(app, ["export-hub", str(tmp_path / "run"), str(tmp_path / "hub")])
    assert res.exit_code == 2 and "pip install 'census-scvi[hub]'" in res.output


# ----------------------------------------------------------------------------------------------
# on the mini census's reference run, embedded again with its minified model (slow)
@pytest.fixture(scope="module")
def minified_run(mini_census, tmp_path_factory) -> Path:
    from census_scvi.embed import run_embed

    reference = reference_run(mini_census, str(tmp_path_factory.getbasetemp()))
    run = tmp_path_factory.mktemp("hub") / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("index"))
    config = tiny_config(mini_census, "embed.write_minified_model=true", "train.accelerator=cpu")
    run_embed(config, run_dir=run)
    (run / "evaluate").mkdir(exist_ok=True)
    (run / "evaluate" / "metrics.json").write_text(json.dumps(METRICS))
    return run


@pytest.fixture(scope="module")
def exported(minified_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "scvi-hub"
    return export_hub(minified_run, out, repo_id="someone/census-scvi-demo")


@pytest.mark.slow
@needs_hub
def test_exported_model_loads_with_hubmodel_and_gives_our_latent(minified_run, exported):
    from scvi.hub import HubModel

    hub = HubModel(local_dir=str(exported.out_dir))
    assert hub.metadata.model_cls_name == "SCVI"
    model = hub.model  # loads from the minified AnnData alone (no counts)
    z = model.get_latent_representation()
    latent = np.load(minified_run / "embed" / "latent.npy")
    joinids = np.load(minified_run / "embed" / "latent-idx.npy")
    assert list(model.adata.obs_names) == [str(j) for j in joinids]
    assert z.shape == latent.shape
    assert np.allclose(z, latent, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_hub
def test_model_card_has_the_hugging_face_header_and_our_metrics(exported):
    from huggingface_hub import ModelCard

    out = exported.out_dir
    assert exported.files == sorted(
        ["README.md", "_scvi_required_metadata.json", "adata.h5ad", "metrics.json", "model.pt"]
    )
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["library_name"] == "scvi-tools"
    assert header["license"] == "cc-by-4.0"
    assert "model_cls_name:SCVI" in header["tags"] and "modality:rna" in header["tags"]
    assert any(t.startswith("scvi_version:") for t in header["tags"])
    assert ModelCard.load(out / "README.md").data.library_name == "scvi-tools"
    assert "| total | 0.550 | 0.420 |" in text  # the evaluate aggregates
    assert "Data is Minified**: True" in text
    assert json.loads((out / "metrics.json").read_text()) == METRICS
    meta = json.loads((out / "_scvi_required_metadata.json").read_text())
    assert meta["model_cls_name"] == "SCVI" and meta["anndata_version"]


@pytest.mark.slow
@needs_hub
def test_upload_command_and_overwrite_rules(minified_run, exported, tmp_path):
    assert exported.upload_command == (
        f"hf upload someone/census-scvi-demo {exported.out_dir} . --repo-type model"
    )
    with pytest.raises(CensusScviError, match="already exists"):
        export_hub(minified_run, exported.out_dir)
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CensusScviError, match="not an earlier export"):
        export_hub(minified_run, other, force=True)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(CensusScviError, match="holds the run directory"):
        export_hub(minified_run, minified_run.parent, force=True)
    res = CliRunner().invoke(app, ["export-hub", str(minified_run), str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "hf upload <hf-user>/<model-name>" in res.output
    assert (tmp_path / "cli" / "README.md").is_file()
    res = CliRunner().invoke(
        app, ["export-hub", str(minified_run), str(tmp_path / "cli"), "--force"]
    )
    assert res.exit_code == 0, res.output
