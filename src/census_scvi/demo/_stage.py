"""The mini census: a small SOMA census in the Census layout and schema, with realistic counts.

The counts follow a Splatter-style model, so the pipeline's choices (HVGs, batch label, scVI's
batch correction) matter on it:

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
the cell count (obs metadata, a few arrays per cell, is held in memory).

Hand-written because no library generates Census-schema SOMA data; Splatter itself is R-only.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from census_scvi.constants import CENSUS_DATA, CENSUS_INFO, MEASUREMENT, X_RAW
from census_scvi.errors import CensusScviError
from census_scvi.progress import track

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd
    import pyarrow as pa
    import tiledbsoma as soma

__all__ = ["MiniCensusResult", "OrganismSummary", "make_mini_census"]

logger = logging.getLogger(__name__)

BLOCK_CELLS = 2048  # cells per seeded generation block (fixed: part of the determinism contract)
_WRITE_NNZ = 4_000_000  # buffered non-zeros per X write (bounded memory, few fragments)
NNZ_MIN = 300  # the Census model filter threshold the low-quality cells fall under

# (class, [(cell type, CL id), ...])
_CELL_TYPES: list[tuple[str, list[tuple[str, str]]]] = [
    (
        "T cell",
        [
            ("CD4-positive, alpha-beta T cell", "CL:0000624"),
            ("CD8-positive, alpha-beta T cell", "CL:0000625"),
            ("regulatory T cell", "CL:0000815"),
        ],
    ),
    ("natural killer cell", [("natural killer cell", "CL:0000623")]),
    (
        "B cell",
        [
            ("naive B cell", "CL:0000788"),
            ("memory B cell", "CL:0000787"),
            ("plasma cell", "CL:0000786"),
        ],
    ),
    (
        "myeloid cell",
        [
            ("classical monocyte", "CL:0000860"),
            ("non-classical monocyte", "CL:0000875"),
            ("conventional dendritic cell", "CL:0000990"),
        ],
    ),
]

# assay label, ontology id, log-library-size mean, sd
_ASSAYS = {
    "10x 3' v2": ("EFO:0009899", np.log(2500.0), 0.45),
    "10x 3' v3": ("EFO:0009922", np.log(6000.0), 0.45),
    "10x 5' v1": ("EFO:0011025", np.log(4000.0), 0.45),
    "Smart-seq2": ("EFO:0008931", np.log(9000.0), 0.55),
}

# primary datasets: assay, suspension type, donors, tissue
_HUMAN_DATASETS = [
    ("10x 3' v3", "cell", 3, "blood"),
    ("10x 3' v3", "nucleus", 3, "blood"),
    ("10x 3' v2", "cell", 2, "blood"),
    ("10x 5' v1", "cell", 3, "lung"),
    ("Smart-seq2", "cell", 2, "blood"),
    ("10x 3' v2", "nucleus", 2, "lung"),
    ("10x 3' v3", "cell", 4, "blood"),
]
_MOUSE_DATASETS = [
    ("10x 3' v3", "cell", 2, "blood"),
    ("10x 3' v2", "nucleus", 2, "blood"),
    ("Smart-seq2", "cell", 2, "lung"),
]
_TISSUES = {"blood": "UBERON:0000178", "lung": "UBERON:0002048"}
_NON_PRIMARY_FRACTION = 0.10
_LOW_QUALITY_FRACTION = 0.03
_UNMEASURED_FRACTION = 0.05  # of genes, in the dataset that lacks some


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


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
@dataclass
class _Design:
    """Per-cell metadata and per-gene parameters for one organism (held in memory)."""

    organism: str
    n_cells: int
    n_genes: int
    gene_ids: list[str]
    gene_names: list[str]
    gene_lengths: npt.NDArray[np.int64]
    datasets: pd.DataFrame  # one row per dataset
    donors: pd.DataFrame  # one row per donor: dataset index, donor_id
    combo_props: npt.NDArray[np.float32]  # (n_types * n_donors, genes), rows sum to 1
    dispersion: npt.NDArray[np.float32]  # NB dispersion per gene
    measured: npt.NDArray[np.bool_]  # (n_datasets, genes)
    # per cell
    cell_dataset: npt.NDArray[np.int32]
    cell_donor: npt.NDArray[np.int32]
    cell_type: npt.NDArray[np.int32]
    log_lib: npt.NDArray[np.float32]
    dup_source: npt.NDArray[np.int64]  # -1 for primary cells, else the source cell's row
    type_names: list[str]
    type_ids: list[str]


def _design(organism: str, n_cells: int, n_genes: int, seed: int) -> _Design:
    import pandas as pd

    rng = np.random.default_rng([seed, 0 if organism == "homo_sapiens" else 1])
    human = organism == "homo_sapiens"
    spec = _HUMAN_DATASETS if human else _MOUSE_DATASETS
    prefix = "ENSG" if human else "ENSMUSG"
    gene_ids = [f"{prefix}{i + 1:011d}" for i in range(n_genes)]
    gene_names = [f"{'GENE' if human else 'Gene'}{i + 1}" for i in range(n_genes)]
    gene_lengths = rng.integers(400, 6000, n_genes).astype(np.int64)

    # gene base means: gamma, a few high-expression outliers (Splatter)
    base = rng.gamma(0.6, 1.0 / 0.3, n_genes)
    outliers = rng.random(n_genes) < 0.02
    base[outliers] *= rng.lognormal(1.5, 0.5, outliers.sum())

    # cell-type hierarchy: class DE then subtype DE on top
    type_names, type_ids, type_class = [], [], []
    for ci, (_, types) in enumerate(_CELL_TYPES):
        for name, cl in types:
            type_names.append(name)
            type_ids.append(cl)
            type_class.append(ci)
    n_types = len(type_names)

    def de_factors(n: int, prob: float, loc: float, scale: float) -> npt.NDArray[np.float64]:
        f = np.ones((n, n_genes))
        hit = rng.random((n, n_genes)) < prob
        mag = rng.lognormal(loc, scale, (n, n_genes))
        down = rng.random((n, n_genes)) < 0.5
        mag = np.where(down, 1.0 / mag, mag)
        f[hit] = mag[hit]
        return f

    class_f = de_factors(len(_CELL_TYPES), 0.10, 0.9, 0.4)
    sub_f = de_factors(n_types, 0.05, 0.7, 0.3)
    type_means = base[None, :] * class_f[type_class] * sub_f  # (n_types, genes)

    # datasets and donors, with gene-wise batch effects by assay, dataset, donor
    assay_f = {a: rng.lognormal(0.0, 0.35, n_genes) for a in _ASSAYS}
    nucleus_f = np.where(rng.random(n_genes) < 0.15, rng.lognormal(-0.8, 0.3, n_genes), 1.0)
    rows, donor_rows = [], []
    for di, (assay, susp, n_donors, tissue) in enumerate(spec):
        ds_id = f"{'hs' if human else 'mm'}-dataset-{di:02d}"
        rows.append(
            {
                "dataset_id": ds_id,
                "assay": assay,
                "suspension_type": susp,
                "tissue": tissue,
                "n_donors": n_donors,
                "primary": True,
            }
        )
        for k in range(n_donors):
            donor_rows.append({"dataset": di, "donor_id": f"{ds_id}-donor-{k}"})
    rows.append(
        {
            "dataset_id": f"{'hs' if human else 'mm'}-compilation",
            "assay": "",
            "suspension_type": "",
            "tissue": "",
            "n_donors": 0,
            "primary": False,
        }
    )
    datasets = pd.DataFrame(rows)
    donors = pd.DataFrame(donor_rows)
    n_primary_ds = len(spec)
    ds_f = rng.lognormal(0.0, 0.25, (n_primary_ds, n_genes))
    donor_f = rng.lognormal(0.0, 0.1, (len(donors), n_genes))

    combo = np.empty((n_types * len(donors), n_genes), dtype=np.float64)
    for d, drow in donors.iterrows():
        di = int(drow["dataset"])
        assay, susp = spec[di][0], spec[di][1]
        batch = assay_f[assay] * ds_f[di] * donor_f[int(str(d))]
        if susp == "nucleus":
            batch = batch * nucleus_f
        combo[int(str(d)) * n_types : (int(str(d)) + 1) * n_types] = type_means * batch[None, :]
    combo /= combo.sum(axis=1, keepdims=True)

    # one dataset does not measure a few genes
    measured = np.ones((len(datasets), n_genes), dtype=bool)
    lacking = n_primary_ds - 2 if n_primary_ds > 2 else 0
    measured[lacking, rng.random(n_genes) < _UNMEASURED_FRACTION] = False
    combo_measured = combo.copy()
    for d, drow in donors.iterrows():
        di = int(drow["dataset"])
        sl = slice(int(str(d)) * n_types, (int(str(d)) + 1) * n_types)
        combo_measured[sl] *= measured[di][None, :]
    combo_measured /= combo_measured.sum(axis=1, keepdims=True)

    # dispersion: higher for lowly expressed genes (biological coefficient of variation)
    bcv = 0.25 + 0.6 / np.sqrt(1.0 + base)
    dispersion = (bcv**2).astype(np.float32)

    # per-cell metadata; every block's last ~10% are non-primary duplicates of cells in the block
    comp = rng.dirichlet(np.full(n_types, 1.5), n_primary_ds)
    ds_weight = rng.dirichlet(np.full(n_primary_ds, 4.0))
    cell_dataset = rng.choice(n_primary_ds, size=n_cells, p=ds_weight).astype(np.int32)
    cell_type = np.empty(n_cells, dtype=np.int32)
    cell_donor = np.empty(n_cells, dtype=np.int32)
    for di in range(n_primary_ds):
        idx = np.flatnonzero(cell_dataset == di)
        cell_type[idx] = rng.choice(n_types, size=len(idx), p=comp[di])
        dset_donors = np.flatnonzero(donors["dataset"].to_numpy() == di)
        cell_donor[idx] = rng.choice(dset_donors, size=len(idx))
    log_lib = np.empty(n_cells, dtype=np.float32)
    for di in range(n_primary_ds):
        idx = cell_dataset == di
        _, mu, sd = _ASSAYS[spec[di][0]]
        log_lib[idx] = rng.normal(mu, sd, idx.sum())
    low = rng.random(n_cells) < _LOW_QUALITY_FRACTION
    log_lib[low] = rng.normal(np.log(120.0), 0.4, low.sum())

    dup_source = np.full(n_cells, -1, dtype=np.int64)
    for start in range(0, n_cells, BLOCK_CELLS):
        stop = min(start + BLOCK_CELLS, n_cells)
        n_dup = int(round((stop - start) * _NON_PRIMARY_FRACTION))
        if n_dup == 0 or stop - start - n_dup < 1:
            continue
        dups = np.arange(stop - n_dup, stop)
        dup_source[dups] = rng.integers(start, stop - n_dup, n_dup)
    is_dup = dup_source >= 0
    src = dup_source[is_dup]
    # a duplicate is the same cell (same donor, type, counts) seen in the compilation dataset
    cell_type[is_dup] = cell_type[src]
    cell_donor[is_dup] = cell_donor[src]
    log_lib[is_dup] = log_lib[src]

    return _Design(
        organism=organism,
        n_cells=n_cells,
        n_genes=n_genes,
        gene_ids=gene_ids,
        gene_names=gene_names,
        gene_lengths=gene_lengths,
        datasets=datasets,
        donors=donors,
        combo_props=combo_measured.astype(np.float32),
        dispersion=dispersion,
        measured=measured,
        cell_dataset=cell_dataset,  # the source dataset for duplicates (fixed up in obs)
        cell_donor=cell_donor,
        cell_type=cell_type,
        log_lib=log_lib,
        dup_source=dup_source,
        type_names=type_names,
        type_ids=type_ids,
    )


def _block_counts(d: _Design, start: int, stop: int, seed: int) -> npt.NDArray[np.float32]:
    """Dense counts for cells [start, stop): NB(mu, dispersion) with duplicates copied."""
    rng = np.random.default_rng([seed, 7 if d.organism == "homo_sapiens" else 8, start])
    n_types = len(d.type_names)
    combo_idx = d.cell_donor[start:stop].astype(np.int64) * n_types + d.cell_type[start:stop]
    lib = np.exp(d.log_lib[start:stop].astype(np.float64))
    mu = d.combo_props[combo_idx] * lib[:, None].astype(np.float32)
    shape = 1.0 / d.dispersion
    lam = rng.gamma(shape[None, :], 1.0, size=mu.shape).astype(np.float32)
    lam *= mu * d.dispersion[None, :]
    counts = rng.poisson(lam).astype(np.float32)
    dups = np.flatnonzero(d.dup_source[start:stop] >= 0)
    if len(dups):
        counts[dups] = counts[d.dup_source[start:stop][dups] - start]
    return counts


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------
def _create_dataframe(
    parent: Any, key: str, table: pa.Table, *, domain_max: int | None = None
) -> None:
    """Create a SOMA dataframe and write ``table``.

    Writes through a freshly opened handle: with tiledbsoma 2.3.0, writing through the handle
    ``add_new_dataframe`` returns can store enumeration (categorical) columns with empty value
    lists, and reads then fail in ``to_pandas``.
    """
    import tiledbsoma as soma

    n = table.num_rows
    schema = table.schema.remove(table.schema.get_field_index("soma_joinid"))
    hi = max(n - 1, 0) if domain_max is None else domain_max
    df = parent.add_new_dataframe(
        key, schema=schema, index_column_names=["soma_joinid"], domain=[(0, hi)]
    )
    uri = df.uri
    df.close()
    with soma.DataFrame.open(uri, "w", context=parent.context) as w:
        w.write(table)


def _obs_table(d: _Design, stats: dict[str, Any]) -> pa.Table:
    import pandas as pd
    import pyarrow as pa

    n = d.n_cells
    is_dup = d.dup_source >= 0
    src_ds = d.cell_dataset
    ds = d.datasets
    comp_idx = len(ds) - 1
    dataset_idx = np.where(is_dup, comp_idx, src_ds)
    spec_rows = ds.iloc[src_ds]  # assay etc. of the cell's source (what was measured)
    assays = spec_rows["assay"].to_numpy()
    human = d.organism == "homo_sapiens"
    donor_ids = d.donors["donor_id"].to_numpy()[d.cell_donor]
    prefix = "hs" if human else "mm"
    own = np.arange(n)
    origin = np.where(is_dup, d.dup_source, own)
    sex = np.where(d.cell_donor % 2 == 0, "female", "male")
    sex_id = np.where(sex == "female", "PATO:0000383", "PATO:0000384")
    tissue = spec_rows["tissue"].to_numpy()

    def cat(values: Any) -> pd.Categorical:
        return pd.Categorical(np.asarray(values, dtype=object))

    frame = pd.DataFrame(
        {
            "soma_joinid": own.astype(np.int64),
            "dataset_id": cat(ds["dataset_id"].to_numpy()[dataset_idx]),
            "assay": cat(assays),
            "assay_ontology_term_id": cat([_ASSAYS[a][0] for a in assays]),
            "cell_type": cat(np.asarray(d.type_names, dtype=object)[d.cell_type]),
            "cell_type_ontology_term_id": cat(np.asarray(d.type_ids, dtype=object)[d.cell_type]),
            "development_stage": cat(np.full(n, "adult stage" if not human else "adult")),
            "development_stage_ontology_term_id": cat(
                np.full(n, "HsapDv:0000258" if human else "MmusDv:0000110")
            ),
            "disease": cat(np.full(n, "normal")),
            "disease_ontology_term_id": cat(np.full(n, "PATO:0000461")),
            "donor_id": cat(donor_ids),
            "is_primary_data": ~is_dup,
            "observation_joinid": np.array([f"{prefix}-obs-{i:09d}" for i in origin], dtype=object),
            "self_reported_ethnicity": cat(np.full(n, "unknown" if human else "na")),
            "self_reported_ethnicity_ontology_term_id": cat(
                np.full(n, "unknown" if human else "na")
            ),
            "sex": cat(sex),
            "sex_ontology_term_id": cat(sex_id),
            "suspension_type": cat(spec_rows["suspension_type"].to_numpy()),
            "tissue": cat(tissue),
            "tissue_ontology_term_id": cat([_TISSUES[t] for t in tissue]),
            "tissue_general": cat(tissue),
            "tissue_general_ontology_term_id": cat([_TISSUES[t] for t in tissue]),
            "tissue_type": cat(np.full(n, "tissue")),
            "raw_sum": stats["raw_sum"].astype(np.float32),
            "nnz": stats["nnz"].astype(np.int64),
            "raw_mean_nnz": stats["raw_mean_nnz"].astype(np.float32),
            "raw_variance_nnz": stats["raw_variance_nnz"].astype(np.float32),
            "n_measured_vars": d.measured[src_ds].sum(axis=1).astype(np.int64),
        }
    )
    return pa.Table.from_pandas(frame, preserve_index=False)


def _var_table(d: _Design, var_nnz: npt.NDArray[np.int64]) -> pa.Table:
    import pyarrow as pa

    # n_measured_obs: cells whose (source) dataset measures the gene
    per_ds = np.bincount(d.cell_dataset, minlength=len(d.datasets))
    n_measured_obs = (per_ds[:, None] * d.measured).sum(axis=0).astype(np.int64)
    return pa.table(
        {
            "soma_joinid": pa.array(np.arange(d.n_genes, dtype=np.int64)),
            "feature_id": pa.array(d.gene_ids, type=pa.large_string()),
            "feature_name": pa.array(d.gene_names, type=pa.large_string()),
            "feature_length": pa.array(d.gene_lengths, type=pa.int64()),
            "nnz": pa.array(var_nnz.astype(np.int64)),
            "n_measured_obs": pa.array(n_measured_obs),
        }
    )


def _write_experiment(
    census_data: soma.Collection, d: _Design, seed: int, nnz_min: int, *, ds_offset: int, n_ds: int
) -> OrganismSummary:
    """Write one organism; presence-matrix rows are census_info/datasets soma_joinids."""
    import pyarrow as pa
    import tiledbsoma as soma

    exp = census_data.add_new_collection(d.organism, soma.Experiment)
    ms = exp.add_new_collection("ms")
    rna = ms.add_new_collection(MEASUREMENT, soma.Measurement)
    xcoll = rna.add_new_collection("X")
    x = xcoll.add_new_sparse_ndarray(X_RAW, type=pa.float32(), shape=(d.n_cells, d.n_genes))

    nnz = np.zeros(d.n_cells, dtype=np.int64)
    raw_sum = np.zeros(d.n_cells, dtype=np.float64)
    sq_sum = np.zeros(d.n_cells, dtype=np.float64)
    var_nnz = np.zeros(d.n_genes, dtype=np.int64)
    presence = np.zeros((len(d.datasets), d.n_genes), dtype=bool)
    buf_r: list[np.ndarray] = []
    buf_c: list[np.ndarray] = []
    buf_v: list[np.ndarray] = []
    buffered = 0

    def flush() -> None:
        nonlocal buffered
        if not buf_r:
            return
        table = pa.table(
            {
                "soma_dim_0": np.concatenate(buf_r),
                "soma_dim_1": np.concatenate(buf_c),
                "soma_data": np.concatenate(buf_v),
            }
        )
        x.write(table)
        buf_r.clear()
        buf_c.clear()
        buf_v.clear()
        buffered = 0

    is_dup = d.dup_source >= 0
    comp_idx = len(d.datasets) - 1
    obs_ds = np.where(is_dup, comp_idx, d.cell_dataset)

    def block(start: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
        stop = min(start + BLOCK_CELLS, d.n_cells)
        counts = _block_counts(d, start, stop, seed)
        r, c = np.nonzero(counts)
        return start, stop, r, c, counts[r, c]

    starts = range(0, d.n_cells, BLOCK_CELLS)
    # numpy's samplers release the GIL: two blocks in flight use both cores; results arrive in
    # order, so the output does not depend on the thread timing.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[Future[Any]] = deque()
        it = iter(starts)
        for _ in track(starts, description=f"{d.organism} X", total=len(starts)):
            while len(pending) < 3 and (nxt := next(it, None)) is not None:
                pending.append(pool.submit(block, nxt))
            start, stop, r, c, v = pending.popleft().result()
            rows = r.astype(np.int64) + start
            nnz[start:stop] = np.bincount(r, minlength=stop - start)
            raw_sum[start:stop] = np.bincount(r, weights=v, minlength=stop - start)
            sq_sum[start:stop] = np.bincount(
                r, weights=v.astype(np.float64) ** 2, minlength=stop - start
            )
            var_nnz += np.bincount(c, minlength=d.n_genes)
            presence[obs_ds[rows], c] = True
            buf_r.append(rows)
            buf_c.append(c.astype(np.int64))
            buf_v.append(v)
            buffered += len(v)
            if buffered >= _WRITE_NNZ:
                flush()
    flush()
    x.close()

    with np.errstate(invalid="ignore", divide="ignore"):
        mean_nnz = np.where(nnz > 0, raw_sum / np.maximum(nnz, 1), 0.0)
        var_nnz_cell = np.where(nnz > 1, (sq_sum - nnz * mean_nnz**2) / np.maximum(nnz - 1, 1), 0.0)
    stats = {
        "nnz": nnz,
        "raw_sum": raw_sum,
        "raw_mean_nnz": mean_nnz,
        "raw_variance_nnz": np.maximum(var_nnz_cell, 0.0),
    }
    _create_dataframe(exp, "obs", _obs_table(d, stats))
    _create_dataframe(rna, "var", _var_table(d, var_nnz))

    pr, pc = np.nonzero(presence)
    pr = pr + ds_offset  # the datasets table is shared by both organisms
    pm = rna.add_new_sparse_ndarray(
        "feature_dataset_presence_matrix", type=pa.bool_(), shape=(n_ds, d.n_genes)
    )
    if len(pr):
        pm.write(
            pa.table(
                {
                    "soma_dim_0": pr.astype(np.int64),
                    "soma_dim_1": pc.astype(np.int64),
                    "soma_data": np.ones(len(pr), dtype=bool),
                }
            )
        )
    pm.close()

    primary = ~is_dup
    return OrganismSummary(
        organism=d.organism,
        n_cells=d.n_cells,
        n_genes=d.n_genes,
        n_primary=int(primary.sum()),
        n_low_nnz=int((nnz < nnz_min).sum()),
        n_datasets=len(d.datasets),
        n_cell_types=len(np.unique(d.cell_type)),
        model_cells=np.flatnonzero(primary & (nnz >= nnz_min)).astype(np.int64),
    )


def _census_info(census: soma.Collection, designs: list[_Design], seed: int) -> None:
    import pyarrow as pa

    info = census.add_new_collection(CENSUS_INFO)
    total = sum(d.n_cells for d in designs)
    unique = sum(int((d.dup_source < 0).sum()) for d in designs)
    labels = [
        ("census_schema_version", "2.1.0"),
        ("census_build_date", _dt.date.today().isoformat()),
        ("dataset_schema_version", "5.2.0"),
        ("total_cell_count", str(total)),
        ("unique_cell_count", str(unique)),
        ("number_donors_homo_sapiens", str(len(designs[0].donors))),
        ("census_scvi_mini_census_seed", str(seed)),
    ]
    _create_dataframe(
        info,
        "summary",
        pa.table(
            {
                "soma_joinid": np.arange(len(labels), dtype=np.int64),
                "label": pa.array([k for k, _ in labels], type=pa.large_string()),
                "value": pa.array([v for _, v in labels], type=pa.large_string()),
            }
        ),
    )
    rows: list[dict[str, Any]] = []
    counts_rows: list[dict[str, Any]] = []
    for d in designs:
        is_dup = d.dup_source >= 0
        obs_ds = np.where(is_dup, len(d.datasets) - 1, d.cell_dataset)
        for di, ds in d.datasets.iterrows():
            dsid = ds["dataset_id"]
            rows.append(
                {
                    "citation": f"Synthetic mini census (census-scvi), seed {seed}",
                    "collection_id": f"collection-{dsid}",
                    "collection_name": f"Mini census collection {dsid}",
                    "collection_doi": "",
                    "collection_doi_label": "",
                    "dataset_id": dsid,
                    "dataset_version_id": f"{dsid}-v1",
                    "dataset_title": f"Synthetic {ds['assay'] or 'compilation'} "
                    f"{ds['suspension_type']} dataset {dsid}".replace("  ", " "),
                    "dataset_h5ad_path": f"{dsid}.h5ad",
                    "dataset_total_cell_count": int((obs_ds == int(str(di))).sum()),
                }
            )
        for ti, name in enumerate(d.type_names):
            sel = d.cell_type == ti
            counts_rows.append(
                {
                    "organism": d.organism.replace("_", " ").capitalize(),
                    "category": "cell_type",
                    "label": name,
                    "ontology_term_id": d.type_ids[ti],
                    "total_cell_count": int(sel.sum()),
                    "unique_cell_count": int((sel & ~is_dup).sum()),
                }
            )
    import pandas as pd

    ds_df = pd.DataFrame(rows)
    ds_df.insert(0, "soma_joinid", np.arange(len(ds_df), dtype=np.int64))
    _create_dataframe(info, "datasets", pa.Table.from_pandas(ds_df, preserve_index=False))
    cc = pd.DataFrame(counts_rows)
    cc.insert(0, "soma_joinid", np.arange(len(cc), dtype=np.int64))
    _create_dataframe(info, "summary_cell_counts", pa.Table.from_pandas(cc, preserve_index=False))
    org = pd.DataFrame(
        {
            "soma_joinid": np.arange(len(designs), dtype=np.int64),
            "organism_ontology_term_id": [
                "NCBITaxon:9606" if d.organism == "homo_sapiens" else "NCBITaxon:10090"
                for d in designs
            ],
            "organism_label": [d.organism.replace("_", " ").capitalize() for d in designs],
            "organism": [d.organism for d in designs],
        }
    )
    _create_dataframe(info, "organisms", pa.Table.from_pandas(org, preserve_index=False))


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
    import tiledbsoma as soma

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
        _design("homo_sapiens", n_cells, n_genes, seed),
        _design("mus_musculus", max(n_cells // 10, 200), max(n_genes // 2, 100), seed),
    ]
    summaries: dict[str, OrganismSummary] = {}
    with atomic_path(path) as tmp:
        census: Any
        with soma.Collection.create(str(tmp)) as census:
            census.metadata["census_scvi_mini_census"] = f"seed={seed}"
            _census_info(census, designs, seed)
            data = census.add_new_collection(CENSUS_DATA)
            n_ds = sum(len(d.datasets) for d in designs)
            offset = 0
            for d in designs:
                logger.info("writing %s: %d cells x %d genes", d.organism, d.n_cells, d.n_genes)
                summaries[d.organism] = _write_experiment(
                    data, d, seed, NNZ_MIN, ds_offset=offset, n_ds=n_ds
                )
                offset += len(d.datasets)
    return MiniCensusResult(
        path=path, seed=seed, organisms=summaries, seconds=time.perf_counter() - t0
    )
