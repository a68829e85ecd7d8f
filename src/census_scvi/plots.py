"""Pictures shared by evaluate and map: UMAP coordinates of an embedding and the panels drawn."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["draw_umap", "umap_coords"]

logger = logging.getLogger(__name__)


def umap_coords(
    embedding: npt.NDArray[np.floating], *, n_neighbors: int = 15, seed: int = 0
) -> npt.NDArray[np.float32]:
    """2-D UMAP of an embedding (scanpy neighbours + UMAP)."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    emb = np.asarray(embedding, dtype=np.float32)
    a = ad.AnnData(obs=pd.DataFrame(index=np.arange(emb.shape[0]).astype(str)), obsm={"X_emb": emb})
    from sklearn.neighbors import KNeighborsTransformer

    k = max(2, min(n_neighbors, a.n_obs - 1))
    # Exact k-NN through sklearn: scanpy 1.11.5's default (pynndescent, used above 4,096 cells)
    # returns a scipy csr_array and then calls .getnnz(), which scipy 1.17 removed.
    knn = KNeighborsTransformer(n_neighbors=k, mode="distance")
    sc.pp.neighbors(a, use_rep="X_emb", n_neighbors=k, transformer=knn, random_state=seed)
    sc.tl.umap(a, random_state=seed)
    return np.asarray(a.obsm["X_umap"], dtype=np.float32)


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


_GREY = (0.78, 0.78, 0.78, 1.0)
_QUERY = (0.9, 0.0, 0.49, 1.0)  # magenta: not a tab20 colour
_DARK = (0.15, 0.15, 0.15, 1.0)
_BACKGROUND = ("reference", "query cells")


def _palette(categories: Sequence[str]) -> dict[str, Any]:
    """Colours for labels (tab20, then an evenly spaced wide colormap); fixed colours for the
    special names ``reference`` and ``query cells`` (grey background), ``query`` (red) and
    ``unknown`` (dark)."""
    import matplotlib.pyplot as plt

    special = {"reference": _GREY, "query cells": _GREY, "query": _QUERY, "unknown": _DARK}
    cats = [c for c in categories if c not in special]
    if len(cats) <= 20:
        cmap = plt.get_cmap("tab20")
        out = {c: tuple(cmap(i)) for i, c in enumerate(cats)}
    else:
        cmap = plt.get_cmap("gist_ncar")
        out = {c: tuple(cmap(0.05 + 0.9 * i / len(cats))) for i, c in enumerate(cats)}
    out.update({c: v for c, v in special.items() if c in categories})
    return out


def draw_umap(
    coords: npt.NDArray[np.floating],
    colours: Mapping[str, npt.ArrayLike],
    path: Path,
    *,
    title: str = "scVI latent",
    order: Mapping[str, Sequence[str]] | None = None,
    shared_palette: bool = False,
) -> None:
    """Scatter ``coords`` once per entry of ``colours`` (title -> one label per cell), legends right.

    Legends list every category with its cell count (long names shortened). Cells labelled
    ``reference`` or ``query cells`` are drawn first, in grey, as a background; the others in random order so no
    category hides another. ``shared_palette`` gives a label the same colour in every panel.
    """
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(colours)
    values_by_panel = {name: np.asarray(colours[name]).astype(str) for name in panels}
    common = (
        _palette(sorted(set().union(*(np.unique(v) for v in values_by_panel.values()))))
        if shared_palette
        else None
    )
    ncols = 2 if len(panels) > 1 else 1
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(9.5 * ncols, 6.2 * nrows), squeeze=False)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(coords.shape[0])
    size = float(np.clip(60_000 / max(coords.shape[0], 1), 1.0, 25.0))
    for ax, name in zip(axes.ravel(), panels, strict=False):
        values = values_by_panel[name]
        cats = list(order[name]) if order and name in order else sorted(np.unique(values))
        cats = [c for c in cats if c not in _BACKGROUND] + [c for c in cats if c in _BACKGROUND]
        palette = common or _palette(cats)
        background = np.isin(values[shuffled], list(_BACKGROUND))
        draw = np.concatenate([shuffled[background], shuffled[~background]])
        c = np.array([palette[v] for v in values[draw]])
        ax.scatter(coords[draw, 0], coords[draw, 1], c=c, s=size, linewidths=0, rasterized=True)
        ax.set_title(f"{title}: {name}", fontsize=13)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=palette[cat], markersize=7) for cat in cats
        ]
        counts = {cat: int((values == cat).sum()) for cat in cats}
        ax.legend(
            handles,
            [f"{_short(cat)} ({counts[cat]:,})" for cat in cats],
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
            fontsize=9,
            ncol=1 if len(cats) <= 18 else 2,
        )
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
