"""Resuming: whose run ``checkpoints/`` holds, and reading ``last.ckpt`` as data only.

``checkpoints/run.json`` says which config and inputs the checkpoint belongs to; a run of the
same ones continues from it (:func:`plan_resume`). A checkpoint is read once, with
:func:`census_scvi.scvi_model.verify_torch_file` (``torch.load(weights_only=True)`` and an
allow-list), so a tampered ``last.ckpt`` is refused with one line instead of running its pickle;
Lightning is then handed those verified contents (:class:`VerifiedCheckpointIO`), not the path
again. What makes the resumed run equal to an uninterrupted one is in the checkpoint itself: the
weights, optimizer, loops and callbacks (Lightning's) and the random generators'
states (:mod:`._rng`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from census_scvi.errors import CensusScviError

__all__ = [
    "CHECKPOINT_GLOBALS",
    "RUN_INFO_FILE",
    "ResumePlan",
    "VerifiedCheckpointIO",
    "plan_resume",
    "read_checkpoint",
]

logger = logging.getLogger(__name__)

RUN_INFO_FILE = "run.json"  # in checkpoints/: config hash and inputs of the run they belong to

#: What a train-stage ``last.ckpt`` holds besides tensors and plain containers (torch's own
#: ``weights_only`` defaults): nothing. Measured with ``get_unsafe_globals_in_checkpoint`` on
#: checkpoints of memory and stream mode, with early stopping and ``reduce_lr_on_plateau``.
CHECKPOINT_GLOBALS: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ResumePlan:
    """Whether this run continues from ``checkpoint``, and whose run the checkpoints are."""

    run_info: dict[str, Any]
    checkpoint: Path
    resuming: bool
    requested: bool
    force: bool


def plan_resume(
    run_info: dict[str, Any],
    checkpoint: Path,
    *,
    force: bool,
    resume: bool,
    zero: bool,
) -> ResumePlan:
    """Resume from ``checkpoint`` or not; refuse (before touching anything) another run's.

    Parameters
    ----------
    run_info
        This run's config hash and input hashes (what ``run.json`` records).
    checkpoint
        ``train/checkpoints/last.ckpt``.
    force
        Start over whatever the checkpoints hold.
    resume
        ``--resume``: continue, and fail when the checkpoint is another run's.
    zero
        Global rank 0 (only it refuses; a worker rank follows).
    """
    info_path = checkpoint.parent / RUN_INFO_FILE
    same_run = info_path.is_file() and json.loads(info_path.read_text()) == run_info
    # an interrupted run of the same config and inputs continues by itself (so 'census-scvi
    # run' resumes after a crash); --resume insists on it, --force starts over
    resuming = not force and checkpoint.is_file() and (same_run or resume)
    if zero and resuming and not same_run:
        msg = (
            f"the checkpoint in {checkpoint.parent} belongs to a run with another config or inputs"
        )
        raise CensusScviError(msg, hint="pass --force to start over with this config")
    return ResumePlan(run_info, checkpoint, resuming, requested=resume, force=force)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint's contents, verified to be data only (a refusal names the file)."""
    from census_scvi.scvi_model import load_torch_bytes, verify_torch_file

    try:
        data = verify_torch_file(path, allowed=CHECKPOINT_GLOBALS)
        ckpt = load_torch_bytes(data, allowed=CHECKPOINT_GLOBALS, source=path, map_location="cpu")
    except CensusScviError as e:
        hint = "; ".join(h for h in (e.hint, "or pass --force to train from the start") if h)
        raise CensusScviError(e.message, hint=hint) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        msg = f"{path} is not a Lightning checkpoint (no state_dict)"
        raise CensusScviError(msg, hint="pass --force to start over")
    return ckpt


def checkpoint_epochs(ckpt: dict[str, Any]) -> int | None:
    """Epochs a checkpoint's run had completed (None when it does not say)."""
    epoch = ckpt.get("epoch")
    return int(epoch) + 1 if epoch is not None else None


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer, handed the checkpoint this run verified.

    ``load_checkpoint`` of that path returns the verified contents (once; then they are
    dropped); any other path is read with :func:`read_checkpoint`. Saving is Lightning's.
    """

    def __init__(self, path: Path, checkpoint: dict[str, Any]) -> None:
        super().__init__()
        self.path = Path(path)
        self._checkpoint: dict[str, Any] | None = checkpoint

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if self._checkpoint is not None and Path(path) == self.path:
            ckpt, self._checkpoint = self._checkpoint, None
            return ckpt
        return read_checkpoint(Path(path))
