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
a seed whatever the number of writer processes; memory is bounded by the block and write-buffer
sizes, not by the cell count. ``processes`` writers each generate and write a contiguous range of
cells as their own TileDB fragments (:mod:`census_scvi.demo._parallel`); the parent then writes
var, the presence matrices and census_info and consolidates. The census is written through the
same SOMA writer and schema as build-census (:mod:`census_scvi.soma._writer`,
:mod:`census_scvi.soma._schema`), so both carry one ``census_schema_version`` and the same
census_info tables.

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

from census_scvi.constants import CENSUS_DATA, MEASUREMENT
from census_scvi.demo._model import NNZ_MIN, SHAPES, Design, ShapeName, block_cells
from census_scvi.demo._parallel import MAX_PROCESSES, default_processes, run_tasks
from census_scvi.demo._tables import (
    BlockStats,
    OrganismCounts,
    dataset_rows,
    obs_block,
    obs_categories,
    var_frame,
)
from census_scvi.demo._write import Task, TaskResult, organism_design, split_blocks
from census_scvi.errors import CensusScviError
from census_scvi.soma._census_info import write_census_info
from census_scvi.soma._schema import OBS_COLUMNS, VAR_COLUMNS
from census_scvi.soma._writer import (
    consolidate,
    create_census_root,
    create_counts_array,
    create_dataframe,
    create_empty_dataframe,
    create_experiment,
    schema_table,
    write_presence_matrix,
)

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["MiniCensusResult", "OrganismSummary", "make_mini_census"]

logger = logging.getLogger(__name__)

_DATASET_SCHEMA_VERSION = "5.2.0"  # the CELLxGENE dataset schema the synthetic datasets mimic
_DEFAULT_GENES = {"default": 2_000, "census": 20_000}


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

    n_nnz: int = 0
    """Non-zeros of X."""

    @classmethod
    def of(cls, d: Design, counts: OrganismCounts) -> OrganismSummary:
        return cls(
            organism=d.organism,
            n_cells=d.n_cells,
            n_genes=d.n_genes,
            n_primary=counts.n_primary,
            n_low_nnz=counts.n_low_nnz,
            n_datasets=len(d.datasets),
            n_cell_types=int((counts.per_type > 0).sum()),
            model_cells=np.sort(np.concatenate(counts.model_cells)),
            n_nnz=int(counts.var_nnz.sum()),
        )


@dataclass
class MiniCensusResult:
    """Result of :func:`make_mini_census`."""

    path: Path
    seed: int
    organisms: dict[str, OrganismSummary]
    seconds: float
    shape: str = "default"
    processes: int = 1
    writer_peak_rss_bytes: int = 0
    """The largest peak RSS of the writers (this process when ``processes == 1``)."""

    def summary(self) -> str:
        cells = sum(s.n_cells for s in self.organisms.values())
        lines = [
            f"mini census written to {self.path} (seed {self.seed}, shape {self.shape}, "
            f"{self.seconds:.1f} s = {cells / max(self.seconds, 1e-9):,.0f} cells/s with "
            f"{self.processes} writer process{'es' if self.processes > 1 else ''}, writer peak "
            f"RSS {self.writer_peak_rss_bytes / 2**30:.2f} GiB)"
        ]
        for s in self.organisms.values():
            lines.append(
                f"  {s.organism}: {s.n_cells:,} cells x {s.n_genes:,} genes; "
                f"{s.n_primary:,} primary, {s.n_cells - s.n_primary:,} non-primary duplicates, "
                f"{s.n_low_nnz:,} with nnz < {NNZ_MIN}; {s.n_nnz / max(s.n_cells, 1):,.0f} "
                f"non-zeros per cell; {s.n_datasets} datasets, "
                f"{s.n_cell_types} cell types; {len(s.model_cells):,} pass the model filter"
            )
        return "\n".join(lines)


