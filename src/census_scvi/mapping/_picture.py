"""The map's picture: the query and a reference sample in one UMAP, three colourings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from pathlib import Path

    from census_scvi.mapping._reference import Reference

__all__ = ["draw_map"]


def draw_map(
    path: Path,
    z_query: npt.NDArray[np.float32],
    pred: npt.NDArray[np.object_],
    ref: Reference,
    label_key: str,
    *,
    n_reference: int,
    seed: int,
) -> None:
    """One UMAP of the query and a stratified sample of ``n_reference`` reference cells."""
    from census_scvi.plots import draw_umap, umap_coords
    from census_scvi.soma import stratified_indices

    pick = stratified_indices(ref.labels, n_reference, seed=seed)
    z = np.concatenate([ref.z[pick], z_query])
    source = np.array(["reference"] * pick.size + ["query"] * z_query.shape[0], dtype=object)
    labels = np.concatenate([ref.labels[pick], pred]).astype(str)
    coords = umap_coords(z, seed=seed)
    draw_umap(
        coords,
        {
            "query vs reference": source,
            f"reference {label_key}": np.where(source == "reference", labels, "query cells"),
            f"query: predicted {label_key}": np.where(source == "query", labels, "reference"),
        },
        path,
        title="scVI latent",
        order={"query vs reference": ["reference", "query"]},
        shared_palette=True,
    )
