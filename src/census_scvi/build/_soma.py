"""``build-census`` SOMA side: staging copy, tiledbsoma ingestion, census-wide columns, census_info.

Safety model: every build writes into a *staging* census next to ``OUT_URI`` and only replaces
``OUT_URI`` (two renames) once everything succeeded, so a failure mid-append leaves the existing
census exactly as it was. When appending, the staging census starts as a clone of the existing one
in which TileDB fragment files (immutable once written: TileDB never modifies a committed fragment,
it only adds new ones) are hard links and every other file (schemas, metadata, commit markers,
group membership) is copied, so staging costs little disk and time even for a large census.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from census_scvi.build._input import PreparedDataset
from census_scvi.constants import CENSUS_DATA, CENSUS_INFO, MEASUREMENT, X_RAW
from census_scvi.errors import CensusScviError
from census_scvi.soma._schema import (
    CATEGORY_PAIRS,
    DATASET_COLUMNS,
    OBS_KEY,
    ORGANISM_TERMS,
    PRESENCE_MATRIX,
    SCHEMA_VERSION,
    UNKNOWN,
)

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import pyarrow as pa
    import tiledbsoma as soma

__all__ = [
    "clone_census",
    "create_census_root",
    "dataset_organisms",
    "drop_member",
    "export_chunks",
    "gene_nnz",
    "has_obs_key",
    "ingest",
    "open_collection",
    "read_dataframe",
    "read_presence",
    "staging_path",
    "swap_into_place",
    "write_census_info",
    "write_presence",
    "write_var_stats",
]

logger = logging.getLogger(__name__)

VAR_ID = "feature_id"
CHUNK_CELLS = 65_536  # cells per chunk when re-ingesting an existing experiment
# non-zeros per X write. tiledbsoma's default (100M) holds the whole of a typical h5ad as one
# Arrow COO table plus TileDB's sorted copy: ~10x the CSR size in RSS. Smaller chunks bound that
# (see docs/benchmarks.md, "Build census").
WRITE_CHUNK_NNZ = 16_000_000


def _path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def open_collection(uri: str | Path, mode: Literal["r", "w"] = "r") -> Any:
    """Open a SOMA collection of any kind (Collection, Experiment, Measurement), typed loosely."""
    import tiledbsoma as soma

    return soma.open(str(uri), mode)


# ------------------------------------------------------------------------------------------
# staging
# ------------------------------------------------------------------------------------------
def staging_path(out: Path, tag: str) -> Path:
    """A sibling of ``out`` (same file system, so the final rename is cheap)."""
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clone_census(src: Path, dst: Path) -> None:
    """Copy the census at ``src`` to ``dst``: fragment files hard-linked, everything else copied.

    Falls back to copying a file when a hard link is impossible (another file system).
    """

    def link_or_copy(s: str, d: str) -> object:
        if "__fragments" in Path(s).parts:
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    _remove(dst)
    shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)
    _check_self_contained(dst)


def _check_self_contained(root: Path) -> None:
    """Every member of the cloned census must resolve inside the clone (relative member URIs)."""
    import tiledbsoma as soma

    base = str(root.resolve())

    def walk(coll: Any, where: str) -> None:
        for key in coll:
            child = coll[key]
            if not str(_path(child.uri).resolve()).startswith(base):
                msg = (
                    f"census member '{where}{key}' is stored by absolute URI ({child.uri}), so "
                    "the census cannot be staged safely for --append"
                )
                raise CensusScviError(msg, hint="build a new census with build-census instead")
            if isinstance(child, soma.Collection | soma.Experiment | soma.Measurement):
                walk(child, f"{where}{key}/")

    with open_collection(root) as census:
        walk(census, "")


def create_census_root(path: Path) -> None:
    """An empty census: the root collection with ``census_info`` and ``census_data``."""
    import tiledbsoma as soma

    _remove(path)
    with soma.Collection.create(str(path)) as root:  # type: ignore[var-annotated]
        root.metadata["created_by"] = "census-scvi build-census"
        root.add_new_collection(CENSUS_INFO).close()
        root.add_new_collection(CENSUS_DATA).close()


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` onto ``out``; the previous ``out`` is kept until the rename succeeded."""
    if not out.exists():
        staging.replace(out)
        return
    old = staging_path(out, "old")
    _remove(old)
    out.replace(old)
    try:
        staging.replace(out)
    except BaseException:
        old.replace(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def drop_member(parent_uri: str, key: str, root: Path) -> None:
    """Remove member ``key`` of a staged collection and delete its folder (inside ``root`` only)."""

    with open_collection(parent_uri, "w") as parent:
        if key not in parent:
            return
        uri = parent[key].uri
        del parent[key]
    path = _path(uri)
    if str(path.resolve()).startswith(str(root.resolve())) and path.exists():
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------------
# reading an existing census
# ------------------------------------------------------------------------------------------
def read_dataframe(df: Any, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A whole SOMA dataframe as pandas, in ``soma_joinid`` order."""
    names = None if columns is None else [c for c in columns if c in df.schema.names]
    table = df.read(column_names=names).concat()
    out = table.to_pandas()
    if "soma_joinid" in out.columns:
        out = out.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
    return out


def dataset_organisms(census: soma.Collection) -> dict[str, str]:
    """``dataset_id -> organism`` for every experiment of ``census_data`` (reads obs dataset_id)."""
    out: dict[str, str] = {}
    data = census[CENSUS_DATA]
    for org in data:
        exp = data[org]
        if "obs" not in exp or "dataset_id" not in exp.obs.schema.names:
            continue
        ids = read_dataframe(exp.obs, ["dataset_id"])["dataset_id"].astype(str).unique()
        for d in ids:
            out.setdefault(str(d), str(org))
    return out


def read_presence(exp: soma.Experiment) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(dataset row, var soma_joinid, value)`` of an experiment's presence matrix, or None."""
    ms: Any = exp.ms[MEASUREMENT]
    if PRESENCE_MATRIX not in ms:
        return None
    t = ms[PRESENCE_MATRIX].read().tables().concat()
    return (
        t["soma_dim_0"].to_numpy(),
        t["soma_dim_1"].to_numpy(),
        t["soma_data"].to_numpy(zero_copy_only=False).astype(bool),
    )


def has_obs_key(exp: soma.Experiment) -> bool:
    """Whether the experiment's obs has the registration key column (built by build-census)."""
    return OBS_KEY in exp.obs.schema.names


def gene_nnz(exp: soma.Experiment, rows: np.ndarray, n_var: int) -> np.ndarray:
    """Per var soma_joinid: how many of the cells ``rows`` have a non-zero count (streamed)."""
    out = np.zeros(n_var, dtype=np.int64)
    x: Any = exp.ms[MEASUREMENT].X[X_RAW]
    for t in x.read(coords=(rows,)).tables():
        out += np.bincount(t["soma_dim_1"].to_numpy(), minlength=n_var)[:n_var]
    return out


def export_chunks(
    exp: soma.Experiment, rows: np.ndarray, *, chunk_cells: int = CHUNK_CELLS
) -> Iterator[ad.AnnData]:
    """The cells ``rows`` (sorted soma_joinids) of an existing experiment, in chunks, as stored.

    Every chunk carries the whole var (so var soma_joinids stay as they were) and obs as stored,
    with the registration key added (``<dataset_id>:#<soma_joinid>``) when the census lacks it.
    """
    import anndata as ad
    import pandas as pd
    import tiledbsoma as soma

    var = read_dataframe(exp.ms[MEASUREMENT].var)
    var = var.set_index(pd.Index(var[VAR_ID].astype(str).to_numpy()))  # unnamed
    var = var.drop(columns=["soma_joinid", VAR_ID])
    for start in range(0, len(rows), chunk_cells):
        chunk = rows[start : start + chunk_cells]
        with exp.axis_query(MEASUREMENT, obs_query=soma.AxisQuery(coords=(chunk,))) as q:
            a = q.to_anndata(X_RAW)
        obs = a.obs
        if obs.index.name is not None and obs.index.name not in obs.columns:
            obs = obs.reset_index()
        joinids = obs["soma_joinid"].to_numpy()
        if OBS_KEY not in obs.columns:
            ds = obs["dataset_id"].astype(str).to_numpy()
            obs[OBS_KEY] = np.asarray([f"{d}:#{j}" for d, j in zip(ds, joinids, strict=True)])
        obs = obs.drop(columns=["soma_joinid"])
        obs.index = pd.Index([str(j) for j in joinids])
        x = a.X.tocsr().astype(np.float32) if a.X is not None else None
        yield ad.AnnData(X=x, obs=obs, var=var.copy())


# ------------------------------------------------------------------------------------------
# ingestion
# ------------------------------------------------------------------------------------------
def _conform(df: pd.DataFrame, schema: pa.Schema, *, what: str, index_col: str) -> pd.DataFrame:
    """Give ``df`` exactly the columns and types of an existing SOMA dataframe's schema."""
    import pandas as pd
    import pyarrow as pa

    out: dict[str, Any] = {}
    n = len(df)
    for f in schema:
        name = f.name
        if name in ("soma_joinid", index_col):
            continue
        t = f.type
        if name in df.columns:
            col = df[name]
        elif pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
            col = pd.Series([UNKNOWN] * n, index=df.index)
        elif pa.types.is_floating(t):
            col = pd.Series(np.full(n, np.nan), index=df.index)
        else:
            msg = (
                f"the existing census has {what} column '{name}' ({t}) that this input cannot fill"
            )
            raise CensusScviError(msg, hint="add the column to your file or map it with --columns")
        if pa.types.is_dictionary(t):
            col = pd.Categorical(col.astype(str).to_numpy())
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            col = col.astype(str).astype(object)
        else:
            col = col.astype(t.to_pandas_dtype())
        out[name] = col
    dropped = [c for c in df.columns if c not in out and c != index_col]
    if dropped:
        logger.info("the existing census has no %s column(s) %s; not stored", what, dropped)
    return pd.DataFrame(out, index=df.index)


def ingest(census_data_uri: str, organism: str, adata: ad.AnnData, *, label: str) -> None:
    """Append Census-shaped ``adata`` to ``census_data/<organism>`` with tiledbsoma.io.

    tiledbsoma's multi-file append workflow: ``register_anndatas`` (cells keyed by ``obs_id``,
    genes by ``feature_id``; new genes extend the var axis), ``prepare_experiment`` (resize,
    extend categories), then ``from_anndata`` with the registration. obs/var are first given the
    existing experiment's exact columns and types.
    """
    import tiledbsoma as soma
    import tiledbsoma.io as tio

    exp_uri = f"{census_data_uri}/{organism}"
    exists = soma.Experiment.exists(exp_uri)
    if exists:
        with soma.Experiment.open(exp_uri) as exp:
            obs_schema = exp.obs.schema
            var_schema = exp.ms[MEASUREMENT].var.schema
        adata.obs = _conform(adata.obs, obs_schema, what="obs", index_col="")
        adata.var = _conform(adata.var, var_schema, what="var", index_col=VAR_ID)
    try:
        registration = tio.register_anndatas(
            exp_uri if exists else None,
            [adata],
            measurement_name=MEASUREMENT,
            obs_field_name=OBS_KEY,
            var_field_name=VAR_ID,
        )
    except soma.SOMAError as e:
        first = str(e).splitlines()[0]
        msg = f"{label} cannot be appended: {first}"
        raise CensusScviError(msg) from None
    if exists:
        registration.prepare_experiment(exp_uri)
    tio.from_anndata(
        exp_uri,
        adata,
        MEASUREMENT,
        platform_config={"tiledb": {"create": {"goal_chunk_nnz": WRITE_CHUNK_NNZ}}},
        registration_mapping=registration,
        obs_id_name=OBS_KEY,
        var_id_name=VAR_ID,
        X_layer_name=X_RAW,
        uns_keys=[],
    )
    if not exists:
        with open_collection(census_data_uri, "w") as data:
            if organism not in data:
                with soma.Experiment.open(exp_uri) as exp:
                    data.set(organism, exp, use_relative_uri=True)


# ------------------------------------------------------------------------------------------
# census-wide columns
# ------------------------------------------------------------------------------------------
def write_var_stats(
    exp_uri: str,
    added: Iterable[PreparedDataset],
    removed: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Update var ``nnz`` and ``n_measured_obs``: stored values - ``removed`` + ``added``.

    ``removed`` holds ``(nnz, n_measured_obs)`` per var soma_joinid of replaced datasets. Genes
    new to this build start from 0. Written with ``tiledbsoma.io.update_var``.
    """
    import pandas as pd
    import tiledbsoma as soma
    import tiledbsoma.io as tio

    with soma.Experiment.open(exp_uri) as exp:
        var = read_dataframe(exp.ms[MEASUREMENT].var)
    index = pd.Index(var[VAR_ID].astype(str))
    nnz = var["nnz"].to_numpy().astype(np.int64)
    measured = var["n_measured_obs"].to_numpy().astype(np.int64)
    if removed is not None:
        n = min(len(removed[0]), len(nnz))
        nnz[:n] -= removed[0][:n]
        measured[:n] -= removed[1][:n]
    for ds in added:
        cols = index.get_indexer(ds.adata.var_names)
        assert (cols >= 0).all(), "ingested genes missing from var"
        nnz[cols] += ds.gene_nnz
        measured[cols] += ds.n_cells
    assert (nnz >= 0).all() and (measured >= 0).all(), "negative var statistics"
    var["nnz"] = nnz
    var["n_measured_obs"] = measured
    new = var.drop(columns=["soma_joinid"]).set_index(VAR_ID).rename_axis(None)
    with soma.Experiment.open(exp_uri, "w") as exp:
        tio.update_var(exp, new, MEASUREMENT, default_index_name=VAR_ID)
    return var


def write_presence(
    exp_uri: str,
    root: Path,
    *,
    shape: tuple[int, int],
    old: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    keep_rows: Sequence[int],
    new: Iterable[tuple[int, PreparedDataset]],
    var: pd.DataFrame,
) -> None:
    """(Re)write ``ms/RNA/feature_dataset_presence_matrix`` (datasets x var, bool).

    Stored coordinates are the genes each dataset measured (its var); the value is True when the
    gene has a non-zero count in the dataset (the Census definition), False otherwise.
    """
    import pandas as pd
    import pyarrow as pa
    import tiledbsoma as soma

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    if old is not None:
        sel = np.isin(old[0], np.asarray(list(keep_rows), dtype=np.int64))
        rows.append(old[0][sel])
        cols.append(old[1][sel])
        vals.append(old[2][sel])
    index = pd.Index(var[VAR_ID].astype(str))
    joinids = var["soma_joinid"].to_numpy()
    for row, ds in new:
        c = joinids[index.get_indexer(ds.adata.var_names)]
        rows.append(np.full(len(c), row, dtype=np.int64))
        cols.append(c.astype(np.int64))
        vals.append(ds.gene_nnz > 0)
    ms_uri = f"{exp_uri}/ms/{MEASUREMENT}"
    drop_member(ms_uri, PRESENCE_MATRIX, root)
    with soma.Measurement.open(ms_uri, "w") as ms:
        arr = ms.add_new_sparse_ndarray(PRESENCE_MATRIX, type=pa.bool_(), shape=shape)
        uri = arr.uri
        arr.close()
    if rows and sum(len(r) for r in rows):
        table = pa.table(
            {
                "soma_dim_0": np.concatenate(rows).astype(np.int64),
                "soma_dim_1": np.concatenate(cols).astype(np.int64),
                "soma_data": np.concatenate(vals).astype(bool),
            }
        )
        with soma.SparseNDArray.open(uri, "w") as w:
            w.write(table)


# ------------------------------------------------------------------------------------------
# census_info
# ------------------------------------------------------------------------------------------
def _arrow_table(df: pd.DataFrame) -> pa.Table:
    import pyarrow as pa

    arrays = {"soma_joinid": pa.array(np.arange(len(df), dtype=np.int64))}
    for name in df.columns:
        col = df[name]
        if col.dtype.kind in "iu":
            arrays[name] = pa.array(col.to_numpy().astype(np.int64))
        else:
            arrays[name] = pa.array(col.astype(str).tolist(), type=pa.large_string())
    return pa.table(arrays)


def _write_table(parent_uri: str, key: str, df: pd.DataFrame, root: Path) -> None:
    """Create dataframe ``key`` under ``parent_uri`` and write ``df`` (soma_joinid = row number).

    Written through a freshly opened handle: with tiledbsoma 2.3.0, writing through the handle
    ``add_new_dataframe`` returns can store enumeration columns with empty value lists.
    """
    import tiledbsoma as soma

    table = _arrow_table(df)
    drop_member(parent_uri, key, root)
    schema = table.schema.remove(table.schema.get_field_index("soma_joinid"))
    with open_collection(parent_uri, "w") as parent:
        sdf = parent.add_new_dataframe(
            key,
            schema=schema,
            index_column_names=["soma_joinid"],
            domain=[(0, max(len(df), 1) - 1)],
        )
        uri = sdf.uri
        sdf.close()
    with soma.DataFrame.open(uri, "w") as w:
        w.write(table)


def _organism_label(organism: str) -> str:
    return organism.replace("_", " ").capitalize()


def _cell_counts(census: soma.Collection) -> tuple[pd.DataFrame, int, int]:
    """``summary_cell_counts`` rows, and total and unique (primary) cell counts."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    total = unique = 0
    data = census[CENSUS_DATA]
    for org in sorted(data):
        exp = data[org]
        if "obs" not in exp:
            continue
        wanted = ["is_primary_data"] + [c for pair in CATEGORY_PAIRS for c in pair if c]
        obs = read_dataframe(exp.obs, wanted)
        primary = (
            obs["is_primary_data"].to_numpy().astype(bool)
            if "is_primary_data" in obs.columns
            else np.ones(len(obs), bool)
        )
        label = _organism_label(str(org))
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
        for category, term in CATEGORY_PAIRS:
            if category not in obs.columns:
                continue
            keys = [category] + ([term] if term and term in obs.columns else [])
            frame = obs[keys].astype(str).assign(_p=primary.astype(np.int64), _n=1)
            grouped = frame.groupby(keys, sort=True)[["_n", "_p"]].sum().reset_index()
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
    return pd.DataFrame(rows), total, unique


def write_census_info(
    root: Path,
    *,
    datasets: pd.DataFrame,
    old_summary: pd.DataFrame | None,
    dataset_schema_version: str,
) -> tuple[int, int]:
    """(Re)write ``census_info/{summary, datasets, summary_cell_counts, organisms}``.

    Returns the total and unique (primary) cell counts of the whole census.
    """
    import pandas as pd

    info_uri = f"{root}/{CENSUS_INFO}"
    with open_collection(root, "w") as census:
        if CENSUS_INFO not in census:
            census.add_new_collection(CENSUS_INFO).close()
    with open_collection(root) as census:
        counts, total, unique = _cell_counts(census)
        organisms = sorted(census[CENSUS_DATA])
    values: dict[str, str] = {}
    if old_summary is not None and {"label", "value"} <= set(old_summary.columns):
        values = dict(
            zip(old_summary["label"].astype(str), old_summary["value"].astype(str), strict=True)
        )
    values.setdefault("census_schema_version", SCHEMA_VERSION)
    values["census_build_date"] = _dt.date.today().isoformat()
    values["dataset_schema_version"] = dataset_schema_version
    values["total_cell_count"] = str(total)
    values["unique_cell_count"] = str(unique)
    summary = pd.DataFrame({"label": list(values), "value": list(values.values())})
    org = pd.DataFrame(
        {
            "organism_ontology_term_id": [ORGANISM_TERMS.get(o, UNKNOWN) for o in organisms],
            "organism_label": [_organism_label(o) for o in organisms],
            "organism": organisms,
        }
    )
    _write_table(info_uri, "summary", summary, root)
    _write_table(info_uri, "datasets", datasets[[c for c, _ in DATASET_COLUMNS]], root)
    _write_table(info_uri, "summary_cell_counts", counts, root)
    _write_table(info_uri, "organisms", org, root)
    return total, unique
