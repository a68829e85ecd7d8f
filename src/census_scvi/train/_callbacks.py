"""Lightning callbacks of the train stage: history, checkpoints, non-finite loss, throughput.

Each one does what no stock callback does for us:
- :class:`HistoryRecorder` keeps one row of epoch metrics per epoch *in the checkpoint* (scvi's
  ``SimpleLogger`` history lives in memory only, so a resumed run would lose its first epochs)
  and rewrites ``history.csv`` after every epoch.
- :class:`EpochCheckpoint` saves ``last.ckpt`` every N epochs or M minutes at the end of the
  training epoch, after :class:`HistoryRecorder` recorded it (a ``ModelCheckpoint`` would
  collide with scvi-tools' Trainer, which adds its own ``SaveCheckpoint`` when checkpointing is
  enabled).
- :class:`NonFiniteLossGuard` stops at the first NaN/inf loss with a one-line fix, without
  waiting for the GPU every step.
- :class:`ThroughputMonitor` times the training steps of each epoch (data loading included,
  validation excluded) for the cells/s figure.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ProgressBar

from census_scvi.errors import CensusScviError

__all__ = [
    "EpochCheckpoint",
    "HistoryRecorder",
    "NonFiniteLossGuard",
    "StderrProgressBar",
    "ThroughputMonitor",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
_TMP_SUFFIX = ".ckpt.tmp"


def _scalar(v: Any) -> float | None:
    try:
        return float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError, RuntimeError):
        return None


class HistoryRecorder(Callback):
    """One row per finished epoch: epoch metrics (train and validation), KL weight, learning rate.

    Parameters
    ----------
    csv_path
        Where ``history.csv`` is rewritten after each epoch (global rank 0 only); None: keep in
        memory only.
    """

    def __init__(self, csv_path: str | os.PathLike[str] | None = None) -> None:
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.rows: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch)
        row: dict[str, Any] = {"epoch": epoch}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.endswith("_step") or key == "kl_weight":
                continue
            row[key.removesuffix("_epoch")] = _scalar(value)
        kl = getattr(pl_module, "kl_weight", None)
        if kl is not None:
            row["kl_weight"] = _scalar(kl)
        optimizers = trainer.optimizers
        if optimizers:
            row["lr"] = float(optimizers[0].param_groups[0]["lr"])
        # a resumed run may repeat an epoch that was running when it stopped
        self.rows = [r for r in self.rows if r["epoch"] < epoch]
        self.rows.append(row)
        if trainer.is_global_zero:
            self.write()

    def frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("epoch") if self.rows else pd.DataFrame()

    def write(self) -> None:
        if self.csv_path is None:
            return
        from census_scvi.rundir import atomic_path

        with atomic_path(self.csv_path) as tmp:
            self.frame().to_csv(tmp)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]


class EpochCheckpoint(Callback):
    """Save ``<dirpath>/last.ckpt`` every N epochs or M minutes, and after the last epoch.

    Runs at the end of the training epoch (validation of that epoch done), so a resumed run
    starts at the next epoch with the optimizer, KL warm-up position and history restored. A
    checkpoint is due when ``every_n_epochs`` epochs have passed, or when ``every_minutes``
    minutes have passed since the last one (checked at epoch ends; rank 0's clock decides for
    every rank, so all of them save together). It is written under a temporary name in the same
    folder and renamed onto ``last.ckpt``; a temporary is removed on error and, left by a killed
    run, when the next run starts.

    Parameters
    ----------
    dirpath
        The checkpoints folder.
    every_n_epochs
        Save after every this many epochs.
    every_minutes
        Also save when this many minutes passed since the last save (or the start); None: by
        epochs only.
    clock
        Seconds, monotonic (tests replace it).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        every_n_epochs: int = 1,
        every_minutes: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.every_minutes = every_minutes
        self.clock = clock
        self._last_save = clock()

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST_CHECKPOINT

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_save = self.clock()
        if trainer.is_global_zero:
            for stale in self.dirpath.glob(f".*{_TMP_SUFFIX}"):
                stale.unlink(missing_ok=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch) + 1
        if self._due(trainer, epoch):
            self._save(trainer, epoch)

    def _due(self, trainer: Any, epoch: int) -> bool:
        if epoch % self.every_n_epochs == 0 or epoch >= int(trainer.max_epochs or 0):
            return True
        if self.every_minutes is None:
            return False
        due = self.clock() - self._last_save >= 60.0 * self.every_minutes
        return bool(trainer.strategy.broadcast(due, 0))

    def _save(self, trainer: Any, epoch: int) -> None:
        tmp = self.dirpath / f".epoch-{epoch:05d}{_TMP_SUFFIX}"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        try:
            # all ranks call it; rank 0 writes, then a barrier. weights_only=False (optimizer,
            # loops, callbacks: what resuming needs), said explicitly so Lightning does not log
            # that it was not set after every epoch
            trainer.save_checkpoint(tmp, weights_only=False)
        except BaseException:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
            raise
        if trainer.is_global_zero:
            tmp.replace(self.last_path)
            logger.debug("checkpoint after epoch %d -> %s", epoch, self.last_path)
        self._last_save = self.clock()


