"""Train stage: scVI exactly as configured, in memory or streamed, resumable, on one device or many.

``run_train`` reads what prepare wrote (``prepare/anndata_model.h5ad`` in ``train.mode: memory``;
``prepare/cells.parquet`` + ``prepare/hvg.parquet`` and the SOMA census in ``train.mode: stream``),
checks that it matches the config *before* any training, builds ``scvi.model.SCVI`` with every
``model`` key, trains with every ``train`` key and the ``training_plan`` keys as scvi-tools'
``plan_kwargs``, and writes::

    train/scvi.model/      scvi-tools save format (scvi.model.SCVI.load(dir, adata=prepared))
    train/logs/            TensorBoard events, history.csv, loss_curve.png
    train/checkpoints/     last.ckpt (every train.checkpoint_every_n_epochs) for --resume
    train/manifest.json    config, versions, input hashes, epochs, final losses, wall time, cells/s

Devices (decided by :func:`resolve_devices`): ``accelerator: auto`` is a GPU when one is visible,
else the CPU. Lightning DDP is used when ``train.multi_gpu`` is true, ``train.devices`` is a count
above 1, or ``train.num_nodes`` is above 1. Without those, training uses one device: the first
index of a ``devices`` list on a GPU (the original pipeline's ``devices: [0, 1, 2, 3]`` with
``multi_gpu: False`` trained on one GPU), one process on the CPU. On the CPU a DDP request runs
that many processes with the gloo backend.

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.train._stage import run_train
>>> cfg = load_config(None, overrides=["train.max_epochs=2"])
>>> result = run_train(cfg, run_dir="runs/demo")  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from census_scvi.config import Config, ModelConfig, TrainConfig, TrainingPlanConfig, config_hash
from census_scvi.constants import (
    BATCH_KEY,
    CHECKPOINTS_DIR,
    FEATURE_ID,
    HISTORY_FILE,
    HVG_FILE,
    LOGS_DIR,
    LOSS_CURVE_FILE,
    MANIFEST_FILE,
    MEASUREMENT,
    PREPARE_DIR,
    SOMA_JOINID,
    TRAIN_DIR,
    X_RAW,
)
from census_scvi.errors import CensusScviError
from census_scvi.rundir import (
    Manifest,
    StageTimer,
    atomic_path,
    file_hash,
    peak_rss_bytes,
    read_manifest,
    write_json_atomic,
    write_manifest,
    write_run_config,
)

if TYPE_CHECKING:
    import anndata
    import pandas as pd

__all__ = [
    "CELLS_FILE",
    "DeviceSettings",
    "TrainResult",
    "resolve_devices",
    "run_train",
    "scvi_model_kwargs",
    "scvi_plan_kwargs",
]

logger = logging.getLogger(__name__)

CELLS_FILE = "cells.parquet"
RUN_INFO_FILE = "run.json"  # in checkpoints/: config hash and inputs of the run they belong to
DDP_STRATEGY = "ddp_find_unused_parameters_true"
_HASHED_SECTIONS = ("census", "hvg", "anndata", "model", "train", "training_plan")
_FINAL_KEYS = (
    "elbo_train",
    "elbo_validation",
    "reconstruction_loss_train",
    "reconstruction_loss_validation",
    "kl_local_train",
    "kl_local_validation",
)


# ------------------------------------------------------------------------------------------
# config -> scvi-tools / Lightning arguments
# ------------------------------------------------------------------------------------------
def scvi_model_kwargs(model: ModelConfig) -> dict[str, Any]:
    """``scvi.model.SCVI(adata, **kwargs)`` arguments for every ``model`` key.

    ``n_hidden`` … ``latent_distribution`` are SCVI's own arguments; ``encode_covariates``,
    ``deeply_inject_covariates``, ``use_batch_norm``, ``use_layer_norm`` and ``var_activation``
    travel through SCVI's ``**kwargs`` to ``scvi.module.VAE`` (``var_activation: softplus`` becomes
    ``torch.nn.functional.softplus``; ``exp`` is VAE's default and is not passed).
    ``filename`` names the output folder and is not a model argument.
    """
    kwargs: dict[str, Any] = {
        "n_hidden": model.n_hidden,
        "n_latent": model.n_latent,
        "n_layers": model.n_layers,
        "dropout_rate": model.dropout_rate,
        "dispersion": model.dispersion,
        "gene_likelihood": model.gene_likelihood,
        "latent_distribution": model.latent_distribution,
        "encode_covariates": model.encode_covariates,
        "deeply_inject_covariates": model.deeply_inject_covariates,
        "use_batch_norm": model.use_batch_norm,
        "use_layer_norm": model.use_layer_norm,
    }
    if model.var_activation == "softplus":
        import torch

        kwargs["var_activation"] = torch.nn.functional.softplus
    return kwargs


def scvi_plan_kwargs(plan: TrainingPlanConfig) -> dict[str, Any]:
    """``plan_kwargs`` for scvi-tools' ``TrainingPlan``: every ``training_plan`` key, as is."""
    return plan.model_dump()


