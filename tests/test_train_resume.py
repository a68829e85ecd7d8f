"""Exact resume: killed with SIGKILL after a checkpoint, a rerun ends where an uninterrupted run ends.

The checkpoint carries the random generators' states (``train/_rng.py``) and every epoch's data
order follows from them (``train.memory_loader: scvi-tools``: its RandomSampler on torch's global
generator) or from ``seed + epoch`` (stream mode and memory mode's census-scvi loader), so the
resumed weights, latent and losses equal the uninterrupted run's. The checkpoint is read as data only: a tampered one is refused. Also here:
the DataLoader worker settings, and torch's distribution checks being off while training only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback

from census_scvi.config import load_config
from census_scvi.errors import CensusScviError
from census_scvi.prepare import run_prepare
from census_scvi.train import run_train
from census_scvi.train._devices import loader_workers
from census_scvi.train._model import distribution_checks_off, memory_loader_kwargs
from census_scvi.train._rng import (
    RandomStateCheckpoint,
    capture_random_states,
    restore_random_states,
)

SMALL = [
    "hvg.top_n_hvg=100",
    "model.n_hidden=32",
    "model.n_latent=5",
    "train.max_epochs=4",
    "train.batch_size=256",
    "train.accelerator=cpu",
    "train.checkpoint_every_n_epochs=1",
    "training_plan.n_epochs_kl_warmup=3",
    "train.stream_io_batch_size=1024",
]
LOSSES = ["elbo_train", "elbo_validation", "reconstruction_loss_train", "kl_local_train"]

# trains in its own process and stalls mid-epoch 3 (after the epoch-2 checkpoint) to be killed
CHILD = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    from lightning.pytorch import Callback

    from census_scvi.config import load_config
    from census_scvi.train import run_train

    run_dir, marker, *overrides = sys.argv[1:]


    class Stall(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 1:  # one step into epoch 3
                Path(marker).write_text("stalled")
                time.sleep(600)


    run_train(load_config(None, overrides=overrides), run_dir=Path(run_dir), callbacks=[Stall()])
    """
)


def _overrides(uri: str, mode: str, *extra: str) -> list[str]:
    return [f"census.uri={uri}", *SMALL, f"train.mode={mode}", *extra]


