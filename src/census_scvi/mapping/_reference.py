"""The label-transfer reference: the run's embedded cells, labelled from the census obs.

Memory: the label column is read in Arrow batches and kept as one int32 code per embedded cell
(plus the batch's soma_joinids while aligning), never as a Python string per cell: at 100M cells
that is ~0.4 GB of codes instead of ~6 GB of strings. The stratified sample (of
``map.knn_reference_cells`` cells for exact search, of ``map.reference_sample_size`` for the
picture when the index serves the search) is drawn from the codes; only the sampled rows of the
latent (a memory map) are read, and only they get string labels. With the index, the neighbours'
labels are read from the codes of every embedded cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from census_scvi.constants import SOMA_JOINID
from census_scvi.errors import CensusScviError

if TYPE_CHECKING:
    import pyarrow as pa
    import tiledbsoma as soma

__all__ = [
    "Reference",
    "check_label_column",
    "label_codes",
    "present_classes",
    "reference_sample",
]

#: The label given to cells whose reference label is missing (null), as pandas' str(NaN).
_NULL_LABEL = "nan"


@dataclass
class Reference:
    """The sampled reference rows: latent, labels, and how many embedded cells there were."""

    z: npt.NDArray[np.float32]
    labels: npt.NDArray[np.object_]
    n_embedded: int

    @property
    def n_cells(self) -> int:
        return int(self.z.shape[0])


def check_label_column(experiment: soma.Experiment, label_key: str) -> None:
    """Refuse a ``--labels`` column the census obs lacks, listing the valid ones."""
    names = [c for c in experiment.obs.keys() if c != SOMA_JOINID]
    if label_key not in names:
        msg = (
            f"--labels column {label_key!r} is not in the reference census's obs; valid: "
            f"{', '.join(sorted(names)) or 'none'}"
        )
        raise CensusScviError(msg, hint="pass one of those, e.g. --labels cell_type")


def label_codes(
    experiment: soma.Experiment, joinids: npt.NDArray[np.int64], label_key: str
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.object_]]:
    """The ``label_key`` of each of ``joinids`` (ascending, unique) as codes into classes.

    Returns
    -------
    ``(codes, classes)``: int32 per cell, in ``joinids`` order; ``classes[codes]`` are the labels.
    """
    lookup: dict[str, int] = {}
    ids: list[npt.NDArray[np.int64]] = []
    codes: list[npt.NDArray[np.int32]] = []
    coords: Any = joinids
    if joinids.size and int(joinids[-1]) - int(joinids[0]) + 1 == joinids.size:
        coords = slice(int(joinids[0]), int(joinids[-1]))  # a contiguous range reads faster
    inside = joinids[joinids < _domain_end(experiment)]
    if inside.size < joinids.size:
        coords = inside  # ids past the obs domain are an error below, not a TileDB one
    read = experiment.obs.read(coords=(coords,), column_names=[SOMA_JOINID, label_key])
    for table in read:
        ids.append(table.column(SOMA_JOINID).to_numpy().astype(np.int64, copy=False))
        codes.append(_batch_codes(table.column(label_key), lookup))
    got = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
    out = np.concatenate(codes) if codes else np.empty(0, dtype=np.int32)
    if got.size > 1 and (np.diff(got) < 0).any():
        order = np.argsort(got, kind="stable")
        got, out = got[order], out[order]
    if got.size != joinids.size or not np.array_equal(got, joinids):
        missing = int(np.setdiff1d(joinids, got, assume_unique=True).size)
        msg = f"{missing:,} embedded soma_joinids are not in the census obs"
        raise CensusScviError(msg, hint="the embedding belongs to another census; re-embed")
    return out, np.array(list(lookup), dtype=object)


def _domain_end(experiment: soma.Experiment) -> int:
    """One past the largest soma_joinid the obs domain allows."""
    try:
        return int(experiment.obs.domain[0][1]) + 1
    except (AttributeError, IndexError, TypeError):  # pragma: no cover - older tiledbsoma
        return int(np.iinfo(np.int64).max)


def _batch_codes(column: pa.ChunkedArray, lookup: dict[str, int]) -> npt.NDArray[np.int32]:
    """One Arrow batch's labels as global codes (``lookup`` grows with new labels)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    names = [_NULL_LABEL if v is None else str(v) for v in arr.dictionary.to_pylist()]
    lut = np.array([lookup.setdefault(n, len(lookup)) for n in names], dtype=np.int32)
    indices = arr.indices
    if indices.null_count:
        null_code = lookup.setdefault(_NULL_LABEL, len(lookup))
        lut = np.append(lut, np.int32(null_code))
        indices = pc.fill_null(indices, len(names))
    return lut[indices.to_numpy(zero_copy_only=False)]


def reference_sample(
    latent: npt.NDArray[np.float32],
    codes: npt.NDArray[np.int32],
    classes: npt.NDArray[np.object_],
    *,
    n_cells: int,
    seed: int,
) -> Reference:
    """A stratified sample (by label) of at most ``n_cells`` embedded cells, with their labels.

    ``codes`` / ``classes``: :func:`label_codes` of every embedded cell (``latent``'s rows).
    """
    from census_scvi.soma import stratified_indices

    keep = stratified_indices(codes, n_cells, seed=seed)
    return Reference(
        z=np.asarray(latent[keep], dtype=np.float32),
        labels=classes[codes[keep]],
        n_embedded=int(codes.size),
    )


def present_classes(codes: npt.NDArray[np.int32], classes: npt.NDArray[np.object_]) -> list[str]:
    """The labels at least one embedded cell has (one pass of counts, no per-cell strings)."""
    counts = np.bincount(codes, minlength=len(classes)) if codes.size else np.zeros(len(classes))
    return [str(c) for c, n in zip(classes, counts, strict=False) if n > 0]