@dataclass(frozen=True)
class DeviceSettings:
    """What Lightning is given: accelerator, devices, nodes, strategy."""

    accelerator: str
    devices: int | list[int] | str
    num_nodes: int
    strategy: str
    distributed: bool

    @property
    def world_size(self) -> int:
        if isinstance(self.devices, list):
            n = len(self.devices)
        elif isinstance(self.devices, int):
            n = self.devices
        else:
            n = 1
        return n * self.num_nodes


def resolve_devices(train: TrainConfig, *, gpu_count: int | None = None) -> DeviceSettings:
    """Decide accelerator, devices and strategy from the ``train`` section.

    Parameters
    ----------
    train
        The ``train`` section.
    gpu_count
        Visible CUDA devices (default: ``torch.cuda.device_count()``).

    Returns
    -------
    The settings; ``distributed`` is true when Lightning DDP runs more than one process.

    Notes
    -----
    DDP is requested by ``multi_gpu: true``, ``devices: N`` with N > 1, or ``num_nodes > 1``
    (a ``devices`` *list* alone does not, as in the original pipeline, where ``devices`` was used
    only with ``multi_gpu``). Without a request one device is used: the first listed GPU, or one
    CPU process. ``accelerator: auto`` is ``gpu`` when CUDA is visible, else ``cpu``; asking for a
    GPU where none is visible is an error. On the CPU, ``devices`` counts processes.
    """
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    accelerator = train.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if gpu_count > 0 else "cpu"
    if accelerator in ("gpu", "cuda") and gpu_count == 0:
        msg = f"train.accelerator is '{train.accelerator}' but no CUDA GPU is visible"
        raise CensusScviError(msg, hint="set train.accelerator: cpu (or auto)")
    devices = train.devices
    requested = train.multi_gpu or train.num_nodes > 1 or (isinstance(devices, int) and devices > 1)
    resolved: int | list[int] | str
    if accelerator == "cpu":
        if requested:
            resolved = (
                len(devices)
                if isinstance(devices, list)
                else (devices if isinstance(devices, int) else 1)
            )
        else:
            if devices not in ("auto", 1):
                logger.info(
                    "train.devices=%s is used only with multi_gpu/num_nodes; training in one "
                    "CPU process",
                    devices,
                )
            resolved = 1
    elif accelerator == "mps":
        resolved = 1
    elif requested:
        if isinstance(devices, list):
            bad = [d for d in devices if d >= gpu_count]
            if bad and train.num_nodes == 1:
                msg = f"train.devices={devices} names GPU {bad[0]} but only {gpu_count} are visible"
                raise CensusScviError(msg, hint=f"use indices below {gpu_count} or 'auto'")
            resolved = list(devices)
        elif isinstance(devices, int):
            resolved = devices
        else:
            resolved = gpu_count
    else:
        if isinstance(devices, list):
            if len(devices) > 1:
                logger.info(
                    "train.devices=%s with multi_gpu false: training on GPU %d only "
                    "(set train.multi_gpu: true for DDP on all of them)",
                    devices,
                    devices[0],
                )
            resolved = [devices[0]]
        else:
            resolved = [0]
    probe = DeviceSettings(accelerator, resolved, train.num_nodes, "auto", False)
    distributed = probe.world_size > 1
    # the library-size encoder is unused with observed library sizes (scvi's default), so DDP must
    # look for unused parameters, as the original pipeline's strategy did
    strategy = train.strategy or (DDP_STRATEGY if distributed else "auto")
    return DeviceSettings(accelerator, resolved, train.num_nodes, strategy, distributed)


