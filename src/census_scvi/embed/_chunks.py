"""The embed stage's work: plan the rows (cells, genes, chunks), then encode this process's
unfinished chunks into the preallocated outputs, recording each chunk once its rows are on disk.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import MEASUREMENT, SOMA_JOINID, X_RAW
from census_scvi.embed._io import GeneMap, iter_blocks, map_genes, select_cells
from census_scvi.embed._store import EmbedStore, chunk_bounds, shard_chunks
from census_scvi.progress import track
from census_scvi.rundir import peak_rss_bytes
from census_scvi.scvi_model import EncoderModel, batch_indices, encode_csr, load_encoder

if TYPE_CHECKING:
    from pathlib import Path

    from census_scvi.config import Config

__all__ = ["CHUNK_SLEEP_ENV", "ChunkRun", "embed_chunks"]

logger = logging.getLogger(__name__)

#: Seconds to sleep after each finished chunk (a test hook: lets a test kill a run mid-way).
CHUNK_SLEEP_ENV = "CENSUS_SCVI_EMBED_CHUNK_SLEEP"


@dataclass
class ChunkRun:
    """What one process embedded."""

    plan: dict[str, Any]
    chunks: int = 0
    cells: int = 0
    seconds: float = 0.0


@dataclass
class _Rows:
    """The cells to embed, in row order, with what encoding them needs."""

    joinids: npt.NDArray[np.int64]
    codes: npt.NDArray[np.int64]
    genes: GeneMap


def embed_chunks(
    config: Config,
    experiment: Any,
    model_dir: Path,
    store: EmbedStore,
    *,
    fingerprint: str,
    shard: tuple[int, int] | None,
    force: bool,
) -> ChunkRun:
    """Plan (or reuse) the outputs, then embed this process's unfinished chunks.

    ``fingerprint`` identifies what decides the rows (config, model, census): outputs planned
    under another one are started over; with the same one, finished chunks are kept.
    """
    encoder = load_encoder(model_dir, accelerator=config.embed.accelerator)
    rows = _rows(config, experiment, encoder)
    plan = _plan(config, encoder, rows, fingerprint)
    progress = store.ensure_plan(plan, rows.joinids, reset=force)
    done = set(progress["done"])
    todo = [c for c in shard_chunks(plan["n_chunks"], shard) if c not in done]
    if done:
        logger.info("embed: resuming, %d of %d chunks already done", len(done), plan["n_chunks"])
    t0 = time.perf_counter()
    cells = _encode_chunks(config, experiment, encoder, rows, store, todo)
    run = ChunkRun(plan=plan, chunks=len(todo), cells=cells, seconds=time.perf_counter() - t0)
    store.add_run(
        {
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "chunks": run.chunks,
            "cells": run.cells,
            "seconds": round(run.seconds, 3),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    )
    return run


def _rows(config: Config, experiment: Any, encoder: EncoderModel) -> _Rows:
    """The selected cells (ascending soma_joinid), their batch codes, the model's genes.

    Per cell only the joinid and the model's batch code are kept (16 bytes); the batch parts
    are read as categoricals and combined over their distinct values, never a string per cell.
    """
    from census_scvi.batches import batch_codes

    keys = list(config.anndata.batch_key) if encoder.encodes_batch else []
    obs = select_cells(experiment, config.census.obs_query, keys)
    joinids = obs[SOMA_JOINID].to_numpy(dtype=np.int64)
    if encoder.encodes_batch:
        codes, names = batch_codes(obs, keys, config.anndata.batch_key_separator)
        model_codes = batch_indices(encoder, names, len(names))[codes]
    else:
        model_codes = batch_indices(encoder, None, len(obs))
    del obs  # per-cell metadata is the one thing held for every cell: drop it before reading
    return _Rows(joinids, model_codes, map_genes(experiment, list(encoder.var_names)))


def _plan(config: Config, encoder: EncoderModel, rows: _Rows, fingerprint: str) -> dict[str, Any]:
    n_cells, chunk_size = len(rows.joinids), config.embed.chunk_size
    return {
        "fingerprint": fingerprint,
        "n_cells": n_cells,
        "n_latent": encoder.n_latent,
        "n_genes": rows.genes.n_genes,
        "n_genes_missing": int((~rows.genes.present).sum()),
        "chunk_size": chunk_size,
        "n_chunks": -(-n_cells // chunk_size),
    }


def _encode_chunks(
    config: Config,
    experiment: Any,
    encoder: EncoderModel,
    rows: _Rows,
    store: EmbedStore,
    todo: list[int],
) -> int:
    """Encode ``todo`` chunk by chunk into the outputs; returns the cells embedded."""
    x_array = experiment.ms[MEASUREMENT].X[X_RAW]
    latent, latent_var, libsize = store.open_outputs("r+")
    sleep = float(os.environ.get(CHUNK_SLEEP_ENV) or 0)
    n_cells, chunk_size = len(rows.joinids), config.embed.chunk_size
    cells = 0
    for chunk in track(todo, description="embedding chunks"):
        start, stop = chunk_bounds(chunk, chunk_size, n_cells)
        row = start
        blocks = iter_blocks(
            x_array, rows.joinids[start:stop], rows.genes, block_rows=config.embed.io_block_size
        )
        for x in blocks:
            end = row + x.shape[0]
            mean, var = encode_csr(
                encoder, x, batch_index=rows.codes[row:end], batch_size=config.embed.batch_size
            )
            latent[row:end] = mean
            latent_var[row:end] = var
            libsize[row:end] = np.asarray(x.sum(axis=1), dtype=np.float32).reshape(-1)
            row = end
        if row != stop:  # pragma: no cover - a tiledbsoma contract
            msg = f"chunk {chunk}: read {row - start} rows, expected {stop - start}"
            raise RuntimeError(msg)
        for arr in (latent, latent_var, libsize):
            arr.flush()
        store.mark_done(chunk)  # only after the rows are on disk
        cells += stop - start
        if sleep:
            time.sleep(sleep)
    del latent, latent_var, libsize
    return cells
