"""The mini census's generative model: per-organism design (in memory) and per-block counts.

Splatter-style: gamma gene means with high-expression outliers; a cell-type hierarchy (classes,
then subtypes) with differentially expressed genes at each level; gene-wise multiplicative batch
effects by assay, dataset and donor (and nucleus vs cell); log-normal library sizes by assay;
negative-binomial (gamma-Poisson) noise. About 10% of each block's cells are non-primary copies
of other cells of the block, and a few percent are low quality (small libraries, nnz < 300).

Determinism: the design draws from one stream seeded by ``(seed, organism)``, in a fixed order (the
step functions below are called in the order they draw); the counts of block ``start`` draw from
their own stream ``(seed, organism, start)``, so the output is identical for a seed whatever the
write batching or thread timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd

__all__ = ["ASSAYS", "BLOCK_CELLS", "NNZ_MIN", "TISSUES", "Design", "block_counts", "design"]

BLOCK_CELLS = 2048  # cells per seeded generation block (fixed: part of the determinism contract)
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
ASSAYS = {
    "10x 3' v2": ("EFO:0009899", np.log(2500.0), 0.45),
    "10x 3' v3": ("EFO:0009922", np.log(6000.0), 0.45),
    "10x 5' v1": ("EFO:0011025", np.log(4000.0), 0.45),
    "Smart-seq2": ("EFO:0008931", np.log(9000.0), 0.55),
}

# primary datasets: assay, suspension type, donors, tissue
_Spec = list[tuple[str, str, int, str]]
_HUMAN_DATASETS: _Spec = [
    ("10x 3' v3", "cell", 3, "blood"),
    ("10x 3' v3", "nucleus", 3, "blood"),
    ("10x 3' v2", "cell", 2, "blood"),
    ("10x 5' v1", "cell", 3, "lung"),
    ("Smart-seq2", "cell", 2, "blood"),
    ("10x 3' v2", "nucleus", 2, "lung"),
    ("10x 3' v3", "cell", 4, "blood"),
]
_MOUSE_DATASETS: _Spec = [
    ("10x 3' v3", "cell", 2, "blood"),
    ("10x 3' v2", "nucleus", 2, "blood"),
    ("Smart-seq2", "cell", 2, "lung"),
]
TISSUES = {"blood": "UBERON:0000178", "lung": "UBERON:0002048"}
_NON_PRIMARY_FRACTION = 0.10
_LOW_QUALITY_FRACTION = 0.03
_UNMEASURED_FRACTION = 0.05  # of genes, in the dataset that lacks some


@dataclass
class Design:
    """Per-cell metadata and per-gene parameters for one organism (held in memory)."""

    organism: str
    n_cells: int
    n_genes: int
    gene_ids: list[str]
    gene_names: list[str]
    gene_lengths: npt.NDArray[np.int64]
    datasets: pd.DataFrame  # one row per dataset; the last is the non-primary compilation
    donors: pd.DataFrame  # one row per donor: dataset index, donor_id
    combo_props: npt.NDArray[np.float32]  # (n_types * n_donors, genes), rows sum to 1
    dispersion: npt.NDArray[np.float32]  # NB dispersion per gene
    measured: npt.NDArray[np.bool_]  # (n_datasets, genes)
    # per cell
    cell_dataset: npt.NDArray[np.int32]  # the source dataset (duplicates: their source cell's)
    cell_donor: npt.NDArray[np.int32]
    cell_type: npt.NDArray[np.int32]
    log_lib: npt.NDArray[np.float32]
    dup_source: npt.NDArray[np.int64]  # -1 for primary cells, else the source cell's row
    type_names: list[str]
    type_ids: list[str]

    @property
    def human(self) -> bool:
        return self.organism == "homo_sapiens"

    @property
    def is_dup(self) -> npt.NDArray[np.bool_]:
        return self.dup_source >= 0

    @property
    def obs_dataset(self) -> npt.NDArray[np.intp]:
        """The dataset row each cell is stored under (duplicates: the compilation)."""
        return np.where(self.is_dup, len(self.datasets) - 1, self.cell_dataset)


def design(organism: str, n_cells: int, n_genes: int, seed: int) -> Design:
    """Draw one organism's design (genes, datasets, donors, every cell's metadata)."""
    rng = np.random.default_rng([seed, 0 if organism == "homo_sapiens" else 1])
    human = organism == "homo_sapiens"
    spec = _HUMAN_DATASETS if human else _MOUSE_DATASETS
    gene_ids, gene_names, gene_lengths, base = _genes(rng, n_genes, human=human)
    type_names, type_ids, type_class = _cell_type_table()
    type_means = _type_means(rng, base, type_class, n_types=len(type_names))
    datasets, donors = _dataset_tables(spec, human=human)
    combo = _batch_profiles(rng, spec, donors, type_means)
    measured = _measured(rng, n_datasets=len(datasets), n_primary=len(spec), n_genes=n_genes)
    combo_measured = _mask_unmeasured(combo, measured, donors, n_types=len(type_names))
    # dispersion: higher for lowly expressed genes (biological coefficient of variation)
    bcv = 0.25 + 0.6 / np.sqrt(1.0 + base)
    cell_dataset, cell_type, cell_donor, log_lib = _cells(
        rng, spec, donors, n_cells, n_types=len(type_names)
    )
    dup_source = _duplicates(rng, n_cells)
    # a duplicate is the same cell (same donor, type, counts) seen in the compilation dataset
    is_dup = dup_source >= 0
    src = dup_source[is_dup]
    cell_type[is_dup] = cell_type[src]
    cell_donor[is_dup] = cell_donor[src]
    log_lib[is_dup] = log_lib[src]
    return Design(
        organism=organism,
        n_cells=n_cells,
        n_genes=n_genes,
        gene_ids=gene_ids,
        gene_names=gene_names,
        gene_lengths=gene_lengths,
        datasets=datasets,
        donors=donors,
        combo_props=combo_measured.astype(np.float32),
        dispersion=(bcv**2).astype(np.float32),
        measured=measured,
        cell_dataset=cell_dataset,
        cell_donor=cell_donor,
        cell_type=cell_type,
        log_lib=log_lib,
        dup_source=dup_source,
        type_names=type_names,
        type_ids=type_ids,
    )


# ------------------------------------------------------------------------------------------
# design steps, in the order they draw from the design stream
# ------------------------------------------------------------------------------------------
def _genes(
    rng: np.random.Generator, n_genes: int, *, human: bool
) -> tuple[list[str], list[str], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Ids, names, lengths and base means (gamma, a few high-expression outliers: Splatter)."""
    prefix = "ENSG" if human else "ENSMUSG"
    gene_ids = [f"{prefix}{i + 1:011d}" for i in range(n_genes)]
    gene_names = [f"{'GENE' if human else 'Gene'}{i + 1}" for i in range(n_genes)]
    gene_lengths = rng.integers(400, 6000, n_genes).astype(np.int64)
    base = rng.gamma(0.6, 1.0 / 0.3, n_genes)
    outliers = rng.random(n_genes) < 0.02
    base[outliers] *= rng.lognormal(1.5, 0.5, outliers.sum())
    return gene_ids, gene_names, gene_lengths, base


