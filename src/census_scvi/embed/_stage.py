"""Embed stage: every selected cell's latent representation, in chunks, resumable, shardable.

Reads the cells ``census.obs_query`` selects (every cell of the organism when unset, including
non-primary and low-quality cells, as the original create-latent step did) and the model's genes,
chunk by chunk from SOMA; runs the trained encoder on each chunk; writes the rows straight into
preallocated outputs. Memory is bounded by ``embed.chunk_size``, not by the number of cells
(per-cell obs metadata aside).

Outputs in ``RUN_DIR/embed/``:

- ``latent.npy`` / ``latent-var.npy``: float32 (cells x n_latent) posterior mean and variance,
  equal to ``SCVI.load_query_data(...).get_latent_representation(return_dist=True)``;
- ``latent-idx.npy``: int64 soma_joinid of each row (ascending);
- ``embedding.soma``: SOMA SparseNDArray (soma_joinid x latent dim) with ``CxG_embedding_info``
  metadata, as the Census contributed-embedding format defines (values rounded to bfloat16);
- ``meta.yml``: that metadata as the Census contribution tooling reads it;
- ``final_scvi_optimized/``: the query model saved with a minified AnnData (obs + latent, no X);
- ``progress.json`` (finished chunks) and ``manifest.json`` (written last; its ``census``
  records the census read and its fingerprint, which ``map`` checks).

A full disk fails at allocation of the arrays, or at a later write, with one line (``need N GiB
free in DIR; M GiB free``) and nothing half-written left visible.

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.embed._stage import run_embed
>>> result = run_embed(load_config(None), run_dir="census-scvi-runs/demo")  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from census_scvi.constants import (
    EMBED_DIR,
    EMBEDDING_SOMA,
    LATENT_FILE,
    LATENT_IDX_FILE,
    LATENT_VAR_FILE,
    MINIFIED_MODEL_DIR,
    STAGE_LOCK,
)
from census_scvi.embed._census import census_record
from census_scvi.embed._chunks import CHUNK_SLEEP_ENV, ChunkRun, embed_chunks
from census_scvi.embed._embedding import META_YML, round_bfloat16
from census_scvi.embed._outputs import embedding_metadata, write_outputs
from census_scvi.embed._store import EmbedStore
from census_scvi.errors import CensusScviError, disk_full, is_disk_full
from census_scvi.rundir import (
    StageRun,
    file_hash,
    hold_lock,
    model_dir,
    peak_rss_bytes,
    run_stage,
)
from census_scvi.scvi_model import encode_csr, load_encoder, model_file
from census_scvi.soma import census_fingerprint

if TYPE_CHECKING:
    from census_scvi.config import Config

__all__ = [
    "CHUNK_SLEEP_ENV",
    "EmbedResult",
    "encode_csr",
    "load_encoder",
    "round_bfloat16",
    "run_embed",
]

logger = logging.getLogger(__name__)

_GIB = 1024**3
#: TileDB read buffer per column while reading counts (blocks are io_block_size cells anyway).
READ_BUFFER_BYTES = 64 * 1024**2
#: A rough size of one cell's obs row in the minified model (for the disk-full message only).
_OBS_BYTES_PER_CELL = 64

#: The config sections whose hash identifies an embed run (run_stage's manifest).
_SECTIONS = ("census", "anndata", "embed")
#: embed settings that change how fast the rows are computed, not their values: a resume with
#: other values keeps the finished chunks (they are left out of the plan's fingerprint).
_EXECUTION_ONLY = ("batch_size", "io_block_size", "accelerator")
#: What the manifest lists, when present.
_OUTPUTS = (
    LATENT_FILE,
    LATENT_VAR_FILE,
    LATENT_IDX_FILE,
    META_YML,
    EMBEDDING_SOMA,
    MINIFIED_MODEL_DIR,
)


@dataclass
class EmbedResult:
    """What one ``run_embed`` call did."""

    run_dir: Path
    skipped: bool = False
    complete: bool = False
    merged: bool = False
    shard: tuple[int, int] | None = None
    n_cells: int = 0
    n_latent: int = 0
    n_chunks: int = 0
    chunks_run: int = 0
    chunks_done: int = 0
    cells_run: int = 0
    seconds: float = 0.0
    cells_per_s: float = 0.0
    peak_rss_bytes: int = 0
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dir(self) -> Path:
        return self.run_dir / EMBED_DIR

    def summary(self) -> str:
        """A few lines for the terminal."""
        where = self.embed_dir
        if self.skipped:
            return f"embed: up to date, skipped ({where})"
        head = f"embed shard {self.shard[0]}/{self.shard[1]}" if self.shard else "embed"
        rss = f"peak RSS {self.peak_rss_bytes / _GIB:.2f} GiB"
        if self.merged:
            lines = [f"embed --merge: all {self.n_chunks} chunks present, outputs written, {rss}"]
        else:
            lines = [
                f"{head}: embedded {self.cells_run:,} cells in {self.chunks_run} chunk(s), "
                f"{self.seconds:.1f} s ({self.cells_per_s:,.0f} cells/s), {rss}"
            ]
        if self.complete:
            lines.append(
                f"  {self.n_cells:,} cells x {self.n_latent} latent dims "
                f"({self.n_chunks} chunks): {where}/"
                f"{{{LATENT_FILE}, {LATENT_VAR_FILE}, {LATENT_IDX_FILE}}}"
            )
            extra = [p for p in (EMBEDDING_SOMA, MINIFIED_MODEL_DIR) if (where / p).exists()]
            if extra:
                lines.append(f"  also: {', '.join(str(where / p) for p in extra)}")
        else:
            lines.append(
                f"  {self.chunks_done} of {self.n_chunks} chunks done; run "
                "'census-scvi embed --merge' once every shard has finished"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
def run_embed(
    config: Config,
    *,
    run_dir: str | os.PathLike[str],
    force: bool = False,
    shard: tuple[int, int] | None = None,
    merge: bool = False,
) -> EmbedResult:
    """Embed every selected cell with the trained model (``RUN_DIR/train/<model.filename>``).

    Parameters
    ----------
    config
        The resolved config (``census``, ``anndata``, ``embed`` sections are used).
    run_dir
        The run directory; outputs go to ``RUN_DIR/embed``.
    force
        Start over even when the outputs are complete or partly done.
    shard
        ``(K, N)``: embed only the K-th of N contiguous runs of chunks (1-based), in this
        process. Shards may run at the same time, on hosts sharing the run directory; finish
        with ``merge=True``. A shard is a partial run: it writes no manifest. Under a launcher
        that sets ``RANK``/``WORLD_SIZE`` (torchrun, as for DDP training) and with neither
        ``shard`` nor ``merge`` given, each rank embeds shard ``RANK+1/WORLD_SIZE`` and rank 0
        waits for the others, then writes the outputs (``torchrun --nproc-per-node N -m
        census_scvi.cli embed ...``).
    merge
        Check that every chunk is done, then write ``embedding.soma``,
        ``final_scvi_optimized/`` and the manifest.

    Returns
    -------
    An :class:`EmbedResult` (``.summary()`` for the terminal).

    Raises
    ------
    CensusScviError
        On ``shard`` together with ``merge``, a ``shard`` K outside 1..N, ``force`` with
        ``shard`` or ``merge``, no trained model, or (merge) chunks not embedded yet.
    """
    launched = _launched_shard() if shard is None and not merge else None
    if launched is not None:  # torchrun-style launch: this rank embeds its shard
        shard = launched
        logger.info("embed: rank %d of %d (from RANK/WORLD_SIZE)", shard[0] - 1, shard[1])
    _check_args(shard, merge, force)
    run_dir = Path(run_dir)
    mdir = model_dir(run_dir, config.model.filename)
    inputs = {"model": file_hash(model_file(mdir)), "census": census_fingerprint(config)}
    with run_stage(
        run_dir,
        EMBED_DIR,
        config=config,
        sections=_SECTIONS,
        inputs=inputs,
        force=force,
        # shards share the folder, maybe from other hosts: no single-writer lock (nor its
        # removal of temporaries it cannot tell from another host's live ones)
        lock=STAGE_LOCK if shard is None else None,
    ) as stage:
        if stage.skipped:
            return _skipped(run_dir, stage.figures)
        try:
            with _shard_lock(stage.dir, shard):
                return _embed(
                    config, stage, mdir, shard=shard, merge=merge, launched=launched, force=force
                )
        except CensusScviError:
            raise
        except Exception as e:
            if is_disk_full(e):  # a write after the arrays (progress, SOMA, minified model)
                raise _out_of_space(config, EmbedStore(stage.dir)) from None
            raise


def _shard_lock(embed_dir: Path, shard: tuple[int, int] | None) -> AbstractContextManager[None]:
    """One process per shard: a second ``--shard K/N`` of the same K fails at once, naming the
    first (other shards go on in parallel, each under its own lock)."""
    if shard is None:
        return contextlib.nullcontext()
    k, n = shard
    return hold_lock(embed_dir / f".shard-{k}-of-{n}.lock", what=f"embed shard {k}/{n}")


def _out_of_space(config: Config, store: EmbedStore) -> CensusScviError:
    """The disk-full line, with about how much the outputs written after the arrays need."""
    plan = (store.read_progress() or {}).get("plan") or {}
    n, k = int(plan.get("n_cells", 0)), int(plan.get("n_latent", 0))
    need = 0
    if config.embed.write_soma:
        need += n * k * 4  # float32 values; the coordinates compress to little
    if config.embed.write_minified_model:
        need += n * (2 * k * 4 + _OBS_BYTES_PER_CELL)
    return disk_full(
        store.dir, need or None, about=True, rerun="rerun (the finished chunks are kept)"
    )


def _check_args(shard: tuple[int, int] | None, merge: bool, force: bool) -> None:
    if shard is not None and merge:
        msg = "--shard and --merge cannot be used together"
        raise CensusScviError(msg, hint="run the shards first, then --merge once")
    if shard is not None:
        k, n = shard
        if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
            msg = f"shard {k}/{n}: K must be between 1 and N"
            raise CensusScviError(msg, hint="e.g. --shard 1/4")
    if force and (shard is not None or merge):
        msg = "--force with --shard or --merge would discard other shards' work"
        raise CensusScviError(
            msg,
            hint="run 'census-scvi embed --force' once without --shard, or delete RUN_DIR/embed",
        )


def _skipped(run_dir: Path, figures: dict[str, Any]) -> EmbedResult:
    return EmbedResult(
        run_dir=run_dir,
        skipped=True,
        complete=True,
        n_cells=int(figures.get("n_cells", 0)),
        n_latent=int(figures.get("n_latent", 0)),
        n_chunks=int(figures.get("n_chunks", 0)),
        figures=figures,
    )


def _fingerprint(config: Config, inputs: dict[str, str]) -> str:
    """What decides the rows: the config (less the execution-only settings), model, census."""
    from census_scvi.config import config_hash

    fields = type(config.embed).model_fields
    neutral = {k: fields[k].default for k in _EXECUTION_ONLY}
    rows = config.model_copy(update={"embed": config.embed.model_copy(update=neutral)})
    return f"{config_hash(rows, sections=_SECTIONS)}:{inputs['model']}:{inputs['census']}"


def _embed(
    config: Config,
    stage: StageRun,
    mdir: Path,
    *,
    shard: tuple[int, int] | None,
    merge: bool,
    launched: tuple[int, int] | None,
    force: bool,
) -> EmbedResult:
    """Embed (or merge) the chunks; when they are all done, write the outputs and record them."""
    from census_scvi.soma import get_experiment, open_census, tiledb_read_config

    store = EmbedStore(stage.dir)
    result = EmbedResult(run_dir=stage.run_dir, shard=shard, merged=merge)
    fingerprint = _fingerprint(config, stage.manifest.inputs)
    # capped read buffers: TileDB's defaults (1 GiB buffers, a 10 GiB budget) keep what they
    # decompress, which grows with the census (as evaluate measured, evaluate/_stage.py)
    with open_census(config, tiledb_config=tiledb_read_config(READ_BUFFER_BYTES)) as census:
        experiment = get_experiment(census, config.census.organism)
        if merge:
            plan = _plan_to_merge(store, fingerprint)
        else:
            run = embed_chunks(
                config, experiment, mdir, store, fingerprint=fingerprint, shard=shard, force=force
            )
            plan = run.plan
            _count(result, run)
        result.n_cells, result.n_latent = plan["n_cells"], plan["n_latent"]
        result.n_chunks, result.chunks_done = plan["n_chunks"], len(store.done_chunks())
        result.peak_rss_bytes = peak_rss_bytes()
        if shard is not None and (launched is None or launched[0] != 1):
            return result  # a partial run: no outputs, no manifest
        if shard is not None:  # rank 0 of a launch waits for the other ranks' chunks
            result.chunks_done = len(_wait_for_chunks(store, plan["n_chunks"]))
        _require_every_chunk(store, plan)
        info = embedding_metadata(config, census, plan)
        write_outputs(config, experiment, mdir, store, info)
        record = census_record(config, experiment, store.joinids(), release=info["census_version"])
    result.complete = True
    result.peak_rss_bytes = peak_rss_bytes()
    figures = _figures(store, plan, info, stage, merge=merge, rss=result.peak_rss_bytes)
    outputs = {n: store.path(n) for n in _OUTPUTS if store.path(n).exists()}
    stage.record(figures=figures, outputs=outputs, census=record)
    result.seconds = result.seconds or stage.timer.seconds
    result.figures = figures
    logger.info("embed: %d cells written to %s", plan["n_cells"], stage.dir)
    return result


def _count(result: EmbedResult, run: ChunkRun) -> None:
    result.chunks_run, result.cells_run, result.seconds = run.chunks, run.cells, run.seconds
    result.cells_per_s = run.cells / run.seconds if run.seconds > 0 and run.cells else 0.0


def _plan_to_merge(store: EmbedStore, fingerprint: str) -> dict[str, Any]:
    """The shards' plan, which must be this config's, model's and census's."""
    progress = store.read_progress()
    if progress is None:
        msg = f"nothing to merge: {store.progress_path} does not exist"
        raise CensusScviError(msg, hint="run 'census-scvi embed --shard K/N' first")
    plan: dict[str, Any] = progress["plan"]
    if plan.get("fingerprint") != fingerprint:
        msg = f"{store.dir} was embedded with another config or model"
        raise CensusScviError(msg, hint="rerun the shards with this config and model")
    return plan


def _require_every_chunk(store: EmbedStore, plan: dict[str, Any]) -> None:
    missing = sorted(set(range(plan["n_chunks"])) - store.done_chunks())
    if missing:
        msg = (
            f"{len(missing)} of {plan['n_chunks']} chunks are not embedded yet "
            f"(first: chunk {missing[0]})"
        )
        raise CensusScviError(msg, hint="run the missing shards (--shard K/N), then --merge")


def _launched_shard() -> tuple[int, int] | None:
    """``(RANK + 1, WORLD_SIZE)`` when started by torchrun.

    Only torchrun's own marker (``TORCHELASTIC_RUN_ID``) counts: Lightning's DDP launcher leaves
    ``WORLD_SIZE`` set in the training process without any ``RANK``, which must not turn a later
    embed into a shard waiting for ranks that do not exist.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    if world <= 1 or not 0 <= rank < world:
        return None
    return rank + 1, world