# ------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What ``run_train`` did."""

    run_dir: Path
    model_dir: Path
    mode: str
    skipped: bool = False
    is_global_zero: bool = True
    epochs: int = 0
    n_cells: int = 0
    n_genes: int = 0
    n_batches: int = 0
    final: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cells_per_second: float | None = None
    resumed_from_epoch: int | None = None

    def summary(self) -> str:
        """A few lines for the CLI."""
        if not self.is_global_zero:
            return f"train: worker process done ({self.model_dir.parent})"
        if self.skipped:
            return f"train: up to date, skipped (model in {self.model_dir})"
        losses = ", ".join(f"{k}={v:.4g}" for k, v in self.final.items() if "elbo" in k)
        speed = f", {self.cells_per_second:,.0f} cells/s" if self.cells_per_second else ""
        resumed = (
            f" (resumed after epoch {self.resumed_from_epoch})"
            if self.resumed_from_epoch is not None
            else ""
        )
        return (
            f"train: {self.mode} mode, {self.n_cells:,} cells x {self.n_genes:,} genes, "
            f"{self.n_batches} batches, {self.epochs} epochs{resumed} in {self.seconds:.1f} s"
            f"{speed}\n  {losses}\n  model: {self.model_dir}"
        )


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    mode: str
    gene_ids: list[str]
    var_joinids: np.ndarray
    categories: list[str]
    hashes: dict[str, str]
    adata_path: Path | None = None
    cell_joinids: np.ndarray | None = None
    cell_codes: np.ndarray | None = None
    experiment_uri: str | None = None
    # the census context's TileDB settings (S3 region, unsigned requests for the public
    # census): the stream reader opens the experiment again, in each DataLoader worker
    tiledb_config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)


def _rerun_prepare(what: str) -> NoReturn:
    raise CensusScviError(what, hint="rerun 'census-scvi prepare --force' with this config")


def _batch_labels(obs: pd.DataFrame, keys: Sequence[str], separator: str) -> np.ndarray:
    try:
        from census_scvi.batches import batch_labels  # the prepare stage's helper
    except ImportError:
        parts = obs[list(keys)].astype(str)
        return parts.agg(separator.join, axis=1).to_numpy(dtype=object)
    return np.asarray(batch_labels(obs, list(keys), separator), dtype=object)


def _check_batch(obs: pd.DataFrame, batch: np.ndarray, config: Config, where: str) -> None:
    keys = list(config.anndata.batch_key)
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        logger.debug("%s lacks batch_key columns %s; batch labels not re-derived", where, missing)
        return
    expected = _batch_labels(obs, keys, config.anndata.batch_key_separator)
    bad = np.flatnonzero(expected != np.asarray(batch, dtype=object))
    if len(bad):
        i = int(bad[0])
        msg = (
            f"{where}: batch label {batch[i]!r} of cell {i} is not anndata.batch_key {keys} joined "
            f"by {config.anndata.batch_key_separator!r} ({expected[i]!r}); {len(bad)} cells differ"
        )
        _rerun_prepare(msg)


def _read_hvgs(config: Config, prepare_dir: Path) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    path = prepare_dir / HVG_FILE
    if not path.is_file():
        msg = f"prepared gene table not found: {path}"
        raise CensusScviError(msg, hint="run 'census-scvi prepare' first")
    hvg = pd.read_parquet(path)
    need = {SOMA_JOINID, FEATURE_ID, "highly_variable"}
    if not need <= set(hvg.columns):
        _rerun_prepare(f"{path} lacks columns {sorted(need - set(hvg.columns))}")
    sel = hvg[hvg["highly_variable"].astype(bool)].sort_values(SOMA_JOINID)
    n, top = len(sel), config.hvg.top_n_hvg
    if n != top and n != len(hvg):
        _rerun_prepare(f"{path} marks {n} genes highly variable but hvg.top_n_hvg is {top}")
    if n == 0:
        _rerun_prepare(f"{path} marks no gene highly variable")
    return sel[FEATURE_ID].astype(str).tolist(), sel[SOMA_JOINID].to_numpy(dtype=np.int64)


