"""Train stage: scVI exactly as configured, in memory or streamed, resumable, on one device or many.

``run_train`` reads what prepare wrote (``prepare/anndata_model.h5ad`` in ``train.mode: memory``;
``prepare/cells.parquet`` + ``prepare/hvg.parquet`` and the SOMA census in ``train.mode: stream``),
checks that it matches the config *before* any training (:mod:`._inputs`), builds
``scvi.model.SCVI`` with every ``model`` key, trains with every ``train`` key and the
``training_plan`` keys as scvi-tools' ``plan_kwargs`` (:mod:`._model`), feeds it shuffled-chunk
mini-batches from a read-ahead thread in both modes (:mod:`._datamodule`; in memory mode cut from
the h5ad's X held as CSR, or scvi-tools' own loader with ``train.memory_loader: scvi-tools``), on
the devices :func:`resolve_devices` decides (:mod:`._devices`), and writes::

    train/scvi.model/      scvi-tools save format (scvi.model.SCVI.load(dir, adata=prepared))
    train/logs/            TensorBoard events, history.csv, loss_curve.png
    train/checkpoints/     last.ckpt (every train.checkpoint_every_n_epochs epochs or
                           train.checkpoint_every_minutes minutes) and run.json, for --resume
    train/manifest.json    config, versions, input hashes, epochs, final losses, wall time, cells/s

The skip / config / manifest-last bookkeeping is :func:`census_scvi.rundir.run_stage`'s; what is
the train stage's own is resuming (:mod:`._resume`): ``checkpoints/run.json`` says which config
and inputs the checkpoint belongs to, and a run of the same ones continues from it, verified as
data only, and draw for draw where the interrupted run was (the random generators' states are in
the checkpoint, :mod:`._rng`): a resumed run ends with the weights of an uninterrupted one.

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.train import run_train
>>> cfg = load_config(None, overrides=["train.max_epochs=2"])
>>> result = run_train(cfg, run_dir="runs/demo")  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.config import Config, config_hash
from census_scvi.constants import (
    CHECKPOINTS_DIR,
    HISTORY_FILE,
    LOGS_DIR,
    LOSS_CURVE_FILE,
    PREPARE_DIR,
    TRAIN_DIR,
)
from census_scvi.errors import CensusScviError
from census_scvi.rundir import (
    StageRun,
    StageTimer,
    atomic_path,
    is_global_zero,
    peak_rss_bytes,
    run_stage,
    write_json_atomic,
)
from census_scvi.train._devices import (
    DDP_STRATEGY,
    DeviceSettings,
    loader_workers,
    resolve_devices,
)
from census_scvi.train._inputs import CELLS_FILE, TrainInputs, read_inputs
from census_scvi.train._model import (
    build_model,
    distribution_checks_off,
    fused_plan_kwargs,
    memory_loader_kwargs,
    scvi_model_kwargs,
    scvi_plan_kwargs,
)

if TYPE_CHECKING:
    from census_scvi.train._callbacks import HistoryRecorder, NonFiniteLossGuard, ThroughputMonitor
    from census_scvi.train._resume import ResumePlan

__all__ = [
    "CELLS_FILE",
    "DDP_STRATEGY",
    "DeviceSettings",
    "TrainResult",
    "resolve_devices",
    "run_train",
    "scvi_model_kwargs",
    "scvi_plan_kwargs",
]

logger = logging.getLogger(__name__)

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
        onto a checkpoint of another config or a checkpoint that is not data only (it is never
        unpickled unrestricted), no GPU for ``accelerator: gpu``, or a NaN/inf loss during
        training.

    Notes
    -----
    Finished with the same config and inputs: skipped. Config or inputs changed: retrained.
    Interrupted (a checkpoint, no manifest) with the same config and inputs: continued from the
    last checkpoint, with or without ``resume``. Only global rank 0 writes the config, the run
    directory and the manifest; a worker rank trains and returns ``is_global_zero=False``.
    """
    timer = StageTimer()
    paths = _Paths.of(Path(run_dir), config)
    zero = is_global_zero()
    _check_train_settings(config)
    devices = resolve_devices(config.train)
    inputs = read_inputs(config, paths.run_dir / PREPARE_DIR)
    plan = _plan_resume(config, inputs, paths, force=force, resume=resume, zero=zero)
    with run_stage(
        paths.run_dir,
        TRAIN_DIR,
        config=config,
        sections=_HASHED_SECTIONS,
        inputs=inputs.hashes,
        force=force or not zero,  # a worker rank runs only because rank 0 is training
        write_config=zero,
    ) as stage:
        if stage.skipped:
            return _skipped_result(paths, config, inputs, stage.figures)
        if zero:
            _start_train_dir(paths, plan, had_manifest=stage.previous is not None)
        fit = _fit(config, inputs, devices, paths, plan, callbacks)
        if not fit.model.trainer.is_global_zero:
            mode = config.train.mode
            return TrainResult(paths.run_dir, paths.model, mode, is_global_zero=False)
        frame = _save_outputs(fit, paths, config.train.mode, inputs)
        _remove_stream_cache(paths)
        figures = _figures(config, inputs, devices, fit, frame, timer)
        _record(stage, config, paths, figures)
    return _result(paths, config, inputs, figures, timer)