def _wait_for_chunks(store: EmbedStore, n_chunks: int, poll_s: float = 2.0) -> set[int]:
    """Block until every chunk is recorded as done (other ranks are still embedding)."""
    done = store.done_chunks()
    while len(done) < n_chunks:
        logger.info("embed: waiting for other ranks, %d of %d chunks done", len(done), n_chunks)
        time.sleep(poll_s)
        done = store.done_chunks()
    return done


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------
def _figures(
    store: EmbedStore,
    plan: dict[str, Any],
    info: dict[str, Any],
    stage: StageRun,
    *,
    merge: bool,
    rss: int,
) -> dict[str, Any]:
    """The manifest's figures: the plan, and every process's timing from ``progress.json``."""
    runs = (store.read_progress() or {}).get("runs", [])
    encode_s = sum(r["seconds"] for r in runs)
    cells = sum(r["cells"] for r in runs)
    stage_s = stage.timer.seconds
    return {
        "n_cells": plan["n_cells"],
        "n_latent": plan["n_latent"],
        "n_chunks": plan["n_chunks"],
        "chunk_size": plan["chunk_size"],
        "n_genes": plan["n_genes"],
        "n_genes_missing": plan["n_genes_missing"],
        "processes": len(runs),
        "embed_seconds": round(encode_s, 3),
        # a merge's own time plus every shard's embedding time; else this process's stage time
        "wall_seconds": round(encode_s + stage_s if merge else stage_s, 3),
        "cells_per_s": round(cells / encode_s, 1) if encode_s > 0 else None,
        "peak_rss_bytes": max([rss, *[r["peak_rss_bytes"] for r in runs]]),
        "embedding_info": info,
    }
