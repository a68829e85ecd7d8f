"""Which accelerator, devices and strategy Lightning is given, from the ``train`` section.

``accelerator: auto`` is a GPU when one is visible, else the CPU. Lightning DDP is used when
``train.multi_gpu`` is true, ``train.devices`` is a count above 1, or ``train.num_nodes`` is above
1. Without those, training uses one device: the first index of a ``devices`` list on a GPU (the
original pipeline's ``devices: [0, 1, 2, 3]`` with ``multi_gpu: False`` trained on one GPU), one
process on the CPU. On the CPU a DDP request runs that many processes with the gloo backend.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from census_scvi.config import TrainConfig
from census_scvi.errors import CensusScviError

__all__ = ["DDP_STRATEGY", "DeviceSettings", "loader_workers", "resolve_devices"]

logger = logging.getLogger(__name__)

# the library-size encoder is unused with observed library sizes (scvi's default), so DDP must
# look for unused parameters, as the original pipeline's strategy did
DDP_STRATEGY = "ddp_find_unused_parameters_true"


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

    @property
    def processes_per_node(self) -> int:
        """Training processes on this machine (DDP starts one per device)."""
        return max(1, self.world_size // max(1, self.num_nodes))


def loader_workers(requested: int, *, processes: int = 1, cores: int | None = None) -> int:
    """``train.num_workers``, capped at the CPU cores each training process may use.

    A DataLoader worker is a process; more of them than cores only take turns with each other and
    with training (the original config's ``num_workers: 4`` on a 2-core machine trained 2.1x
    slower than 0). The cap is the cores this process may run on (``os.sched_getaffinity``)
    shared among the training processes of this machine; one info line says when it applies.

    Parameters
    ----------
    requested
        ``train.num_workers``.
    processes
        Training processes on this machine (:attr:`DeviceSettings.processes_per_node`).
    cores
        CPU cores available (default: this process's CPU affinity).

    Returns
    -------
    The DataLoader workers to start per training process.
    """
    if requested <= 0:
        return 0
    if cores is None:
        cores = _available_cores()
    cap = max(0, cores // max(1, processes))
    if requested <= cap:
        return requested
    shared = f" for {processes} training processes" if processes > 1 else ""
    logger.info(
        "train.num_workers=%d capped at %d: %d CPU core(s) available%s",
        requested,
        cap,
        cores,
        shared,
    )
    return cap


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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
        resolved = _cpu_processes(devices, requested=requested)
    elif accelerator == "mps":
        resolved = 1
    else:
        resolved = _gpus(train, gpu_count, requested=requested)
    distributed = (
        DeviceSettings(accelerator, resolved, train.num_nodes, "auto", False).world_size > 1
    )
    strategy = train.strategy or (DDP_STRATEGY if distributed else "auto")
    return DeviceSettings(accelerator, resolved, train.num_nodes, strategy, distributed)


def _cpu_processes(devices: int | list[int] | str, *, requested: bool) -> int:
    """CPU training processes: ``devices`` counts them when DDP is requested, else one."""
    if requested:
        if isinstance(devices, list):
            return len(devices)
        return devices if isinstance(devices, int) else 1
    if devices not in ("auto", 1):
        logger.info(
            "train.devices=%s is used only with multi_gpu/num_nodes; training in one CPU process",
            devices,
        )
    return 1


def _gpus(train: TrainConfig, gpu_count: int, *, requested: bool) -> int | list[int]:
    """The GPUs: all requested ones under DDP, else the first listed (or GPU 0)."""
    devices = train.devices
    if requested:
        if isinstance(devices, list):
            bad = [d for d in devices if d >= gpu_count]
            if bad and train.num_nodes == 1:
                msg = f"train.devices={devices} names GPU {bad[0]} but only {gpu_count} are visible"
                raise CensusScviError(msg, hint=f"use indices below {gpu_count} or 'auto'")
            return list(devices)
        return devices if isinstance(devices, int) else gpu_count
    if not isinstance(devices, list):
        return [0]
    if len(devices) > 1:
        logger.info(
            "train.devices=%s with multi_gpu false: training on GPU %d only "
            "(set train.multi_gpu: true for DDP on all of them)",
            devices,
            devices[0],
        )
    return [devices[0]]
