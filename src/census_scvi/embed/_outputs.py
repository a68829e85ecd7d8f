"""What embed writes once every chunk is done: the embedding metadata (``meta.yml``),
``embedding.soma`` and the minified model, all from the memory-mapped arrays.

Memory: ``embedding.soma`` is streamed from the memory maps in blocks of rows
(:func:`~census_scvi.embed._embedding.write_embedding_soma`), a fixed cost. The minified model is
an AnnData that scvi-tools holds in memory whole, by design: for every cell its obs row, its
batch, the posterior mean and variance and the library size. We hand it the obs with categories
as codes (the Census obs: ~140 bytes per cell, most of it the ``observation_joinid`` string and
the str ``soma_joinid`` index AnnData needs), the batch as a Categorical (not a string per cell)
and the latent as memory maps; scvi-tools' ``minify_adata`` then copies obs and latent once more.
Measured (``benchmarks/bench_embed.py --profile``, 50k vs 200k cells, n_latent 10): ~480
bytes per cell of traced memory for the minified step (reading the obs ~200, scvi-tools'
AnnData, its minify copy and the h5ad write ~280), i.e. ~48 GB at the 99.6M-cell Census, the one
per-cell cost left in embed (the rest is ~16 bytes per cell: joinid and batch code). Two switches:
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
from census_scvi.errors import CensusScviError
from census_scvi.rundir import atomic_path
from census_scvi.scvi_model import save_minified_model

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
    """``final_scvi_optimized/``: the query model with every cell's obs and latent, no counts."""
    import pandas as pd

    from census_scvi.batches import batch_codes

    latent, latent_var, libsize = store.open_outputs("r")
    obs = select_cells(experiment, config.census.obs_query, _obs_columns(config, experiment))
    if not np.array_equal(obs[SOMA_JOINID].to_numpy(), store.joinids()):
        msg = "the census's cells changed since embedding (obs_query selects other cells)"
        raise CensusScviError(msg, hint="rerun with --force")
    # the batch of each cell as codes into its few labels, never one string per cell
    codes, names = batch_codes(obs, config.anndata.batch_key, config.anndata.batch_key_separator)
    labels = pd.Categorical.from_codes(codes, categories=pd.Index(names.astype(str)))
    obs.index = obs[SOMA_JOINID].astype(str).to_numpy()
    with atomic_path(store.path(MINIFIED_MODEL_DIR)) as tmp:
        save_minified_model(
            mdir,
            tmp,
            obs=obs,
            batch_labels=labels,
            qz_mean=latent,
            qz_var=latent_var,
            library_size=libsize,
            seed=config.train.seed,
            accelerator=config.embed.accelerator,
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
