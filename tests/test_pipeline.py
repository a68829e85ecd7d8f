"""``census-scvi run`` / ``run_pipeline``: stage selection, skipping, the real stages end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from census_scvi import pipeline
from census_scvi.cli import app
from census_scvi.config import load_config
from census_scvi.errors import CensusScviError
from census_scvi.pipeline import run_pipeline, stage_range


def test_stage_range_orders_and_validates():
    every = ["prepare", "train", "embed", "evaluate"]
    assert stage_range(None, None, available=lambda s: True) == (every, [])
    assert stage_range("train", "embed", available=lambda s: True) == (["train", "embed"], [])
    assert stage_range("EMBED", None, available=lambda s: True) == (["embed", "evaluate"], [])
    # evaluate is optional: left out (and reported) when its module is missing
    assert stage_range(None, None, available=lambda s: False) == (every[:3], ["evaluate"])
    with pytest.raises(CensusScviError, match=r"needs scib-metrics.*census-scvi\[eval\]"):
        stage_range(None, "evaluate", available=lambda s: False)
    with pytest.raises(CensusScviError, match=r"--from 'trian' is not a stage; valid stages: prep"):
        stage_range("trian", None)
    with pytest.raises(CensusScviError, match="--to 'all' is not a stage"):
        stage_range(None, "all")
    with pytest.raises(CensusScviError, match="--from embed comes after --to train"):
        stage_range("embed", "train")


def test_cli_rejects_bad_stage_names(tmp_path):
    res = CliRunner().invoke(app, ["run", "-o", str(tmp_path), "--from", "bogus"])
    assert res.exit_code == 2
    assert "--from 'bogus' is not a stage" in res.output


def test_runs_selected_stages_in_order(monkeypatch, tmp_path):
    calls = []

    class Done:
        def __init__(self, stage: str, skipped: bool) -> None:
            self.stage, self.skipped = stage, skipped

        def summary(self) -> str:
            return f"{self.stage}: {'skipped' if self.skipped else 'ran'}"

    def fake(stage, config, run_dir, force):
        calls.append((stage, force))
        return Done(stage, skipped=stage == "prepare")

    monkeypatch.setattr(pipeline, "_run_stage", fake)
    monkeypatch.setattr(pipeline, "_available", lambda s: True)
    cfg = load_config(None)
    res = run_pipeline(cfg, run_dir=tmp_path, to_stage="embed")
    assert calls == [("prepare", False), ("train", False), ("embed", False)]
    assert (tmp_path / "config.yaml").is_file()
    text = res.summary()
    assert "2 stage(s) run, 1 up to date (prepare)" in text and "embed: ran" in text
    calls.clear()
    run_pipeline(cfg, run_dir=tmp_path, from_stage="embed", force=True)
    assert calls == [("embed", True), ("evaluate", True)]
    # a DDP worker process (Lightning re-runs the command with LOCAL_RANK=1) stops after train
    calls.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    run_pipeline(cfg, run_dir=tmp_path)
    assert calls == [("prepare", False), ("train", False)]
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(CensusScviError, match="torchrun"):
        run_pipeline(cfg, run_dir=tmp_path)


@pytest.mark.slow
def test_run_after_interrupted_train_and_config_change_starts_over(tmp_path):
    """An interrupted train (checkpoint, no manifest) of another config is discarded, not refused.

    The pipeline used to peek into train's checkpoints and pass ``resume=True``, so a config
    change after a crash stopped ``run`` with "checkpoint belongs to another config" while
    ``train`` itself started over.
    """
    census = tmp_path / "census"
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY_DEMO.replace('"{cache}/tiny-census"', f'"{census}"'))
    run_dir = tmp_path / "run"
    first = run_pipeline(load_config(cfg_path), run_dir=run_dir, to_stage="train")
    assert [s.skipped for s in first.stages] == [False, False]
    ckpts = list((run_dir / "train" / "checkpoints").glob("*.ckpt"))
    assert ckpts, "training left no checkpoint to resume from"
    (run_dir / "train" / "manifest.json").unlink()  # as if killed after the last checkpoint
    changed = load_config(cfg_path, overrides=["train.seed=7"])
    again = run_pipeline(changed, run_dir=run_dir, to_stage="train")
    assert [(s.stage, s.skipped) for s in again.stages] == [("prepare", True), ("train", False)]
    assert again.stages[1].result.resumed_from_epoch is None
    assert (run_dir / "train" / "manifest.json").is_file()


TINY_DEMO = """
census:
  organism: homo_sapiens
  version: null
  uri: "{cache}/tiny-census"
  obs_query_model: "is_primary_data == True and nnz >= 100"
  demo: {cells: 1500, genes: 400, seed: 1}
