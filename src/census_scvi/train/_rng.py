"""The random generators' states, kept in the checkpoint: a resumed run draws what an uninterrupted one would.

What draws from them while scVI trains: torch's global generator gives the memory-mode shuffle
(scvi-tools' ``AnnDataLoader`` uses a ``RandomSampler`` without a generator, which seeds each
epoch's order from the global generator when the epoch's first batch is drawn), the
``DataLoader``'s base seed (drawn when an iterator is made), dropout and the reparameterised
samples of ``z`` (on a GPU these two draw from the CUDA generators). numpy's and python's global
generators are not used by scvi-tools 1.4 that we know of; they are kept too, for callbacks and
later versions. The train/validation split is drawn from ``scvi.settings.seed`` with its own
``RandomState`` (memory mode: scvi's ``DataSplitter``; stream mode: the same rows), so it is the
same on every run of a seed, and the stream data module shuffles each epoch with ``seed + epoch``.

When: :class:`~._callbacks.EpochCheckpoint` saves at the end of a training epoch, after that
epoch's validation. In an uninterrupted run nothing draws between that point and the next
epoch's first data-loader iterator (measured: the CPU generator's state at ``on_train_epoch_end``
equals its state at the next ``on_train_epoch_start``). On resume, Lightning hands the callbacks
their states (``load_state_dict``) before its fit loop makes the first iterator, so the states
are restored right there: the next epoch starts from the generators the uninterrupted run had.

Under DDP each process has its own generators: the checkpoint holds every rank's (gathered when
it is written) and each rank restores its own.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
from lightning.pytorch import Callback

__all__ = ["RandomStateCheckpoint", "capture_random_states", "restore_random_states"]

logger = logging.getLogger(__name__)


def capture_random_states() -> dict[str, Any]:
    """This process's generator states: torch (CPU, and CUDA once initialised), numpy, python.

    Plain tensors, numbers and lists only, so the checkpoint stays loadable with
    ``torch.load(weights_only=True)``.
    """
    import torch

    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_states(state: dict[str, Any]) -> None:
    """Put this process's generators back where :func:`capture_random_states` found them."""
    import torch

    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            logger.warning(
                "the checkpoint holds the random states of %d GPUs, %d are visible: "
                "resumed training is close to, not draw-for-draw, the uninterrupted run",
                len(cuda),
                torch.cuda.device_count(),
            )
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=i)
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


class RandomStateCheckpoint(Callback):
    """Every rank's generator states in the checkpoint; this rank's restored on resume.

    ``state_dict`` is called while a checkpoint is written (on every rank: it gathers the ranks'
    states, a collective), ``load_state_dict`` when Lightning restores one, before the first
    data-loader iterator of the resumed run is made (see the module).
    """

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # called before Lightning restores a checkpoint, with the process group set up
        self.rank, self.world_size = int(trainer.global_rank), int(trainer.world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": _gathered(capture_random_states(), self.world_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        if len(ranks) != self.world_size:
            logger.warning(
                "the checkpoint holds the random states of %d training processes, this run has "
                "%d: resumed training is close to, not draw-for-draw, the uninterrupted run",
                len(ranks),
                self.world_size,
            )
        if self.rank < len(ranks):
            restore_random_states(ranks[self.rank])


def _gathered(mine: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    """Every rank's states, in rank order (just ``[mine]`` in one process)."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
