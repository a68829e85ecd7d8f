"""The mini census's generative model: per-organism design and per-block cells.

Splatter-style: gene means with high-expression outliers; a cell-type hierarchy (classes, then
subtypes) with differentially expressed genes at each level; gene-wise multiplicative batch
effects by assay, dataset and donor (and nucleus vs cell); log-normal library sizes by assay;
negative-binomial counts (:mod:`census_scvi.demo._sample`). About 10% of each block's cells are
non-primary copies of other cells of the block, and a few percent are low quality (small
libraries, nnz < 300).

Two shapes (:data:`SHAPES`): ``default`` (gamma gene means; at 2,000 genes ~1,000 non-zeros per
cell, every gene sampled densely) and ``census`` (log-normal gene means spanning orders of
magnitude as in real data: at 20,000 genes ~1,500-2,500 non-zeros per cell, so 8,000 HVGs make
sense; the 256 most expressed genes are sampled densely, the rest sparsely).

Determinism: the design (genes, datasets, profiles: nothing per cell) draws from one stream seeded
by ``(seed, organism)`` in a fixed order (the step functions below are called in the order they
draw). Block ``b`` (cells ``[b * BLOCK_CELLS, (b + 1) * BLOCK_CELLS)``) draws its cells' metadata
from the stream ``(seed, organism, b, 0)`` and its counts from ``(seed, organism, b, 1)``, so the
census is a function of the seed alone: identical whatever the number of writer processes or the
order blocks are written in, and memory is bounded by one block, not by the cell count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np

from census_scvi.demo._alias import alias_rows

if TYPE_CHECKING:
    import numpy.typing as npt
    import pandas as pd

__all__ = [
    "ASSAYS",
    "BLOCK_CELLS",
    "NNZ_MIN",
    "SHAPES",
    "TISSUES",
    "Cells",
    "Design",
    "Shape",
    "SparseTables",
    "block_cells",
    "block_rng",
    "design",
]

BLOCK_CELLS = 2048  # cells per seeded block (fixed: part of the determinism contract; = X_TILE)
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


@dataclass(frozen=True)
class Shape:
    """How the counts look: the gene-mean distribution and which genes are sampled densely."""

    name: str
    gene_means: Literal["gamma", "lognormal"]
    dense_genes: int | None
    """The most expressed genes sampled densely (cells x genes); None: every gene. The others
    are sampled sparsely (cost per count, not per gene); both are exact negative binomials."""


SHAPES = {
    "default": Shape("default", "gamma", None),
    "census": Shape("census", "lognormal", 256),
}
ShapeName = Literal["default", "census"]


@dataclass
class Design:
    """One organism's genes, datasets, donors and expression profiles (nothing per cell)."""

    organism: str
    n_cells: int
    n_genes: int
    shape: Shape
    gene_ids: list[str]
    gene_names: list[str]
    gene_lengths: npt.NDArray[np.int64]
    datasets: pd.DataFrame  # one row per dataset; the last is the non-primary compilation
    donors: pd.DataFrame  # one row per donor: dataset index, donor_id
    combo_props: npt.NDArray[np.float32]  # (n_types * n_donors, genes), rows sum to 1
    dispersion: npt.NDArray[np.float32]  # NB dispersion per gene
    measured: npt.NDArray[np.bool_]  # (n_datasets, genes)
    composition: npt.NDArray[np.float64]  # (n_primary datasets, n_types) cell-type proportions
    dataset_weight: npt.NDArray[np.float64]  # (n_primary datasets,) share of the cells
    type_names: list[str]
    type_ids: list[str]
    dense: npt.NDArray[np.int64] = field(repr=False)
    """Genes sampled densely (ascending); the others are sampled sparsely."""

    @property
    def human(self) -> bool:
        return self.organism == "homo_sapiens"

    @property
    def n_types(self) -> int:
        return len(self.type_names)

    @property
    def n_blocks(self) -> int:
        return -(-self.n_cells // BLOCK_CELLS)

    @property
    def code(self) -> int:
        """The organism's number in the random streams."""
        return 0 if self.human else 1

    @cached_property
    def sparse(self) -> npt.NDArray[np.int64]:
        """Genes sampled sparsely (ascending)."""
        return np.setdiff1d(np.arange(self.n_genes), self.dense)

    @cached_property
    def dense_props(self) -> npt.NDArray[np.float32]:
        """``combo_props`` of the dense genes (profiles x dense genes)."""
        if len(self.dense) == self.n_genes:
            return self.combo_props
        return np.ascontiguousarray(self.combo_props[:, self.dense])

    @cached_property
    def sparse_props(self) -> npt.NDArray[np.float32]:
        """``combo_props`` of the sparse genes (profiles x sparse genes)."""
        return np.ascontiguousarray(self.combo_props[:, self.sparse])

    @cached_property
    def sparse_tables(self) -> SparseTables:
        """Per profile: the sparse genes' alias tables, cluster-size bases and total share."""
        props = self.sparse_props.astype(np.float64)
        accept, alias = alias_rows(props)
        xbase = self.dispersion[self.sparse][None, :] * self.sparse_props
        return SparseTables(accept, alias, xbase, props.sum(axis=1))

    @cached_property
    def n_measured(self) -> npt.NDArray[np.int64]:
        """Genes each dataset measures (obs ``n_measured_vars`` of its cells)."""
        return self.measured.sum(axis=1).astype(np.int64)


@dataclass(frozen=True)
class SparseTables:
    """What sampling the sparse genes needs per profile (rows of ``sparse_props``); ~45 MB for a
    census-shape design (190 profiles x 19,744 genes)."""

    accept: npt.NDArray[np.float32]  # alias tables over the sparse genes (demo._alias)
    alias: npt.NDArray[np.int32]
    xbase: npt.NDArray[np.float32]  # dispersion x proportion: x = phi mu = xbase x library
    share: npt.NDArray[np.float64]  # the sparse genes' total proportion


@dataclass
class Cells:
    """The cells of one block: metadata drawn from the block's own stream."""

    start: int
    dataset: npt.NDArray[np.int32]  # the source dataset (duplicates: their source cell's)
    donor: npt.NDArray[np.int32]
    cell_type: npt.NDArray[np.int32]
    log_lib: npt.NDArray[np.float32]
    dup_source: npt.NDArray[np.int64]  # -1 for primary cells, else the source's row in the block

    @property
    def n(self) -> int:
        return len(self.dataset)

    @property
    def stop(self) -> int:
        return self.start + self.n

    @property
    def is_dup(self) -> npt.NDArray[np.bool_]:
        return self.dup_source >= 0

    def obs_dataset(self, d: Design) -> npt.NDArray[np.intp]:
        """The dataset row each cell is stored under (duplicates: the compilation)."""
        return np.where(self.is_dup, len(d.datasets) - 1, self.dataset)

    def combo(self, d: Design) -> npt.NDArray[np.int64]:
        """Each cell's expression profile: row of ``d.combo_props``."""
        return self.donor.astype(np.int64) * d.n_types + self.cell_type


def block_rng(d: Design, block: int, seed: int, stream: int) -> np.random.Generator:
    """The random stream of one block: 0 for its cells' metadata, 1 for its counts."""
    return np.random.default_rng([seed, d.code, block, stream])


def design(organism: str, n_cells: int, n_genes: int, seed: int, shape: Shape) -> Design:
    """Draw one organism's design (genes, datasets, donors, profiles, cell-type composition)."""
    rng = np.random.default_rng([seed, 0 if organism == "homo_sapiens" else 1])
    human = organism == "homo_sapiens"
    spec = _HUMAN_DATASETS if human else _MOUSE_DATASETS
    gene_ids, gene_names, gene_lengths, base = _genes(rng, n_genes, human=human, shape=shape)
    type_names, type_ids, type_class = _cell_type_table()
    type_means = _type_means(rng, base, type_class, n_types=len(type_names))
    datasets, donors = _dataset_tables(spec, human=human)
    combo = _batch_profiles(rng, spec, donors, type_means)
    measured = _measured(rng, n_datasets=len(datasets), n_primary=len(spec), n_genes=n_genes)
    combo_measured = _mask_unmeasured(combo, measured, donors, n_types=len(type_names))
    # dispersion: higher for lowly expressed genes (biological coefficient of variation)
    bcv = 0.25 + 0.6 / np.sqrt(1.0 + base)
    composition = rng.dirichlet(np.full(len(type_names), 1.5), len(spec))
    dataset_weight = rng.dirichlet(np.full(len(spec), 4.0))
    return Design(
        organism=organism,
        n_cells=n_cells,
        n_genes=n_genes,
        shape=shape,
        gene_ids=gene_ids,
        gene_names=gene_names,
        gene_lengths=gene_lengths,
        datasets=datasets,
        donors=donors,
        combo_props=combo_measured.astype(np.float32),
        dispersion=(bcv**2).astype(np.float32),
        measured=measured,
        composition=composition,
        dataset_weight=dataset_weight,
        type_names=type_names,
        type_ids=type_ids,
        dense=_dense_genes(combo_measured, shape.dense_genes),
    )


# ------------------------------------------------------------------------------------------
# design steps, in the order they draw from the design stream
# ------------------------------------------------------------------------------------------
def _genes(
    rng: np.random.Generator, n_genes: int, *, human: bool, shape: Shape
) -> tuple[list[str], list[str], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Ids, names, lengths and base means, with a few high-expression outliers (Splatter).

    ``gamma``: Splatter's gamma(0.6, 1/0.3); ``lognormal``: log-normal with sd 2 (real gene means
    span several orders of magnitude, so most genes are rarely detected, as in the Census).
    """
    prefix = "ENSG" if human else "ENSMUSG"
    gene_ids = [f"{prefix}{i + 1:011d}" for i in range(n_genes)]
    gene_names = [f"{'GENE' if human else 'Gene'}{i + 1}" for i in range(n_genes)]
    gene_lengths = rng.integers(400, 6000, n_genes).astype(np.int64)
    if shape.gene_means == "gamma":
        base = rng.gamma(0.6, 1.0 / 0.3, n_genes)
    else:
        base = rng.lognormal(0.0, 2.0, n_genes)
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


def _dense_genes(combo: npt.NDArray[np.float64], n_dense: int | None) -> npt.NDArray[np.int64]:
    """The ``n_dense`` genes with the highest expression in any profile (no draws)."""
    n_genes = combo.shape[1]
    if n_dense is None or n_dense >= n_genes:
        return np.arange(n_genes, dtype=np.int64)
    top = np.argsort(-combo.max(axis=0), kind="stable")[:n_dense]
    return np.sort(top).astype(np.int64)


# ------------------------------------------------------------------------------------------
# one block's cells, from the block's own stream
# ------------------------------------------------------------------------------------------
def block_cells(d: Design, block: int, seed: int) -> Cells:
    """Cells ``[block * BLOCK_CELLS, ...)``: dataset, type, donor, library size, duplicates.

    The last ~10% of the block are non-primary copies of earlier cells of the block (same donor,
    type, library and counts, stored under the compilation dataset); ~3% are low quality (~120
    counts).
    """
    rng = block_rng(d, block, seed, 0)
    start = block * BLOCK_CELLS
    n = min(BLOCK_CELLS, d.n_cells - start)
    spec = _HUMAN_DATASETS if d.human else _MOUSE_DATASETS
    dataset = rng.choice(len(spec), size=n, p=d.dataset_weight).astype(np.int32)
    cell_type = np.empty(n, dtype=np.int32)
    donor = np.empty(n, dtype=np.int32)
    log_lib = np.empty(n, dtype=np.float32)
    donor_dataset = d.donors["dataset"].to_numpy()
    for di in range(len(spec)):
        idx = np.flatnonzero(dataset == di)
        cell_type[idx] = rng.choice(d.n_types, size=len(idx), p=d.composition[di])
        donor[idx] = rng.choice(np.flatnonzero(donor_dataset == di), size=len(idx))
        _, mu, sd = ASSAYS[spec[di][0]]
        log_lib[idx] = rng.normal(mu, sd, len(idx))
    low = rng.random(n) < _LOW_QUALITY_FRACTION
    log_lib[low] = rng.normal(np.log(120.0), 0.4, low.sum())
    dup_source = np.full(n, -1, dtype=np.int64)
    n_dup = int(round(n * _NON_PRIMARY_FRACTION))
    if 0 < n_dup < n:
        dups = np.arange(n - n_dup, n)
        dup_source[dups] = src = rng.integers(0, n - n_dup, n_dup)
        # a duplicate is the same cell (same donor, type, counts) seen in the compilation
        dataset[dups], cell_type[dups] = dataset[src], cell_type[src]
        donor[dups], log_lib[dups] = donor[src], log_lib[src]
    return Cells(start, dataset, donor, cell_type, log_lib, dup_source)
