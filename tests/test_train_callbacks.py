"""The train stage's callbacks without training: checkpoint cadence, temporaries, NaN guard, quiet.

A small stand-in for Lightning's Trainer carries what the callbacks read (epoch, step,
``max_epochs``, rank, strategy) and writes what ``save_checkpoint`` would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from census_scvi.errors import CensusScviError
from census_scvi.train._callbacks import EpochCheckpoint, NonFiniteLossGuard
from census_scvi.train._quiet import quiet_lightning


class _Strategy:
    def __init__(self, others_bad: bool = False) -> None:
        self.others_bad = others_bad
        self.broadcasts = 0

    def broadcast(self, obj, src=0):
        self.broadcasts += 1
        return obj

    def reduce_boolean_decision(self, decision, all=True):
        return decision or self.others_bad


class _Trainer:
    def __init__(self, max_epochs: int = 100, *, fail_save: bool = False, **strategy) -> None:
        self.current_epoch = 0
        self.global_step = 0
        self.max_epochs = max_epochs
        self.is_global_zero = True
        self.strategy = _Strategy(**strategy)
        self.callback_metrics: dict = {}
        self.fail_save = fail_save
        self.saved: list[tuple[Path, bool | None]] = []

    def save_checkpoint(self, path, weights_only=None):
        Path(path).write_bytes(b"partial")
        if self.fail_save:
            raise OSError("disk full")
        self.saved.append((Path(path), weights_only))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _epochs(cb: EpochCheckpoint, trainer: _Trainer, clock: _Clock, n: int, minutes: float):
    """Run ``n`` epochs of ``minutes`` each; the epochs (1-based) after which it saved."""
    cb.on_train_start(trainer, None)
    saved = []
    for epoch in range(n):
        clock.now += 60.0 * minutes
        trainer.current_epoch = epoch
        before = len(trainer.saved)
        cb.on_train_epoch_end(trainer, None)
        if len(trainer.saved) > before:
            saved.append(epoch + 1)
    return saved


# ------------------------------------------------------------------------------------------
# checkpoint cadence
# ------------------------------------------------------------------------------------------
def test_checkpoint_every_n_epochs_or_m_minutes_whichever_first(tmp_path):
    clock = _Clock()
    trainer = _Trainer(max_epochs=12)
    cb = EpochCheckpoint(tmp_path, every_n_epochs=5, every_minutes=10.0, clock=clock)
    # 4 minutes an epoch: 10 minutes pass after epochs 3 (12 min), 5 by count, then 8, 10, 12
    assert _epochs(cb, trainer, clock, 12, minutes=4) == [3, 5, 8, 10, 12]
    assert (tmp_path / "last.ckpt").read_bytes() == b"partial"
    assert not list(tmp_path.glob(".*"))
    assert {w for _, w in trainer.saved} == {False}  # weights_only said explicitly


def test_checkpoint_by_epochs_only_without_minutes(tmp_path):
    clock = _Clock()
    trainer = _Trainer(max_epochs=7)
    cb = EpochCheckpoint(tmp_path, every_n_epochs=3, every_minutes=None, clock=clock)
    assert _epochs(cb, trainer, clock, 7, minutes=60) == [3, 6, 7]  # and after the last one
    assert trainer.strategy.broadcasts == 0


def test_checkpoint_long_epochs_save_every_epoch(tmp_path):
    clock = _Clock()
    trainer = _Trainer(max_epochs=4)
    cb = EpochCheckpoint(tmp_path, every_n_epochs=100, every_minutes=0.5, clock=clock)
    assert _epochs(cb, trainer, clock, 4, minutes=1) == [1, 2, 3, 4]
    # the clock starts with training, not when the callback was made
    clock.now += 3600
    assert _epochs(cb, _Trainer(max_epochs=4), clock, 1, minutes=0.1) == []


def test_checkpoint_temporary_removed_on_error_and_stale_ones_at_start(tmp_path):
    stale = tmp_path / ".epoch-00003.ckpt.tmp"
    stale.write_bytes(b"killed mid-write")
    cb = EpochCheckpoint(tmp_path, every_n_epochs=1)
    trainer = _Trainer(fail_save=True)
    cb.on_train_start(trainer, None)
    assert not stale.exists()
    with pytest.raises(OSError, match="disk full"):
        cb.on_train_epoch_end(trainer, None)
    assert list(tmp_path.iterdir()) == []  # no temporary, no last.ckpt


# ------------------------------------------------------------------------------------------
# NaN guard
# ------------------------------------------------------------------------------------------
def _guard(**kwargs) -> NonFiniteLossGuard:
    return NonFiniteLossGuard(lr=1e-3, var_activation="exp", **kwargs)


def _steps(guard: NonFiniteLossGuard, trainer: _Trainer, losses, epoch: int = 0) -> None:
    trainer.current_epoch = epoch
    for i, loss in enumerate(losses):
        guard.on_train_batch_start(trainer, None, None, i)
        trainer.global_step += 1
        guard.on_train_batch_end(trainer, None, {"loss": loss}, None, i)


def test_guard_on_cpu_stops_at_the_bad_step():
    trainer = _Trainer()
    guard = _guard(check_every_n_steps=100)
    losses = [torch.tensor(3.0), torch.tensor(2.0), torch.tensor(float("nan"))]
    with pytest.raises(CensusScviError) as err:
        _steps(guard, trainer, losses, epoch=2)
    text = str(err.value)
    assert "the training loss became nan at epoch 2 (step 3)" in text and "\n" not in text
    assert "training_plan.lr (now 0.001)" in err.value.hint
    assert "model.var_activation: softplus" in err.value.hint


def test_guard_off_host_reads_the_flag_every_n_steps_and_at_epoch_end():
    trainer = _Trainer()
    guard = _guard(check_every_n_steps=4)
    guard.host_devices = ()  # treat CPU tensors as a GPU's: no read per step
    ok = [torch.tensor(1.0)] * 5
    _steps(guard, trainer, ok)  # steps 1..5, checks at 4: fine
    # a bad loss at step 6 (batch 1 of this call) is found at batch index 3 (step 8), reported
    # with the step and value it had
    trainer.global_step = 5
    bad = [torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(float("nan"))]
    _steps(guard, trainer, bad)  # batch indices 0..2: no check due yet
    with pytest.raises(CensusScviError, match=r"became inf at epoch 0 \(step 7\)"):
        _steps(guard, trainer, [torch.tensor(1.0)] * 4)
    # after the last check of an epoch: the epoch end finds it (before the checkpoint)
    guard = _guard(check_every_n_steps=1000)
    guard.host_devices = ()
    _steps(guard, trainer, [torch.tensor(1.0), torch.tensor(float("nan"))], epoch=1)
    with pytest.raises(CensusScviError, match="became nan at epoch 1"):
        guard.on_train_epoch_end(trainer, None)


def test_guard_agrees_across_ranks():
    trainer = _Trainer(others_bad=True)
    guard = _guard(check_every_n_steps=2)
    guard.host_devices = ()
    with pytest.raises(CensusScviError, match="training loss of another rank"):
        _steps(guard, trainer, [torch.tensor(1.0)] * 2)


def test_guard_nan_weights_error_names_a_recorded_bad_loss():
    trainer = _Trainer()
    guard = _guard(check_every_n_steps=1000)
    guard.host_devices = ()
    _steps(guard, trainer, [torch.tensor(1.0)] * 3)
    assert "the encoder output (training) became nan" in str(guard.nan_weights_error())
    _steps(guard, trainer, [torch.tensor(float("nan"))])
    assert "the training loss became nan at epoch 0 (step 4)" in str(guard.nan_weights_error())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guard_no_host_sync_per_step_on_gpu():
    trainer = _Trainer()
    guard = _guard(check_every_n_steps=8)
    losses = [torch.tensor(1.0, device="cuda")] * 7 + [torch.tensor(float("nan"), device="cuda")]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host wait raises
    try:
        _steps(guard, trainer, losses[:7])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(CensusScviError, match=r"became nan at epoch 0 \(step 8\)"):
        _steps(guard, trainer, losses[7:])  # batch index 0 of a new call: no check due
        guard.on_train_epoch_end(trainer, None)


# ------------------------------------------------------------------------------------------
# Lightning's routine lines
# ------------------------------------------------------------------------------------------
def test_quiet_lightning_drops_only_routine_info(caplog):
    caplog.set_level(logging.INFO)
    ckpt = logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with quiet_lightning():
        ckpt.info("`weights_only` was not set, defaulting to `False`.")
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("`Trainer.fit` stopped: `max_epochs=3` reached.")
        rank_zero.info("Monitored metric elbo_validation did not improve")
        rank_zero.warning("GPU available but not used")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "Monitored metric elbo_validation did not improve",
        "GPU available but not used",
    ]
    caplog.clear()
    ckpt.info("`weights_only` was not set, defaulting to `False`.")  # outside: untouched
    assert len(caplog.records) == 1