def _sorted_categories(values: np.ndarray) -> list[str]:
    return sorted({str(v) for v in values})


def _memory_inputs(config: Config, prepare_dir: Path) -> _Inputs:
    import anndata
    import pandas as pd

    gene_ids, var_joinids = _read_hvgs(config, prepare_dir)
    path = prepare_dir / config.anndata.model_filename
    if not path.is_file():
        msg = f"prepared training data not found: {path}"
        raise CensusScviError(
            msg, hint="run 'census-scvi prepare' first (or set train.mode: stream)"
        )
    backed = anndata.read_h5ad(path, backed="r")
    try:
        var_names = backed.var_names.astype(str).tolist()
        obs = backed.obs.copy()
    finally:
        backed.file.close()
    if var_names != gene_ids:
        extra = len(set(var_names) - set(gene_ids))
        lack = len(set(gene_ids) - set(var_names))
        order = " in another order" if not extra and not lack else ""
        msg = (
            f"{path} has {len(var_names)} genes{order} but prepare/hvg.parquet selects "
            f"{len(gene_ids)} ({extra} extra, {lack} missing); the model's genes are the HVGs "
            "in soma_joinid order"
        )
        _rerun_prepare(msg)
    if BATCH_KEY not in obs.columns:
        _rerun_prepare(f"{path} has no obs column '{BATCH_KEY}'")
    batch = obs[BATCH_KEY].astype(str).to_numpy(dtype=object)
    if obs[BATCH_KEY].isna().any():
        _rerun_prepare(f"{path}: obs '{BATCH_KEY}' has missing values")
    _check_batch(obs, batch, config, str(path))
    hashes = {
        "anndata": file_hash(path, max_bytes=1 << 28),
        "hvg": file_hash(prepare_dir / HVG_FILE),
    }
    cells_path = prepare_dir / CELLS_FILE
    if cells_path.is_file() and SOMA_JOINID in obs.columns:
        cells = pd.read_parquet(cells_path, columns=[SOMA_JOINID])
        if not np.array_equal(
            cells[SOMA_JOINID].to_numpy(np.int64), obs[SOMA_JOINID].to_numpy(np.int64)
        ):
            _rerun_prepare(f"{path} cells differ from {cells_path}")
    return _Inputs(
        mode="memory",
        gene_ids=gene_ids,
        var_joinids=var_joinids,
        categories=_sorted_categories(batch),
        hashes=hashes,
        adata_path=path,
    )


