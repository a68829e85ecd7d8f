"""The train stage: oracle against scvi-tools, every key honoured, resume, failures, CLI, stream."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback
from typer.testing import CliRunner

from census_scvi.cli import app
from census_scvi.config import ModelConfig, TrainingPlanConfig, load_config
from census_scvi.errors import CensusScviError
from census_scvi.prepare import run_prepare
from census_scvi.train._stage import (
    DDP_STRATEGY,
    resolve_devices,
    run_train,
    scvi_model_kwargs,
    scvi_plan_kwargs,
)

SEED_CONFIG = Path(__file__).resolve().parents[1].parent / "shared/reference/seed-scvi-config.yaml"
SMALL = [
    "hvg.top_n_hvg=100",
    "model.n_hidden=32",
    "model.n_latent=5",
    "train.max_epochs=3",
    "train.batch_size=256",
    "train.accelerator=cpu",
    "training_plan.n_epochs_kl_warmup=2",
]


def _cfg(uri: str, *extra: str, path: Path | None = None):
    return load_config(path, overrides=[f"census.uri={uri}", *SMALL, *extra])


@pytest.fixture(scope="module")
def prepared(mini_census, tmp_path_factory) -> Path:
    """A run dir whose prepare/ stage is done (memory mode: h5ad, cells, hvg)."""
    run = tmp_path_factory.mktemp("train") / "prepared"
    run_prepare(_cfg(mini_census), run_dir=run)
    return run


def _run_dir(prepared: Path, tmp_path: Path, name: str = "run") -> Path:
    run = tmp_path / name
    shutil.copytree(prepared / "prepare", run / "prepare")
    return run


def _history(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "train/logs/history.csv", index_col="epoch")


def _prepared_adata(run: Path) -> ad.AnnData:
    return ad.read_h5ad(run / "prepare/anndata_model.h5ad")


# ------------------------------------------------------------------------------------------
# config -> scvi-tools arguments (fast)
# ------------------------------------------------------------------------------------------
def test_every_training_plan_key_is_a_training_plan_parameter():
    from scvi.train import TrainingPlan

    params = inspect.signature(TrainingPlan.__init__).parameters
    fields = set(TrainingPlanConfig.model_fields)
    assert fields <= set(params), fields - set(params)
    # and our defaults are scvi-tools' defaults (a config that says nothing changes nothing)
    for name in fields:
        assert TrainingPlanConfig().model_dump()[name] == params[name].default, name
    assert scvi_plan_kwargs(TrainingPlanConfig()).keys() == fields


def test_fused_optimizer_gives_scvi_tools_adam_update():
    """train.fused_optimizer swaps scvi-tools' Adam/AdamW creator for torch's fused kernel with
    the same lr, eps and weight decay: the same parameters after a few steps (float rounding)."""
    from census_scvi.train._model import FusedOptimizer, fused_plan_kwargs

    plan = scvi_plan_kwargs(TrainingPlanConfig(lr=3e-3, eps=0.01, weight_decay=1e-4))
    fused = fused_plan_kwargs(plan, "cpu")
    assert fused["optimizer"] == "Custom" and isinstance(fused["optimizer_creator"], FusedOptimizer)
    assert fused_plan_kwargs(plan, "mps") is plan  # no fused kernel there: scvi-tools' own
    other = scvi_plan_kwargs(TrainingPlanConfig(optimizer="AdamW"))
    assert fused_plan_kwargs(other, "cpu")["optimizer_creator"].name == "AdamW"
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(300, 40, generator=g), torch.randn(40, generator=g)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    results = []
    for make in (
        lambda ps: torch.optim.Adam(ps, lr=3e-3, eps=0.01, weight_decay=1e-4),  # scvi-tools'
        fused["optimizer_creator"],
    ):
        params = [p.clone().requires_grad_(True) for p in start]
        opt = make(params)
        for step in grads:
            for p, gr in zip(params, step, strict=True):
                p.grad = gr.clone()
            opt.step()
        results.append(params)
    assert results[1][0].data.ne(start[0]).all()
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_every_model_key_reaches_scvi():
    from scvi.model import SCVI
    from scvi.module import VAE

    kwargs = scvi_model_kwargs(ModelConfig(var_activation="softplus"))
    assert set(ModelConfig.model_fields) - {"filename"} == set(kwargs)
    accepted = set(inspect.signature(SCVI.__init__).parameters) | set(
        inspect.signature(VAE.__init__).parameters
    )
    assert set(kwargs) <= accepted
    assert kwargs["var_activation"] is torch.nn.functional.softplus
    assert "var_activation" not in scvi_model_kwargs(ModelConfig())  # exp: VAE's default


def test_devices_original_config_on_cpu_and_gpu():
    seed = load_config(SEED_CONFIG) if SEED_CONFIG.is_file() else None
    if seed is None:
        pytest.skip("../shared/reference/seed-scvi-config.yaml absent")
    t = seed.train  # devices [0, 1, 2, 3], multi_gpu False, accelerator auto
    cpu = resolve_devices(t, gpu_count=0)
    assert (cpu.accelerator, cpu.devices, cpu.distributed, cpu.strategy) == (
        "cpu",
        1,
        False,
        "auto",
    )
    gpu = resolve_devices(t, gpu_count=4)
    assert (gpu.accelerator, gpu.devices, gpu.distributed) == ("gpu", [0], False)
    multi = resolve_devices(t.model_copy(update={"multi_gpu": True}), gpu_count=4)
    assert (multi.devices, multi.distributed, multi.strategy) == ([0, 1, 2, 3], True, DDP_STRATEGY)
    cpu_ddp = resolve_devices(t.model_copy(update={"multi_gpu": True}), gpu_count=0)
    assert (cpu_ddp.accelerator, cpu_ddp.devices, cpu_ddp.world_size) == ("cpu", 4, 4)
    two = resolve_devices(t.model_copy(update={"devices": 2, "accelerator": "cpu"}), gpu_count=0)
    assert (two.devices, two.distributed) == (2, True)
    nodes = resolve_devices(t.model_copy(update={"num_nodes": 2, "devices": 1}), gpu_count=1)
    assert nodes.distributed and nodes.world_size == 2
    with pytest.raises(CensusScviError, match="no CUDA GPU"):
        resolve_devices(t.model_copy(update={"accelerator": "gpu"}), gpu_count=0)


def test_stream_sizes_checked_at_config_load():
    with pytest.raises(CensusScviError, match="not a multiple of stream_shuffle_chunk_size=256"):
        load_config(None, overrides=["train.stream_io_batch_size=1000"])


# ------------------------------------------------------------------------------------------
# prepared data that does not match the config fails before training
# ------------------------------------------------------------------------------------------
@pytest.fixture
def no_training(monkeypatch):
    import scvi

    def boom(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(scvi.model.SCVI, "train", boom)


def test_missing_prepare_names_the_command(tmp_path, mini_census, no_training):
    with pytest.raises(CensusScviError, match="census-scvi prepare"):
        run_train(_cfg(mini_census), run_dir=tmp_path / "empty")


def test_hvg_count_mismatch_fails_before_training(prepared, tmp_path, mini_census, no_training):
    run = _run_dir(prepared, tmp_path)
    with pytest.raises(CensusScviError, match=r"top_n_hvg is 120.*prepare --force"):
        run_train(_cfg(mini_census, "hvg.top_n_hvg=120"), run_dir=run)


def test_batch_key_mismatch_fails_before_training(prepared, tmp_path, mini_census, no_training):
    run = _run_dir(prepared, tmp_path)
    with pytest.raises(CensusScviError, match="batch label .* is not anndata.batch_key"):
        run_train(_cfg(mini_census, "anndata.batch_key_separator=__"), run_dir=run)
    with pytest.raises(CensusScviError, match="batch label"):
        run_train(_cfg(mini_census, "anndata.batch_key=[dataset_id, assay]"), run_dir=run)


def test_gene_order_mismatch_fails_before_training(prepared, tmp_path, mini_census, no_training):
    run = _run_dir(prepared, tmp_path)
    path = run / "prepare/anndata_model.h5ad"
    adata = ad.read_h5ad(path)
    adata[:, adata.var_names[::-1]].copy().write_h5ad(path)
    with pytest.raises(CensusScviError, match="in another order"):
        run_train(_cfg(mini_census), run_dir=run)
    adata[:, adata.var_names[:-3]].copy().write_h5ad(path)
    with pytest.raises(CensusScviError, match="0 extra, 3 missing"):
        run_train(_cfg(mini_census), run_dir=run)


def test_worker_rank_writes_no_config_or_run_state(
    prepared, tmp_path, mini_census, no_training, monkeypatch
):
    # a process a launcher started as another rank trains, but leaves the bookkeeping to rank 0
    run = _run_dir(prepared, tmp_path)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(AssertionError, match="training started"):
        run_train(_cfg(mini_census), run_dir=run)
    assert not (run / "config.yaml").exists()
    assert not (run / "train/checkpoints/run.json").exists()
    assert not (run / "train/manifest.json").exists()


def test_early_stopping_without_validation_is_refused(prepared, tmp_path, mini_census):
    cfg = _cfg(mini_census, "train.early_stopping=true", "train.train_size=1.0")
    with pytest.raises(CensusScviError, match="train_size"):
        run_train(cfg, run_dir=_run_dir(prepared, tmp_path))


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_oracle_same_result_as_scvi_tools_directly(prepared, tmp_path, mini_census):
    import scvi

    run = _run_dir(prepared, tmp_path)
    # scvi-tools' own loader: the same mini-batches draw for draw (the census-scvi loader's
    # shuffle differs; tests/test_train_memory_loader.py compares its ELBO with this one's)
    oracle = "train.memory_loader=scvi-tools"
    result = run_train(_cfg(mini_census, oracle), run_dir=run)
    assert not result.skipped and result.epochs == 3

    adata = _prepared_adata(run)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    direct = scvi.model.SCVI(
        adata,
        n_hidden=32,
        n_latent=5,
        n_layers=1,
        dropout_rate=0.1,
        gene_likelihood="nb",
        encode_covariates=False,
    )
    direct.train(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        batch_size=256,
        train_size=0.9,
        check_val_every_n_epoch=1,
        plan_kwargs={"lr": 2e-3, "n_epochs_kl_warmup": 2, "max_kl_weight": 1.0},
    )
    ours = scvi.model.SCVI.load(str(run / "train/scvi.model"), adata=adata)
    hist = _history(run)
    for key in ("elbo_train", "elbo_validation", "reconstruction_loss_train", "kl_local_train"):
        np.testing.assert_allclose(
            hist[key].to_numpy(), direct.history[key][key].to_numpy(dtype=float), rtol=1e-5
        )
    theirs = direct.module.state_dict()
    mine = ours.module.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    np.testing.assert_allclose(
        ours.get_latent_representation(), direct.get_latent_representation(), atol=1e-5
    )
    # artifacts
    manifest = json.loads((run / "train/manifest.json").read_text())
    fig = manifest["figures"]
    assert fig["epochs"] == 3 and fig["n_cells"] == adata.n_obs and fig["n_genes"] == 100
    assert fig["final"]["elbo_validation"] == pytest.approx(hist["elbo_validation"].iloc[-1])
    assert fig["cells_per_second"] > 0 and fig["wall_seconds"] > 0
    assert manifest["config"]["model"]["n_hidden"] == 32
    assert manifest["inputs"]["anndata"] and manifest["versions"]["scvi-tools"]
    logs = run / "train/logs"
    assert list(logs.glob("events.out.tfevents.*"))
    assert (logs / "loss_curve.png").stat().st_size > 10_000
    assert hist["kl_weight"].tolist() == pytest.approx([0.0, 0.5, 1.0])  # warm-up over 2 epochs
    assert (run / "train/checkpoints/last.ckpt").is_file()
    # a second call with the same config and inputs is skipped
    again = run_train(_cfg(mini_census, oracle), run_dir=run)
    assert again.skipped and "skipped" in again.summary()
    # another config retrains (as prepare redoes itself), replacing the model
    changed = run_train(_cfg(mini_census, "model.n_latent=4", "train.max_epochs=1"), run_dir=run)
    assert not changed.skipped and changed.epochs == 1
    manifest = json.loads((run / "train/manifest.json").read_text())
    assert manifest["config"]["model"]["n_latent"] == 4
    assert set(manifest["outputs"]) == {"model", "history", "loss_curve", "checkpoint"}
    assert manifest["files"]["train/scvi.model"] > 0  # run_stage's output sizes
    # a model that went missing is retrained, not skipped
    shutil.rmtree(run / "train/scvi.model")
    redone = run_train(_cfg(mini_census, "model.n_latent=4", "train.max_epochs=1"), run_dir=run)
    assert not redone.skipped and (run / "train/scvi.model/model.pt").is_file()


@pytest.mark.slow
def test_original_seed_config_trains_n_hidden_512(prepared, tmp_path, mini_census):
    if not SEED_CONFIG.is_file():
        pytest.skip("../shared/reference/seed-scvi-config.yaml absent")
    # the seed config unchanged, but for the census location, fewer genes, one epoch and no
    # DataLoader worker processes: forking 4 workers from a pytest process that has already run
    # the rest of the suite failed here with ENOMEM (heuristic overcommit), which is not what
    # this test is about.
    cfg = load_config(
        SEED_CONFIG,
        overrides=[
            f"census.uri={mini_census}",
            "hvg.top_n_hvg=100",
            "train.max_epochs=1",
            "train.num_workers=0",
        ],
    )
    assert cfg.train.devices == [0, 1, 2, 3] and not cfg.train.multi_gpu
    run = tmp_path / "seed"
    run_prepare(cfg, run_dir=run)
    result = run_train(cfg, run_dir=run)
    assert result.epochs == 1
    import scvi

    model = scvi.model.SCVI.load(str(run / "train/scvi.model"), adata=_prepared_adata(run))
    enc = model.module.z_encoder
    linears = [m for m in enc.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [512, 512]  # n_hidden 512, n_layers 2
    assert enc.mean_encoder.out_features == 50
    assert model.module.n_latent == 50 and not model.module.encode_covariates
    device = json.loads((run / "train/manifest.json").read_text())["figures"]["device"]
    assert device["accelerator"] == ("gpu" if torch.cuda.is_available() else "cpu")


@pytest.mark.slow
def test_model_keys_honoured(prepared, tmp_path, mini_census):
    import scvi

    run = _run_dir(prepared, tmp_path)
    extra = [
        "model.n_layers=2",
        "model.dropout_rate=0.2",
        "model.gene_likelihood=zinb",
        "model.dispersion=gene-batch",
        "model.var_activation=softplus",
        "model.use_batch_norm=none",
        "model.use_layer_norm=both",
        "model.deeply_inject_covariates=false",
        "train.max_epochs=1",
    ]
    run_train(_cfg(mini_census, *extra), run_dir=run)
    model = scvi.model.SCVI.load(str(run / "train/scvi.model"), adata=_prepared_adata(run))
    m = model.module
    assert (m.n_hidden, m.n_layers) == (32, 2)
    assert {x.p for x in m.z_encoder.modules() if isinstance(x, torch.nn.Dropout)} == {0.2}
    assert (m.gene_likelihood, m.dispersion) == ("zinb", "gene-batch")
    assert m.px_r.shape[1] == len(model.adata.obs["batch"].cat.categories)
    assert m.z_encoder.var_activation is torch.nn.functional.softplus
    assert not any(isinstance(x, torch.nn.BatchNorm1d) for x in m.modules())
    assert any(isinstance(x, torch.nn.LayerNorm) for x in m.modules())
    assert m.decoder.px_decoder.inject_covariates is False  # deeply_inject_covariates


class _StopAfterEpoch(Callback):
    """Simulates a crash: raises at the end of epoch ``k`` (0-based), after its checkpoint."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.k:
            raise RuntimeError(f"simulated crash after epoch {self.k}")