def _remove_stream_cache(paths: _Paths) -> None:
    """Training finished: its local copy of the counts is no longer needed (it is the run's)."""
    cache = paths.stream_cache
    if cache.is_dir() and not cache.is_symlink():
        shutil.rmtree(cache)
        logger.info("stream cache removed (%s)", cache)


def _check_train_settings(config: Config) -> None:
    t = config.train
    if t.early_stopping and t.train_size >= 1.0:
        msg = "train.early_stopping monitors validation loss but train.train_size is 1.0"
        raise CensusScviError(msg, hint="set train.train_size below 1 (e.g. 0.9)")


@dataclass(frozen=True)
class _Paths:
    """Where the train stage writes, under ``run_dir/train``."""

    run_dir: Path
    train: Path
    model: Path
    checkpoints: Path
    logs: Path

    @classmethod
    def of(cls, run_dir: Path, config: Config) -> _Paths:
        train = run_dir / TRAIN_DIR
        return cls(
            run_dir, train, train / config.model.filename, train / CHECKPOINTS_DIR, train / LOGS_DIR
        )

    @property
    def stream_cache(self) -> Path:
        from census_scvi.train._stream_cache import CACHE_DIR

        return self.train / CACHE_DIR

    @property
    def last_checkpoint(self) -> Path:
        from census_scvi.train._callbacks import LAST_CHECKPOINT

        return self.checkpoints / LAST_CHECKPOINT

    def outputs(self) -> dict[str, Path]:
        """The outputs the manifest lists, by name."""
        return {
            "model": self.model,
            "history": self.logs / HISTORY_FILE,
            "loss_curve": self.logs / LOSS_CURVE_FILE,
            "checkpoint": self.last_checkpoint,
        }


# ------------------------------------------------------------------------------------------
# resuming
# ------------------------------------------------------------------------------------------
def _plan_resume(
    config: Config, inputs: TrainInputs, paths: _Paths, *, force: bool, resume: bool, zero: bool
) -> ResumePlan:
    """Resume from ``last.ckpt`` or not; refuse (before touching anything) another run's."""
    from census_scvi.train._resume import plan_resume

    run_info = {
        "config_hash": config_hash(config, sections=_HASHED_SECTIONS),
        "inputs": inputs.hashes,
    }
    return plan_resume(run_info, paths.last_checkpoint, force=force, resume=resume, zero=zero)


def _start_train_dir(paths: _Paths, plan: ResumePlan, *, had_manifest: bool) -> None:
    """Rank 0, before training: clear the last run (keeping checkpoints and logs to resume)."""
    from census_scvi.train._resume import RUN_INFO_FILE

    if plan.requested and not plan.force and not plan.checkpoint.is_file():
        logger.warning("--resume: no checkpoint at %s; training from the start", plan.checkpoint)
    if not (had_manifest or plan.force or plan.resuming) and plan.checkpoint.is_file():
        logger.info("train: discarding an interrupted run of another config or inputs")
    old = [paths.model]
    if not plan.resuming:
        old += [paths.logs, paths.checkpoints, paths.stream_cache]
    for p in old:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    write_json_atomic(paths.checkpoints / RUN_INFO_FILE, plan.run_info)


def _read_resume_checkpoint(plan: ResumePlan) -> tuple[dict[str, Any] | None, int | None]:
    """The verified checkpoint to resume from and its epochs (None, None when not resuming)."""
    if not plan.resuming:
        return None, None
    from census_scvi.train._resume import checkpoint_epochs, read_checkpoint

    ckpt = read_checkpoint(plan.checkpoint)
    epoch = checkpoint_epochs(ckpt)
    logger.info("resuming from %s (after epoch %s)", plan.checkpoint, epoch)
    return ckpt, epoch


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
@dataclass
class _Fit:
    """A trained model and what the callbacks saw."""

    model: Any
    datamodule: Any
    n_cells: int
    guard: NonFiniteLossGuard
    history: HistoryRecorder
    throughput: ThroughputMonitor
    resumed_from: int | None


