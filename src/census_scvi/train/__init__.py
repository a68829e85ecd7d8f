"""Train stage: scVI as configured, in memory or streamed from SOMA, resumable, DDP."""

from census_scvi.train._stage import (
    CELLS_FILE,
    DeviceSettings,
    TrainResult,
    resolve_devices,
    run_train,
    scvi_model_kwargs,
    scvi_plan_kwargs,
)

__all__ = [
    "CELLS_FILE",
    "DeviceSettings",
    "TrainResult",
    "resolve_devices",
    "run_train",
    "scvi_model_kwargs",
    "scvi_plan_kwargs",
]