class NonFiniteLossGuard(Callback):
    """Stop training at the first NaN/inf training loss with a one-line error and the fixes.

    Checking a loss on the host every step would wait for the device every step. Instead each
    step's ``isfinite`` is folded into a flag on the loss's device (with the first bad value,
    epoch and step), and the flag is read every ``check_every_n_steps`` steps and at each epoch
    end (before the checkpoint), agreed across DDP ranks. A loss already on the host (CPU
    training) is checked at once: reading it costs nothing there.

    Parameters
    ----------
    lr
        The configured learning rate (quoted in the hint).
    var_activation
        The configured encoder variance activation (quoted in the hint).
    check_every_n_steps
        Steps between reads of the device flag.
    """

    #: devices whose losses are read at once (no transfer, no wait)
    host_devices: tuple[str, ...] = ("cpu",)

    def __init__(self, *, lr: float, var_activation: str, check_every_n_steps: int = 100) -> None:
        self.lr = lr
        self.var_activation = var_activation
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self.epoch = 0
        self.step = 0
        self.stage = "training"
        # on the loss's device: any non-finite loss yet; the first one's value, epoch, step
        self._flag: Any = None
        self._value: Any = None
        self._epoch: Any = None
        self._step: Any = None

    def error(self, what: str, value: Any) -> CensusScviError:
        """The one-line error for a non-finite ``what`` at the last epoch/step seen."""
        fixes = [f"lower training_plan.lr (now {self.lr:g})"]
        if self.var_activation != "softplus":
            fixes.append("set model.var_activation: softplus")
        msg = f"{what} became {value} at epoch {self.epoch} (step {self.step}); training stopped"
        return CensusScviError(msg, hint=" or ".join(fixes))

    @staticmethod
    def is_nan_error(err: BaseException) -> bool:
        """True for torch's distribution check on NaN parameters (how NaNs usually surface)."""
        text = str(err)
        return isinstance(err, ValueError) and "found invalid values" in text

    def nan_weights_error(self) -> CensusScviError:
        """The error for :meth:`is_nan_error`: the non-finite loss before it, if one was seen."""
        loss_error = self._recorded_error()
        if loss_error is not None:
            return loss_error
        return self.error(f"the encoder output ({self.stage})", "nan")

    def _fail(self, what: str, value: Any, trainer: Any) -> None:
        self._seen(trainer, self.stage)
        raise self.error(what, value)

    def _seen(self, trainer: Any, stage: str) -> None:
        self.epoch = int(trainer.current_epoch)
        self.step = int(trainer.global_step)
        self.stage = stage

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._seen(trainer, "training")

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._seen(trainer, "validation")

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if not hasattr(loss, "detach"):  # a plain number
            if not math.isfinite(float(loss)):
                self._fail("the training loss", float(loss), trainer)
            return
        self._track(loss.detach(), trainer)
        if loss.device.type in self.host_devices:
            self._check(trainer, agree=False)
        elif (batch_idx + 1) % self.check_every_n_steps == 0:
            self._check(trainer, agree=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._check(trainer, agree=True)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        value = _scalar(trainer.callback_metrics.get("elbo_validation"))
        if value is not None and not math.isfinite(value):
            self._fail("the validation ELBO", value, trainer)

    def _track(self, loss: Any, trainer: Any) -> None:
        """Fold this step's loss into the device flag: device ops only, no wait for the device."""
        import torch

        if self._flag is None or self._flag.device != loss.device:
            self._flag = torch.zeros((), dtype=torch.bool, device=loss.device)
            self._value = torch.zeros((), dtype=torch.float32, device=loss.device)
            self._epoch = torch.zeros((), dtype=torch.int64, device=loss.device)
            self._step = torch.zeros((), dtype=torch.int64, device=loss.device)
        value = loss.float().sum()
        first = ~torch.isfinite(value) & ~self._flag
        self._value = torch.where(first, value, self._value)
        self._epoch.masked_fill_(first, int(trainer.current_epoch))
        self._step.masked_fill_(first, int(trainer.global_step))
        self._flag.logical_or_(first)

    def _recorded_error(self) -> CensusScviError | None:
        if self._flag is None or not bool(self._flag):
            return None
        self.epoch, self.step, self.stage = int(self._epoch), int(self._step), "training"
        return self.error("the training loss", float(self._value))

    def _check(self, trainer: Any, *, agree: bool) -> None:
        """Raise when a non-finite loss was recorded (``agree``: on any rank; one read each)."""
        if self._flag is None:
            return
        bad = bool(self._flag)
        if agree:
            bad = bool(trainer.strategy.reduce_boolean_decision(bad, all=False))
        if not bad:
            return
        err = self._recorded_error()
        if err is not None:
            raise err
        self._fail("the training loss of another rank", "nan or inf", trainer)


class ThroughputMonitor(Callback):
    """Per-epoch training time (first step to last step, loading included) and cells."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []  # (cells, seconds) per epoch
        self._t0: float | None = None
        self._t_last = 0.0
        self._cells = 0
        self.fit_seconds = 0.0
        self._fit_t0 = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._fit_t0 = time.perf_counter()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_t0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._t0 = time.perf_counter()
        self._cells = 0

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        x = batch.get("X") if isinstance(batch, dict) else None
        self._cells += int(x.shape[0]) if x is not None else 0
        self._t_last = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._t0 is not None and self._cells:
            self.epochs.append((self._cells, self._t_last - self._t0))
        self._t0 = None

    def cells_per_second(self, *, skip_first: bool = True) -> float | None:
        """Training cells per second on this rank (the first epoch skipped when others exist)."""
        epochs = self.epochs[1:] if skip_first and len(self.epochs) > 1 else self.epochs
        seconds = sum(s for _, s in epochs)
        cells = sum(c for c, _ in epochs)
        return cells / seconds if seconds > 0 else None


class StderrProgressBar(ProgressBar):
    """Training progress in cells, on stderr (scvi-tools' bar counts epochs, on stdout).

    One bar over every training cell of every epoch still to run, with rate and ETA, its
    description the epoch and the last epoch's loss; not on a terminal, a log line every 10%
    (:class:`census_scvi.progress.Tracker`): a one-epoch training of millions of cells says how
    far it is. Rank 0 only.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._tracker: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None}  # a rich display does not pickle

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from census_scvi.progress import Tracker

        if not (self._enabled and trainer.is_global_zero):
            return
        epochs = max(int(trainer.max_epochs) - int(trainer.current_epoch), 0)
        total = _training_cells(trainer) * epochs
        self._tracker = Tracker(self._describe(trainer), total=total or None, unit="cells")

    def _describe(self, trainer: Any, loss: Any = None) -> str:
        epoch = min(int(trainer.current_epoch) + 1, int(trainer.max_epochs))
        text = f"training, epoch {epoch}/{trainer.max_epochs}"
        return text if loss is None else f"{text}, last loss {float(loss):,.1f}"

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._tracker is not None:
            x = batch.get("X") if isinstance(batch, dict) else None
            self._tracker.advance(int(x.shape[0]) if x is not None else 0)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._tracker is not None:  # the epoch now running, the loss of the one before
            loss = trainer.callback_metrics.get("train_loss_epoch")
            self._tracker.describe(self._describe(trainer, loss))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None


def _training_cells(trainer: Any) -> int:
    """Training cells per epoch on this rank: the data module's count, else batches x size."""
    dm = trainer.datamodule
    n = getattr(dm, "n_train", None)
    if isinstance(n, int) and n > 0:
        return n // max(int(trainer.world_size), 1)
    batches = trainer.num_training_batches
    size = getattr(dm, "batch_size", 0) or 0
    return int(batches * size) if math.isfinite(batches) else 0