@pytest.fixture(scope="module")
def prepared(mini_census, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "prepared"
    run_prepare(load_config(None, overrides=_overrides(mini_census, "memory")), run_dir=run)
    return run


def _run_dir(prepared: Path, tmp_path: Path, name: str) -> Path:
    run = tmp_path / name
    shutil.copytree(prepared / "prepare", run / "prepare")
    return run


def _history(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "train/logs/history.csv", index_col="epoch")


def _model(run: Path, adata: ad.AnnData):
    import scvi

    return scvi.model.SCVI.load(str(run / "train/scvi.model"), adata=adata.copy())


def _kill_after_epoch_2(run: Path, overrides: list[str], tmp_path: Path) -> None:
    """Train in a child process; SIGKILL it one step into epoch 3."""
    script, marker = tmp_path / "child.py", tmp_path / "stalled"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(run), str(marker), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the child never reached epoch 3"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL


_TRAIN = (
    "import sys; from pathlib import Path; from census_scvi.config import load_config; "
    "from census_scvi.train import run_train; "
    "run_train(load_config(None, overrides=sys.argv[2:]), run_dir=Path(sys.argv[1]))"
)


def _train_in_child(run: Path, overrides: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN, str(run), *overrides],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "workers", "loader"),
    [
        ("memory", 0, "census-scvi"),
        ("stream", 0, "census-scvi"),
        ("memory", 0, "scvi-tools"),
        ("memory", 1, "scvi-tools"),  # 1: a persistent DataLoader worker
    ],
    ids=["memory", "stream", "memory-scvi-tools", "memory-scvi-tools-worker"],
)
def test_resume_after_sigkill_equals_uninterrupted_run(
    mode, workers, loader, prepared, mini_census, tmp_path
):
    overrides = _overrides(
        mini_census, mode, f"train.num_workers={workers}", f"train.memory_loader={loader}"
    )
    full = _run_dir(prepared, tmp_path, "full")
    # trainings run in fresh child processes: forking a DataLoader worker from this test
    # process (grown by the whole suite) fails with ENOMEM under the kernel's overcommit check
    _train_in_child(full, overrides)

    killed = _run_dir(prepared, tmp_path, "killed")
    _kill_after_epoch_2(killed, overrides, tmp_path)
    ckpt = torch.load(killed / "train/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1  # the epoch-2 checkpoint (0-based epoch 1), nothing later
    assert not (killed / "train/manifest.json").exists()

    _train_in_child(killed, overrides)  # an interrupted run of the same config resumes
    figures = json.loads((killed / "train/manifest.json").read_text())["figures"]
    assert figures["resumed_from_epoch"] == 2 and figures["epochs"] == 4

    adata = ad.read_h5ad(prepared / "prepare/anndata_model.h5ad")
    ref, got = _model(full, adata), _model(killed, adata)
    theirs, mine = ref.module.state_dict(), got.module.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
    np.testing.assert_allclose(
        got.get_latent_representation(), ref.get_latent_representation(), rtol=1e-5, atol=1e-6
    )
    h_ref, h_got = _history(full), _history(killed)
    assert list(h_got.index) == [0, 1, 2, 3]
    for key in LOSSES:  # epochs 1-2 trained by the killed process, 3-4 by the resumed one
        np.testing.assert_allclose(h_got[key], h_ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


class _Payload:
    """Unpickling this touches ``path``: what a tampered checkpoint could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


class _CrashAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("simulated crash")


@pytest.mark.slow
def test_tampered_checkpoint_is_refused_and_never_runs(prepared, mini_census, tmp_path):
    cfg = load_config(None, overrides=_overrides(mini_census, "memory", "train.max_epochs=2"))
    run = _run_dir(prepared, tmp_path, "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(cfg, run_dir=run, callbacks=[_CrashAfterFirstEpoch()])
    last = run / "train/checkpoints/last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    marker = tmp_path / "payload-ran"
    ckpt["callbacks"]["extra"] = _Payload(marker)
    torch.save(ckpt, last)

    with pytest.raises(CensusScviError) as err:
        run_train(cfg, run_dir=run)
    text = str(err.value)
    assert "\n" not in text and str(last) in text and "refusing to load" in text
    assert "pathlib" in text and "--force" in text  # names what it holds, and the way out
    assert not marker.exists()
    assert not (run / "train/manifest.json").exists()


# ------------------------------------------------------------------------------------------
# the random states and the loaders, without training
# ------------------------------------------------------------------------------------------
def _draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_random_states_round_trip_through_a_weights_only_file():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    state = capture_random_states()
    first = _draws()
    buf = io.BytesIO()
    torch.save({"callbacks": {"RandomStateCheckpoint": {"ranks": [state]}}}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["callbacks"]["RandomStateCheckpoint"]
    _draws()
    cb = RandomStateCheckpoint()
    cb.load_state_dict(loaded)
    assert _draws() == first
    restore_random_states(state)
    assert _draws() == first


def test_random_states_of_another_world_size_warn(caplog):
    state = {"ranks": [capture_random_states(), capture_random_states()]}
    with caplog.at_level(logging.WARNING):
        RandomStateCheckpoint().load_state_dict(state)
    assert "2 training processes, this run has 1" in caplog.text


def test_loader_workers_capped_at_the_cores(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="census_scvi"):
        assert loader_workers(4, cores=2) == 2
    assert "train.num_workers=4 capped at 2: 2 CPU core(s) available" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="census_scvi"):
        assert loader_workers(2, cores=2) == 2
        assert loader_workers(0, cores=2) == 0
    assert not caplog.text  # nothing to say when nothing is capped
    assert loader_workers(4, processes=2, cores=2) == 1  # DDP processes share the cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert loader_workers(8) == 3


def test_memory_loader_kwargs_persistent_workers_with_their_own_seed():
    assert memory_loader_kwargs(0, distributed=False) == {"num_workers": 0}
    kw = memory_loader_kwargs(3, distributed=True)
    assert kw["num_workers"] == 3 and kw["persistent_workers"] is True
    assert isinstance(kw["generator"], torch.Generator) and kw["drop_dataset_tail"] is True


def test_stream_loaders_have_persistent_workers():
    from census_scvi.train._datamodule import SomaStreamDataModule

    dm = SomaStreamDataModule(
        "unused", obs_joinids=np.arange(100), batch_codes=np.zeros(100), var_joinids=[0, 1],
        n_batch=1, batch_size=16, io_batch_size=256, num_workers=2,
    )  # fmt: skip
    dm._x_locator = object()  # as setup() would leave it (no census opened)
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    assert isinstance(loader.generator, torch.Generator)  # its base seed is not the global one


@pytest.fixture
def record_train_kwargs(monkeypatch):
    """``SCVI.train`` records its keyword arguments and the distribution check, then stops."""
    import scvi

    seen: dict = {}

    def record(self, **kwargs):
        seen.update(kwargs, validate_args=torch.distributions.Distribution._validate_args)
        raise RuntimeError("recorded")

    monkeypatch.setattr(scvi.model.SCVI, "train", record)
    return seen


def test_run_train_caps_workers_and_checks_distributions_off_while_training(
    prepared, mini_census, tmp_path, record_train_kwargs, monkeypatch, caplog
):
    from census_scvi.train import _devices
    from census_scvi.train._datamodule import MemoryDataModule

    monkeypatch.setattr(_devices, "_available_cores", lambda: 1)
    scvi_loader = "train.memory_loader=scvi-tools"
    cfg = load_config(
        None, overrides=_overrides(mini_census, "memory", "train.num_workers=4", scvi_loader)
    )
    before = torch.distributions.Distribution._validate_args
    with caplog.at_level(logging.INFO, logger="census_scvi"), pytest.raises(RuntimeError):
        run_train(cfg, run_dir=_run_dir(prepared, tmp_path, "run"))
    splitter = record_train_kwargs["datasplitter_kwargs"]
    assert splitter["num_workers"] == 1 and splitter["persistent_workers"] is True
    assert "datamodule" not in record_train_kwargs
    assert "train.num_workers=4 capped at 1" in caplog.text
    assert record_train_kwargs["validate_args"] is False  # off while training ...
    assert torch.distributions.Distribution._validate_args is before  # ... restored after
    # the census-scvi memory loader (the default): a data module, no worker processes
    record_train_kwargs.clear()
    caplog.clear()
    cfg = load_config(None, overrides=_overrides(mini_census, "memory", "train.num_workers=4"))
    with caplog.at_level(logging.INFO, logger="census_scvi"), pytest.raises(RuntimeError):
        run_train(cfg, run_dir=_run_dir(prepared, tmp_path, "run2"))
    dm = record_train_kwargs["datamodule"]
    assert isinstance(dm, MemoryDataModule) and "datasplitter_kwargs" not in record_train_kwargs
    assert dm.train_dataloader().num_workers == 0
    assert "train.num_workers=1 not used" in caplog.text


def test_distribution_checks_off_restores_on_error():
    nan = torch.tensor(float("nan"))
    with pytest.raises(RuntimeError, match="inside"), distribution_checks_off():
        torch.distributions.Normal(nan, 1.0)  # no check, no error
        raise RuntimeError("inside")
    if torch.distributions.Distribution._validate_args:  # python without -O
        with pytest.raises(ValueError, match="found invalid values"):
            torch.distributions.Normal(nan, 1.0)