@pytest.mark.slow
def test_resume_finishes_max_epochs_with_full_history(prepared, tmp_path, mini_census, caplog):
    caplog.set_level(logging.INFO)
    cfg = _cfg(mini_census, "train.max_epochs=4")
    full = _run_dir(prepared, tmp_path, "full")
    run_train(cfg, run_dir=full)

    run = _run_dir(prepared, tmp_path, "crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(cfg, run_dir=run, callbacks=[_StopAfterEpoch(1)])
    assert not (run / "train/manifest.json").exists()
    assert len(_history(run)) == 2
    with pytest.raises(CensusScviError, match="another config"):
        run_train(_cfg(mini_census, "train.max_epochs=5"), run_dir=run, resume=True)
    result = run_train(cfg, run_dir=run, resume=True)
    assert result.resumed_from_epoch == 2 and result.epochs == 4
    hist, ref = _history(run), _history(full)
    assert list(hist.index) == list(ref.index) == [0, 1, 2, 3]
    assert hist["kl_weight"].tolist() == ref["kl_weight"].tolist()
    # every epoch is the uninterrupted run's: the crashed run's, and the resumed ones (the
    # random generators' states travel in the checkpoint)
    for key in ("elbo_train", "elbo_validation", "reconstruction_loss_train"):
        np.testing.assert_allclose(hist[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
    manifest = json.loads((run / "train/manifest.json").read_text())
    assert manifest["figures"]["epochs"] == 4 and manifest["figures"]["resumed_from_epoch"] == 2
    assert not list((run / "train/checkpoints").glob(".*.tmp"))
    # Lightning's routine lines are dropped, its other ones kept
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    assert any(m.startswith("Restored all states from the checkpoint") for m in lines), lines
    assert not [m for m in lines if "weights_only" in m or m.startswith("GPU available")]


class _PoisonWeights(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                for p in pl_module.module.z_encoder.parameters():
                    p.fill_(float("nan"))


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_naming_epoch_and_fixes(prepared, tmp_path, mini_census):
    run = _run_dir(prepared, tmp_path)
    with pytest.raises(CensusScviError) as err:
        run_train(_cfg(mini_census), run_dir=run, callbacks=[_PoisonWeights()])
    text = str(err.value)
    assert "\n" not in text
    # distribution checks are off while training: NaN weights surface as a NaN loss the guard
    # stops at (not as torch's "found invalid values" argument check)
    assert text.startswith("the training loss became nan at epoch 1"), text
    assert "training_plan.lr (now 0.002)" in text and "model.var_activation: softplus" in text


@pytest.mark.slow
def test_cli_end_to_end(prepared, tmp_path, mini_census):
    import scvi

    run = _run_dir(prepared, tmp_path)
    args = ["train", "-o", str(run), "--set", f"census.uri={mini_census}"]
    for s in [*SMALL, "train.max_epochs=2"]:
        args += ["--set", s]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "train: memory mode" in res.output and "2 epochs" in res.output
    adata = _prepared_adata(run)
    model = scvi.model.SCVI.load(str(run / "train/scvi.model"), adata=adata)
    assert model.get_latent_representation().shape == (adata.n_obs, 5)
    assert (run / "config.yaml").is_file()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "skipped" in res.output
    res = runner.invoke(app, [*args, "--set", "train.accelerator=gpu"])
    if not torch.cuda.is_available():
        assert res.exit_code == 2 and "no CUDA GPU" in res.output


# ------------------------------------------------------------------------------------------
# stream mode
# ------------------------------------------------------------------------------------------
def test_stream_datamodule_split_shuffle_and_ranks(prepared, mini_census):
    import scvi

    from census_scvi.train._datamodule import SomaStreamDataModule, split_rows

    cells = pd.read_parquet(prepared / "prepare/cells.parquet")
    hvg = pd.read_parquet(prepared / "prepare/hvg.parquet")
    genes = np.sort(hvg.loc[hvg.highly_variable, "soma_joinid"].to_numpy())
    cats = sorted(cells["batch"].unique())
    codes = np.searchsorted(cats, cells["batch"].to_numpy())
    ids = cells["soma_joinid"].to_numpy()
    dm = SomaStreamDataModule(
        f"{mini_census}/census_data/homo_sapiens",
        obs_joinids=ids,
        batch_codes=codes,
        var_joinids=genes,
        n_batch=len(cats),
        train_size=0.9,
        batch_size=128,
        seed=0,
        io_batch_size=512,
        shuffle_chunk_size=16,
    )
    # the split is scvi-tools' DataSplitter's for the same rows and seed
    adata = _prepared_adata(prepared)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    splitter = scvi.dataloaders.DataSplitter(
        scvi.model.SCVI(adata).adata_manager, train_size=0.9, batch_size=128
    )
    splitter.setup()
    assert set(dm.train_joinids) == set(ids[splitter.train_idx])
    assert set(dm.val_joinids) == set(ids[splitter.val_idx])
    train_rows, _ = split_rows(len(ids), train_size=0.9, batch_size=128, seed=0)
    assert np.array_equal(np.sort(ids[train_rows]), dm.train_joinids)

    dm.setup()
    epochs = []
    for epoch in (0, 1):
        dm._epoch = lambda e=epoch: e  # as the trainer would report it
        loader = dm.train_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)
        seen = np.concatenate([b["soma_joinid"].numpy() for b in batches])
        assert np.array_equal(np.sort(seen), dm.train_joinids)  # every cell exactly once
        epochs.append(seen)
        b = batches[0]
        x = adata[pd.Index(b["soma_joinid"].numpy().astype(str))].X.toarray()
        np.testing.assert_array_equal(b["X"].numpy(), x)  # X rows = the prepared h5ad's
        expected = adata.obs.loc[b["soma_joinid"].numpy().astype(str), "batch"].cat.codes
        np.testing.assert_array_equal(b["batch"].numpy()[:, 0], expected.to_numpy())
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled per epoch
    # two ranks read disjoint, equally long slices
    parts = []
    for rank in (0, 1):
        dm.rank, dm.world_size = rank, 2
        parts.append(np.concatenate([b["soma_joinid"].numpy() for b in dm.train_dataloader()]))
    assert len(parts[0]) == len(parts[1]) == len(dm.train_joinids) // 2
    assert not set(parts[0]) & set(parts[1])


@pytest.mark.slow
def test_stream_mode_model_matches_memory_registry(prepared, tmp_path, mini_census):
    import scvi

    mem = _run_dir(prepared, tmp_path, "memory")
    run_train(_cfg(mini_census), run_dir=mem)
    stream = _run_dir(prepared, tmp_path, "stream")
    (stream / "prepare/anndata_model.h5ad").unlink()  # stream mode never reads it
    cfg = _cfg(mini_census, "train.mode=stream", "train.stream_io_batch_size=1024")
    result = run_train(cfg, run_dir=stream)
    assert result.mode == "stream" and result.epochs == 3

    adata = _prepared_adata(mem)
    m_mem = scvi.model.SCVI.load(str(mem / "train/scvi.model"), adata=adata.copy())
    m_str = scvi.model.SCVI.load(str(stream / "train/scvi.model"), adata=adata.copy())
    reg_mem, reg_str = m_mem.adata_manager.registry, m_str.adata_manager.registry
    assert list(m_str.adata.var_names) == list(m_mem.adata.var_names)
    for key in ("batch", "X"):
        a = reg_mem["field_registries"][key]
        b = reg_str["field_registries"][key]
        assert a["summary_stats"] == b["summary_stats"]
    assert list(reg_str["field_registries"]["batch"]["state_registry"]["categorical_mapping"]) == (
        list(reg_mem["field_registries"]["batch"]["state_registry"]["categorical_mapping"])
    )
    z = m_str.get_latent_representation()
    assert z.shape == (adata.n_obs, 5) and np.isfinite(z).all()
    # same data, same split, same model: the losses land close to memory mode's
    h_mem, h_str = _history(mem), _history(stream)
    assert h_str["elbo_validation"].iloc[-1] == pytest.approx(
        h_mem["elbo_validation"].iloc[-1], rel=0.05
    )
    assert h_str["elbo_train"].iloc[-1] < h_str["elbo_train"].iloc[0]


def _check_progress_lines(caplog, *, n_cells: int, epochs: int) -> None:
    """Training logs its progress in cells (not on a terminal: every 10%), to 100% of all epochs."""
    import re

    lines = [r.getMessage() for r in caplog.records if r.name == "census_scvi.progress"]
    found = [
        re.match(r"training, epoch (\d+)/(\d+).*: (\d+)% \(([\d,]+)/([\d,]+) cells", m)
        for m in lines
    ]
    found = [m for m in found if m]
    assert len(found) >= 5, lines
    done = [int(m.group(4).replace(",", "")) for m in found]
    total = int(found[-1].group(5).replace(",", ""))
    assert done == sorted(done) and done[-1] == total and found[-1].group(3) == "100"
    assert abs(total - n_cells * epochs) <= epochs * 2  # the split rounds; every epoch counted
    assert found[-1].group(1) == found[-1].group(2) == str(epochs)


def test_stream_cache_trains_the_same_model_as_soma_reads(
    prepared, tmp_path, mini_census, monkeypatch, caplog
):
    import scvi
    import torch

    from census_scvi.train._stream_cache import StreamCache

    reads = []
    real_read = StreamCache.read
    monkeypatch.setattr(
        StreamCache, "read", lambda self, ids: reads.append(1) or real_read(self, ids)
    )

    weights = {}
    for cache in ("true", "false"):
        run = _run_dir(prepared, tmp_path, f"stream-cache-{cache}")
        cfg = _cfg(
            mini_census,
            "train.mode=stream",
            "train.stream_io_batch_size=1024",
            f"train.stream_cache={cache}",
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="census_scvi"):
            result = run_train(cfg, run_dir=run)
        assert not (run / "train/stream_cache").exists()  # removed once training finished
        _check_progress_lines(caplog, n_cells=int(result.n_cells * 0.9), epochs=3)
        model = scvi.model.SCVI.load(str(run / "train/scvi.model"), adata=_prepared_adata(run))
        weights[cache] = model.module.state_dict()
    assert reads  # epochs 2 and 3 read the cache instead of SOMA: the same rows, same order
    assert weights["true"].keys() == weights["false"].keys()
    for name, w in weights["true"].items():
        torch.testing.assert_close(w, weights["false"][name], rtol=0, atol=0, msg=name)


def test_stream_inputs_check_every_cell_against_the_census(prepared, tmp_path, mini_census):
    """Codes and categories equal the string path's; a wrong label or a missing cell is named."""
    from census_scvi.train._inputs import stream_inputs

    cfg = _cfg(mini_census, "train.mode=stream")
    run = _run_dir(prepared, tmp_path)
    cells = pd.read_parquet(run / "prepare/cells.parquet")
    inputs = stream_inputs(cfg, run / "prepare")
    labels = cells["batch"].astype(str).to_numpy()
    assert inputs.categories == sorted(set(labels))
    assert np.array_equal(np.asarray(inputs.categories, dtype=object)[inputs.cell_codes], labels)
    assert np.array_equal(inputs.cell_joinids, cells["soma_joinid"].to_numpy())

    wrong = cells.copy()
    wrong.loc[[3, 7], "batch"] = "not//a//real//label"
    wrong.to_parquet(run / "prepare/cells.parquet", index=False)
    with pytest.raises(CensusScviError, match=r"'not//a//real//label' of cell 3 .*2 cells differ"):
        stream_inputs(cfg, run / "prepare")
    gone = cells.copy()
    gone.loc[0, "soma_joinid"] = 10**9
    gone.to_parquet(run / "prepare/cells.parquet", index=False)
    with pytest.raises(CensusScviError, match="not in the census obs"):
        stream_inputs(cfg, run / "prepare")
