"""The Census schema (census-schema 2.x) that every census we write follows.

``build-census`` and the mini census (``demo-data``) both write through
:mod:`census_scvi.soma._writer` with these column lists, so both carry one
``census_schema_version``. The obs/var/datasets columns follow ``reference/census-schema.md``;
string obs columns are stored as categoricals (dictionary/enumeration), as the Census does, except
``observation_joinid``.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CATEGORY_PAIRS",
    "CELL_COUNT_COLUMNS",
    "COMPUTED_OBS",
    "DATASET_COLUMNS",
    "MAPPABLE_OBS",
    "OBS_COLUMNS",
    "OBS_KEY",
    "ORGANISM_COLUMNS",
    "ORGANISM_TERMS",
    "PRESENCE_MATRIX",
    "SCHEMA_VERSION",
    "SUMMARY_COLUMNS",
    "UNKNOWN",
    "VAR_COLUMNS",
    "VAR_ID",
    "ColumnKind",
    "organism_label",
]

ColumnKind = Literal["category", "string", "bool", "int64", "float32"]

SCHEMA_VERSION = "2.4.0"
UNKNOWN = "unknown"
PRESENCE_MATRIX = "feature_dataset_presence_matrix"

# obs, in the Census order
OBS_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("dataset_id", "category"),
    ("tissue_general_ontology_term_id", "category"),
    ("tissue_general", "category"),
    ("assay_ontology_term_id", "category"),
    ("assay", "category"),
    ("cell_type_ontology_term_id", "category"),
    ("cell_type", "category"),
    ("development_stage_ontology_term_id", "category"),
    ("development_stage", "category"),
    ("disease_ontology_term_id", "category"),
    ("disease", "category"),
    ("donor_id", "category"),
    ("is_primary_data", "bool"),
    ("observation_joinid", "string"),
    ("self_reported_ethnicity_ontology_term_id", "category"),
    ("self_reported_ethnicity", "category"),
    ("sex_ontology_term_id", "category"),
    ("sex", "category"),
    ("suspension_type", "category"),
    ("tissue_ontology_term_id", "category"),
    ("tissue", "category"),
    ("tissue_type", "category"),
    ("nnz", "int64"),
    ("n_measured_vars", "int64"),
    ("raw_sum", "float32"),
    ("raw_mean_nnz", "float32"),
    ("raw_variance_nnz", "float32"),
)
# One more obs column, beyond the Census schema: the unique cell key tiledbsoma's append
# registration matches on, "<dataset_id>:<obs name in the source h5ad>". (observation_joinid is
# not unique: CELLxGENE repeats it for the non-primary copies of a cell in other datasets. The
# name is not tiledbsoma's "obs_id", which its export would turn into the obs index.)
OBS_KEY = "source_obs_id"
COMPUTED_OBS = frozenset({"nnz", "n_measured_vars", "raw_sum", "raw_mean_nnz", "raw_variance_nnz"})
# what --columns may map (computed columns come from the counts, never from the user)
MAPPABLE_OBS = tuple(name for name, _ in OBS_COLUMNS if name not in COMPUTED_OBS)

VAR_ID = "feature_id"  # the var column genes are keyed on (Ensembl ids)
VAR_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("feature_id", "string"),
    ("feature_name", "string"),
    ("feature_length", "int64"),
    ("nnz", "int64"),
    ("n_measured_obs", "int64"),
)

# census_info/datasets
DATASET_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("citation", "string"),
    ("collection_id", "string"),
    ("collection_name", "string"),
    ("collection_doi", "string"),
    ("collection_doi_label", "string"),
    ("dataset_id", "string"),
    ("dataset_version_id", "string"),
    ("dataset_title", "string"),
    ("dataset_h5ad_path", "string"),
    ("dataset_total_cell_count", "int64"),
)

# census_info/summary: one row per label
SUMMARY_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (("label", "string"), ("value", "string"))

# census_info/summary_cell_counts: one row per (organism, category, label)
CELL_COUNT_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("organism", "string"),
    ("category", "string"),
    ("label", "string"),
    ("ontology_term_id", "string"),
    ("total_cell_count", "int64"),
    ("unique_cell_count", "int64"),
)

# census_info/organisms: one row per experiment of census_data
ORGANISM_COLUMNS: tuple[tuple[str, ColumnKind], ...] = (
    ("organism_ontology_term_id", "string"),
    ("organism_label", "string"),
    ("organism", "string"),
)

# summary_cell_counts categories: category -> (label column, ontology id column or None)
CATEGORY_PAIRS: tuple[tuple[str, str | None], ...] = (
    ("cell_type", "cell_type_ontology_term_id"),
    ("assay", "assay_ontology_term_id"),
    ("tissue", "tissue_ontology_term_id"),
    ("tissue_general", "tissue_general_ontology_term_id"),
    ("disease", "disease_ontology_term_id"),
    ("self_reported_ethnicity", "self_reported_ethnicity_ontology_term_id"),
    ("sex", "sex_ontology_term_id"),
    ("suspension_type", None),
)

ORGANISM_TERMS = {
    "homo_sapiens": "NCBITaxon:9606",
    "mus_musculus": "NCBITaxon:10090",
    "callithrix_jacchus": "NCBITaxon:9483",
    "macaca_mulatta": "NCBITaxon:9544",
    "pan_troglodytes": "NCBITaxon:9598",
}


def organism_label(organism: str) -> str:
    """``'homo_sapiens'`` -> ``'Homo sapiens'`` (census_info's organism labels)."""
    return organism.replace("_", " ").capitalize()