def make_mini_census(
    path: str | os.PathLike[str],
    *,
    n_cells: int = 20_000,
    n_genes: int | None = None,
    seed: int = 0,
    force: bool = False,
    shape: ShapeName = "default",
    processes: int | None = None,
) -> MiniCensusResult:
    """Write the mini census to ``path`` (a folder).

    Parameters
    ----------
    path
        Folder to create; written under a temporary name and renamed when complete.
    n_cells
        Human cells (mouse gets a tenth, at least 200).
    n_genes
        Human genes (mouse gets half, at least 100); default 2,000 (``default`` shape) or 20,000
        (``census`` shape).
    seed
        Random seed: the same seed (and shape and sizes) gives identical arrays, whatever
        ``processes``.
    force
        Replace an existing folder.
    shape
        ``"default"`` (gamma gene means, ~1,000 non-zeros per cell at 2,000 genes) or ``"census"``
        (Census-like: log-normal gene means, ~2,000 non-zeros per cell at 20,000 genes).
    processes
        Writer processes (default: the CPU count, at most 8, and at most one per 16,384 cells).

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

    if shape not in SHAPES:
        msg = f"unknown mini census shape '{shape}'"
        raise CensusScviError(msg, hint=f"use one of: {', '.join(SHAPES)}")
    n_genes = _DEFAULT_GENES[shape] if n_genes is None else n_genes
    if n_cells < 100 or n_genes < 100:
        msg = f"mini census needs at least 100 cells and 100 genes, got {n_cells} x {n_genes}"
        raise CensusScviError(msg)
    if processes is not None and not 1 <= processes <= 64:
        msg = f"processes must be between 1 and 64, got {processes}"
        raise CensusScviError(msg, hint=f"e.g. the CPU count, up to {MAX_PROCESSES}")
    path = Path(path)
    if path.exists() and not force:
        msg = f"{path} already exists"
        raise CensusScviError(msg, hint="pass --force to overwrite it, or choose another PATH")
    t0 = time.perf_counter()
    sizes = [
        ("homo_sapiens", n_cells, n_genes),
        ("mus_musculus", max(n_cells // 10, 200), max(n_genes // 2, 100)),
    ]
    designs = [organism_design(org, c, g, seed, shape) for org, c, g in sizes]
    procs = default_processes(n_cells) if processes is None else processes
    with atomic_path(path) as tmp:
        summaries, peak = _write_census(tmp, designs, seed, procs)
    return MiniCensusResult(
        path=path,
        seed=seed,
        organisms=summaries,
        seconds=time.perf_counter() - t0,
        shape=shape,
        processes=procs,
        writer_peak_rss_bytes=peak,
    )


def _write_census(
    root: Path, designs: list[Design], seed: int, processes: int
) -> tuple[dict[str, OrganismSummary], int]:
    """The root and empty arrays, the writers' blocks, then var, presence and census_info."""
    import pandas as pd

    shape = designs[0].shape.name
    create_census_root(
        root,
        created_by="census-scvi demo-data",
        metadata={"census_scvi_mini_census": f"seed={seed} shape={shape}"},
    )
    tasks = [t for d in designs for t in _tasks(root, d, seed, processes)]
    results = run_tasks(tasks, processes)
    n_datasets = sum(len(d.datasets) for d in designs)
    summaries: dict[str, OrganismSummary] = {}
    rows: list[dict[str, object]] = []
    offset = 0
    for d in designs:
        counts = _sum_counts(
            d, [r for t, r in zip(tasks, results, strict=True) if t.organism == d.organism]
        )
        _finish_organism(root, d, counts, ds_offset=offset, n_datasets=n_datasets)
        summaries[d.organism] = OrganismSummary.of(d, counts)
        rows += dataset_rows(d, seed, counts)
        offset += len(d.datasets)
    write_census_info(
        root,
        datasets=pd.DataFrame(rows),
        summary={
            "number_donors_homo_sapiens": str(len(designs[0].donors)),
            "census_scvi_mini_census_seed": str(seed),
            "census_scvi_mini_census_shape": shape,
        },
        dataset_schema_version=_DATASET_SCHEMA_VERSION,
    )
    return summaries, max(r.peak_rss_bytes for r in results)


def _tasks(root: Path, d: Design, seed: int, processes: int) -> list[Task]:
    """The organism's empty experiment, X and obs, and one task per writer's block range."""
    exp_uri = create_experiment(f"{root}/{CENSUS_DATA}", d.organism)
    x_uri = create_counts_array(f"{exp_uri}/ms/{MEASUREMENT}", (d.n_cells, d.n_genes))
    # the obs schema, from a (throw-away) first block's table: the writers' tables match it
    cells = block_cells(d, 0, seed)
    zeros = np.zeros(cells.n, dtype=np.int64)
    table = schema_table(
        obs_block(
            d, cells, BlockStats(zeros, zeros.astype(float), zeros.astype(float)), obs_categories(d)
        ),
        OBS_COLUMNS,
    )
    schema = table.schema.remove(table.schema.get_field_index("soma_joinid"))
    obs_uri = create_empty_dataframe(
        exp_uri, "obs", schema, n_rows=d.n_cells, enumerations=obs_categories(d), root=root
    )
    return [
        Task(d.organism, d.n_cells, d.n_genes, seed, d.shape.name, a, b, x_uri, obs_uri)
        for a, b in split_blocks(d.n_blocks, processes)
    ]


def _sum_counts(d: Design, results: list[TaskResult]) -> OrganismCounts:
    total = OrganismCounts.zeros(d)
    for r in results:
        total.add(r.counts)
    return total


def _finish_organism(
    root: Path, d: Design, counts: OrganismCounts, *, ds_offset: int, n_datasets: int
) -> None:
    """var and the presence matrix from the counts; X and obs consolidated.

    Presence-matrix rows are census_info/datasets soma_joinids: this organism's datasets start at
    row ``ds_offset`` of the ``n_datasets`` shared by every organism. X keeps one fragment per
    writer (disjoint row ranges: merging them would rewrite all of X for no faster read); its
    fragment metadata and commits are consolidated. obs (one fragment per 16 blocks) is merged.
    """
    exp_uri = f"{root}/{CENSUS_DATA}/{d.organism}"
    ms_uri = f"{exp_uri}/ms/{MEASUREMENT}"
    create_dataframe(ms_uri, "var", schema_table(var_frame(d, counts), VAR_COLUMNS), root=root)
    pr, pc = np.nonzero(counts.dataset_gene_nnz)
    write_presence_matrix(
        ms_uri,
        root,
        shape=(n_datasets, d.n_genes),
        rows=(pr + ds_offset).astype(np.int64),
        cols=pc.astype(np.int64),
        values=np.ones(len(pr), dtype=bool),
    )
    consolidate(f"{ms_uri}/X/raw", fragments=False)
    consolidate(f"{exp_uri}/obs", fragments=True)