hvg: {top_n_hvg: 100}
model: {n_latent: 4, n_hidden: 32}
train: {max_epochs: 1, batch_size: 256, accelerator: cpu}
embed: {chunk_size: 500}
"""


@pytest.mark.slow
def test_run_builds_census_runs_real_stages_then_skips(tmp_path):
    from census_scvi.config import cache_dir

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY_DEMO)
    run_dir = tmp_path / "run"
    assert not (cache_dir() / "tiny-census").exists()
    res = CliRunner().invoke(app, ["-q", "run", "-c", str(cfg_path), "-o", str(run_dir), "--to", "embed"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (cache_dir() / "tiny-census").is_dir()  # the mini census was built on first use
    assert "3 stage(s) run" in res.output and str(run_dir.resolve()) in res.output
    for p in ("config.yaml", "prepare/hvg.parquet", "train/scvi.model/model.pt",
              "embed/latent.npy", "embed/manifest.json"):  # fmt: skip
        assert (run_dir / p).exists(), p
    latent = np.load(run_dir / "embed" / "latent.npy")
    assert latent.shape == (1500, 4) and np.isfinite(latent).all()

    cfg = load_config(cfg_path)
    again = run_pipeline(cfg, run_dir=run_dir, to_stage="embed")
    # train and embed are up to date (prepare may redo once: its census identity gains a content
    # hash once the census it built on first use exists; its outputs, hence train's inputs, match)
    assert [s.skipped for s in again.stages][1:] == [True, True]
    again = run_pipeline(cfg, run_dir=run_dir, to_stage="embed")
    assert [s.skipped for s in again.stages] == [True, True, True]
    assert "3 up to date" in again.summary()
    redo = run_pipeline(cfg, run_dir=run_dir, from_stage="embed", to_stage="embed", force=True)
    assert [(s.stage, s.skipped) for s in redo.stages] == [("embed", False)]
    np.testing.assert_array_equal(np.load(run_dir / "embed" / "latent.npy"), latent)


def test_missing_model_error_names_the_fix(tmp_path):
    cfg = load_config(None, overrides=[f"census.uri={tmp_path / 'nowhere'}", "census.demo=null"])
    with pytest.raises(CensusScviError, match="no trained model"):
        run_pipeline(cfg, run_dir=Path(tmp_path), from_stage="embed", to_stage="embed")


def test_embed_index_builds_the_index_after_a_complete_embed_only(monkeypatch, tmp_path):
    import sys

    import census_scvi.search

    ran, indexed = [], []

    class Done:
        def __init__(self, stage: str, complete: bool = True) -> None:
            self.stage, self.skipped, self.complete = stage, False, complete

        def summary(self) -> str:
            return f"{self.stage}: ran"

    def fake_stage(stage, config, run_dir, force):
        ran.append(stage)
        return Done(stage)

    def fake_index(config, *, run_dir):
        indexed.append(Path(run_dir))
        return Done("index")

    monkeypatch.setattr(pipeline, "_run_stage", fake_stage)
    monkeypatch.setattr(census_scvi.search, "run_index", fake_index)
    on = load_config(None, overrides=["embed.index=true"])
    res = run_pipeline(on, run_dir=tmp_path, to_stage="embed")
    assert [s.stage for s in res.stages] == ["prepare", "train", "embed", "index"]
    assert indexed == [tmp_path] and "index: ran" in res.summary()
    # off (the default): no index; an incomplete embedding (one shard of several): no index
    indexed.clear()
    res = run_pipeline(load_config(None), run_dir=tmp_path, to_stage="embed")
    assert [s.stage for s in res.stages] == ["prepare", "train", "embed"] and not indexed
    assert pipeline.index_after_embed(on, tmp_path, Done("embed", complete=False)) is None
    assert not indexed
    # without the search extra, embed.index is refused before any stage runs
    ran.clear()
    monkeypatch.setitem(sys.modules, "tiledb.vector_search", None)
    with pytest.raises(CensusScviError, match=r"pip install 'census-scvi\[search\]'"):
        run_pipeline(on, run_dir=tmp_path, to_stage="embed")
    assert ran == []
    res = CliRunner().invoke(app, ["embed", "-o", str(tmp_path), "--set", "embed.index=true"])
    assert res.exit_code == 2 and "census-scvi[search]" in res.output