def _cell_type_table() -> tuple[list[str], list[str], list[int]]:
    """Cell type names, CL ids and class index, flattened from the hierarchy."""
    names, ids, classes = [], [], []
    for ci, (_, types) in enumerate(_CELL_TYPES):
        for name, cl in types:
            names.append(name)
            ids.append(cl)
            classes.append(ci)
    return names, ids, classes


def _de_factors(
    rng: np.random.Generator, n: int, n_genes: int, prob: float, loc: float, scale: float
) -> npt.NDArray[np.float64]:
    """(n, genes) fold changes: a ``prob`` fraction log-normal, half of them down."""
    f = np.ones((n, n_genes))
    hit = rng.random((n, n_genes)) < prob
    mag = rng.lognormal(loc, scale, (n, n_genes))
    down = rng.random((n, n_genes)) < 0.5
    mag = np.where(down, 1.0 / mag, mag)
    f[hit] = mag[hit]
    return f


def _type_means(
    rng: np.random.Generator, base: npt.NDArray[np.float64], type_class: list[int], *, n_types: int
) -> npt.NDArray[np.float64]:
    """(n_types, genes) means: class DE, then subtype DE on top."""
    n_genes = len(base)
    class_f = _de_factors(rng, len(_CELL_TYPES), n_genes, 0.10, 0.9, 0.4)
    sub_f = _de_factors(rng, n_types, n_genes, 0.05, 0.7, 0.3)
    return base[None, :] * class_f[type_class] * sub_f


