"""Stream training data straight from a SOMA experiment (``train.mode: stream``).

:class:`SomaStreamDataModule` is a Lightning data module that feeds scVI shuffled mini-batches
of ``X[cells, genes]`` read from a TileDB-SOMA experiment (shuffle chunks, I/O batches, read-ahead
in a thread; :mod:`census_scvi.train._soma_reader` reads), so no h5ad of the census is ever
written and memory is bounded by ``io_batch_size``, not by the number of cells.

Why not scvi-tools' ``TileDBDataModule``: it reads the obs table of the whole query up front to
derive batch labels, its default ``io_batch_size`` makes the first I/O batch the whole query, its
registry names genes by ``soma_joinid`` (so a streamed model would not load onto the prepared
AnnData), and with tiledbsoma-ml 0.1 every epoch repeats the same order. Why not tiledbsoma-ml's
``ExperimentDataset`` underneath (the first version of this module used it): its reads were the
bottleneck, 2,400 cells/s of training against 6,500 in memory (``docs/benchmarks.md``). Here the
batch label of each cell comes from ``prepare/cells.parquet`` (held in memory: two numbers per
cell), the train/validation split is the one scvi-tools' ``DataSplitter`` makes for the same rows
and seed, each epoch is shuffled with ``seed + epoch``, and each DDP rank reads its own disjoint
slice (each DataLoader worker a contiguous part of it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from census_scvi.train._soma_reader import IOBatchReader, release_free_memory

# this private module is imported only when stream mode trains, so torch/lightning at import
# time are fine; the dataset and loader classes must be module-level to pickle into workers

__all__ = ["EpochDataLoader", "SomaStreamDataModule", "StreamDataset", "split_rows"]

logger = logging.getLogger(__name__)

# keys scvi-tools modules read from a mini-batch (scvi.REGISTRY_KEYS values)
_X_KEY = "X"
_BATCH_KEY = "batch"
_LABELS_KEY = "labels"
SOMA_JOINID_KEY = "soma_joinid"


def split_rows(
    n_obs: int, *, train_size: float, batch_size: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Train and validation row positions, exactly as scvi-tools' ``DataSplitter`` makes them.

    Parameters
    ----------
    n_obs
        Number of cells (rows).
    train_size
        Fraction of cells used for training; the rest validate.
    batch_size
        Mini-batch size (scvi-tools uses it to avoid a tiny last batch).
    seed
        ``scvi.settings.seed``.

    Returns
    -------
    ``(train_rows, validation_rows)``, positions into the cell table.
    """
    from scvi.dataloaders._data_splitting import validate_data_split

    n_train, n_val = validate_data_split(n_obs, train_size, None, batch_size, False, False)
    perm = np.random.RandomState(seed=seed).permutation(np.arange(n_obs))
    return perm[n_val : n_val + n_train].astype(np.int64), perm[:n_val].astype(np.int64)


def _rank_slice(ids: npt.NDArray[np.int64], rank: int, world_size: int) -> npt.NDArray[np.int64]:
    """This rank's contiguous slice; every rank gets the same count (at most world-1 dropped)."""
    if world_size <= 1:
        return ids
    per_rank = len(ids) // world_size
    return ids[rank * per_rank : (rank + 1) * per_rank]


