"""The embedding as the Census contributed-embedding format defines it: ``embedding.soma`` (a SOMA
SparseNDArray) with its ``CxG_embedding_info`` metadata, and ``meta.yml`` for the contribution
tooling.

The format (cellxgene-census ``tools/census_contrib``: ``embedding_metadata.md``, ``metadata.py``
``EmbeddingMetadata``, ``validate.py``): a float32 SparseNDArray with ``soma_dim_0`` = obs
soma_joinid and ``soma_dim_1`` in [0, n_features), shape[0] = the experiment's obs shape (largest
obs soma_joinid + 1), every embedded cell stored explicitly (zeros included), no duplicate
coordinates, values rounded to bfloat16 precision (round half to even; ``embed.round_bfloat16``,
on by default; ``latent.npy`` keeps full precision), the TileDB storage format of the census;
metadata fields exactly those of ``EmbeddingMetadata`` (the tool's YAML loader forbids others):
id, embedding_name, title, description, primary_contact {name, email, affiliation},
additional_contacts, DOI (not a URL), additional_information, model_link, data_type
(``obs_embedding``), census_version, experiment_name, measurement_name, n_embeddings, n_features,
submission_date (ISO date; an unquoted YAML date in ``meta.yml``, as the tool's loader wants).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import EMBEDDING_INFO_KEY, MEASUREMENT

if TYPE_CHECKING:
    import tiledbsoma as soma

__all__ = [
    "META_FIELDS",
    "META_YML",
    "census_version_of",
    "check_storage_version",
    "embedding_info",
    "obs_shape",
    "round_bfloat16",
    "write_embedding_soma",
    "write_meta_yml",
]

logger = logging.getLogger(__name__)

#: The metadata file the Census contribution tooling reads from its working directory.
META_YML = "meta.yml"
#: ``EmbeddingMetadata``'s fields, in its order (``meta.yml`` holds exactly these).
META_FIELDS = (
    "id",
    "embedding_name",
    "title",
    "description",
    "primary_contact",
    "additional_contacts",
    "DOI",
    "additional_information",
    "model_link",
    "data_type",
    "census_version",
    "experiment_name",
    "measurement_name",
    "n_embeddings",
    "n_features",
    "submission_date",
)
_RELEASE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def round_bfloat16(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Round float32 values to bfloat16 precision (7 mantissa bits), half to even, in place.

    The Census stores contributed embeddings this way (its ``census_contrib`` tool's
    ``roundHalfToEven``); done on the integer view because numpy has no bfloat16 type.
    """
    if a.dtype != np.float32:
        msg = f"expected float32, got {a.dtype}"
        raise TypeError(msg)
    maskbits = 23 - 7
    b = a.view(np.int32)
    b += ((b >> maskbits) & 1) + ((1 << (maskbits - 1)) - 1)
    b &= np.int32(~((1 << maskbits) - 1))
    return a


def _build_date(census: soma.Collection) -> str | None:
    try:
        summary = census["census_info"]["summary"].read().concat().to_pandas()
    except (KeyError, ValueError):
        return None
    row = summary.loc[summary["label"] == "census_build_date", "value"]
    return str(row.iloc[0]) if len(row) else None


def census_version_of(census: soma.Collection, configured: str | None) -> str:
    """The ``census_version`` of the metadata: the Census release, or a local census's build date.

    ``configured`` is ``census.version`` when the census was opened by version (None for a
    ``census.uri``). A release name (``2025-11-08``) is kept; an alias (``stable``, ``latest``)
    becomes the release it resolved to, which Census releases name by their build date
    (``census_info/summary``'s ``census_build_date``), read from the open census without another
    network call. A local census gives its build date; ``"unknown"`` when it has none.
    """
    if configured and _RELEASE.match(configured):
        return configured
    built = _build_date(census)
    if configured:
        if built is None:
            logger.warning("embed: cannot resolve Census version %r to a release", configured)
            return configured
        logger.info("embed: Census version %r is release %s", configured, built)
    return built or "unknown"


def embedding_info(
    *,
    embedding_id: str,
    embedding_name: str,
    title: str,
    description: str,
    contact: tuple[str, str, str],
    additional_contacts: Sequence[dict[str, str]] = (),
    doi: str,
    additional_information: str,
    model_link: str,
    census_version: str,
    experiment_name: str,
    n_embeddings: int,
    n_features: int,
    submission_date: str | None = None,
) -> dict[str, Any]:
    """The ``CxG_embedding_info`` record: :data:`META_FIELDS`, in that order."""
    name, email, affiliation = contact
    info = {
        "id": embedding_id,
        "embedding_name": embedding_name,
        "title": title,
        "description": description,
        "primary_contact": {"name": name, "email": email, "affiliation": affiliation},
        "additional_contacts": [
            {k: str(c[k]) for k in ("name", "email", "affiliation")} for c in additional_contacts
        ],
        "DOI": doi,
        "additional_information": additional_information,
        "model_link": model_link,
        "data_type": "obs_embedding",
        "census_version": census_version,
        "experiment_name": experiment_name,
        "measurement_name": MEASUREMENT,
        "n_embeddings": int(n_embeddings),
        "n_features": int(n_features),
        "submission_date": submission_date or _dt.date.today().isoformat(),
    }
    assert tuple(info) == META_FIELDS
    return info