def _dataset_tables(spec: _Spec, *, human: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per dataset (primary ones, then the compilation) and one per donor (no draws)."""
    import pandas as pd

    tag = "hs" if human else "mm"
    rows, donor_rows = [], []
    for di, (assay, susp, n_donors, tissue) in enumerate(spec):
        ds_id = f"{tag}-dataset-{di:02d}"
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
        donor_rows += [{"dataset": di, "donor_id": f"{ds_id}-donor-{k}"} for k in range(n_donors)]
    rows.append(
        {
            "dataset_id": f"{tag}-compilation",
            "assay": "",
            "suspension_type": "",
            "tissue": "",
            "n_donors": 0,
            "primary": False,
        }
    )
    return pd.DataFrame(rows), pd.DataFrame(donor_rows)


def _batch_profiles(
    rng: np.random.Generator,
    spec: _Spec,
    donors: pd.DataFrame,
    type_means: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """(n_types * n_donors, genes) expression profiles with gene-wise batch effects, rows sum to 1.

    Effects by assay, dataset and donor, and a nucleus effect on 15% of the genes.
    """
    n_types, n_genes = type_means.shape
    assay_f = {a: rng.lognormal(0.0, 0.35, n_genes) for a in ASSAYS}
    nucleus_f = np.where(rng.random(n_genes) < 0.15, rng.lognormal(-0.8, 0.3, n_genes), 1.0)
    ds_f = rng.lognormal(0.0, 0.25, (len(spec), n_genes))
    donor_f = rng.lognormal(0.0, 0.1, (len(donors), n_genes))
    combo = np.empty((n_types * len(donors), n_genes), dtype=np.float64)
    for d, di in enumerate(donors["dataset"].to_numpy().astype(int)):
        assay, susp = spec[di][0], spec[di][1]
        batch = assay_f[assay] * ds_f[di] * donor_f[d]
        if susp == "nucleus":
            batch = batch * nucleus_f
        combo[d * n_types : (d + 1) * n_types] = type_means * batch[None, :]
    combo /= combo.sum(axis=1, keepdims=True)
    return combo


def _measured(
    rng: np.random.Generator, *, n_datasets: int, n_primary: int, n_genes: int
) -> npt.NDArray[np.bool_]:
    """(datasets, genes): one dataset does not measure ~5% of the genes."""
    measured = np.ones((n_datasets, n_genes), dtype=bool)
    lacking = n_primary - 2 if n_primary > 2 else 0
    measured[lacking, rng.random(n_genes) < _UNMEASURED_FRACTION] = False
    return measured


def _mask_unmeasured(
    combo: npt.NDArray[np.float64],
    measured: npt.NDArray[np.bool_],
    donors: pd.DataFrame,
    *,
    n_types: int,
) -> npt.NDArray[np.float64]:
    """The profiles with each donor's dataset's unmeasured genes at zero, renormalised (no draws)."""
    out = combo.copy()
    for d, di in enumerate(donors["dataset"].to_numpy().astype(int)):
        out[d * n_types : (d + 1) * n_types] *= measured[di][None, :]
    out /= out.sum(axis=1, keepdims=True)
    return out


def _cells(
    rng: np.random.Generator, spec: _Spec, donors: pd.DataFrame, n_cells: int, *, n_types: int
) -> tuple[
    npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]
]:
    """Every cell's dataset, type, donor and log library size (low-quality cells: ~120 counts)."""
    n_primary = len(spec)
    comp = rng.dirichlet(np.full(n_types, 1.5), n_primary)
    ds_weight = rng.dirichlet(np.full(n_primary, 4.0))
    cell_dataset = rng.choice(n_primary, size=n_cells, p=ds_weight).astype(np.int32)
    cell_type = np.empty(n_cells, dtype=np.int32)
    cell_donor = np.empty(n_cells, dtype=np.int32)
    donor_dataset = donors["dataset"].to_numpy()
    for di in range(n_primary):
        idx = np.flatnonzero(cell_dataset == di)
        cell_type[idx] = rng.choice(n_types, size=len(idx), p=comp[di])
        cell_donor[idx] = rng.choice(np.flatnonzero(donor_dataset == di), size=len(idx))
    log_lib = np.empty(n_cells, dtype=np.float32)
    for di in range(n_primary):
        sel = cell_dataset == di
        _, mu, sd = ASSAYS[spec[di][0]]
        log_lib[sel] = rng.normal(mu, sd, sel.sum())
    low = rng.random(n_cells) < _LOW_QUALITY_FRACTION
    log_lib[low] = rng.normal(np.log(120.0), 0.4, low.sum())
    return cell_dataset, cell_type, cell_donor, log_lib


def _duplicates(rng: np.random.Generator, n_cells: int) -> npt.NDArray[np.int64]:
    """Per cell: -1, or the source row of a non-primary copy (each block's last ~10%)."""
    dup_source = np.full(n_cells, -1, dtype=np.int64)
    for start in range(0, n_cells, BLOCK_CELLS):
        stop = min(start + BLOCK_CELLS, n_cells)
        n_dup = int(round((stop - start) * _NON_PRIMARY_FRACTION))
        if n_dup == 0 or stop - start - n_dup < 1:
            continue
        dups = np.arange(stop - n_dup, stop)
        dup_source[dups] = rng.integers(start, stop - n_dup, n_dup)
    return dup_source


# ------------------------------------------------------------------------------------------
# counts
# ------------------------------------------------------------------------------------------
def block_counts(d: Design, start: int, stop: int, seed: int) -> npt.NDArray[np.float32]:
    """Dense counts for cells [start, stop): NB(mu, dispersion) with duplicates copied."""
    rng = np.random.default_rng([seed, 7 if d.human else 8, start])
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
