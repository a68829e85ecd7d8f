"""What embed writes once every chunk is done: the embedding metadata (``meta.yml``),
``embedding.soma`` and the minified model, all from the memory-mapped arrays.

Memory: ``embedding.soma`` is streamed from the memory maps in blocks of rows
(:func:`~census_scvi.embed._embedding.write_embedding_soma`), a fixed cost. The minified model
is written a block of cells at a time (:mod:`census_scvi.embed._minified`): scvi-tools builds
it for one cell per batch label, and every per-cell dataset of its h5ad is then rewritten for
all cells from the census obs (read in blocks) and the memory maps. Per cell, embed holds the
joinid and the batch code (12 bytes). Before, scvi-tools' AnnData of every cell was held whole
(~480 bytes per cell of traced memory, ~48 GB at the 99.6M-cell Census).
``embed.minified_obs_columns`` keeps fewer obs columns; ``embed.write_minified_model: false``
skips the minified model (the latent arrays and ``embedding.soma`` hold the same latent).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.constants import EMBEDDING_SOMA, MINIFIED_MODEL_DIR, SOMA_JOINID
from census_scvi.embed._embedding import (
    META_YML,
    census_version_of,
    check_storage_version,
    embedding_info,
    obs_shape,
    write_embedding_soma,
    write_meta_yml,
)
from census_scvi.embed._io import select_cells
from census_scvi.embed._minified import MinifiedSource, write_minified_model
from census_scvi.errors import CensusScviError
from census_scvi.rundir import atomic_path

if TYPE_CHECKING:
    from census_scvi.config import Config
    from census_scvi.embed._store import EmbedStore

__all__ = ["embedding_metadata", "write_outputs"]

logger = logging.getLogger(__name__)

#: Placeholder contact values: the metadata is not ready for a contribution with them.
_UNSET = ("", "unknown")


def embedding_metadata(config: Config, census: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """The ``CxG_embedding_info`` / ``meta.yml`` record of this run."""
    from census_scvi.soma import experiment_name

    e = config.embed
    unset = [k for k in ("submitter_name", "submitter_email") if getattr(e, k) in _UNSET]
    if not e.embedding_id or unset:
        logger.info(
            "embed: before contributing this embedding to the Census, set %s",
            ", ".join(["embed.embedding_id (CZI assigns it)"] * (not e.embedding_id) + unset),
        )
    return embedding_info(
        embedding_id=e.embedding_id,
        embedding_name=e.embedding_name,
        title=e.title,
        description=e.description,
        contact=(e.submitter_name, e.submitter_email, e.submitter_affiliation),
        additional_contacts=e.additional_contacts,
        doi=e.doi,
        additional_information=e.additional_information,
        model_link=e.model_link,
        census_version=census_version_of(
            census, config.census.version if config.census_uri() is None else None
        ),
        experiment_name=experiment_name(config.census.organism),
        n_embeddings=plan["n_cells"],
        n_features=plan["n_latent"],
    )


def write_outputs(
    config: Config, experiment: Any, mdir: Path, store: EmbedStore, info: dict[str, Any]
) -> None:
    """``meta.yml``, ``embedding.soma`` and the minified model from the finished arrays."""
    with atomic_path(store.path(META_YML)) as tmp:
        write_meta_yml(tmp, info)
    if config.embed.write_soma:
        latent, _, _ = store.open_outputs("r")
        joinids = store.joinids()
        n_obs = max(obs_shape(experiment), int(joinids[-1]) + 1)
        with atomic_path(store.path(EMBEDDING_SOMA)) as tmp:
            write_embedding_soma(
                tmp,
                latent=latent,
                joinids=joinids,
                n_obs=n_obs,
                info=info,
                bfloat16=config.embed.round_bfloat16,
            )
        check_storage_version(store.path(EMBEDDING_SOMA), experiment)
    if config.embed.write_minified_model:
        _write_minified_model(config, experiment, mdir, store)


def _write_minified_model(config: Config, experiment: Any, mdir: Path, store: EmbedStore) -> None:
    """``final_scvi_optimized/``: the query model with every cell's obs and latent, no counts,
    written a block of cells at a time (:mod:`census_scvi.embed._minified`)."""
    from census_scvi.batches import batch_codes

    latent, latent_var, libsize = store.open_outputs("r")
    keys = list(config.anndata.batch_key)
    obs = select_cells(experiment, config.census.obs_query, keys)
    joinids = obs[SOMA_JOINID].to_numpy(dtype=np.int64)
    if not np.array_equal(joinids, store.joinids()):
        msg = "the census's cells changed since embedding (obs_query selects other cells)"
        raise CensusScviError(msg, hint="rerun with --force")
    # the batch of each cell as codes into its few labels, never one string per cell
    codes, names = batch_codes(obs, keys, config.anndata.batch_key_separator)
    del obs
    source = MinifiedSource(
        experiment,
        _obs_columns(config, experiment),
        joinids=joinids,
        codes=codes,
        names=names,
        qz_mean=latent,
        qz_var=latent_var,
        library_size=libsize,
    )
    with atomic_path(store.path(MINIFIED_MODEL_DIR)) as tmp:
        write_minified_model(
            mdir, tmp, source, seed=config.train.seed, accelerator=config.embed.accelerator
        )


def _obs_columns(config: Config, experiment: Any) -> list[str]:
    """The obs columns the minified model keeps: ``embed.minified_obs_columns`` (and the batch
    parts), else every column of the census obs."""
    names = [c for c in experiment.obs.keys() if c != SOMA_JOINID]
    wanted = config.embed.minified_obs_columns
    if wanted is None:
        return names
    keep = list(dict.fromkeys([*wanted, *config.anndata.batch_key]))
    missing = [c for c in keep if c not in names]
    if missing:
        msg = f"embed.minified_obs_columns {missing} are not census obs columns; valid: {', '.join(names)}"
        raise CensusScviError(msg, hint="pick from those (null keeps every column)")
    return keep
