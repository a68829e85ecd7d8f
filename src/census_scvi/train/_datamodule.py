"""Shuffled-chunk mini-batches for scVI, streamed from SOMA or cut from the in-memory CSR.

One design, two readers. :class:`StreamDataset` cuts a rank's cells into runs of
``shuffle_chunk_size``, shuffles the runs with ``seed + epoch``, groups them into I/O batches,
has a reader turn each I/O batch into CSR (the next one in a read-ahead thread while the
current one trains, :mod:`._read_ahead`), cuts it into shuffled mini-batches and writes each
dense in one numba pass (:func:`~._csr_reader.dense_rows`). The reader is what differs:

* :class:`SomaStreamDataModule` (``train.mode: stream``) reads ``X[cells, genes]`` from a
  TileDB-SOMA experiment (:class:`~._soma_reader.IOBatchReader`), so no h5ad of the census is
  ever written and memory is bounded by ``io_batch_size``, not by the number of cells;
* :class:`MemoryDataModule` (``train.mode: memory``, ``train.memory_loader: census-scvi``)
  cuts mini-batches straight from the prepared h5ad's X, held once as float32 CSR
  (:class:`~._csr_reader.CsrRowReader`: an I/O batch is the whole matrix, nothing is copied),
  the next one built in a thread while the current one trains, in place of scvi-tools'
  ``AnnDataLoader`` (~5,100 cells/s at the census-like shape, on the training thread: see
  :mod:`._csr_reader` for why).

Both split train/validation exactly as scvi-tools' ``DataSplitter`` does for the same rows and
seed (:func:`split_rows`), shuffle each epoch with ``seed + epoch`` (so a resumed run sees the
uninterrupted run's batches), and give each DDP rank its own disjoint slice.

Why not scvi-tools' ``TileDBDataModule`` for stream mode: it reads the obs table of the whole
query up front to derive batch labels, its default ``io_batch_size`` makes the first I/O batch
the whole query, its registry names genes by ``soma_joinid`` (so a streamed model would not load
onto the prepared AnnData), and with tiledbsoma-ml 0.1 every epoch repeats the same order. Why
not tiledbsoma-ml's ``ExperimentDataset`` underneath (the first version of this module used it):
its reads were the bottleneck, 2,400 cells/s of training against 6,500 in memory
(``docs/benchmarks.md``). Here the batch label of each cell comes from ``prepare/cells.parquet``
(held in memory: two numbers per cell), and each DataLoader worker reads a contiguous part of
its rank's slice.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from census_scvi.train._csr_reader import CsrRowReader, as_float32_csr, dense_rows, gather_rows
from census_scvi.train._read_ahead import built_ahead, release_free_memory
from census_scvi.train._soma_reader import IOBatchReader
from census_scvi.train._stream_cache import (
    CachedRowReader,
    CachingReader,
    StreamCache,
    fingerprint,
)

# this private module is imported only when training through these modules, so torch/lightning
# at import time are fine; the dataset and loader classes must be module-level to pickle into
# workers

__all__ = [
    "EpochDataLoader",
    "MemoryDataModule",
    "SomaStreamDataModule",
    "StreamDataset",
    "split_rows",
]

logger = logging.getLogger(__name__)

# keys scvi-tools modules read from a mini-batch (scvi.REGISTRY_KEYS values)
_X_KEY = "X"
_BATCH_KEY = "batch"
_LABELS_KEY = "labels"
# the cells of a mini-batch: soma_joinid (stream mode) or the prepared h5ad's row (memory mode)
SOMA_JOINID_KEY = "soma_joinid"
ROW_KEY = "row"


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
    ``(train_rows, validation_rows)``, positions into the cell table, in ``DataSplitter``'s
    order (its ``train_idx``, ``val_idx``).
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


class RowReader(Protocol):
    """What :class:`StreamDataset` needs of a reader: CSR per I/O batch, read ahead; close.

    ``whole_matrix``: each I/O batch's CSR is the whole matrix, whose rows the cell ids name
    (the in-memory reader: nothing to read, nothing copied); otherwise its rows are the I/O
    batch's cells in order (the SOMA reader).
    """

    whole_matrix: bool

    def prefetched(
        self, batches: Iterable[npt.NDArray[np.int64]]
    ) -> Iterator[tuple[npt.NDArray[np.int64], sp.csr_matrix]]: ...

    def close(self) -> None: ...


# (CSR, its rows) pieces of one mini-batch, and the mini-batch's cell ids
_Parts = list[tuple[sp.csr_matrix, npt.NDArray[np.int64]]]


class StreamDataset(IterableDataset):  # type: ignore[type-arg]
    """scVI tensor dicts over one rank's cells, shuffled with ``seed + epoch``.

    Each epoch splits the cells (sorted) into runs of ``shuffle_chunk_size``, shuffles the runs,
    and has the reader read ``io_batch_size`` cells (a group of runs) at a time while the
    previous I/O batch is cut into shuffled mini-batches; a mini-batch that straddles two I/O
    batches takes cells from both, so every mini-batch but a worker's last has ``batch_size``
    cells. Each mini-batch is written dense by one numba pass (:func:`~._csr_reader.dense_rows`);
    with ``build_ahead`` in a thread of its own, the next one while the current one trains.

    Parameters
    ----------
    open_reader
        Makes this pass's :class:`RowReader` (picklable: DataLoader workers call it too).
    cell_ids
        The cells, as the reader names them (``soma_joinid``, or h5ad row positions).
    sorted_ids, sorted_codes
        Every cell id, ascending, and its batch code (the model registry's integer).
    id_key
        The mini-batch key that carries the cell ids.
    build_ahead
        Build the next mini-batch in a background thread (:func:`~._read_ahead.built_ahead`).
    """

    def __init__(
        self,
        *,
        open_reader: Callable[[], RowReader],
        cell_ids: npt.NDArray[np.int64],
        sorted_ids: npt.NDArray[np.int64],
        sorted_codes: npt.NDArray[np.int32],
        batch_size: int,
        io_batch_size: int,
        shuffle_chunk_size: int,
        shuffle: bool,
        seed: int,
        drop_singletons: bool,
        n_workers: int,
        id_key: str = SOMA_JOINID_KEY,
        build_ahead: bool = False,
    ) -> None:
        super().__init__()
        self.open_reader = open_reader
        self.cell_ids = np.sort(np.asarray(cell_ids, dtype=np.int64))
        self.sorted_ids = sorted_ids
        self.sorted_codes = sorted_codes
        self.batch_size = batch_size
        self.io_batch_size = io_batch_size
        self.shuffle_chunk_size = shuffle_chunk_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_singletons = drop_singletons
        self.n_workers = max(1, n_workers)
        self.id_key = id_key
        self.build_ahead = build_ahead
        self.epoch = 0

    def _worker_ids(self) -> npt.NDArray[np.int64]:
        info = get_worker_info()
        if info is None:
            return self.cell_ids
        return np.array_split(self.cell_ids, info.num_workers)[info.id]

    def __len__(self) -> int:
        # the cells are split contiguously among DataLoader workers (np.array_split)
        total = 0
        for part in np.array_split(np.arange(len(self.cell_ids)), self.n_workers):
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
        ids = self._worker_ids()
        if len(ids) == 0:
            return
        # A pass opens its own reader and closes it before yielding its last mini-batch:
        # Lightning stops asking after len(loader) batches and leaves the generator suspended
        # until the next epoch, so anything held past the last yield (reader, I/O batches)
        # stayed alive through the next pass; peak RSS grew with the cells per pass.
        reader = self.open_reader()
        last: dict[str, torch.Tensor] | None = None
        try:
            recipes = self._pass(reader, ids, np.random.default_rng(self.seed + epoch))
            if self.build_ahead:
                batches = built_ahead(self._batch, recipes)
            else:
                batches = (self._batch(parts, cells) for parts, cells in recipes)
            for batch in batches:
                if last is not None:
                    yield last
                last = batch
        finally:
            reader.close()
            release_free_memory()
        if last is not None:
            yield last

    def _pass(
        self, reader: RowReader, ids: npt.NDArray[np.int64], rng: np.random.Generator
    ) -> Iterator[tuple[_Parts, npt.NDArray[np.int64]]]:
        """Each mini-batch's ``(parts, cell ids)``, in training order."""
        whole = reader.whole_matrix
        # the cells of an unfinished mini-batch: (CSR, its rows) parts and their ids
        pending: _Parts = []
        pending_ids: list[npt.NDArray[np.int64]] = []
        n_pending = 0
        for io_ids, x in reader.prefetched(self.io_batches(ids, rng)):
            order = rng.permutation(len(io_ids)) if self.shuffle else np.arange(len(io_ids))
            part = functools.partial(_part, x, io_ids if whole else None)
            start = 0
            if n_pending:  # finish the mini-batch left over from the previous I/O batch
                take = order[: self.batch_size - n_pending]
                pending_ids.append(io_ids[take])
                n_pending += len(take)
                start = len(take)
                if n_pending < self.batch_size:
                    pending.append(part(take, keep=True))
                    continue
                pending.append(part(take))
                yield pending, np.concatenate(pending_ids)
                pending, pending_ids, n_pending = [], [], 0
            for s in range(start, len(order), self.batch_size):
                sel = order[s : s + self.batch_size]
                if len(sel) < self.batch_size:
                    pending, pending_ids, n_pending = (
                        [part(sel, keep=True)],
                        [io_ids[sel]],
                        len(sel),
                    )
                    break
                yield [part(sel)], io_ids[sel]
        if n_pending and not (self.drop_singletons and n_pending < 2):
            # BatchNorm cannot train on one cell; scvi-tools avoids such batches too
            yield pending, np.concatenate(pending_ids)

    def _batch(self, parts: _Parts, ids: npt.NDArray[np.int64]) -> dict[str, torch.Tensor]:
        codes = self.sorted_codes[np.searchsorted(self.sorted_ids, ids)]
        return {
            _X_KEY: torch.from_numpy(dense_rows(parts, parts[0][0].shape[1])),
            _BATCH_KEY: torch.from_numpy(codes.astype(np.int64))[:, None],
            _LABELS_KEY: torch.zeros((len(ids), 1), dtype=torch.int64),
            self.id_key: torch.from_numpy(ids),
        }


def _part(
    x: sp.csr_matrix,
    row_of: npt.NDArray[np.int64] | None,
    sel: npt.NDArray[np.int64],
    *,
    keep: bool = False,
) -> tuple[sp.csr_matrix, npt.NDArray[np.int64]]:
    """The I/O batch positions ``sel`` as a ``(CSR, rows)`` part of a mini-batch.

    ``row_of``: the row of ``x`` at each I/O batch position (``x`` is then the whole matrix,
    nothing is copied); None: position = row. ``keep``: the part outlives this I/O batch, so it
    holds a copy of its rows rather than the I/O batch (which is then freed).
    """
    if row_of is not None:
        return x, row_of[sel]
    if keep:
        return gather_rows(x, sel.astype(np.int64, copy=False)), np.arange(len(sel), dtype=np.int64)
    return x, sel


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


class _ChunkedDataModule(LightningDataModule):
    """What both data modules share: the split, ranks, the epoch, the loaders (see subclasses).

    ``ids`` names each cell as the reader does, in the order of the cell table the split is
    made over (``prepare/cells.parquet``, which is also the h5ad's row order).
    """

    _kind = "chunked"
    _id_key = SOMA_JOINID_KEY
    _build_ahead = False

    def __init__(
        self,
        *,
        ids: npt.NDArray[np.int64],
        batch_codes: npt.ArrayLike,
        n_vars: int,
        n_batch: int,
        train_size: float,
        batch_size: int,
        seed: int,
        io_batch_size: int,
        shuffle_chunk_size: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        codes = np.asarray(batch_codes, dtype=np.int32).reshape(-1)
        if ids.shape != codes.shape:
            msg = f"cells ({ids.shape}) and batch_codes ({codes.shape}) differ in length"
            raise ValueError(msg)
        if io_batch_size % shuffle_chunk_size:
            msg = f"{io_batch_size=} is not a multiple of {shuffle_chunk_size=}"
            raise ValueError(msg)
        self._ids = ids
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[order]
        self._sorted_codes = codes[order]
        self._n_vars = int(n_vars)
        self.n_batch = int(n_batch)
        self.train_size = float(train_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.io_batch_size = int(io_batch_size)
        self.shuffle_chunk_size = int(shuffle_chunk_size)
        self.num_workers = int(num_workers)
        train_rows, val_rows = split_rows(
            len(ids), train_size=self.train_size, batch_size=self.batch_size, seed=self.seed
        )
        self._train_rows, self._val_rows = train_rows, val_rows
        # sorted ids read with better locality; the shuffle happens per epoch
        self.train_ids = np.sort(ids[train_rows])
        self.val_ids = np.sort(ids[val_rows])
        self.rank = 0
        self.world_size = 1

    # scvi-tools reads these
    @property
    def n_obs(self) -> int:
        return len(self._ids)

    @property
    def n_vars(self) -> int:
        return self._n_vars

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    @property
    def n_val(self) -> int:
        return len(self.val_ids)

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.rank, self.world_size = int(trainer.global_rank), int(trainer.world_size)
        logger.info(
            "%s data: rank %d/%d, %d training and %d validation cells x %d genes",
            self._kind,
            self.rank,
            self.world_size,
            self.n_train,
            self.n_val,
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

    def _open_reader(self) -> Callable[[], RowReader]:
        raise NotImplementedError

    def _pass_reader(self, ids: npt.NDArray[np.int64]) -> Callable[[], RowReader]:
        """What opens the reader of each pass over ``ids``."""
        return self._open_reader()

    def _loader(self, ids: npt.NDArray[np.int64], *, train: bool) -> Any:
        rank_ids = _rank_slice(ids, self.rank, self.world_size)
        dataset = StreamDataset(
            open_reader=self._pass_reader(rank_ids),
            cell_ids=rank_ids,
            sorted_ids=self._sorted_ids,
            sorted_codes=self._sorted_codes,
            batch_size=self.batch_size,
            io_batch_size=self.io_batch_size,
            shuffle_chunk_size=self.shuffle_chunk_size,
            shuffle=train,
            seed=self.seed,
            drop_singletons=train,
            n_workers=self.num_workers,
            id_key=self._id_key,
            build_ahead=self._build_ahead,
        )
        kwargs: dict[str, Any] = {"num_workers": self.num_workers}
        if self.num_workers > 0:
            # TileDB contexts do not survive fork (tiledbsoma-ml uses spawn for the same
            # reason), and forking a large training process failed with ENOMEM
            kwargs["multiprocessing_context"] = "spawn"
            # spawned workers import torch and compile tiledbsoma-ml's numba kernels: once
            kwargs["persistent_workers"] = True
            # the iterator's base seed from the loader's own generator, not torch's global one:
            # a persistent loader makes its iterator once per fit, so a resumed fit would draw
            # one number more from the global generator than the uninterrupted one did
            kwargs["generator"] = torch.Generator()
        return EpochDataLoader(dataset, self._epoch, **kwargs)

    def train_dataloader(self) -> Any:
        return self._loader(self.train_ids, train=True)

    def val_dataloader(self) -> Any:
        if len(self.val_ids) == 0:
            return []
        return self._loader(self.val_ids, train=False)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class SomaStreamDataModule(_ChunkedDataModule):
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

    _kind = "stream"
    _id_key = SOMA_JOINID_KEY

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
        cache_dir: str | Path | None = None,
    ) -> None:
        self.var_joinids = np.asarray(var_joinids, dtype=np.int64)
        super().__init__(
            ids=np.asarray(obs_joinids, dtype=np.int64),
            batch_codes=batch_codes,
            n_vars=len(self.var_joinids),
            n_batch=n_batch,
            train_size=train_size,
            batch_size=batch_size,
            seed=seed,
            io_batch_size=io_batch_size,
            shuffle_chunk_size=shuffle_chunk_size,
            num_workers=num_workers,
        )
        self.experiment_uri = experiment_uri
        self.measurement_name = measurement_name
        self.layer_name = layer_name
        self.tiledb_config = dict(tiledb_config or {})
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.cache: StreamCache | None = None
        self._x_locator: Any = None

    @property
    def obs_joinids(self) -> npt.NDArray[np.int64]:
        return self._ids

    @property
    def train_joinids(self) -> npt.NDArray[np.int64]:
        return self.train_ids

    @property
    def val_joinids(self) -> npt.NDArray[np.int64]:
        return self.val_ids

    def setup(self, stage: str | None = None) -> None:
        import tiledbsoma as soma
        from tiledbsoma_ml.x_locator import XLocator

        ctx = soma.SOMATileDBContext(tiledb_config=self.tiledb_config)
        with soma.Experiment.open(self.experiment_uri, context=ctx) as exp:
            self._x_locator = XLocator.create(
                exp, measurement_name=self.measurement_name, layer_name=self.layer_name
            )
        super().setup(stage)
        self._open_cache()

    def _open_cache(self) -> None:
        if self.cache_dir is None or self.cache is not None:
            return
        if self.num_workers > 0 or self.world_size > 1:
            logger.info(
                "stream cache not used with %d DataLoader workers and %d ranks (each would "
                "write the same files); training reads SOMA every epoch",
                self.num_workers,
                self.world_size,
            )
            return
        key = fingerprint(self.experiment_uri, self._sorted_ids, self.var_joinids)
        self.cache = StreamCache(self.cache_dir, self._sorted_ids, self.n_vars, key)
        self._build_ahead = True  # reads from the cache leave a core for building batches

    def _open_reader(self) -> Callable[[], RowReader]:
        if self._x_locator is None:
            self.setup()
        # a picklable recipe: each pass (and each DataLoader worker) opens its own handle
        return functools.partial(IOBatchReader, self._x_locator, self.var_joinids)

    def _pass_reader(self, ids: npt.NDArray[np.int64]) -> Callable[[], RowReader]:
        soma_reader = self._open_reader()
        cache = self.cache
        if cache is None:
            return soma_reader

        def open_for_pass() -> RowReader:
            # decided per pass: the cache once it holds every cell of the pass, else SOMA,
            # writing through to the cache
            if cache.holds(ids):
                return CachedRowReader(cache)
            if cache.enabled:
                return CachingReader(soma_reader(), cache)
            return soma_reader()

        return open_for_pass


class MemoryDataModule(_ChunkedDataModule):
    """Lightning data module cutting scVI mini-batches from an in-memory CSR matrix.

    The memory-mode loader (``train.memory_loader: census-scvi``): the same shuffled chunks,
    I/O batches and mini-batches as :class:`SomaStreamDataModule`, over the rows of ``x`` (the
    prepared h5ad's X) instead of SOMA reads; the next mini-batch is written dense in a
    background thread while the current one trains. No DataLoader worker processes: spawned
    ones would each need their own copy of ``x`` (forked ones failed with ENOMEM from a large
    process), and the kernel that writes a mini-batch is ``nogil`` numba, so one thread
    overlaps it with training.

    Parameters
    ----------
    x
        Cells x model genes, the AnnData the model is set up on's X (float32 CSR: shared, not
        copied; :func:`~._csr_reader.as_float32_csr`).
    batch_codes
        Integer batch category of each row, as the model's registry maps them.
    n_batch
        Number of batch categories.
    train_size, batch_size, seed, io_batch_size, shuffle_chunk_size
        As for :class:`SomaStreamDataModule`; the split equals scvi-tools' ``DataSplitter``'s
        (``train_idx``, ``val_idx``, as scvi-tools then records them on the model).

    Examples
    --------
    >>> dm = MemoryDataModule(adata.X, batch_codes=codes, n_batch=12, batch_size=1024)
    >>> model.train(datamodule=dm, max_epochs=10)  # doctest: +SKIP
    """

    _kind = "memory"
    _id_key = ROW_KEY
    # the reads cost nothing here (the rows are in memory): the thread builds mini-batches
    _build_ahead = True

    def __init__(
        self,
        x: Any,
        *,
        batch_codes: npt.ArrayLike,
        n_batch: int,
        train_size: float = 0.9,
        batch_size: int = 128,
        seed: int = 0,
        io_batch_size: int = 16_384,
        shuffle_chunk_size: int = 256,
    ) -> None:
        self.x = as_float32_csr(x)
        super().__init__(
            ids=np.arange(self.x.shape[0], dtype=np.int64),
            batch_codes=batch_codes,
            n_vars=self.x.shape[1],
            n_batch=n_batch,
            train_size=train_size,
            batch_size=batch_size,
            seed=seed,
            io_batch_size=io_batch_size,
            shuffle_chunk_size=shuffle_chunk_size,
            num_workers=0,
        )
        # what scvi-tools' TrainRunner copies onto the model (model.train_indices, ...)
        self.train_idx = self._train_rows
        self.val_idx = self._val_rows
        self.test_idx = np.array([], dtype=np.int64)

    def _open_reader(self) -> Callable[[], RowReader]:
        return functools.partial(CsrRowReader, self.x)
