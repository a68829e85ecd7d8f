"""The mini census's obs, var and census_info/datasets rows, as frames with the Census columns.

The frames carry exactly the columns of :mod:`census_scvi.soma._schema` (``OBS_COLUMNS``,
``VAR_COLUMNS``, ``DATASET_COLUMNS``); :func:`census_scvi.soma._writer.schema_table` gives them the
schema's order and types, as it does for build-census.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.counts import nonzero_moments
from census_scvi.demo._model import ASSAYS, TISSUES, Design

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd

__all__ = ["CellStats", "dataset_rows", "obs_frame", "var_frame"]


@dataclass
class CellStats:
    """What the X pass counts: per cell (the computed obs columns) and per gene."""

    nnz: npt.NDArray[np.int64]
    raw_sum: npt.NDArray[np.float64]
    sq_sum: npt.NDArray[np.float64]
    var_nnz: npt.NDArray[np.int64]
    presence: npt.NDArray[np.bool_]  # (datasets, genes): a cell of the dataset has a count

    @classmethod
    def zeros(cls, d: Design) -> CellStats:
        return cls(
            nnz=np.zeros(d.n_cells, dtype=np.int64),
            raw_sum=np.zeros(d.n_cells, dtype=np.float64),
            sq_sum=np.zeros(d.n_cells, dtype=np.float64),
            var_nnz=np.zeros(d.n_genes, dtype=np.int64),
            presence=np.zeros((len(d.datasets), d.n_genes), dtype=bool),
        )

    def mean_and_variance(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """``raw_mean_nnz`` and ``raw_variance_nnz`` (the build-census convention)."""
        return nonzero_moments(self.nnz, self.raw_sum, self.sq_sum)


def _cat(values: Any) -> pd.Categorical:
    import pandas as pd

    return pd.Categorical(np.asarray(values, dtype=object))


def _label_columns(d: Design) -> dict[str, Any]:
    """The label/ontology obs columns, from each cell's source dataset (what was measured)."""
    n = d.n_cells
    spec_rows = d.datasets.iloc[d.cell_dataset]
    assays = spec_rows["assay"].to_numpy()
    tissue = spec_rows["tissue"].to_numpy()
    sex = np.where(d.cell_donor % 2 == 0, "female", "male")
    human = d.human
    return {
        "dataset_id": _cat(d.datasets["dataset_id"].to_numpy()[d.obs_dataset]),
        "tissue_general_ontology_term_id": _cat([TISSUES[t] for t in tissue]),
        "tissue_general": _cat(tissue),
        "assay_ontology_term_id": _cat([ASSAYS[a][0] for a in assays]),
        "assay": _cat(assays),
        "cell_type_ontology_term_id": _cat(np.asarray(d.type_ids, dtype=object)[d.cell_type]),
        "cell_type": _cat(np.asarray(d.type_names, dtype=object)[d.cell_type]),
        "development_stage_ontology_term_id": _cat(
            np.full(n, "HsapDv:0000258" if human else "MmusDv:0000110")
        ),
        "development_stage": _cat(np.full(n, "adult stage" if not human else "adult")),
        "disease_ontology_term_id": _cat(np.full(n, "PATO:0000461")),
        "disease": _cat(np.full(n, "normal")),
        "donor_id": _cat(d.donors["donor_id"].to_numpy()[d.cell_donor]),
        "self_reported_ethnicity_ontology_term_id": _cat(np.full(n, "unknown" if human else "na")),
        "self_reported_ethnicity": _cat(np.full(n, "unknown" if human else "na")),
        "sex_ontology_term_id": _cat(np.where(sex == "female", "PATO:0000383", "PATO:0000384")),
        "sex": _cat(sex),
        "suspension_type": _cat(spec_rows["suspension_type"].to_numpy()),
        "tissue_ontology_term_id": _cat([TISSUES[t] for t in tissue]),
        "tissue": _cat(tissue),
        "tissue_type": _cat(np.full(n, "tissue")),
    }


def obs_frame(d: Design, stats: CellStats) -> pd.DataFrame:
    """obs: the label columns, ``is_primary_data``, ``observation_joinid`` and computed columns.

    A non-primary copy keeps its source cell's ``observation_joinid`` (as CELLxGENE does).
    """
    import pandas as pd

    prefix = "hs" if d.human else "mm"
    origin = np.where(d.is_dup, d.dup_source, np.arange(d.n_cells))
    mean, var = stats.mean_and_variance()
    return pd.DataFrame(
        {
            **_label_columns(d),
            "is_primary_data": ~d.is_dup,
            "observation_joinid": np.array([f"{prefix}-obs-{i:09d}" for i in origin], dtype=object),
            "nnz": stats.nnz,
            "n_measured_vars": d.measured[d.cell_dataset].sum(axis=1).astype(np.int64),
            "raw_sum": stats.raw_sum.astype(np.float32),
            "raw_mean_nnz": mean.astype(np.float32),
            "raw_variance_nnz": var.astype(np.float32),
        }
    )


def var_frame(d: Design, var_nnz: npt.NDArray[np.int64]) -> pd.DataFrame:
    """var; ``n_measured_obs`` counts the cells whose (source) dataset measures the gene."""
    import pandas as pd

    per_ds = np.bincount(d.cell_dataset, minlength=len(d.datasets))
    return pd.DataFrame(
        {
            "feature_id": d.gene_ids,
            "feature_name": d.gene_names,
            "feature_length": d.gene_lengths,
            "nnz": var_nnz.astype(np.int64),
            "n_measured_obs": (per_ds[:, None] * d.measured).sum(axis=0).astype(np.int64),
        }
    )


def dataset_rows(d: Design, seed: int) -> list[dict[str, Any]]:
    """census_info/datasets rows of one organism, in dataset order."""
    counts = np.bincount(d.obs_dataset, minlength=len(d.datasets))
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
                "dataset_total_cell_count": int(counts[di]),
            }
        )
    return rows
