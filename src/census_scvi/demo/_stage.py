"""The mini census: a small SOMA census in the Census layout and schema, with realistic counts.

The counts follow a Splatter-style model (:mod:`census_scvi.demo._model`), so the pipeline's
choices (HVGs, batch label, scVI's batch correction) matter on it:

- gene base means are gamma distributed; a hierarchy of cell types (classes, then subtypes) with
  differentially expressed genes at each level;
- several datasets, each with its own assay (10x 3' v2/v3, 10x 5', Smart-seq2), suspension type,
  donors and cell-type composition;
- gene-wise multiplicative batch effects by assay, dataset and donor; log-normal library sizes by
  assay; negative-binomial (gamma-Poisson) noise;
- about 10% non-primary cells in a compilation dataset that duplicate primary cells of the other
  datasets (same counts, same ``observation_joinid``), and a few percent of low-quality cells with
  nnz < 300; one dataset does not measure ~5% of the genes (``n_measured_vars``/``n_measured_obs``).

Cells are generated in fixed blocks, each from its own seeded stream, so the output is identical for
a seed whatever the write batching; memory is bounded by the block and write-buffer sizes, not by
the cell count. The census is written through the same SOMA writer and schema as build-census
(:mod:`census_scvi.soma._writer`, :mod:`census_scvi.soma._schema`), so both carry one
``census_schema_version`` and the same census_info tables.

Hand-written because no library generates Census-schema SOMA data; Splatter itself is R-only.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from census_scvi.demo._model import NNZ_MIN, Design, design
from census_scvi.demo._tables import CellStats, dataset_rows
from census_scvi.demo._write import write_organism
from census_scvi.errors import CensusScviError
from census_scvi.soma._census_info import write_census_info
from census_scvi.soma._writer import create_census_root

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["MiniCensusResult", "OrganismSummary", "make_mini_census"]

logger = logging.getLogger(__name__)

_DATASET_SCHEMA_VERSION = "5.2.0"  # the CELLxGENE dataset schema the synthetic datasets mimic


@dataclass
class OrganismSummary:
    """What the generator wrote for one organism."""

    organism: str
    n_cells: int
    n_genes: int
    n_primary: int
    n_low_nnz: int
    n_datasets: int
    n_cell_types: int
    model_cells: npt.NDArray[np.int64] = field(repr=False)
    """soma_joinids of primary cells with nnz >= 300 (the original training filter)."""

    @classmethod
    def of(cls, d: Design, stats: CellStats) -> OrganismSummary:
        primary = ~d.is_dup
        return cls(
            organism=d.organism,
            n_cells=d.n_cells,
            n_genes=d.n_genes,
            n_primary=int(primary.sum()),
            n_low_nnz=int((stats.nnz < NNZ_MIN).sum()),
            n_datasets=len(d.datasets),
            n_cell_types=len(np.unique(d.cell_type)),
            model_cells=np.flatnonzero(primary & (stats.nnz >= NNZ_MIN)).astype(np.int64),
        )


@dataclass
class MiniCensusResult:
    """Result of :func:`make_mini_census`."""

    path: Path
    seed: int
    organisms: dict[str, OrganismSummary]
    seconds: float

    def summary(self) -> str:
        lines = [f"mini census written to {self.path} (seed {self.seed}, {self.seconds:.1f} s)"]
        for s in self.organisms.values():
            lines.append(
                f"  {s.organism}: {s.n_cells:,} cells x {s.n_genes:,} genes; "
                f"{s.n_primary:,} primary, {s.n_cells - s.n_primary:,} non-primary duplicates, "
                f"{s.n_low_nnz:,} with nnz < {NNZ_MIN}; {s.n_datasets} datasets, "
                f"{s.n_cell_types} cell types; {len(s.model_cells):,} pass the model filter"
            )
        return "\n".join(lines)


def make_mini_census(
    path: str | os.PathLike[str],
    *,
    n_cells: int = 20_000,
    n_genes: int = 2_000,
    seed: int = 0,
    force: bool = False,
) -> MiniCensusResult:
    """Write the mini census to ``path`` (a folder).

    Parameters
    ----------
    path
        Folder to create; written under a temporary name and renamed when complete.
    n_cells
        Human cells (mouse gets a tenth, at least 200).
    n_genes
        Human genes (mouse gets half, at least 100).
    seed
        Random seed: the same seed gives identical arrays.
    force
        Replace an existing folder.

    Returns
    -------
    :class:`MiniCensusResult` with per-organism counts and the soma_joinids of the cells that pass
    the original training filter (``is_primary_data == True and nnz >= 300``).

    Examples
    --------
    >>> res = make_mini_census("/tmp/mini", n_cells=2000, n_genes=500)  # doctest: +SKIP
    >>> import cellxgene_census
    >>> census = cellxgene_census.open_soma(uri="/tmp/mini")  # doctest: +SKIP
    """
    from census_scvi.rundir import atomic_path

    if n_cells < 100 or n_genes < 100:
        msg = f"mini census needs at least 100 cells and 100 genes, got {n_cells} x {n_genes}"
        raise CensusScviError(msg)
    path = Path(path)
    if path.exists() and not force:
        msg = f"{path} already exists"
        raise CensusScviError(msg, hint="pass --force to overwrite it, or choose another PATH")
    t0 = time.perf_counter()
    designs = [
        design("homo_sapiens", n_cells, n_genes, seed),
        design("mus_musculus", max(n_cells // 10, 200), max(n_genes // 2, 100), seed),
    ]
    with atomic_path(path) as tmp:
        summaries = _write_census(tmp, designs, seed)
    return MiniCensusResult(
        path=path, seed=seed, organisms=summaries, seconds=time.perf_counter() - t0
    )


def _write_census(root: Path, designs: list[Design], seed: int) -> dict[str, OrganismSummary]:
    """The root, every organism's experiment, then census_info (counted from what was written)."""
    import pandas as pd

    create_census_root(
        root,
        created_by="census-scvi demo-data",
        metadata={"census_scvi_mini_census": f"seed={seed}"},
    )
    n_datasets = sum(len(d.datasets) for d in designs)
    summaries: dict[str, OrganismSummary] = {}
    offset = 0
    for d in designs:
        logger.info("writing %s: %d cells x %d genes", d.organism, d.n_cells, d.n_genes)
        stats = write_organism(root, d, seed, ds_offset=offset, n_datasets=n_datasets)
        summaries[d.organism] = OrganismSummary.of(d, stats)
        offset += len(d.datasets)
    datasets = pd.DataFrame([row for d in designs for row in dataset_rows(d, seed)])
    write_census_info(
        root,
        datasets=datasets,
        summary={
            "number_donors_homo_sapiens": str(len(designs[0].donors)),
            "census_scvi_mini_census_seed": str(seed),
        },
        dataset_schema_version=_DATASET_SCHEMA_VERSION,
    )
    return summaries