def write_meta_yml(path: str | Path, info: dict[str, Any]) -> None:
    """``meta.yml`` as ``census_contrib`` reads it: the fields, submission_date a YAML date."""
    import yaml

    data = {k: info[k] for k in META_FIELDS}
    data["submission_date"] = _dt.date.fromisoformat(str(info["submission_date"]))
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def obs_shape(experiment: soma.Experiment) -> int:
    """The experiment's obs shape as the format means it: largest obs soma_joinid + 1."""
    try:
        (lo_hi,) = experiment.obs.non_empty_domain()
        return int(lo_hi[1]) + 1
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - an empty obs
        return int(experiment.obs.count)


def storage_version(uri: str) -> int | None:
    """The TileDB format version of the array at ``uri`` (None without tiledb-py)."""
    try:
        import tiledb
    except ImportError:
        return None
    with tiledb.open(str(uri)) as arr:
        return int(arr.schema.version)


def check_storage_version(embedding_uri: str | Path, experiment: soma.Experiment) -> None:
    """Warn when the embedding's TileDB format differs from the census's (the tooling refuses it)."""
    mine, theirs = storage_version(str(embedding_uri)), storage_version(experiment.obs.uri)
    if mine is None or theirs is None:
        logger.debug("embed: tiledb-py not installed; TileDB format versions not compared")
    elif mine != theirs:
        logger.warning(
            "embed: embedding.soma has TileDB format version %d, the census %d; the Census "
            "contribution tooling wants them equal (write it with the census's TileDB)",
            mine,
            theirs,
        )


def _platform_config(n_features: int) -> dict[str, Any]:
    # the Census contrib arrays' layout: 2048-row tiles, one tile across the features, zstd
    return {
        "tiledb": {
            "create": {
                "capacity": 2**17,
                "dims": {
                    "soma_dim_0": {
                        "tile": 2048,
                        "filters": [
                            {"_type": "PositiveDeltaFilter", "window": 2048},
                            {"_type": "ZstdFilter", "level": 9},
                        ],
                    },
                    "soma_dim_1": {
                        "tile": max(1, n_features),
                        "filters": ["DeltaFilter", {"_type": "ZstdFilter", "level": 9}],
                    },
                },
                "attrs": {
                    "soma_data": {
                        "filters": ["ByteShuffleFilter", {"_type": "ZstdFilter", "level": 9}]
                    }
                },
                "cell_order": "row-major",
                "tile_order": "row-major",
            }
        }
    }


def write_embedding_soma(
    uri: str | Path,
    *,
    latent: npt.NDArray[np.float32],
    joinids: npt.NDArray[np.int64],
    n_obs: int,
    info: dict[str, Any],
    bfloat16: bool = True,
    values_per_write: int = 2**21,
) -> None:
    """Write ``latent`` (rows = ``joinids``) as a SOMA SparseNDArray of shape (n_obs, n_features).

    Streamed from the (memory-mapped) arrays, ``values_per_write // n_features`` rows at a time:
    memory is bounded by that block (20 bytes per value of coordinates and data, ~40 MiB, plus
    TileDB's copy of it), not by the number of cells; each write is one fragment (~50 per
    10M cells at 10 features). Every embedded cell is stored explicitly, zeros included, as
    the format requires.
    """
    import pyarrow as pa
    import tiledbsoma as soma

    n, k = latent.shape
    rows_per_write = max(1, values_per_write // max(1, k))
    with soma.SparseNDArray.create(
        str(uri), type=pa.float32(), shape=(n_obs, k), platform_config=_platform_config(k)
    ) as arr:
        arr.metadata[EMBEDDING_INFO_KEY] = json.dumps(info)
        cols = np.arange(k, dtype=np.int64)
        for start in range(0, n, rows_per_write):
            stop = min(start + rows_per_write, n)
            values = np.array(latent[start:stop], dtype=np.float32).reshape(-1)
            if bfloat16:
                round_bfloat16(values)
            ids = np.asarray(joinids[start:stop], dtype=np.int64)
            arr.write(
                pa.Table.from_pydict(
                    {
                        "soma_dim_0": np.repeat(ids, k),
                        "soma_dim_1": np.tile(cols, stop - start),
                        "soma_data": values,
                    }
                )
            )