def _stream_inputs(config: Config, prepare_dir: Path) -> _Inputs:
    import pandas as pd
    import tiledbsoma as soma

    from census_scvi.soma import get_experiment, open_census

    gene_ids, var_joinids = _read_hvgs(config, prepare_dir)
    cells_path = prepare_dir / CELLS_FILE
    if not cells_path.is_file():
        msg = f"prepared cell table not found: {cells_path}"
        raise CensusScviError(msg, hint="run 'census-scvi prepare' first")
    cells = pd.read_parquet(cells_path, columns=[SOMA_JOINID, BATCH_KEY])
    joinids = cells[SOMA_JOINID].to_numpy(dtype=np.int64)
    batch = cells[BATCH_KEY].astype(str).to_numpy(dtype=object)
    if len(joinids) == 0:
        _rerun_prepare(f"{cells_path} lists no cells")
    with open_census(config) as census:
        exp = get_experiment(census, config.census.organism)
        uri = exp.uri
        tiledb_config = dict(exp.context.tiledb_config)
        ms = exp.ms[MEASUREMENT]
        if X_RAW not in ms.X:
            msg = f"census experiment {uri} has no X layer '{X_RAW}'"
            raise CensusScviError(msg, hint="train.mode: stream reads raw counts from the census")
        var = (
            ms.var.read(coords=(var_joinids,), column_names=[SOMA_JOINID, FEATURE_ID])
            .concat()
            .to_pandas()
            .set_index(SOMA_JOINID)
            .reindex(var_joinids)
        )
        if var[FEATURE_ID].astype(str).tolist() != gene_ids:
            msg = f"prepare/hvg.parquet genes do not match the census var table of {uri}"
            raise CensusScviError(msg, hint="check census.uri, then rerun prepare --force")
        keys = list(config.anndata.batch_key)
        try:
            obs = (
                exp.obs.read(coords=(np.sort(joinids),), column_names=[SOMA_JOINID, *keys])
                .concat()
                .to_pandas()
                .set_index(SOMA_JOINID)
                .reindex(joinids)
            )
        except (soma.SOMAError, ValueError, KeyError) as e:
            msg = f"cannot read obs columns {keys} of the training cells from {uri}: {e}"
            raise CensusScviError(msg) from None
    if obs.isna().all(axis=1).any():
        _rerun_prepare(f"{cells_path} lists cells that are not in the census obs")
    _check_batch(obs.reset_index(drop=True), batch, config, str(cells_path))
    categories = _sorted_categories(batch)
    codes = np.searchsorted(np.asarray(categories, dtype=object), batch).astype(np.int32)
    hashes = {
        "cells": file_hash(cells_path),
        "hvg": file_hash(prepare_dir / HVG_FILE),
        "census": str(config.census_uri() or config.census.version),
    }
    return _Inputs(
        mode="stream",
        gene_ids=gene_ids,
        var_joinids=var_joinids,
        categories=categories,
        hashes=hashes,
        cell_joinids=joinids,
        cell_codes=codes,
        experiment_uri=uri,
        tiledb_config=tiledb_config,
    )


def _check_train_settings(config: Config) -> None:
    t = config.train
    if t.early_stopping and t.train_size >= 1.0:
        msg = "train.early_stopping monitors validation loss but train.train_size is 1.0"
        raise CensusScviError(msg, hint="set train.train_size below 1 (e.g. 0.9)")


# ------------------------------------------------------------------------------------------
# model and data
# ------------------------------------------------------------------------------------------
def _registry_adata(inputs: _Inputs) -> anndata.AnnData:
    """A few-row AnnData that carries the model registry for a streamed model.

    One row per batch category: var_names are the genes, obs ``batch`` the categories, X is
    empty. The registry is then what memory mode registers for the same prepared cells.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    n = len(inputs.categories)
    obs = pd.DataFrame(
        {BATCH_KEY: pd.Categorical(inputs.categories, categories=inputs.categories)},
        index=[f"batch-{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=pd.Index(inputs.gene_ids, name=None))
    return anndata.AnnData(X=sp.csr_matrix((n, inputs.n_genes), dtype=np.float32), obs=obs, var=var)


def _build_model(config: Config, inputs: _Inputs) -> tuple[Any, Any, int]:
    """``(model, datamodule or None, n_cells)``."""
    import anndata
    import pandas as pd
    import scvi

    kwargs = scvi_model_kwargs(config.model)
    if inputs.mode == "memory":
        assert inputs.adata_path is not None
        adata = anndata.read_h5ad(inputs.adata_path)
        adata.obs[BATCH_KEY] = pd.Categorical(
            adata.obs[BATCH_KEY].astype(str), categories=inputs.categories
        )
        scvi.model.SCVI.setup_anndata(adata, batch_key=BATCH_KEY)
        return scvi.model.SCVI(adata, **kwargs), None, adata.n_obs

    from census_scvi.train._datamodule import SomaStreamDataModule

    assert inputs.cell_joinids is not None and inputs.cell_codes is not None
    reg = _registry_adata(inputs)
    with warnings.catch_warnings():
        # one row per category by construction; the real counts are in cells.parquet
        warnings.filterwarnings("ignore", message="Category .* has fewer than 3 cells")
        scvi.model.SCVI.setup_anndata(reg, batch_key=BATCH_KEY)
    model = scvi.model.SCVI(reg, **kwargs)
    n_cells = len(inputs.cell_joinids)
    x_reg = model.adata_manager.registry["field_registries"]["X"]
    x_reg["state_registry"]["n_obs"] = n_cells
    x_reg["summary_stats"]["n_cells"] = n_cells
    t = config.train
    dm = SomaStreamDataModule(
        str(inputs.experiment_uri),
        obs_joinids=inputs.cell_joinids,
        batch_codes=inputs.cell_codes,
        var_joinids=inputs.var_joinids,
        n_batch=len(inputs.categories),
        train_size=t.train_size,
        batch_size=t.batch_size,
        seed=t.seed,
        io_batch_size=t.stream_io_batch_size,
        shuffle_chunk_size=t.stream_shuffle_chunk_size,
        num_workers=t.num_workers,
        measurement_name=MEASUREMENT,
        layer_name=X_RAW,
        tiledb_config=inputs.tiledb_config,
    )
    return model, dm, n_cells


def _env_is_global_zero() -> bool:
    """False in a process that a launcher (Lightning, torchrun, SLURM) started as another rank."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        try:
            if int(os.environ.get(var, "0") or 0) != 0:
                return False
        except ValueError:
            continue
    return True