class StreamDataset(IterableDataset):  # type: ignore[type-arg]
    """scVI tensor dicts over one rank's cells, shuffled with ``seed + epoch``.

    Each epoch splits the cells (sorted by ``soma_joinid``) into runs of ``shuffle_chunk_size``,
    shuffles the runs, and reads ``io_batch_size`` cells (a group of runs) per SOMA read while the
    previous I/O batch is cut into shuffled mini-batches; a mini-batch that straddles two I/O
    batches takes cells from both, so every mini-batch but a worker's last has ``batch_size``
    cells.
    """

    def __init__(
        self,
        *,
        x_locator: Any,
        obs_joinids: npt.NDArray[np.int64],
        var_joinids: npt.NDArray[np.int64],
        sorted_joinids: npt.NDArray[np.int64],
        sorted_codes: npt.NDArray[np.int32],
        batch_size: int,
        io_batch_size: int,
        shuffle_chunk_size: int,
        shuffle: bool,
        seed: int,
        drop_singletons: bool,
        n_workers: int,
    ) -> None:
        super().__init__()
        self.x_locator = x_locator
        self.obs_joinids = np.sort(np.asarray(obs_joinids, dtype=np.int64))
        self.var_joinids = np.asarray(var_joinids, dtype=np.int64)
        self.sorted_joinids = sorted_joinids
        self.sorted_codes = sorted_codes
        self.batch_size = batch_size
        self.io_batch_size = io_batch_size
        self.shuffle_chunk_size = shuffle_chunk_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_singletons = drop_singletons
        self.n_workers = max(1, n_workers)
        self.epoch = 0

    def _worker_joinids(self) -> npt.NDArray[np.int64]:
        info = get_worker_info()
        if info is None:
            return self.obs_joinids
        return np.array_split(self.obs_joinids, info.num_workers)[info.id]

    def __len__(self) -> int:
        # the cells are split contiguously among DataLoader workers (np.array_split)
        total = 0
        for part in np.array_split(np.arange(len(self.obs_joinids)), self.n_workers):
            full, rem = divmod(len(part), self.batch_size)
            if self.drop_singletons and rem == 1:
                rem = 0
            total += full + (1 if rem else 0)
        return total

    def io_batches(
        self, ids: npt.NDArray[np.int64], rng: np.random.Generator
    ) -> list[npt.NDArray[np.int64]]:
        """The cells of each I/O batch (sorted within a batch, for the read)."""
        chunk = self.shuffle_chunk_size
        n_chunks = -(-len(ids) // chunk)
        order = rng.permutation(n_chunks) if self.shuffle else np.arange(n_chunks)
        per_io = max(1, self.io_batch_size // chunk)
        return [
            np.sort(
                np.concatenate([ids[c * chunk : (c + 1) * chunk] for c in order[i : i + per_io]])
            )
            for i in range(0, n_chunks, per_io)
        ]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        # a persistent DataLoader worker keeps its copy of this dataset between epochs and
        # counts epochs itself; without workers the loader sets ``epoch`` before each pass
        self.epoch += 1
        ids = self._worker_joinids()
        if len(ids) == 0:
            return
        # A pass opens its own reader and closes it before yielding its last mini-batch:
        # Lightning stops asking after len(loader) batches and leaves the generator suspended
        # until the next epoch, so anything held past the last yield (reader, I/O batches)
        # stayed alive through the next pass; peak RSS grew with the cells per pass.
        reader = IOBatchReader(self.x_locator, self.var_joinids)
        last: dict[str, torch.Tensor] | None = None
        try:
            for batch in self._pass(reader, ids, np.random.default_rng(self.seed + epoch)):
                if last is not None:
                    yield last
                last = batch
        finally:
            reader.close()
            release_free_memory()
        if last is not None:
            yield last

    def _pass(
        self, reader: IOBatchReader, ids: npt.NDArray[np.int64], rng: np.random.Generator
    ) -> Iterator[dict[str, torch.Tensor]]:
        pending_x: list[Any] = []
        pending_ids: list[npt.NDArray[np.int64]] = []
        n_pending = 0
        for io_ids, x in reader.prefetched(self.io_batches(ids, rng)):
            order = rng.permutation(len(io_ids)) if self.shuffle else np.arange(len(io_ids))
            start = 0
            if n_pending:  # finish the mini-batch left over from the previous I/O batch
                take = order[: self.batch_size - n_pending]
                pending_x.append(x[take])
                pending_ids.append(io_ids[take])
                n_pending += len(take)
                start = len(take)
                if n_pending < self.batch_size:
                    continue
                yield self._batch(sp.vstack(pending_x, format="csr"), np.concatenate(pending_ids))
                pending_x, pending_ids, n_pending = [], [], 0
            for s in range(start, len(order), self.batch_size):
                sel = order[s : s + self.batch_size]
                if len(sel) < self.batch_size:
                    pending_x, pending_ids, n_pending = [x[sel]], [io_ids[sel]], len(sel)
                    break
                yield self._batch(x[sel], io_ids[sel])
        if n_pending and not (self.drop_singletons and n_pending < 2):
            # BatchNorm cannot train on one cell; scvi-tools avoids such batches too
            yield self._batch(sp.vstack(pending_x, format="csr"), np.concatenate(pending_ids))

    def _batch(self, x: Any, ids: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        codes = self.sorted_codes[np.searchsorted(self.sorted_joinids, ids)]
        return {
            _X_KEY: torch.from_numpy(x.toarray()),
            _BATCH_KEY: torch.from_numpy(codes.astype(np.int64))[:, None],
            _LABELS_KEY: torch.zeros((len(ids), 1), dtype=torch.int64),
            SOMA_JOINID_KEY: torch.from_numpy(ids),
        }


class EpochDataLoader(DataLoader):  # type: ignore[type-arg]
    """Sets the dataset's epoch (for its shuffle seed) before each pass.

    Lightning calls ``set_epoch`` only on samplers, and an IterableDataset has none.
    """

    def __init__(self, dataset: Any, epoch_fn: Any, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, shuffle=False, **kwargs)
        self._epoch_fn = epoch_fn

    def __iter__(self) -> Any:
        self.dataset.epoch = int(self._epoch_fn())  # type: ignore[attr-defined]
        return super().__iter__()


class SomaStreamDataModule(LightningDataModule):
    """Lightning data module streaming ``X[cells, genes]`` from a SOMA experiment for scVI.

    Parameters
    ----------
    experiment_uri
        URI of the SOMA ``Experiment`` (e.g. ``<census>/census_data/homo_sapiens``).
    obs_joinids
        ``soma_joinid`` of the training cells, in training row order (``prepare/cells.parquet``).
    batch_codes
        Integer batch category of each cell (same order), as the model's registry maps them.
    var_joinids
        ``soma_joinid`` of the model genes, ascending (the model's gene order).
    n_batch
        Number of batch categories.
    train_size
        Fraction of cells for training; the split equals scvi-tools' ``DataSplitter`` for the
        same rows and ``seed``.
    batch_size
        Cells per mini-batch.
    seed
        Split and shuffle seed (each epoch shuffles with ``seed + epoch``).
    io_batch_size
        Cells read from SOMA per I/O batch (bounds memory); a multiple of ``shuffle_chunk_size``.
    shuffle_chunk_size
        Contiguous cells shuffled as a unit (larger reads faster, shuffles less).
    num_workers
        DataLoader worker processes (each reads its own part).
    measurement_name, layer_name
        Where X lives (``ms[measurement_name].X[layer_name]``).
    tiledb_config
        TileDB settings for the reading context.

    Examples
    --------
    >>> dm = SomaStreamDataModule(uri, obs_joinids=ids, batch_codes=codes,
    ...                           var_joinids=genes, n_batch=12, batch_size=1024)
    >>> model.train(datamodule=dm, max_epochs=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        experiment_uri: str,
        *,
        obs_joinids: npt.ArrayLike,
        batch_codes: npt.ArrayLike,
        var_joinids: npt.ArrayLike,
        n_batch: int,
        train_size: float = 0.9,
        batch_size: int = 128,
        seed: int = 0,
        io_batch_size: int = 16_384,
        shuffle_chunk_size: int = 256,
        num_workers: int = 0,
        measurement_name: str = "RNA",
        layer_name: str = "raw",
        tiledb_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        obs = np.asarray(obs_joinids, dtype=np.int64)
        codes = np.asarray(batch_codes, dtype=np.int32)
        if obs.shape != codes.shape:
            msg = f"obs_joinids ({obs.shape}) and batch_codes ({codes.shape}) differ in length"
            raise ValueError(msg)
        if io_batch_size % shuffle_chunk_size:
            msg = f"{io_batch_size=} is not a multiple of {shuffle_chunk_size=}"
            raise ValueError(msg)
        self.experiment_uri = experiment_uri
        self.obs_joinids = obs
        self.var_joinids = np.asarray(var_joinids, dtype=np.int64)
        order = np.argsort(obs, kind="stable")
        self._sorted_joinids = obs[order]
        self._sorted_codes = codes[order]
        self.n_batch = int(n_batch)
        self.train_size = float(train_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.io_batch_size = int(io_batch_size)
        self.shuffle_chunk_size = int(shuffle_chunk_size)
        self.num_workers = int(num_workers)
        self.measurement_name = measurement_name
        self.layer_name = layer_name
        self.tiledb_config = dict(tiledb_config or {})
        train_rows, val_rows = split_rows(
            len(obs), train_size=self.train_size, batch_size=self.batch_size, seed=self.seed
        )
        # sorted joinids read with better locality; the shuffle happens per epoch
        self.train_joinids = np.sort(obs[train_rows])
        self.val_joinids = np.sort(obs[val_rows])
        self.rank = 0
        self.world_size = 1
        self._x_locator: Any = None

    # scvi-tools reads these
    @property
    def n_obs(self) -> int:
        return len(self.obs_joinids)

    @property
    def n_vars(self) -> int:
        return len(self.var_joinids)

    @property
    def n_train(self) -> int:
        return len(self.train_joinids)

    @property
    def n_val(self) -> int:
        return len(self.val_joinids)

    def setup(self, stage: str | None = None) -> None:
        import tiledbsoma as soma
        from tiledbsoma_ml.x_locator import XLocator

        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.rank, self.world_size = int(trainer.global_rank), int(trainer.world_size)
        ctx = soma.SOMATileDBContext(tiledb_config=self.tiledb_config)
        with soma.Experiment.open(self.experiment_uri, context=ctx) as exp:
            self._x_locator = XLocator.create(
                exp, measurement_name=self.measurement_name, layer_name=self.layer_name
            )
        logger.info(
            "stream data: rank %d/%d, %d training and %d validation cells x %d genes",
            self.rank,
            self.world_size,
            len(self.train_joinids),
            len(self.val_joinids),
            self.n_vars,
        )

    def _epoch(self) -> int:
        """The epoch of the next training pass: the one Lightning gives samplers (``set_epoch``).

        Not ``trainer.current_epoch``: resuming from a checkpoint taken at an epoch end,
        Lightning makes the first iterator before it moves ``current_epoch`` on, which then still
        names the epoch before (the resumed run shuffled like the previous epoch).
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_progress.current.processed)

    def _loader(self, ids: npt.NDArray[np.int64], *, train: bool) -> Any:
        if self._x_locator is None:
            self.setup()
        dataset = StreamDataset(
            x_locator=self._x_locator,
            obs_joinids=_rank_slice(ids, self.rank, self.world_size),
            var_joinids=self.var_joinids,
            sorted_joinids=self._sorted_joinids,
            sorted_codes=self._sorted_codes,
            batch_size=self.batch_size,
            io_batch_size=self.io_batch_size,
            shuffle_chunk_size=self.shuffle_chunk_size,
            shuffle=train,
            seed=self.seed,
            drop_singletons=train,
            n_workers=self.num_workers,
        )
        kwargs: dict[str, Any] = {"num_workers": self.num_workers}
        if self.num_workers > 0:
            # TileDB contexts do not survive fork (tiledbsoma-ml uses spawn for the same reason)
            kwargs["multiprocessing_context"] = "spawn"
            # spawned workers import torch and compile tiledbsoma-ml's numba kernels: once
            kwargs["persistent_workers"] = True
            # the iterator's base seed from the loader's own generator, not torch's global one:
            # a persistent loader makes its iterator once per fit, so a resumed fit would draw
            # one number more from the global generator than the uninterrupted one did
            kwargs["generator"] = torch.Generator()
        return EpochDataLoader(dataset, self._epoch, **kwargs)

    def train_dataloader(self) -> Any:
        return self._loader(self.train_joinids, train=True)

    def val_dataloader(self) -> Any:
        if len(self.val_joinids) == 0:
            return []
        return self._loader(self.val_joinids, train=False)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
