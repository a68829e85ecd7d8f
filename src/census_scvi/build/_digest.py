"""The same cells twice: per-dataset digests, and the refusal of a dataset already in the census.

Every dataset a build adds gets a :class:`Digest`: a SHA-256 of its Census-shaped counts and gene
ids, a SHA-256 of its sorted ``observation_joinid`` values when the file had real ones (an
``observation_joinid`` column, as CELLxGENE files do; obs names such as ``0, 1, 2`` or barcodes
repeat between unrelated datasets, so they do not count), and whether it holds primary cells.
The digests are kept in the census root's metadata (:data:`METADATA_KEY`, JSON). A census built
elsewhere (or before digests) gets its datasets' joinid digests from obs, once.

A new dataset with primary cells whose counts or joinids equal those of a dataset already present
(with primary cells) is refused: the same cells under another file name would be counted twice.
Non-primary copies (``is_primary_data`` False everywhere: CELLxGENE repeats cells that way, with
the same ``observation_joinid``) are allowed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.errors import CensusScviError
from census_scvi.soma._writer import open_collection

if TYPE_CHECKING:
    import numpy.typing as npt
    import scipy.sparse as sp

__all__ = [
    "METADATA_KEY",
    "Digest",
    "check_new",
    "counts_digest",
    "joinid_digest",
    "obs_digests",
    "read_digests",
    "write_digests",
]

METADATA_KEY = "census_scvi_dataset_digests"


@dataclass(frozen=True)
class Digest:
    """What identifies a dataset's cells."""

    n_cells: int
    primary: bool
    """Whether any cell is primary (``is_primary_data``)."""
    counts: str | None = None
    """SHA-256 of the gene ids and the CSR counts; None when not known (census built elsewhere)."""
    joinids: str | None = None
    """SHA-256 of the sorted observation_joinids; None when the file had none of its own."""


def counts_digest(x: sp.csr_matrix, gene_ids: npt.ArrayLike) -> str:
    """SHA-256 of the gene ids (in order) and the float32 CSR counts (canonical: sorted indices,
    no stored zeros, as :func:`census_scvi.build._genes.as_csr32` leaves them)."""
    h = hashlib.sha256()
    h.update("\n".join(map(str, np.asarray(gene_ids))).encode())
    for part in (x.indptr.astype(np.int64), x.indices.astype(np.int64), x.data.astype(np.float32)):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def joinid_digest(joinids: npt.ArrayLike) -> str:
    """SHA-256 of the sorted, distinct observation_joinids."""
    values = np.unique(np.asarray(joinids).astype(str))
    return hashlib.sha256("\n".join(values.tolist()).encode()).hexdigest()


def read_digests(root: Path) -> dict[str, Digest]:
    """The digests recorded in the census root's metadata (``{}`` when none)."""
    with open_collection(root) as census:
        raw = census.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        return {k: Digest(**v) for k, v in json.loads(str(raw)).items()}
    except (ValueError, TypeError):  # unreadable: treated as absent, rebuilt from obs
        return {}


def write_digests(root: Path, digests: dict[str, Digest]) -> None:
    with open_collection(root, "w") as census:
        census.metadata[METADATA_KEY] = json.dumps(
            {k: asdict(v) for k, v in sorted(digests.items())}
        )


def obs_digests(exp: Any, dataset_ids: list[str]) -> dict[str, Digest]:
    """Joinid digests of existing datasets, from obs (for censuses without recorded digests)."""
    names = exp.obs.schema.names
    if not dataset_ids or "observation_joinid" not in names or "dataset_id" not in names:
        return {}
    cols = ["dataset_id", "observation_joinid"] + (
        ["is_primary_data"] if "is_primary_data" in names else []
    )
    obs = exp.obs.read(column_names=cols).concat().to_pandas()
    out = {}
    for dsid, group in obs.groupby(obs["dataset_id"].astype(str), sort=False):
        if dsid not in dataset_ids:
            continue
        primary = bool(group["is_primary_data"].any()) if "is_primary_data" in group else True
        out[str(dsid)] = Digest(
            n_cells=len(group),
            primary=primary,
            joinids=joinid_digest(group["observation_joinid"].to_numpy()),
        )
    return out


def _same(new: Digest, old: Digest) -> str | None:
    if new.counts is not None and new.counts == old.counts:
        return "the same counts and genes"
    if new.joinids is not None and new.joinids == old.joinids:
        return "the same observation_joinids"
    return None


def check_new(new: Digest, known: dict[str, Digest], *, label: str, dataset_id: str) -> None:
    """Refuse ``new`` when it has primary cells that a known dataset with primary cells has."""
    if not new.primary:
        return
    for old_id, old in known.items():
        why = _same(new, old) if old.primary else None
        if why is None:
            continue
        msg = (
            f"{label}: its {new.n_cells:,} cells are already in the census as dataset "
            f"'{old_id}' ({why}); adding them again as '{dataset_id}' would count each cell twice"
        )
        hint = (
            f"to update that dataset, give this file dataset_id '{old_id}' and pass --replace; "
            "if it is a non-primary copy, set obs is_primary_data to False"
        )
        raise CensusScviError(msg, hint=hint)
