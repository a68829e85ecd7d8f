"""``census_info``: the summary, datasets, summary_cell_counts and organisms tables.

Written by both ``build-census`` and the mini census, after their experiments, from what the
census holds: cell counts come from every experiment's obs, the organisms table from
``census_data``'s members, so the tables always describe the census as it is.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.constants import CENSUS_DATA, CENSUS_INFO
from census_scvi.soma._frames import read_dataframe
from census_scvi.soma._schema import (
    CATEGORY_PAIRS,
    CELL_COUNT_COLUMNS,
    DATASET_COLUMNS,
    ORGANISM_COLUMNS,
    ORGANISM_TERMS,
    SCHEMA_VERSION,
    SUMMARY_COLUMNS,
    UNKNOWN,
    organism_label,
)
from census_scvi.soma._writer import create_dataframe, open_collection, schema_table

if TYPE_CHECKING:
    import pandas as pd
    import tiledbsoma as soma

__all__ = ["cell_counts", "write_census_info"]


def _category_rows(obs: pd.DataFrame, primary: np.ndarray, label: str) -> list[dict[str, Any]]:
    """One row per (label[, ontology id]) of each category column, in string order.

    Grouped on the categorical codes (``observed=True``): converting every cell's label to a
    Python string first cost ~60 bytes per cell and column (0.5 GiB at a million cells).
    """
    rows: list[dict[str, Any]] = []
    for category, term in CATEGORY_PAIRS:
        if category not in obs.columns:
            continue
        keys = [category] + ([term] if term and term in obs.columns else [])
        frame = obs[keys].assign(_p=primary.astype(np.int64), _n=1)
        grouped = (
            frame.groupby(keys, sort=False, observed=True, dropna=False)[["_n", "_p"]]
            .sum()
            .reset_index()
        )
        for k in keys:
            grouped[k] = grouped[k].astype(str)
        grouped = grouped.groupby(keys, sort=True)[["_n", "_p"]].sum().reset_index()
        for _, g in grouped.iterrows():
            rows.append(
                {
                    "organism": label,
                    "category": category,
                    "label": g[category],
                    "ontology_term_id": g[term] if len(keys) > 1 else "na",
                    "total_cell_count": int(g["_n"]),
                    "unique_cell_count": int(g["_p"]),
                }
            )
    return rows


def cell_counts(census: soma.Collection) -> tuple[pd.DataFrame, int, int]:
    """``summary_cell_counts`` rows (an ``all`` row and one per category label, per organism), and
    the census's total and unique (primary) cell counts."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    total = unique = 0
    data = census[CENSUS_DATA]
    wanted = ["is_primary_data"] + [c for pair in CATEGORY_PAIRS for c in pair if c]
    for org in sorted(data):
        exp = data[org]
        if "obs" not in exp:
            continue
        obs = read_dataframe(exp.obs, wanted)
        primary = (
            obs["is_primary_data"].to_numpy().astype(bool)
            if "is_primary_data" in obs.columns
            else np.ones(len(obs), bool)
        )
        label = organism_label(str(org))
        total += len(obs)
        unique += int(primary.sum())
        rows.append(
            {
                "organism": label,
                "category": "all",
                "label": "na",
                "ontology_term_id": "na",
                "total_cell_count": len(obs),
                "unique_cell_count": int(primary.sum()),
            }
        )
        rows += _category_rows(obs, primary, label)
    frame = pd.DataFrame(rows, columns=[c for c, _ in CELL_COUNT_COLUMNS])
    return frame, total, unique


def _summary(
    previous: Mapping[str, str] | None, *, dataset_schema_version: str, total: int, unique: int
) -> pd.DataFrame:
    """The standard labels first (``census_schema_version`` kept from ``previous``), then the rest."""
    import pandas as pd

    previous = dict(previous or {})
    values = {
        "census_schema_version": previous.pop("census_schema_version", SCHEMA_VERSION),
        "census_build_date": _dt.date.today().isoformat(),
        "dataset_schema_version": dataset_schema_version,
        "total_cell_count": str(total),
        "unique_cell_count": str(unique),
    }
    values.update({k: v for k, v in previous.items() if k not in values})
    return pd.DataFrame({"label": list(values), "value": list(values.values())})


def write_census_info(
    root: Path,
    *,
    datasets: pd.DataFrame,
    summary: Mapping[str, str] | None = None,
    dataset_schema_version: str,
) -> tuple[int, int]:
    """(Re)write ``census_info/{summary, datasets, summary_cell_counts, organisms}`` of ``root``.

    Parameters
    ----------
    root
        The census root folder (its experiments already written).
    datasets
        ``census_info/datasets`` rows with the :data:`~census_scvi.soma._schema.DATASET_COLUMNS`;
        the row number is the ``soma_joinid`` the presence matrices' rows refer to.
    summary
        Summary labels to keep or add (a previous summary, the generator's seed...).
        ``census_schema_version`` is kept when given, else :data:`SCHEMA_VERSION`; the build date,
        ``dataset_schema_version`` and the cell counts are always set here.
    dataset_schema_version
        The CELLxGENE dataset schema of the datasets.

    Returns
    -------
    The total and unique (primary) cell counts of the whole census.
    """
    import pandas as pd

    info_uri = f"{root}/{CENSUS_INFO}"
    with open_collection(root, "w") as census:
        if CENSUS_INFO not in census:
            census.add_new_collection(CENSUS_INFO).close()
    with open_collection(root) as census:
        counts, total, unique = cell_counts(census)
        organisms = sorted(census[CENSUS_DATA])
    org = pd.DataFrame(
        {
            "organism_ontology_term_id": [ORGANISM_TERMS.get(o, UNKNOWN) for o in organisms],
            "organism_label": [organism_label(o) for o in organisms],
            "organism": organisms,
        }
    )
    tables = {
        "summary": schema_table(
            _summary(
                summary, dataset_schema_version=dataset_schema_version, total=total, unique=unique
            ),
            SUMMARY_COLUMNS,
        ),
        "datasets": schema_table(datasets, DATASET_COLUMNS),
        "summary_cell_counts": schema_table(counts, CELL_COUNT_COLUMNS),
        "organisms": schema_table(org, ORGANISM_COLUMNS),
    }
    for key, table in tables.items():
        create_dataframe(info_uri, key, table, root=root)
    return total, unique