def _fit(
    config: Config,
    inputs: TrainInputs,
    devices: DeviceSettings,
    paths: _Paths,
    plan: ResumePlan,
    callbacks: Sequence[Any] | None,
) -> _Fit:
    """Build the model and train it (from the checkpoint when resuming)."""
    import scvi

    from census_scvi._allocators import fix_mmap_threshold
    from census_scvi.train._callbacks import HistoryRecorder, NonFiniteLossGuard, ThroughputMonitor
    from census_scvi.train._quiet import quiet_lightning

    fix_mmap_threshold()  # large arrays mapped and returned: the heap does not grow with steps

    checkpoint, resumed_from = _read_resume_checkpoint(plan)
    with quiet_lightning():  # "Seed set to ..."
        scvi.settings.seed = config.train.seed
    workers = loader_workers(config.train.num_workers, processes=devices.processes_per_node)
    model, datamodule, n_cells = build_model(
        config, inputs, num_workers=workers, cache_dir=paths.stream_cache
    )
    fit = _Fit(
        model,
        datamodule,
        n_cells,
        guard=NonFiniteLossGuard(
            lr=config.training_plan.lr, var_activation=config.model.var_activation
        ),
        history=HistoryRecorder(paths.logs / HISTORY_FILE),
        throughput=ThroughputMonitor(),
        resumed_from=resumed_from,
    )
    all_callbacks = [*_our_callbacks(config, paths, fit), *(callbacks or [])]
    kwargs = _trainer_kwargs(config, devices, paths, all_callbacks, datamodule, workers)
    if checkpoint is not None:
        from census_scvi.train._resume import VerifiedCheckpointIO

        kwargs["ckpt_path"] = str(plan.checkpoint)
        kwargs["plugins"] = [VerifiedCheckpointIO(plan.checkpoint, checkpoint)]
        del checkpoint  # Lightning drops it once restored
    logger.info(
        "training scVI (%s mode): %d cells x %d genes, %d batches, %d epochs on %s x %s",
        inputs.mode,
        n_cells,
        inputs.n_genes,
        len(inputs.categories),
        config.train.max_epochs,
        devices.accelerator,
        devices.devices,
    )
    _train(model, kwargs, fit.guard)
    return fit


def _our_callbacks(config: Config, paths: _Paths, fit: _Fit) -> list[Any]:
    """The train stage's callbacks: NaN guard, history, throughput, checkpoints, progress bar."""
    from census_scvi.train._callbacks import EpochCheckpoint, StderrProgressBar
    from census_scvi.train._rng import RandomStateCheckpoint

    t = config.train
    return [
        fit.guard,
        fit.history,
        fit.throughput,
        RandomStateCheckpoint(),
        EpochCheckpoint(
            paths.checkpoints,
            every_n_epochs=t.checkpoint_every_n_epochs,
            every_minutes=t.checkpoint_every_minutes,
        ),
        StderrProgressBar(),
    ]


