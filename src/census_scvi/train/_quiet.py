"""Lightning's routine info lines, dropped while the train stage trains.

Every ``model.train`` call makes Lightning log, at INFO, the hardware it found ("GPU available:
...", "TPU available: ...", "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: ..."), the seed, an
advertisement for its cloud logger and "`Trainer.fit` stopped: `max_epochs=N` reached." (the
train stage logs its own device line and summary), and torch warns once that Lightning uses a
deprecated ``LeafSpec`` check. Only those messages are dropped; every other log record and
warning (early stopping, data loader advice, errors) passes, and ``-v`` / ``--debug`` (the
``census_scvi`` logger at DEBUG) shows them all. "`weights_only` was not set", logged after every
epoch's checkpoint, is fixed where it is caused (:class:`~._callbacks.EpochCheckpoint` passes
``weights_only=False``) and is dropped here too.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

__all__ = ["quiet_lightning"]

# the loggers those lines come from (Lightning routes rank_zero_info through rank_zero's logger)
_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "lightning.pytorch.accelerators.cuda",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
)
_ROUTINE = re.compile(
    r"^(\[rank: \d+\] )?("
    r"GPU available: |TPU available: |HPU available: |LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES|"
    r"Seed set to |💡 Tip: |`Trainer\.fit` stopped: `max_epochs=|`weights_only` was not set"
    r")"
)
_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _RoutineInfo(logging.Filter):
    """Drops the routine INFO lines above; passes anything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not _ROUTINE.match(record.getMessage())


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Within the block, Lightning's routine info lines are not logged (see the module)."""
    if logging.getLogger("census_scvi").isEnabledFor(logging.DEBUG):
        yield
        return
    routine = _RoutineInfo()
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for lg in loggers:
        lg.addFilter(routine)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_LEAFSPEC)
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(routine)