def _clean(train_dir: Path, model_dir: Path, *, keep_run: bool) -> None:
    """Remove old outputs; a resumed run keeps its checkpoints and logs."""
    import shutil

    paths = [model_dir, train_dir / MANIFEST_FILE]
    if not keep_run:
        paths += [train_dir / LOGS_DIR, train_dir / CHECKPOINTS_DIR]
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------
def run_train(
    config: Config,
    *,
    run_dir: str | os.PathLike[str],
    force: bool = False,
    resume: bool = False,
    callbacks: Sequence[Any] | None = None,
) -> TrainResult:
    """Train scVI on the prepared data of ``run_dir`` and save it under ``run_dir/train``.

    Parameters
    ----------
    config
        The resolved config (sections ``model``, ``train``, ``training_plan`` drive training).
    run_dir
        Run directory holding ``prepare/``.
    force
        Retrain from scratch even when ``train/manifest.json`` matches config and inputs.
    resume
        Continue from ``train/checkpoints/last.ckpt`` (an error if it belongs to another
        config; an interrupted run of the same config continues even without it).
    callbacks
        Extra Lightning callbacks (e.g. for monitoring).

    Returns
    -------
    :class:`TrainResult`; ``skipped`` when the stage was already done.

    Raises
    ------
    CensusScviError
        Prepared data missing or not matching the config (genes, batch labels), ``resume``
        onto a checkpoint of another config, no GPU for ``accelerator: gpu``, or a NaN/inf
        loss during training.

    Notes
    -----
    Finished with the same config and inputs: skipped. Config or inputs changed: retrained.
    Interrupted (a checkpoint, no manifest) with the same config and inputs: continued from the
    last checkpoint, with or without ``resume``.
    """
    import scvi

    run_dir = Path(run_dir)
    train_dir = run_dir / TRAIN_DIR
    model_dir = train_dir / config.model.filename
    ckpt_dir = train_dir / CHECKPOINTS_DIR
    logs_dir = train_dir / LOGS_DIR
    from census_scvi.train._callbacks import LAST_CHECKPOINT

    last_ckpt = ckpt_dir / LAST_CHECKPOINT
    zero = _env_is_global_zero()
    timer = StageTimer()

    _check_train_settings(config)
    devices = resolve_devices(config.train)
    prepare_dir = run_dir / PREPARE_DIR
    mode = config.train.mode
    inputs = (
        _memory_inputs(config, prepare_dir)
        if mode == "memory"
        else _stream_inputs(config, prepare_dir)
    )
    manifest = Manifest(
        stage="train",
        config_hash=config_hash(config, sections=_HASHED_SECTIONS),
        inputs=inputs.hashes,
        started=timer.started,
        census={"uri": config.census_uri(), "version": config.census.version},
    )
    run_info = {"config_hash": manifest.config_hash, "inputs": manifest.inputs}
    existing = read_manifest(train_dir)

    info_path = ckpt_dir / RUN_INFO_FILE
    same_run = info_path.is_file() and json.loads(info_path.read_text()) == run_info
    # an interrupted run of the same config and inputs continues by itself (so 'census-scvi
    # run' resumes after a crash); --resume insists on it, --force starts over
    resuming = not force and last_ckpt.is_file() and (same_run or resume)
    if zero:
        if not force and manifest.matches(existing) and model_dir.is_dir():
            figures = (existing or {}).get("figures", {})
            return TrainResult(
                run_dir=run_dir,
                model_dir=model_dir,
                mode=mode,
                skipped=True,
                epochs=int(figures.get("epochs", 0)),
                n_cells=int(figures.get("n_cells", 0)),
                n_genes=inputs.n_genes,
                n_batches=len(inputs.categories),
                final=dict(figures.get("final", {})),
            )
        if resume and not force and not last_ckpt.is_file():
            logger.warning("--resume: no checkpoint at %s; training from the start", last_ckpt)
        if resuming and not same_run:
            msg = f"the checkpoint in {ckpt_dir} belongs to a run with another config or inputs"
            raise CensusScviError(msg, hint="pass --force to start over with this config")
        if existing is not None and not force:
            logger.info("train: config or inputs changed since the last run; retraining")
        elif last_ckpt.is_file() and not resuming and not force:
            logger.info("train: discarding an interrupted run of another config or inputs")
        _clean(train_dir, model_dir, keep_run=resuming)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        logs_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(ckpt_dir / RUN_INFO_FILE, run_info)
        from census_scvi.config import dump_config

        write_run_config(run_dir, dump_config(config))
    resumed_from: int | None = None
    if resuming:
        resumed_from = _checkpoint_epoch(last_ckpt)
        logger.info("resuming from %s (after epoch %s)", last_ckpt, resumed_from)

    scvi.settings.seed = config.train.seed
    model, datamodule, n_cells = _build_model(config, inputs)

    from lightning.pytorch.loggers import TensorBoardLogger
    from scvi.train._logger import SimpleLogger

    from census_scvi.train._callbacks import (
        EpochCheckpoint,
        HistoryRecorder,
        NonFiniteLossGuard,
        StderrProgressBar,
        ThroughputMonitor,
    )

    history = HistoryRecorder(logs_dir / HISTORY_FILE)
    throughput = ThroughputMonitor()
    guard = NonFiniteLossGuard(
        lr=config.training_plan.lr, var_activation=config.model.var_activation
    )
    our_callbacks = [
        guard,
        history,
        throughput,
        EpochCheckpoint(ckpt_dir, every_n_epochs=config.train.checkpoint_every_n_epochs),
        StderrProgressBar(),
    ]
    t = config.train
    trainer_kwargs: dict[str, Any] = {
        "max_epochs": t.max_epochs,
        "accelerator": devices.accelerator,
        "devices": devices.devices,
        "num_nodes": t.num_nodes,
        "batch_size": t.batch_size,
        "train_size": t.train_size,
        "early_stopping": t.early_stopping,
        "early_stopping_patience": t.early_stopping_patience,
        "early_stopping_monitor": t.early_stopping_monitor,
        "early_stopping_min_delta": t.early_stopping_min_delta,
        "check_val_every_n_epoch": 1,
        "plan_kwargs": scvi_plan_kwargs(config.training_plan),
        "callbacks": [*our_callbacks, *(callbacks or [])],
        "logger": [
            SimpleLogger(),
            TensorBoardLogger(save_dir=str(logs_dir), name="", version="", default_hp_metric=False),
        ],
        "enable_checkpointing": False,
        "simple_progress_bar": False,  # ours is on stderr
        "default_root_dir": str(train_dir),
    }
    if devices.strategy != "auto":
        trainer_kwargs["strategy"] = devices.strategy
    if datamodule is None:
        trainer_kwargs["datasplitter_kwargs"] = {"num_workers": t.num_workers}
        if devices.distributed:
            # give each rank a disjoint, equal share: drop up to world-1 cells rather than
            # repeat cells on some ranks (DistributedSampler's default), as stream mode does
            trainer_kwargs["datasplitter_kwargs"]["drop_dataset_tail"] = True
    else:
        trainer_kwargs["datamodule"] = datamodule
    if resuming:
        trainer_kwargs["ckpt_path"] = str(last_ckpt)

    logger.info(
        "training scVI (%s mode): %d cells x %d genes, %d batches, %s on %s x %s",
        mode,
        n_cells,
        inputs.n_genes,
        len(inputs.categories),
        f"{t.max_epochs} epochs",
        devices.accelerator,
        devices.devices,
    )
    try:
        model.train(**trainer_kwargs)
    except ValueError as e:
        # NaN weights usually surface as torch's distribution argument check, not as a NaN loss
        if guard.is_nan_error(e):
            what = f"the encoder output ({guard.stage})"
            raise guard.error(what, "nan") from None
        raise
    trainer = model.trainer
    world = int(getattr(trainer, "world_size", 1) or 1)
    if not trainer.is_global_zero:
        return TrainResult(run_dir=run_dir, model_dir=model_dir, mode=mode, is_global_zero=False)

    with atomic_path(model_dir) as tmp:
        model.save(str(tmp), save_anndata=False, overwrite=True)
    frame = history.frame()
    history.write()
    if len(frame):
        from census_scvi.train._plot import plot_loss_curve

        plot_loss_curve(
            frame,
            logs_dir / LOSS_CURVE_FILE,
            title=f"scVI {mode} mode: {n_cells:,} cells x {inputs.n_genes:,} genes",
        )
    final = {
        k: float(frame[k].iloc[-1])
        for k in _FINAL_KEYS
        if k in frame.columns and not np.isnan(frame[k].iloc[-1])
    }
    per_rank = throughput.cells_per_second()
    cells_per_s = per_rank * world if per_rank else None
    manifest.figures = {
        "epochs": int(len(frame)),
        "max_epochs": t.max_epochs,
        "stopped_early": bool(len(frame) < t.max_epochs),
        "resumed_from_epoch": resumed_from,
        "n_cells": int(n_cells),
        "n_train": _count(datamodule, "n_train", model.train_indices),
        "n_validation": _count(datamodule, "n_val", model.validation_indices),
        "n_genes": inputs.n_genes,
        "n_batches": len(inputs.categories),
        "final": final,
        "wall_seconds": round(timer.seconds, 3),
        "fit_seconds": round(throughput.fit_seconds, 3),
        "cells_per_second": round(cells_per_s, 1) if cells_per_s else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "device": {
            "accelerator": devices.accelerator,
            "devices": devices.devices,
            "num_nodes": devices.num_nodes,
            "strategy": devices.strategy,
            "world_size": world,
        },
    }
    manifest.outputs = {
        "model": str(model_dir.relative_to(run_dir)),
        "history": str((logs_dir / HISTORY_FILE).relative_to(run_dir)),
        "loss_curve": str((logs_dir / LOSS_CURVE_FILE).relative_to(run_dir)),
        "checkpoint": str(last_ckpt.relative_to(run_dir)),
    }
    _write_manifest_with_config(train_dir, manifest, config)
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        mode=mode,
        epochs=int(len(frame)),
        n_cells=int(n_cells),
        n_genes=inputs.n_genes,
        n_batches=len(inputs.categories),
        final=final,
        seconds=timer.seconds,
        cells_per_second=cells_per_s,
        resumed_from_epoch=resumed_from,
    )


def _count(datamodule: Any, attr: str, indices: Any) -> int:
    if datamodule is not None:
        return int(getattr(datamodule, attr))
    return len(indices) if indices is not None else 0


def _checkpoint_epoch(path: Path) -> int | None:
    """Epochs completed in a Lightning checkpoint (our own file: a full load is safe)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        msg = f"cannot read checkpoint {path}: {e}"
        raise CensusScviError(msg, hint="pass --force to start over") from None
    epoch = ckpt.get("epoch")
    return int(epoch) + 1 if epoch is not None else None


def _write_manifest_with_config(train_dir: Path, manifest: Manifest, config: Config) -> None:
    """``manifest.json`` (last), with the resolved config beside the usual fields."""
    write_manifest(train_dir, manifest)  # sets `finished`
    data = manifest.to_dict()
    data["config"] = config.model_dump(mode="json")
    write_json_atomic(train_dir / MANIFEST_FILE, data)
