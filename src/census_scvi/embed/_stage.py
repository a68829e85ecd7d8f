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
  metadata, as the Census contributed-embedding format defines;
- ``final_scvi_optimized/``: the query model saved with a minified AnnData (obs + latent, no X);
- ``progress.json`` (finished chunks) and ``manifest.json`` (written last).

Examples
--------
>>> from census_scvi.config import load_config
>>> from census_scvi.embed._stage import run_embed
>>> result = run_embed(load_config(None), run_dir="census-scvi-runs/demo")  # doctest: +SKIP
>>> print(result.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.constants import (
    EMBED_DIR,
    EMBEDDING_SOMA,
    LATENT_FILE,
    LATENT_IDX_FILE,
    LATENT_VAR_FILE,
    MANIFEST_FILE,
    MEASUREMENT,
    MINIFIED_MODEL_DIR,
    PROGRESS_FILE,
    SOMA_JOINID,
    TRAIN_DIR,
    X_RAW,
)
from census_scvi.embed._io import (
    census_version_of,
    embedding_info,
    iter_blocks,
    map_genes,
    round_bfloat16,
    select_cells,
    write_embedding_soma,
)
from census_scvi.embed._store import EmbedStore, chunk_bounds, shard_chunks
from census_scvi.errors import CensusScviError
from census_scvi.progress import track
from census_scvi.rundir import (
    Manifest,
    StageTimer,
    atomic_path,
    file_hash,
    peak_rss_bytes,
    read_manifest,
    stage_dir,
    write_manifest,
    write_run_config,
)
from census_scvi.scvi_model import (
    batch_indices,
    encode_csr,
    load_encoder,
    model_registry,
    save_minified_model,
)

if TYPE_CHECKING:
    from census_scvi.config import Config

__all__ = ["EmbedResult", "encode_csr", "load_encoder", "round_bfloat16", "run_embed"]

logger = logging.getLogger(__name__)

#: Seconds to sleep after each finished chunk (a test hook: lets a test kill a run mid-way).
CHUNK_SLEEP_ENV = "CENSUS_SCVI_EMBED_CHUNK_SLEEP"

_GIB = 1024**3


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
def _model_dir(config: Config, run_dir: Path) -> Path:
    return run_dir / TRAIN_DIR / config.model.filename


def _model_hash(model_dir: Path) -> str:
    model_pt = model_dir / "model.pt"
    if not model_pt.is_file():
        msg = f"no trained model at {model_dir}"
        raise CensusScviError(msg, hint="run 'census-scvi train' first (or 'census-scvi run')")
    return file_hash(model_pt)


def _census_id(config: Config) -> str:
    uri = config.census_uri()
    return uri if uri is not None else f"census_version:{config.census.version}"


def _config_hash(config: Config) -> str:
    """Hash of the settings that decide embed's outputs (not batch or block sizes, device)."""
    embed = config.embed.model_dump(mode="json")
    for neutral in ("batch_size", "io_block_size", "accelerator"):
        embed.pop(neutral, None)
    data = {
        "census": {
            "organism": config.census.organism,
            "obs_query": config.census.obs_query,
            "uri": config.census.uri,
            "version": config.census.version,
        },
        "anndata": {
            "batch_key": config.anndata.batch_key,
            "batch_key_separator": config.anndata.batch_key_separator,
        },
        "embed": embed,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


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
        with ``merge=True``. Under a launcher that sets ``RANK``/``WORLD_SIZE`` (torchrun, as
        for DDP training) and with neither ``shard`` nor ``merge`` given, each rank embeds shard
        ``RANK+1/WORLD_SIZE`` and rank 0 waits for the others, then writes the outputs
        (``torchrun --nproc-per-node N -m census_scvi.cli embed ...``).
    merge
        Check that every chunk is done, then write ``embedding.soma``,
        ``final_scvi_optimized/`` and the manifest.

    Returns
    -------
    An :class:`EmbedResult` (``.summary()`` for the terminal).
    """
    launched = _launched_shard() if shard is None and not merge else None
    if launched is not None:  # torchrun-style launch: this rank embeds its shard
        shard = launched
        logger.info("embed: rank %d of %d (from RANK/WORLD_SIZE)", shard[0] - 1, shard[1])
    _check_args(shard, merge, force)
    run_dir = Path(run_dir)
    model_dir = _model_dir(config, run_dir)
    manifest = Manifest(
        stage="embed",
        config_hash=_config_hash(config),
        inputs={"model": _model_hash(model_dir), "census": _census_id(config)},
    )
    embed_dir = stage_dir(run_dir, EMBED_DIR)
    previous = read_manifest(embed_dir)
    if not force and manifest.matches(previous):
        logger.info("embed: %s matches config and model; skipping", embed_dir / MANIFEST_FILE)
        figures = (previous or {}).get("figures", {})
        return EmbedResult(
            run_dir=run_dir,
            skipped=True,
            complete=True,
            n_cells=int(figures.get("n_cells", 0)),
            n_latent=int(figures.get("n_latent", 0)),
            n_chunks=int(figures.get("n_chunks", 0)),
            figures=figures,
        )

    from census_scvi.config import dump_config
    from census_scvi.soma._open import experiment_name, get_experiment, open_census

    write_run_config(run_dir, dump_config(config))
    timer = StageTimer()
    store = EmbedStore(embed_dir)
    result = EmbedResult(run_dir=run_dir, shard=shard, merged=merge)
    with open_census(config) as census:
        experiment = get_experiment(census, config.census.organism)
        if merge:
            progress = store.read_progress()
            if progress is None:
                msg = f"nothing to merge: {embed_dir / PROGRESS_FILE} does not exist"
                raise CensusScviError(msg, hint="run 'census-scvi embed --shard K/N' first")
            plan = progress["plan"]
            if plan.get("fingerprint") != _fingerprint(manifest):
                msg = f"{embed_dir} was embedded with another config or model"
                raise CensusScviError(msg, hint="rerun the shards with this config and model")
        else:
            plan = _embed_chunks(
                config, experiment, model_dir, store, manifest, shard, force, result
            )
        result.n_cells, result.n_latent = plan["n_cells"], plan["n_latent"]
        result.n_chunks = plan["n_chunks"]
        done = store.done_chunks()
        result.chunks_done = len(done)
        result.peak_rss_bytes = peak_rss_bytes()
        if shard is not None:
            if launched is None or launched[0] != 1:
                return result
            # rank 0 of a launch waits for the other ranks' chunks, then writes the outputs
            done = _wait_for_chunks(store, plan["n_chunks"])
            result.chunks_done, result.complete = len(done), True
        missing = sorted(set(range(plan["n_chunks"])) - done)
        if missing:
            msg = (
                f"{len(missing)} of {plan['n_chunks']} chunks are not embedded yet "
                f"(first: chunk {missing[0]})"
            )
            raise CensusScviError(msg, hint="run the missing shards (--shard K/N), then --merge")
        info = embedding_info(
            embedding_id=config.embed.embedding_id,
            title=config.embed.title,
            description=config.embed.description,
            contact=(
                config.embed.submitter_name,
                config.embed.submitter_email,
                config.embed.submitter_affiliation,
            ),
            doi=config.embed.doi,
            additional_information=config.embed.additional_information,
            model_link=config.embed.model_link,
            census_version=census_version_of(
                census, config.census.version if config.census_uri() is None else None
            ),
            experiment_name=experiment_name(config.census.organism),
            n_embeddings=plan["n_cells"],
            n_features=plan["n_latent"],
        )
        _finalize(config, experiment, model_dir, store, info)
    result.complete = True
    result.peak_rss_bytes = peak_rss_bytes()
    progress = store.read_progress() or {}
    runs = progress.get("runs", [])
    encode_s = sum(r["seconds"] for r in runs)
    cells = sum(r["cells"] for r in runs)
    manifest.started = timer.started
    manifest.census = {"uri": config.census_uri(), "version": config.census.version}
    manifest.figures = {
        "n_cells": plan["n_cells"],
        "n_latent": plan["n_latent"],
        "n_chunks": plan["n_chunks"],
        "chunk_size": plan["chunk_size"],
        "n_genes": plan["n_genes"],
        "n_genes_missing": plan["n_genes_missing"],
        "processes": len(runs),
        "embed_seconds": round(encode_s, 3),
        # a merge's own time plus every shard's embedding time; else this process's stage time
        "wall_seconds": round(encode_s + timer.seconds if merge else timer.seconds, 3),
        "cells_per_s": round(cells / encode_s, 1) if encode_s > 0 else None,
        "peak_rss_bytes": max([result.peak_rss_bytes, *[r["peak_rss_bytes"] for r in runs]]),
        "embedding_info": info,
    }
    manifest.outputs = {
        name: str(embed_dir / name)
        for name in (
            LATENT_FILE,
            LATENT_VAR_FILE,
            LATENT_IDX_FILE,
            EMBEDDING_SOMA,
            MINIFIED_MODEL_DIR,
        )
        if (embed_dir / name).exists()
    }
    write_manifest(embed_dir, manifest)
    result.seconds = result.seconds or timer.seconds
    result.figures = manifest.figures
    logger.info("embed: %d cells written to %s", plan["n_cells"], embed_dir)
    return result


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


def _fingerprint(manifest: Manifest) -> str:
    return f"{manifest.config_hash}:{manifest.inputs['model']}:{manifest.inputs['census']}"


def _embed_chunks(
    config: Config,
    experiment: Any,
    model_dir: Path,
    store: EmbedStore,
    manifest: Manifest,
    shard: tuple[int, int] | None,
    force: bool,
    result: EmbedResult,
) -> dict[str, Any]:
    """Plan (or reuse) the outputs, then embed this process's unfinished chunks."""
    from census_scvi.batches import batch_labels

    encoder = load_encoder(model_dir, accelerator=config.embed.accelerator)
    keys = list(config.anndata.batch_key) if encoder.encodes_batch else []
    obs = select_cells(experiment, config.census.obs_query, keys)
    joinids = obs[SOMA_JOINID].to_numpy(dtype=np.int64)
    labels = (
        batch_labels(obs, keys, config.anndata.batch_key_separator)
        if encoder.encodes_batch
        else None
    )
    codes = batch_indices(encoder, labels, len(obs))
    del obs
    genes = map_genes(experiment, list(encoder.var_names))
    n_cells, chunk_size = len(joinids), config.embed.chunk_size
    n_chunks = -(-n_cells // chunk_size)
    plan: dict[str, Any] = {
        "fingerprint": _fingerprint(manifest),
        "n_cells": n_cells,
        "n_latent": encoder.n_latent,
        "n_genes": genes.n_genes,
        "n_genes_missing": int((~genes.present).sum()),
        "chunk_size": chunk_size,
        "n_chunks": n_chunks,
    }
    progress = store.ensure_plan(plan, joinids, reset=force)
    done = set(progress["done"])
    todo = [c for c in shard_chunks(n_chunks, shard) if c not in done]
    if done:
        logger.info("embed: resuming, %d of %d chunks already done", len(done), n_chunks)
    x_array = experiment.ms[MEASUREMENT].X[X_RAW]
    latent, latent_var, libsize = store.open_outputs("r+")
    sleep = float(os.environ.get(CHUNK_SLEEP_ENV) or 0)
    block_rows = config.embed.io_block_size

    t0 = time.perf_counter()
    cells = 0
    for chunk in track(todo, description="embedding chunks"):
        start, stop = chunk_bounds(chunk, chunk_size, n_cells)
        row = start
        for x in iter_blocks(x_array, joinids[start:stop], genes, block_rows=block_rows):
            end = row + x.shape[0]
            mean, var = encode_csr(
                encoder, x, batch_index=codes[row:end], batch_size=config.embed.batch_size
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
    seconds = time.perf_counter() - t0
    del latent, latent_var, libsize
    result.chunks_run, result.cells_run, result.seconds = len(todo), cells, seconds
    result.cells_per_s = cells / seconds if seconds > 0 and cells else 0.0
    store.add_run(
        {
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "chunks": len(todo),
            "cells": cells,
            "seconds": round(seconds, 3),
            "peak_rss_bytes": peak_rss_bytes(),
        }
    )
    return plan


def _finalize(
    config: Config, experiment: Any, model_dir: Path, store: EmbedStore, info: dict[str, Any]
) -> None:
    """Write the SOMA embedding and the minified model from the finished outputs."""
    latent, latent_var, libsize = store.open_outputs("r")
    joinids = store.joinids()
    if config.embed.write_soma:
        n_obs = max(int(experiment.obs.count), int(joinids[-1]) + 1)
        with atomic_path(store.path(EMBEDDING_SOMA)) as tmp:
            write_embedding_soma(
                tmp,
                latent=latent,
                joinids=joinids,
                n_obs=n_obs,
                info=info,
                bfloat16=config.embed.round_bfloat16,
            )
    if config.embed.write_minified_model:
        from census_scvi.batches import batch_labels

        columns = [c for c in experiment.obs.keys() if c != SOMA_JOINID]
        obs = select_cells(experiment, config.census.obs_query, columns)
        if not np.array_equal(obs[SOMA_JOINID].to_numpy(), joinids):
            msg = "the census's cells changed since embedding (obs_query selects other cells)"
            raise CensusScviError(msg, hint="rerun with --force")
        registry = model_registry(model_dir)
        batch_key = str(registry["setup_args"].get("batch_key") or "batch")
        var_names = np.asarray(
            registry["field_registries"]["X"]["state_registry"]["column_names"], dtype=object
        )
        obs[batch_key] = batch_labels(
            obs, config.anndata.batch_key, config.anndata.batch_key_separator
        )
        obs.index = obs[SOMA_JOINID].astype(str).to_numpy()
        with atomic_path(store.path(MINIFIED_MODEL_DIR)) as tmp:
            save_minified_model(
                model_dir,
                tmp,
                obs=obs,
                var_names=var_names,
                batch_key=batch_key,
                qz_mean=np.asarray(latent),
                qz_var=np.asarray(latent_var),
                library_size=np.asarray(libsize),
                seed=config.train.seed,
                accelerator=config.embed.accelerator,
            )