def _trainer_kwargs(
    config: Config,
    devices: DeviceSettings,
    paths: _Paths,
    callbacks: list[Any],
    datamodule: Any,
    num_workers: int,
) -> dict[str, Any]:
    """``model.train(**kwargs)``: every ``train`` key, the plan, callbacks, loggers, devices."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from scvi.train._logger import SimpleLogger

    t = config.train
    kwargs: dict[str, Any] = {
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
        "plan_kwargs": _plan_kwargs(config, devices.accelerator),
        "callbacks": callbacks,
        "logger": [
            SimpleLogger(),
            TensorBoardLogger(
                save_dir=str(paths.logs), name="", version="", default_hp_metric=False
            ),
        ],
        "enable_checkpointing": False,
        "simple_progress_bar": False,  # ours is on stderr
        "default_root_dir": str(paths.train),
    }
    if devices.strategy != "auto":
        kwargs["strategy"] = devices.strategy
    if datamodule is not None:
        kwargs["datamodule"] = datamodule
    else:
        kwargs["datasplitter_kwargs"] = memory_loader_kwargs(
            num_workers, distributed=devices.distributed
        )
    return kwargs


def _plan_kwargs(config: Config, accelerator: str) -> dict[str, Any]:
    """The ``training_plan`` keys for scvi-tools, Adam/AdamW fused unless turned off."""
    kwargs = scvi_plan_kwargs(config.training_plan)
    return fused_plan_kwargs(kwargs, accelerator) if config.train.fused_optimizer else kwargs


def _train(model: Any, kwargs: dict[str, Any], guard: NonFiniteLossGuard) -> None:
    """``model.train``, Lightning's routine info lines dropped, NaN weights as our error.

    torch's distribution argument checks are off while training (:func:`distribution_checks_off`):
    each one waits for the device; NaN weights then surface as a NaN loss, which the guard stops.
    """
    from census_scvi.train._quiet import quiet_lightning

    try:
        with quiet_lightning(), distribution_checks_off():
            model.train(**kwargs)
    except ValueError as e:
        # a distribution that checks its arguments anyway (validate_args=True) raises on NaN
        if guard.is_nan_error(e):
            raise guard.nan_weights_error() from None
        raise


# ------------------------------------------------------------------------------------------
# outputs and manifest
# ------------------------------------------------------------------------------------------
def _save_outputs(fit: _Fit, paths: _Paths, mode: str, inputs: TrainInputs) -> Any:
    """Rank 0: the model (renamed into place), history.csv and the loss curve; the history."""
    with atomic_path(paths.model) as tmp:
        fit.model.save(str(tmp), save_anndata=False, overwrite=True)
    frame = fit.history.frame()
    fit.history.write()
    if len(frame):
        from census_scvi.train._plot import plot_loss_curve

        plot_loss_curve(
            frame,
            paths.logs / LOSS_CURVE_FILE,
            title=f"scVI {mode} mode: {fit.n_cells:,} cells x {inputs.n_genes:,} genes",
        )
    return frame


def _figures(
    config: Config,
    inputs: TrainInputs,
    devices: DeviceSettings,
    fit: _Fit,
    frame: Any,
    timer: StageTimer,
) -> dict[str, Any]:
    """The manifest's figures: epochs, cells, final losses, time, throughput, devices."""
    t = config.train
    model, dm = fit.model, fit.datamodule
    world = int(getattr(model.trainer, "world_size", 1) or 1)
    final = {
        k: float(frame[k].iloc[-1])
        for k in _FINAL_KEYS
        if k in frame.columns and not np.isnan(frame[k].iloc[-1])
    }
    per_rank = fit.throughput.cells_per_second()
    cells_per_s = per_rank * world if per_rank else None
    return {
        "epochs": int(len(frame)),
        "max_epochs": t.max_epochs,
        "stopped_early": bool(len(frame) < t.max_epochs),
        "resumed_from_epoch": fit.resumed_from,
        "n_cells": int(fit.n_cells),
        "n_train": _count(dm, "n_train", model.train_indices),
        "n_validation": _count(dm, "n_val", model.validation_indices),
        "n_genes": inputs.n_genes,
        "n_batches": len(inputs.categories),
        "final": final,
        "wall_seconds": round(timer.seconds, 3),
        "fit_seconds": round(fit.throughput.fit_seconds, 3),
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


def _count(datamodule: Any, attr: str, indices: Any) -> int:
    if datamodule is not None:
        return int(getattr(datamodule, attr))
    return len(indices) if indices is not None else 0


def _record(stage: StageRun, config: Config, paths: _Paths, figures: dict[str, Any]) -> None:
    """What the manifest says; the model, history and loss curve sizes make a rerun redo it.

    ``model.pt`` is recorded on its own too, so its size and hash are checked (the model folder
    as a whole is checked for presence only).

    The checkpoint is listed but not size-checked: deleting it to free space does not retrain.
    """
    outputs = paths.outputs()
    sized = {k: outputs[k] for k in ("model", "history")}
    sized["model_file"] = outputs["model"] / "model.pt"  # hashed: a corrupt copy retrains
    if outputs["loss_curve"].exists():  # not drawn for an empty history
        sized["loss_curve"] = outputs["loss_curve"]
    stage.record(
        figures=figures,
        outputs=sized,
        listed={k: str(p.relative_to(paths.run_dir)) for k, p in outputs.items()},
        census={"uri": config.census_uri(), "version": config.census.version},
        extra={"config": config.model_dump(mode="json")},
    )


def _result(
    paths: _Paths,
    config: Config,
    inputs: TrainInputs,
    figures: dict[str, Any],
    timer: StageTimer,
) -> TrainResult:
    return TrainResult(
        run_dir=paths.run_dir,
        model_dir=paths.model,
        mode=config.train.mode,
        epochs=figures["epochs"],
        n_cells=figures["n_cells"],
        n_genes=inputs.n_genes,
        n_batches=len(inputs.categories),
        final=figures["final"],
        seconds=timer.seconds,
        cells_per_second=figures["cells_per_second"],
        resumed_from_epoch=figures["resumed_from_epoch"],
    )


def _skipped_result(
    paths: _Paths, config: Config, inputs: TrainInputs, figures: dict[str, Any]
) -> TrainResult:
    return TrainResult(
        run_dir=paths.run_dir,
        model_dir=paths.model,
        mode=config.train.mode,
        skipped=True,
        epochs=int(figures.get("epochs", 0)),
        n_cells=int(figures.get("n_cells", 0)),
        n_genes=inputs.n_genes,
        n_batches=len(inputs.categories),
        final=dict(figures.get("final", {})),
    )
