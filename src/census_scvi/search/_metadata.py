"""Recording an index in ``embedding.soma``'s ``CxG_embedding_info``, as the Census does.

The Census lists an embedding's indexes as ``"indexes": [{"type": "IVFFlat", "relative_uri":
...}]`` and its ``find_nearest_obs`` opens the first one (``relative_uri`` joined to its embeddings
root). Ours is relative to the run directory, the root that holds both ``embed/embedding.soma``
and the index (``index/ivf_flat``). Other entries of the record are left as they are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from census_scvi.constants import EMBEDDING_INFO_KEY
from census_scvi.errors import CensusScviError

__all__ = ["INDEX_TYPE", "embedding_indexes", "record_index"]

logger = logging.getLogger(__name__)

#: The type name the Census (and find_nearest_obs) uses for a TileDB-Vector-Search IVF_FLAT index
INDEX_TYPE = "IVFFlat"


def _info(arr: Any, uri: Path) -> dict[str, Any]:
    raw = arr.metadata.get(EMBEDDING_INFO_KEY)
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except (TypeError, ValueError):
        msg = f"{uri}'s {EMBEDDING_INFO_KEY} metadata is not JSON"
        raise CensusScviError(msg, hint="re-run 'census-scvi embed --force'") from None
    return info if isinstance(info, dict) else {}


def embedding_indexes(uri: Path) -> list[dict[str, Any]]:
    """The ``indexes`` recorded in an embedding's ``CxG_embedding_info`` (empty when none)."""
    import tiledbsoma as soma

    with soma.SparseNDArray.open(str(uri), "r") as arr:
        return list(_info(arr, uri).get("indexes") or [])


def record_index(uri: Path, relative_uri: str) -> dict[str, Any]:
    """Set the embedding's IVFFlat index entry to ``relative_uri``; returns the updated record."""
    import tiledbsoma as soma

    with soma.SparseNDArray.open(str(uri), "r") as arr:
        info = _info(arr, uri)
    others = [i for i in info.get("indexes") or [] if i.get("type") != INDEX_TYPE]
    info["indexes"] = [{"type": INDEX_TYPE, "relative_uri": relative_uri}, *others]
    with soma.SparseNDArray.open(str(uri), "w") as arr:
        arr.metadata[EMBEDDING_INFO_KEY] = json.dumps(info)
    logger.info("index: recorded in %s (%s)", uri, EMBEDDING_INFO_KEY)
    return info
