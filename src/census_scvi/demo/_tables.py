"""The mini census's obs (block by block), var and census_info/datasets rows, and the counts the
X pass gathers for them.

The frames carry exactly the columns of :mod:`census_scvi.soma._schema` (``OBS_COLUMNS``,
``VAR_COLUMNS``, ``DATASET_COLUMNS``); :func:`census_scvi.soma._writer.schema_table` gives them the
schema's order and types, as it does for build-census. Every categorical obs column has the same
categories in every block (:func:`obs_categories`: all values the design can produce), so writers
in several processes never extend the obs schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from census_scvi.counts import nonzero_moments
from census_scvi.demo._model import ASSAYS, NNZ_MIN, TISSUES, Cells, Design
from census_scvi.demo._sample import BlockX

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd

__all__ = [
    "BlockStats",
    "OrganismCounts",
    "dataset_rows",
    "obs_block",
    "obs_categories",
    "var_frame",
]


@dataclass
class BlockStats:
    """Per cell of one block: the computed obs columns' inputs."""

    nnz: npt.NDArray[np.int64]
    raw_sum: npt.NDArray[np.float64]
    sq_sum: npt.NDArray[np.float64]

    @classmethod
    def of(cls, x: BlockX, cells: Cells) -> BlockStats:
        # one numba pass: three np.bincount passes (with the float64 copies of the values they
        # need) cost 22.8 us of CPU per census-shape cell, this 7.7 us (bench_demo_data.py
        # --profile-blocks 20, "row stats")
        return cls(*_row_stats(x.rows, x.values, cells.start, cells.n))


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _row_stats(
    rows: npt.NDArray[np.int64], values: npt.NDArray[np.float32], start: int, n_rows: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per row: non-zeros, sum and sum of squares (float64, summed in the order given)."""
    nnz = np.zeros(n_rows, np.int64)
    raw_sum = np.zeros(n_rows, np.float64)
    sq_sum = np.zeros(n_rows, np.float64)
    for i in range(rows.shape[0]):
        r = rows[i] - start
        v = np.float64(values[i])
        nnz[r] += 1
        raw_sum[r] += v
        sq_sum[r] += v * v
    return nnz, raw_sum, sq_sum


@dataclass
class OrganismCounts:
    """What the X pass counts over a range of blocks; ranges add up (:meth:`add`)."""

    dataset_gene_nnz: npt.NDArray[np.int64]  # (stored datasets, genes): cells with a count
    obs_per_dataset: npt.NDArray[np.int64]  # cells stored under each dataset
    source_per_dataset: npt.NDArray[np.int64]  # cells whose source dataset is each dataset
    per_type: npt.NDArray[np.int64]
    n_primary: int = 0
    n_low_nnz: int = 0
    model_cells: list[npt.NDArray[np.int64]] = field(default_factory=list)
    """soma_joinids of primary cells with nnz >= 300 (the original training filter), per range."""

    @classmethod
    def zeros(cls, d: Design) -> OrganismCounts:
        n_ds = len(d.datasets)
        return cls(
            dataset_gene_nnz=np.zeros((n_ds, d.n_genes), dtype=np.int64),
            obs_per_dataset=np.zeros(n_ds, dtype=np.int64),
            source_per_dataset=np.zeros(n_ds, dtype=np.int64),
            per_type=np.zeros(d.n_types, dtype=np.int64),
        )

    def count(self, d: Design, cells: Cells, x: BlockX, stats: BlockStats) -> None:
        """Add one block."""
        n_ds = len(self.obs_per_dataset)
        obs_ds = cells.obs_dataset(d)
        _count_genes(self.dataset_gene_nnz, obs_ds, x.rows, x.cols, cells.start)
        self.obs_per_dataset += np.bincount(obs_ds, minlength=n_ds)
        self.source_per_dataset += np.bincount(cells.dataset, minlength=n_ds)
        self.per_type += np.bincount(cells.cell_type, minlength=len(self.per_type))
        primary = ~cells.is_dup
        self.n_primary += int(primary.sum())
        self.n_low_nnz += int((stats.nnz < NNZ_MIN).sum())
        passing = np.flatnonzero(primary & (stats.nnz >= NNZ_MIN)) + cells.start
        self.model_cells.append(passing.astype(np.int64))

    def add(self, other: OrganismCounts) -> None:
        self.dataset_gene_nnz += other.dataset_gene_nnz
        self.obs_per_dataset += other.obs_per_dataset
        self.source_per_dataset += other.source_per_dataset
        self.per_type += other.per_type
        self.n_primary += other.n_primary
        self.n_low_nnz += other.n_low_nnz
        self.model_cells += other.model_cells

    @property
    def var_nnz(self) -> npt.NDArray[np.int64]:
        return self.dataset_gene_nnz.sum(axis=0)


@numba.njit(nogil=True, cache=True)  # type: ignore[misc]
def _count_genes(
    into: npt.NDArray[np.int64],
    obs_ds: npt.NDArray[np.intp],
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    start: int,
) -> None:
    """``into[dataset of the row, gene] += 1`` per non-zero, in place.

    One pass instead of ``np.bincount`` of the flat (dataset, gene) index (its int64 temporaries
    and a (datasets x genes) result per block): 18.2 / 17.8 -> 7.0 / 7.2 us of CPU per
    census-shape cell (``python benchmarks/bench_demo_data.py --profile-blocks 20``, "dataset
    counts", the old tree then this one, twice).
    """
    for i in range(rows.shape[0]):
        into[obs_ds[rows[i] - start], cols[i]] += 1


# ------------------------------------------------------------------------------------------
# obs
# ------------------------------------------------------------------------------------------
_CONSTANT = {  # obs columns with one value per organism: (human, mouse)
    "development_stage_ontology_term_id": ("HsapDv:0000258", "MmusDv:0000110"),
    "development_stage": ("adult", "adult stage"),
    "disease_ontology_term_id": ("PATO:0000461", "PATO:0000461"),
    "disease": ("normal", "normal"),
    "self_reported_ethnicity_ontology_term_id": ("unknown", "na"),
    "self_reported_ethnicity": ("unknown", "na"),
    "tissue_type": ("tissue", "tissue"),
}
_SEXES = (("female", "PATO:0000383"), ("male", "PATO:0000384"))


def _primary_values(d: Design, column: str) -> list[str]:
    """The distinct values of a dataset-level column over the primary datasets, in order."""
    values = d.datasets[column].to_numpy()[:-1]
    return list(dict.fromkeys(str(v) for v in values))


def obs_categories(d: Design) -> dict[str, list[str]]:
    """Every categorical obs column's categories: all the values the design can produce."""
    assays, tissues = _primary_values(d, "assay"), _primary_values(d, "tissue")
    cats = {
        "dataset_id": [str(v) for v in d.datasets["dataset_id"]],
        "tissue_general_ontology_term_id": [TISSUES[t] for t in tissues],
        "tissue_general": tissues,
        "assay_ontology_term_id": [ASSAYS[a][0] for a in assays],
        "assay": assays,
        "cell_type_ontology_term_id": list(d.type_ids),
        "cell_type": list(d.type_names),
        "donor_id": [str(v) for v in d.donors["donor_id"]],
        "sex_ontology_term_id": [t for _, t in _SEXES],
        "sex": [s for s, _ in _SEXES],
        "suspension_type": _primary_values(d, "suspension_type"),
        "tissue_ontology_term_id": [TISSUES[t] for t in tissues],
        "tissue": tissues,
    }
    cats.update({c: [v[0 if d.human else 1]] for c, v in _CONSTANT.items()})
    return cats


def _dataset_codes(d: Design, column: str, categories: list[str]) -> npt.NDArray[np.int64]:
    """Per dataset row, the code of its value of ``column`` in ``categories`` (-1: compilation)."""
    where = {v: i for i, v in enumerate(categories)}
    return np.array([where.get(str(v), -1) for v in d.datasets[column]], dtype=np.int64)


def _label_columns(d: Design, cells: Cells, cats: dict[str, list[str]]) -> dict[str, Any]:
    """The label/ontology obs columns, from each cell's source dataset (what was measured)."""
    import pandas as pd

    def cat(name: str, codes: npt.ArrayLike) -> pd.Categorical:
        return pd.Categorical.from_codes(np.asarray(codes), categories=cats[name])

    n = cells.n
    src = cells.dataset
    assay = _dataset_codes(d, "assay", cats["assay"])[src]
    tissue = _dataset_codes(d, "tissue", cats["tissue"])[src]
    susp = _dataset_codes(d, "suspension_type", cats["suspension_type"])[src]
    sex = cells.donor % 2  # 0 female, 1 male
    out = {
        "dataset_id": cat("dataset_id", cells.obs_dataset(d)),
        "tissue_general_ontology_term_id": cat("tissue_general_ontology_term_id", tissue),
        "tissue_general": cat("tissue_general", tissue),
        "assay_ontology_term_id": cat("assay_ontology_term_id", assay),
        "assay": cat("assay", assay),
        "cell_type_ontology_term_id": cat("cell_type_ontology_term_id", cells.cell_type),
        "cell_type": cat("cell_type", cells.cell_type),
        "donor_id": cat("donor_id", cells.donor),
        "sex_ontology_term_id": cat("sex_ontology_term_id", sex),
        "sex": cat("sex", sex),
        "suspension_type": cat("suspension_type", susp),
        "tissue_ontology_term_id": cat("tissue_ontology_term_id", tissue),
        "tissue": cat("tissue", tissue),
    }
    out.update({c: cat(c, np.zeros(n, dtype=np.int64)) for c in _CONSTANT})
    return out


def obs_block(
    d: Design, cells: Cells, stats: BlockStats, cats: dict[str, list[str]]
) -> pd.DataFrame:
    """obs rows of one block: labels, ``is_primary_data``, ``observation_joinid``, computed columns.

    A non-primary copy keeps its source cell's ``observation_joinid`` (as CELLxGENE does).
    """
    import pandas as pd

    prefix = "hs" if d.human else "mm"
    origin = cells.start + np.where(cells.is_dup, cells.dup_source, np.arange(cells.n))
    mean, var = nonzero_moments(stats.nnz, stats.raw_sum, stats.sq_sum)
    return pd.DataFrame(
        {
            **_label_columns(d, cells, cats),
            "is_primary_data": ~cells.is_dup,
            "observation_joinid": np.array([f"{prefix}-obs-{i:09d}" for i in origin], dtype=object),
            "nnz": stats.nnz,
            "n_measured_vars": d.n_measured[cells.dataset],
            "raw_sum": stats.raw_sum.astype(np.float32),
            "raw_mean_nnz": mean.astype(np.float32),
            "raw_variance_nnz": var.astype(np.float32),
        }
    )


# ------------------------------------------------------------------------------------------
# var and census_info/datasets
# ------------------------------------------------------------------------------------------
def var_frame(d: Design, counts: OrganismCounts) -> pd.DataFrame:
    """var; ``n_measured_obs`` counts the cells whose (source) dataset measures the gene."""
    import pandas as pd

    return pd.DataFrame(
        {
            "feature_id": d.gene_ids,
            "feature_name": d.gene_names,
            "feature_length": d.gene_lengths,
            "nnz": counts.var_nnz.astype(np.int64),
            "n_measured_obs": (counts.source_per_dataset[:, None] * d.measured)
            .sum(axis=0)
            .astype(np.int64),
        }
    )


def dataset_rows(d: Design, seed: int, counts: OrganismCounts) -> list[dict[str, Any]]:
    """census_info/datasets rows of one organism, in dataset order."""
    rows = []
    for di, ds in enumerate(d.datasets.itertuples(index=False)):
        dsid = str(ds.dataset_id)
        title = f"Synthetic {ds.assay or 'compilation'} {ds.suspension_type} dataset {dsid}"
        rows.append(
            {
                "citation": f"Synthetic mini census (census-scvi), seed {seed}",
                "collection_id": f"collection-{dsid}",
                "collection_name": f"Mini census collection {dsid}",
                "collection_doi": "",
                "collection_doi_label": "",
                "dataset_id": dsid,
                "dataset_version_id": f"{dsid}-v1",
                "dataset_title": title.replace("  ", " "),
                "dataset_h5ad_path": f"{dsid}.h5ad",
                "dataset_total_cell_count": int(counts.obs_per_dataset[di]),
            }
        )
    return rows
